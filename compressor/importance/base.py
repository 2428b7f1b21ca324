"""What every importance estimator shares: the result type, the config, and the hooks that read
or skip decoder layers of any Hugging Face family. The probe data and the loss are
`compressor.fisher`'s (`ProbeSet`, `last_item_loss`), the one home of what Fisher reads."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from transformers import PreTrainedModel

from compressor.modeling import decoder_parts

# Cheap estimators first; `hybrid` last because it combines the others. `ablation_greedy`
# (O(L^2) validation passes) runs only when asked for.
DEFAULT_METHODS = ("fisher", "gradient", "attention", "block_influence", "angular", "ablation", "hybrid")
ALL_METHODS = (*DEFAULT_METHODS, "ablation_greedy")


@dataclass
class LayerScores:
    """One estimator's verdict: `scores[l]` per decoder layer (higher = more important) and the
    same normalised to `weights` summing to 1 (negative scores count as 0)."""

    method: str
    scores: list[float]
    weights: list[float]
    seconds: float
    samples: int
    detail: dict = field(default_factory=dict)

    def __post_init__(self):
        self.weights = [float(w) for w in self.weights]

    def to_json(self) -> dict:
        return {"scores": self.scores, "weights": self.weights, "seconds": self.seconds,
                "samples": self.samples, "detail": self.detail}


# Old field names of FisherOptions. The paper calls these β, δ and γ, but `distill.beta` and
# `distill.gamma` are loss weights and `distill.depth_bias` a strength: the same names meant
# different things, so the importance side now says what each one is.
RENAMED_FISHER_OPTIONS = {"depth_bias": "use_depth_bias", "beta": "depth_beta", "delta": "depth_delta",
                          "gamma": "weight_scale"}


class FisherOptions(BaseModel):
    """FISHER-LD eq. 3-6: diagonal empirical Fisher, w_l = tr(F_l)/sum tr(F) * weight_scale, and
    the optional depth bias w_l * (1 + depth_beta * l/L)^depth_delta (l counted from 1)."""

    model_config = ConfigDict(extra="forbid")
    batch_size: int = Field(32, ge=1, description="histories whose per-sample gradients are computed at once "
                            "(capped by memory); the result does not depend on it")
    use_depth_bias: bool = Field(False, description="multiply layer l's score by (1 + depth_beta*l/L)^depth_delta "
                                 "(the paper's upper-layer emphasis, eq. 6)")
    depth_beta: float = Field(0.3, ge=0, description="depth-bias strength, the paper's β of eq. 6 (its best: 0.3); "
                              "not distill.beta, which weighs the KL term")
    depth_delta: float = Field(1.0, ge=0, description="depth-bias growth rate, the paper's δ of eq. 6")
    weight_scale: float = Field(1.0, gt=0, description="scale of the layer weights, the paper's γ of eq. 5 "
                                "(reported in detail as w_final); not distill.gamma, which weighs the layer term")

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, v):
        """An old name is a one-line error that gives the new one (extra="forbid" alone would not)."""
        if isinstance(v, dict) and (old := next((k for k in v if k in RENAMED_FISHER_OPTIONS), None)):
            raise ValueError(f"{old!r} was renamed {RENAMED_FISHER_OPTIONS[old]!r} (distill.beta, distill.gamma "
                             "and distill.depth_bias are other settings)")
        return v


class ImportanceConfig(BaseModel):
    """How layer importance is estimated. Data: validation histories (input = history,
    target = validation item, loss = next-item cross-entropy at the last position); never test."""

    model_config = ConfigDict(extra="forbid")
    methods: list[str] = Field(default_factory=lambda: list(DEFAULT_METHODS))
    samples: int = Field(512, ge=1, description="validation users sampled for the estimators")
    ablation_samples: int | None = Field(None, ge=1, description="users for the ablation ground truth; None = all validation users")
    batch_size: int = Field(64, ge=1)
    fisher: FisherOptions = FisherOptions()
    angular_block: int = Field(1, ge=1, description="n of the angular distance between layer l's input and layer l+n-1's output")
    hybrid: dict[str, float] = Field(
        default_factory=lambda: {"fisher": 0.5, "block_influence": 0.5},
        description="weights of the methods the hybrid adds up (each method's normalised weights)",
    )
    keep: list[int] | None = Field(None, description="layer budgets recorded in importance.json; None = 25% of depth")
    seed: int = 0
    device: str = "auto"

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, v: list[str]) -> list[str]:
        unknown = [m for m in v if m not in ALL_METHODS]
        if unknown:
            raise ValueError(f"unknown importance method {unknown[0]!r}; choose from {', '.join(ALL_METHODS)}")
        if not v:
            raise ValueError("give at least one importance method")
        return list(dict.fromkeys(v))

    @field_validator("hybrid")
    @classmethod
    def _hybrid_parts(cls, v: dict[str, float]) -> dict[str, float]:
        bad = [m for m in v if m not in ALL_METHODS or m == "hybrid"]
        if bad:
            raise ValueError(f"hybrid cannot combine {bad[0]!r}")
        if not v or any(w < 0 for w in v.values()) or sum(v.values()) <= 0:
            raise ValueError("hybrid weights must be >= 0 and not all zero")
        return v


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _hidden_in(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _hidden_out(output) -> torch.Tensor:
    # transformers 5 layers return a tensor; older/remote families return (hidden, ...) tuples.
    return output[0] if isinstance(output, tuple | list) else output


@contextlib.contextmanager
def capture_layer_io(model: PreTrainedModel) -> Iterator[list[dict]]:
    """Record each decoder layer's input and output hidden states of the next forward passes:
    yields a list (one dict per layer) whose "in"/"out" entries are overwritten by every pass."""
    layers = decoder_parts(model).layers
    records: list[dict] = [{} for _ in layers]
    handles = []
    for rec, layer in zip(records, layers, strict=True):
        def hook(module, args, kwargs, output, rec=rec):
            rec["in"], rec["out"] = _hidden_in(args, kwargs), _hidden_out(output)
        handles.append(layer.register_forward_hook(hook, with_kwargs=True))
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def skip_layers(model: PreTrainedModel, indices) -> Iterator[None]:
    """Make decoder layers `indices` pass their input through unchanged (the layer still runs,
    its output is replaced), in whatever output convention the family uses."""
    layers = decoder_parts(model).layers
    handles = []

    def hook(module, args, kwargs, output):
        h = _hidden_in(args, kwargs)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    for i in indices:
        handles.append(layers[i].register_forward_hook(hook, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def depth_bands(num_layers: int, bands: int = 3) -> list[range]:
    """Contiguous layer ranges from the bottom up, as equal as possible (30 layers: 0-9, 10-19, 20-29)."""
    return [range(int(c[0]), int(c[-1]) + 1) for c in np.array_split(np.arange(num_layers), bands) if len(c)]


def depth_shares(weights, bands: int = 3) -> list[float]:
    """Share of a method's importance weight in each `depth_bands` range: whether the lower or the
    upper layers matter more (the FISHER-LD paper's RQ2) in one number per band."""
    w = np.clip(np.asarray(weights, dtype=np.float64), 0, None)
    total = w.sum()
    return [float(w[list(r)].sum() / total) if total > 0 else 0.0 for r in depth_bands(len(w), bands)]
