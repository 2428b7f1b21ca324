"""Pruning inside the kept layers: structured (heads, MLP channels, model width) and unstructured (weights).

`prune_model(model, data, cfg, max_len)` scores, cuts and reports; `prune_dir` does the same
for a saved model directory and writes a new one that stock `from_pretrained` loads. Layout:
`adapters` (where units live per family), `scoring` (Fisher / magnitude), `structured`
(plans and surgery), `unstructured` (masks made permanent, sparsity measured).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from transformers import PreTrainedModel

from compressor.data.protocol import RecData, prepare
from compressor.errors import CompressorError
from compressor.fisher import ProbeSet, parameter_fisher
from compressor.modeling import (
    count_parameters,
    load_model,
    model_max_len,
    pick_device,
    recsys_meta,
    save_model,
    set_recsys_meta,
)
from compressor.prune.adapters import ADAPTERS, find_adapter
from compressor.prune.scoring import (
    CRITERIA_NEED_DATA,
    PRUNE_SCORERS,
    SCORERS_NEED_DATA,
    WEIGHT_CRITERIA,
    summarize,
)
from compressor.prune.structured import (
    apply_structured,
    config_accepts,
    plan_channels,
    plan_heads,
    plan_hidden,
)
from compressor.prune.unstructured import SCOPES, measure_sparsity, prunable_weights, sparsify

REPORT_FILE = "prune_report.json"


class PruneConfig(BaseModel):
    """What to prune and how to score it. Ratios are fractions removed, in [0, 1)."""

    model_config = ConfigDict(extra="forbid")
    heads: float = Field(0.0, ge=0, lt=1, description="fraction of query heads removed (same count in every layer)")
    mlp: float = Field(0.0, ge=0, lt=1, description="fraction of MLP intermediate channels removed (same count in every layer)")
    hidden: float = Field(
        0.0, ge=0, lt=1, description="fraction of the model width (hidden dimensions of the residual stream: item "
        "table, norms, every layer's input and output sides) removed, the same dimensions everywhere; the "
        "student is then narrower than its teacher and distillation learns Adapt projections between them")
    sparsity: float = Field(0.0, ge=0, lt=1, description="fraction of decoder-layer weights zeroed (unstructured)")
    scorer: str = Field("fisher", description="head/channel/width importance: fisher (mask gradients) or magnitude")
    scope: Literal["global", "per_layer"] = Field(
        "global", description="unstructured: one threshold over all layers, or the same sparsity in each layer "
        "(structured pruning always removes the same count per layer: stock configs hold one count)")
    unstructured_criterion: str = Field("fisher_weighted", description="magnitude |w| or fisher_weighted w^2 * F")
    samples: int = Field(512, ge=1, description="validation users whose gradients give the Fisher scores")
    batch_size: int = Field(32, ge=1, description="users per backward pass while scoring")
    seed: int = 0
    device: str = "auto"

    @field_validator("scorer")
    @classmethod
    def _known_scorer(cls, v: str) -> str:
        if v not in PRUNE_SCORERS:
            raise ValueError(f"unknown scorer {v!r}; choose one of {', '.join(PRUNE_SCORERS)}")
        return v

    @field_validator("unstructured_criterion")
    @classmethod
    def _known_criterion(cls, v: str) -> str:
        if v not in WEIGHT_CRITERIA:
            raise ValueError(f"unknown criterion {v!r}; choose one of {', '.join(WEIGHT_CRITERIA)}")
        return v

    @property
    def structured(self) -> bool:
        return self.heads > 0 or self.mlp > 0 or self.hidden > 0

    def needs_data(self) -> bool:
        return (self.structured and self.scorer in SCORERS_NEED_DATA) or (
            self.sparsity > 0 and self.unstructured_criterion in CRITERIA_NEED_DATA)


def prune_model(model: PreTrainedModel, data: RecData | None, cfg: PruneConfig, max_len: int,
                progress: bool = True) -> tuple[PreTrainedModel, dict]:
    """Prune `model`; returns the pruned model (a new one after structured pruning, the same
    one, changed in place, otherwise) and a report of what was kept and measured."""
    if cfg.needs_data() and data is None:
        raise CompressorError("Fisher scoring needs data (--data); or use --scorer magnitude "
                              "and unstructured_criterion=magnitude")
    if recsys_meta(model).lowrank:  # its linears are U·V pairs the slicing rules do not know
        raise CompressorError("this model is low-rank factorized: prune first, then factorize")
    start = time.time()
    report: dict = {"config": cfg.model_dump(), "params_before": count_parameters(model)}
    probe = ProbeSet.from_data(data, max_len, cfg.samples, cfg.seed) if cfg.needs_data() else None
    home = next(model.parameters()).device
    model.to(pick_device(cfg.device))
    if cfg.structured:
        model, report["structured"] = _structured(model, probe, cfg, progress)
    if cfg.sparsity > 0:
        weights = prunable_weights(model)
        params = [p for _, _, p in weights]
        fisher = (parameter_fisher(model, params, probe, cfg.batch_size, progress=progress) if cfg.unstructured_criterion in CRITERIA_NEED_DATA
                  else [None] * len(params))
        scores = [WEIGHT_CRITERIA[cfg.unstructured_criterion](p, f) for p, f in zip(params, fisher, strict=True)]
        sparsify(model, cfg.sparsity, scores, cfg.scope)
    model.to(home)
    sparsity = measure_sparsity(model)
    report.update(
        params_after=count_parameters(model),
        nonzero_params_after=count_parameters(model) - round(sparsity["model_total"] * count_parameters(model)),
        sparsity={"target": cfg.sparsity, "scope": cfg.scope, "criterion": cfg.unstructured_criterion, **sparsity},
        scorer=cfg.scorer, fisher_samples=len(probe) if probe is not None else 0, seconds=time.time() - start,
    )
    set_recsys_meta(model, pruning={"heads": cfg.heads, "mlp": cfg.mlp, "hidden": cfg.hidden, "sparsity": cfg.sparsity,
                                    "scorer": cfg.scorer,
                                    "params_before": report["params_before"]})
    return model, report


def _structured(model: PreTrainedModel, probe: ProbeSet | None, cfg: PruneConfig, progress: bool):
    adapter = find_adapter(model)
    if cfg.heads > 0 and adapter.head_fields is None:
        raise CompressorError(f"{type(model).__name__}: {adapter.no_head_pruning}")
    if cfg.hidden > 0 and adapter.hidden_rules is None:
        raise CompressorError(f"{type(model).__name__}: {adapter.no_hidden_pruning}")
    scores = PRUNE_SCORERS[cfg.scorer](model, adapter, probe, heads=cfg.heads > 0, channels=cfg.mlp > 0,
                                       progress=progress, batch_size=cfg.batch_size, hidden=cfg.hidden > 0)
    layout = adapter.layout(model.config)
    channels_before = adapter.channels(model.config)
    head_plan = chan_plan = hidden_plan = None
    out: dict = {"family": adapter.name, "scoring_seconds": scores.seconds}
    if cfg.heads > 0:
        def accepts(heads: int, kv: int) -> bool:
            return config_accepts(model.config, adapter.head_updates(layout, heads, kv))

        head_plan = plan_heads(scores.heads, layout, cfg.heads, accepts)
        out["heads"] = {
            "before": layout.heads, "after": head_plan.heads, "kv_before": layout.kv_heads, "kv_after": head_plan.kv_heads,
            "head_dim": layout.head_dim, "requested_ratio": cfg.heads, "effective_ratio": 1 - head_plan.heads / layout.heads,
            "kept_per_layer": head_plan.q_keep, "kv_kept_per_layer": head_plan.kv_keep, "scores": summarize(scores.heads),
        }
    if cfg.mlp > 0:
        chan_plan = plan_channels(scores.channels, cfg.mlp)
        out["mlp"] = {
            "before": channels_before, "after": chan_plan.channels, "requested_ratio": cfg.mlp,
            "effective_ratio": 1 - chan_plan.channels / channels_before,
            "kept_per_layer": [len(k) for k in chan_plan.keep],
        }
    if cfg.hidden > 0:
        heads_after = head_plan.heads if head_plan else layout.heads
        kv_after = head_plan.kv_heads if head_plan else layout.kv_heads

        def accepts_width(width: int) -> bool:
            return config_accepts(model.config, {**adapter.head_updates(layout, heads_after, kv_after),
                                                 "hidden_size": width})

        hidden_plan = plan_hidden(scores.hidden, cfg.hidden, accepts_width)
        width = model.config.hidden_size
        out["hidden"] = {
            "before": width, "after": hidden_plan.size, "requested_ratio": cfg.hidden,
            "effective_ratio": 1 - hidden_plan.size / width, "kept": hidden_plan.keep,
            "scores": summarize(scores.hidden),
        }
    return apply_structured(model, adapter, head_plan, chan_plan, hidden_plan), out


def prune_dir(model_dir: str | Path, out_dir: str | Path, cfg: PruneConfig,
              data: RecData | str | Path | None = None, progress: bool = True) -> tuple[Path, dict]:
    """Load a model directory, prune it, and save a new one (item vocabulary, recsys metadata
    and `prune_report.json` beside the checkpoint); returns its path and that report. `data` may
    be a name or path; it is read only when the config needs Fisher scores."""
    model, vocab = load_model(model_dir)
    max_len = model_max_len(model)
    if cfg.needs_data() and data is not None and not isinstance(data, RecData):
        data = prepare(data, vocab=vocab)
    pruned, report = prune_model(model, data if isinstance(data, RecData) else None, cfg, max_len, progress)
    report["source"] = str(model_dir)
    return save_model(pruned.cpu(), vocab, out_dir, {REPORT_FILE: report}), report


__all__ = [
    "ADAPTERS", "PRUNE_SCORERS", "SCOPES", "WEIGHT_CRITERIA", "PruneConfig", "find_adapter",
    "measure_sparsity", "prune_dir", "prune_model",
]
