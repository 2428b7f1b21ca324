"""What every importance estimator shares: the result type, the config, the probe data and the
hooks that read or skip decoder layers of any Hugging Face family."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from transformers import PreTrainedModel

from compressor.data.protocol import Split, left_pad
from compressor.data.vocab import PAD_ID
from compressor.modeling import decoder_parts, item_scores

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

    def to_json(self) -> dict:
        return {"scores": self.scores, "weights": self.weights, "seconds": self.seconds,
                "samples": self.samples, "detail": self.detail}


def normalise(scores) -> list[float]:
    """Scores -> weights summing to 1; negatives clipped to 0; all-zero -> uniform."""
    s = np.clip(np.asarray(scores, dtype=np.float64), 0, None)
    total = s.sum()
    if not np.isfinite(total) or total <= 0:
        return [1.0 / len(s)] * len(s)
    return (s / total).tolist()


class FisherOptions(BaseModel):
    """FISHER-LD eq. 3-6: diagonal empirical Fisher, w_l = tr(F_l)/sum tr(F) * gamma, and the
    optional depth bias w_l * (1 + beta * l/L)^delta (l counted from 1)."""

    model_config = ConfigDict(extra="forbid")
    batch_size: int = Field(1, ge=1, description="samples per backward pass; 1 = exact per-sample empirical Fisher")
    depth_bias: bool = Field(False, description="multiply by (1 + beta*l/L)^delta (the paper's upper-layer emphasis)")
    beta: float = Field(0.3, ge=0, description="depth-bias strength (paper's best: 0.3)")
    delta: float = Field(1.0, ge=0, description="depth-bias growth rate")
    gamma: float = Field(1.0, gt=0, description="scale of the weights (eq. 5); reported in detail as w_final")


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


@dataclass
class ProbeSet:
    """Validation users as left-padded tensors: the data every estimator reads."""

    ids: torch.Tensor  # (N, T) item tokens, left-padded
    mask: torch.Tensor  # (N, T)
    targets: torch.Tensor  # (N,) validation item
    histories: list[np.ndarray]  # for excluding seen items when ranking
    split: Split

    @classmethod
    def from_split(cls, split: Split, max_len: int, samples: int | None = None, seed: int = 0) -> ProbeSet:
        sub = split if samples is None else split.subset(samples, seed)
        ids, mask = left_pad(sub.histories, max_len)
        return cls(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(sub.targets),
                   sub.histories, sub)

    def __len__(self) -> int:
        return len(self.targets)

    def batches(self, batch_size: int, device: torch.device | str = "cpu") -> Iterator[tuple[torch.Tensor, ...]]:
        for a in range(0, len(self), batch_size):
            yield (self.ids[a : a + batch_size].to(device), self.mask[a : a + batch_size].to(device),
                   self.targets[a : a + batch_size].to(device))


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def last_position_logits(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, V) next-item logits with the padding token excluded."""
    logits = item_scores(model, ids, mask)
    logits[:, PAD_ID] = float("-inf")
    return logits


def next_item_ce(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor,
                 reduction: str = "mean") -> torch.Tensor:
    """The recommendation loss the estimators measure: full-softmax CE of the next item."""
    return F.cross_entropy(last_position_logits(model, ids, mask), targets, reduction=reduction)


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


def layer_param_groups(model: PreTrainedModel) -> list[dict[str, list[torch.nn.Parameter]]]:
    """Per decoder layer: its parameters grouped by the layer's direct child (self_attn, mlp,
    input_layernorm, ... / attn, mlp, ln_1, ...), the per-group detail of gradient estimators."""
    out = []
    for layer in decoder_parts(model).layers:
        groups: dict[str, list[torch.nn.Parameter]] = {}
        for name, p in layer.named_parameters():
            groups.setdefault(name.split(".")[0], []).append(p)
        out.append(groups)
    return out
