"""Low-rank factorization of the decoder layers' linears: W (out, in) ≈ U (out, r) · V (r, in).

Two scorers share one truncated SVD:
- `svd`: the plain SVD of W; keeping the top r singular values minimises ‖W − UV‖_F (Eckart–Young),
  the error being the sum of the dropped σ².
- `fisher`: Fisher-weighted SVD (Hsu et al., ICLR 2022). Each row i of W gets the weight
  d_i = sqrt(Σ_j F_ij), F the diagonal empirical Fisher of the next-item loss, and the SVD is of
  diag(d)·W; then U = diag(1/d)·U_r·S_r^½. It minimises Σ_i d_i²‖W_i − (UV)_i‖², the Fisher
  loss-increase estimate with F made row-separable, so the rank goes where the loss is sensitive.

Ranks come from `ratio` (parameters kept) or `energy` (share of Σσ² kept), per matrix or over
all of them at once (`global`: the components with the most σ² per parameter win, so with
Fisher the budget moves to the layers the loss needs). A matrix is only factorized when
r·(in + out) < (1 − min_saving)·in·out: the pair then has fewer parameters *and* fewer
multiply-adds per token than the dense layer (a linear's FLOPs per token equal its parameters).

Reloading: the factorized model is not a stock checkpoint (a stock LlamaForCausalLM has one
q_proj.weight where this one has q_proj.u / q_proj.v). The ranks are recorded in
`config.recsys["lowrank"]["ranks"]`, and `compressor.modeling.load_model` rebuilds the
factorized modules (`modeling.load_factorized`, with `LowRankLinear`) before loading the saved
tensors strictly. Everything downstream (distillation, ONNX export, evaluation) goes through
`load_model`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from compressor.data.protocol import RecData, prepare
from compressor.errors import CompressorError
from compressor.fisher import ProbeSet, parameter_fisher
from compressor.modeling import (
    LowRankLinear,
    count_parameters,
    decoder_parts,
    dense_weight,
    load_model,
    model_max_len,
    pick_device,
    recsys_meta,
    save_model,
    set_module,
    set_recsys_meta,
)

REPORT_FILE = "lowrank_report.json"
SCORERS = ("fisher", "svd")


class LowRankConfig(BaseModel):
    """Which decoder linears to factorize and how to choose their ranks; off while ratio and
    energy are both null."""

    model_config = ConfigDict(extra="forbid")
    ratio: float | None = Field(None, gt=0, lt=1, description="fraction of the chosen matrices' parameters "
                                "kept; null (and energy null) = the stage is off")
    energy: float | None = Field(None, gt=0, lt=1, description="instead of ratio: keep the smallest rank whose "
                                 "singular values hold this share of Σσ² (of the Fisher-weighted matrix for fisher)")
    scorer: Literal["fisher", "svd"] = Field("fisher", description="fisher: Fisher-weighted SVD; svd: plain SVD")
    scope: Literal["per_matrix", "global"] = Field(
        "per_matrix", description="per_matrix: each matrix keeps the ratio/energy; global: one budget over all")
    modules: list[str] = Field(default_factory=list, description="linear names to factorize (q_proj, k_proj, "
                               "v_proj, o_proj, gate_proj, up_proj, down_proj, ...); empty = every linear of the "
                               "decoder layers")
    min_saving: float = Field(0.0, ge=0, lt=1, description="factorize only when U,V have at most (1 - this) of "
                              "the dense parameters")
    samples: int = Field(512, ge=1, description="validation users whose gradients give the Fisher")
    batch_size: int = Field(32, ge=1, description="users per backward pass (Fisher = mean squared batch gradient)")
    seed: int = 0
    device: str = "auto"

    @model_validator(mode="after")
    def _one_budget(self) -> LowRankConfig:
        if self.ratio is not None and self.energy is not None:
            raise ValueError("give ratio or energy, not both")
        return self

    @property
    def enabled(self) -> bool:
        return self.ratio is not None or self.energy is not None


def target_linears(model: PreTrainedModel, modules: list[str] | None = None) -> dict[str, nn.Module]:
    """Dense linears of the decoder layers by full module path, optionally only those whose last
    name is in `modules`; the embeddings and the output head (the item table) are never touched."""
    names = {id(m): n for n, m in model.named_modules()}
    out = {}
    for layer in decoder_parts(model).layers:
        prefix = names[id(layer)]
        for name, m in layer.named_modules():
            if isinstance(m, nn.Linear | Conv1D) and (not modules or name.split(".")[-1] in modules):
                out[f"{prefix}.{name}"] = m
    return out


def weighted_svd(weight: torch.Tensor, row_weights: torch.Tensor | None = None):
    """SVD of diag(d)·W in float64: (U, S, Vh, d); d = ones for the plain SVD. Zero (or tiny)
    row weights are floored at 1e-6 of the largest so 1/d stays finite: such rows do not
    matter to the loss, and their reconstruction is W_i projected on the kept right vectors."""
    w = weight.detach().double().cpu()
    if row_weights is None or not torch.isfinite(row_weights).all() or row_weights.max() <= 0:
        d = torch.ones(w.shape[0], dtype=torch.float64)
    else:
        d = row_weights.detach().double().cpu()
        d = d.clamp_min(d.max() * 1e-6)
    u, s, vh = torch.linalg.svd(d[:, None] * w, full_matrices=False)
    return u, s, vh, d


def factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, d: torch.Tensor, rank: int):
    """(U (out, r), V (r, in)) with U·V the rank-r approximation of W; √σ goes to each side so
    the two factors have comparable scale (better conditioned for recovery training)."""
    root = s[:rank].sqrt()
    return (u[:, :rank] * root) / d[:, None], root[:, None] * vh[:rank]


def break_even(out_f: int, in_f: int, min_saving: float = 0.0) -> float:
    """Ranks strictly below this save parameters (and per-token multiply-adds)."""
    return (1 - min_saving) * out_f * in_f / (out_f + in_f)


def choose_ranks(spectra: list[torch.Tensor], shapes: list[tuple[int, int]], cfg: LowRankConfig) -> list[int | None]:
    """Rank of each matrix (None = keep it dense) from its singular values and (out, in) shape."""
    energy = [s.double().pow(2) for s in spectra]
    if cfg.scope == "per_matrix":
        ranks = []
        for e, (o, i) in zip(energy, shapes, strict=True):
            if cfg.ratio is not None:
                r = math.floor(cfg.ratio * o * i / (o + i))
            else:
                share = e.cumsum(0) / e.sum().clamp_min(1e-300)
                r = int((share < cfg.energy - 1e-12).sum()) + 1
            ranks.append(max(1, r))
    else:
        # One pool of components. ratio: most σ² per parameter first, until the budget is spent
        # (within a matrix that is its σ order, so every matrix keeps a prefix); energy: most σ².
        cost = [o + i for o, i in shapes]
        items = [(float(v) / (cost[m] if cfg.ratio is not None else 1), m) for m, e in enumerate(energy) for v in e]
        items.sort(key=lambda t: -t[0])
        ranks = [0] * len(spectra)
        if cfg.ratio is not None:
            budget, spent = cfg.ratio * sum(o * i for o, i in shapes), 0
            for _, m in items:
                if spent + cost[m] > budget:
                    break
                ranks[m], spent = ranks[m] + 1, spent + cost[m]
        else:
            total, kept = float(sum(e.sum() for e in energy)), 0.0
            for v, m in items:
                if kept >= cfg.energy * total - 1e-12 * total:
                    break
                ranks[m], kept = ranks[m] + 1, kept + v
        ranks = [max(1, r) for r in ranks]
    return [r if r < break_even(o, i, cfg.min_saving) else None for r, (o, i) in zip(ranks, shapes, strict=True)]


def factorize(model: PreTrainedModel, data: RecData | None, cfg: LowRankConfig, max_len: int,
              progress: bool = True) -> tuple[PreTrainedModel, dict]:
    """Replace the chosen linears of `model` (in place) by `LowRankLinear`s; returns the model and
    a report (per matrix: shape, rank, parameters, dropped share of σ² and relative error)."""
    if not cfg.enabled:
        raise CompressorError("low-rank factorization needs a ratio or an energy threshold")
    if recsys_meta(model).lowrank:
        raise CompressorError("this model is factorized already")
    if cfg.scorer == "fisher" and data is None:
        raise CompressorError("Fisher-weighted SVD needs data (--data); or use --scorer svd")
    start = time.time()
    targets = target_linears(model, cfg.modules or None)
    if not targets:
        raise CompressorError(f"no linear named {cfg.modules} in the decoder layers of {type(model).__name__}")
    params_before = count_parameters(model)
    row_weights: list[torch.Tensor | None] = [None] * len(targets)
    if cfg.scorer == "fisher":
        probe = ProbeSet.from_data(data, max_len, cfg.samples, cfg.seed)
        home = next(model.parameters()).device
        model.to(pick_device(cfg.device))
        fisher = parameter_fisher(model, [m.weight for m in targets.values()], probe, cfg.batch_size, progress=progress)
        model.to(home)
        row_weights = [(f.T if isinstance(m, Conv1D) else f).double().sum(1).sqrt().cpu()
                       for f, m in zip(fisher, targets.values(), strict=True)]
    svds = [weighted_svd(dense_weight(m), rw) for m, rw in zip(targets.values(), row_weights, strict=True)]
    shapes = [tuple(dense_weight(m).shape) for m in targets.values()]
    ranks = choose_ranks([s for _, s, _, _ in svds], shapes, cfg)
    matrices, kept = [], {}
    for (path, m), (u, s, vh, d), (o, i), r in zip(targets.items(), svds, shapes, ranks, strict=True):
        row = {"module": path, "shape": [o, i], "rank": r, "params_before": o * i, "params_after": o * i}
        if r is not None:
            uf, vf = factors(u, s, vh, d, r)
            w = dense_weight(m).detach().double().cpu()
            e = s.pow(2)
            row.update(params_after=r * (o + i), dropped_energy=float(e[r:].sum() / e.sum().clamp_min(1e-300)),
                       relative_error=float((w - uf @ vf).norm() / w.norm().clamp_min(1e-300)))
            new = LowRankLinear(i, o, r, m.bias is not None).to(m.weight.device, m.weight.dtype)
            with torch.no_grad():
                new.u.weight.copy_(uf)
                new.v.weight.copy_(vf)
                if m.bias is not None:
                    new.u.bias.copy_(m.bias)
            set_module(model, path, new)
            kept[path] = r
        matrices.append(row)
    if not kept:
        raise CompressorError("no matrix would save parameters at this ratio/energy: nothing factorized")
    chosen_before = sum(r["params_before"] for r in matrices)
    chosen_after = sum(r["params_after"] for r in matrices)
    report = {"config": cfg.model_dump(), "params_before": params_before, "params_after": count_parameters(model),
              "matrices_params_before": chosen_before, "matrices_params_after": chosen_after,
              "effective_ratio": chosen_after / chosen_before, "factorized": len(kept), "kept_dense": len(matrices) - len(kept),
              "fisher_samples": cfg.samples if cfg.scorer == "fisher" else 0, "seconds": time.time() - start,
              "matrices": matrices}
    set_recsys_meta(model, lowrank={"ranks": kept, "scorer": cfg.scorer, "scope": cfg.scope, "ratio": cfg.ratio,
                                    "energy": cfg.energy, "params_before": params_before})
    return model, report


def lowrank_dir(model_dir: str | Path, out_dir: str | Path, cfg: LowRankConfig,
                data: RecData | str | Path | None = None, progress: bool = True) -> tuple[Path, dict]:
    """Load a model directory, factorize it, save a new one (item vocabulary, recsys metadata with
    the ranks, and `lowrank_report.json`); returns its path and that report. `data` (name, path or
    RecData) is read for Fisher only."""
    model, vocab = load_model(model_dir)
    max_len = model_max_len(model)
    if cfg.scorer == "fisher" and data is not None and not isinstance(data, RecData):
        data = prepare(data, vocab=vocab)
    model, report = factorize(model, data if isinstance(data, RecData) else None, cfg, max_len, progress)
    report["source"] = str(model_dir)
    return save_model(model.cpu(), vocab, out_dir, {REPORT_FILE: report}), report
