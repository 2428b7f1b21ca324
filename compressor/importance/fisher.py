"""Gradient-based estimators: diagonal empirical Fisher (FISHER-LD eq. 3-6) and gradient magnitude.

As in Torch-Pruning, accumulation is separate from scoring: `FisherAccumulator.accumulate()` is
called by whoever ran `backward()` (here `fisher`, later distillation's weight updates), and
`fisher_layer_weights` turns the per-layer traces into the paper's weights.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from compressor.importance.base import (
    ImportanceConfig,
    LayerScores,
    ProbeSet,
    layer_param_groups,
    model_device,
    next_item_ce,
    normalise,
)
from compressor.modeling import decoder_parts


class FisherAccumulator:
    """Running sum of squared gradients per decoder layer and per parameter group.

    Call `accumulate(n)` after each backward of a loss that is the SUM over n samples (n = 1 for
    per-sample gradients); `layer_traces()` is then tr(F_l) = sum over θ in layer l of E[(∂L/∂θ)²]."""

    def __init__(self, model: PreTrainedModel):
        self.groups = layer_param_groups(model)
        self.reset()

    def reset(self) -> None:
        self.sums = [{g: 0.0 for g in groups} for groups in self.groups]
        self.samples = 0

    @torch.no_grad()
    def accumulate(self, n_samples: int = 1) -> None:
        for sums, groups in zip(self.sums, self.groups, strict=True):
            for g, params in groups.items():
                sums[g] += sum(float(p.grad.pow(2).sum()) for p in params if p.grad is not None)
        self.samples += n_samples

    def group_traces(self) -> dict[str, list[float]]:
        names = dict.fromkeys(g for groups in self.groups for g in groups)
        n = max(1, self.samples)
        return {g: [s.get(g, 0.0) / n for s in self.sums] for g in names}

    def layer_traces(self) -> list[float]:
        n = max(1, self.samples)
        return [sum(s.values()) / n for s in self.sums]


def fisher_layer_weights(traces, gamma: float = 1.0, depth_bias: bool = False, beta: float = 0.3,
                         delta: float = 1.0) -> list[float]:
    """FISHER-LD eq. 5-6: w_l = tr(F_l) / sum_l' tr(F_l') * gamma, then, with `depth_bias`,
    w_l * (1 + beta * l / L)^delta with l = 1..L."""
    w = np.asarray(normalise(traces)) * gamma
    if depth_bias:
        w = w * depth_bias_factors(len(w), beta, delta)
    return w.tolist()


def depth_bias_factors(num_layers: int, beta: float, delta: float) -> np.ndarray:
    """(1 + beta * l / L)^delta for l = 1..L (FISHER-LD eq. 6)."""
    return (1 + beta * np.arange(1, num_layers + 1) / num_layers) ** delta


@contextlib.contextmanager
def _gradients_on(model: PreTrainedModel):
    """Eval mode (no dropout); only decoder-layer parameters need gradients (an LLM's embedding
    gradient alone can be larger than all its layers'); gradients cleared before and after."""
    params = list(model.parameters())
    in_layers = {id(p) for p in decoder_parts(model).layers.parameters()}
    was_training, flags = model.training, [p.requires_grad for p in params]
    model.eval()
    for p in params:
        p.requires_grad_(id(p) in in_layers)
        p.grad = None
    try:
        with torch.enable_grad():
            yield
    finally:
        for p, f in zip(params, flags, strict=True):
            p.grad = None
            p.requires_grad_(f)
        model.train(was_training)


def fisher(model: PreTrainedModel, probe: ProbeSet, cfg: ImportanceConfig) -> LayerScores:
    """Diagonal empirical Fisher of the next-item loss, summed per layer (its trace)."""
    t0 = time.perf_counter()
    opts = cfg.fisher
    device = model_device(model)
    acc = FisherAccumulator(model)
    with _gradients_on(model):
        for ids, mask, targets in tqdm(probe.batches(opts.batch_size, device), desc="fisher", leave=False,
                                       total=-(-len(probe) // opts.batch_size)):
            model.zero_grad(set_to_none=True)
            # A summed loss: with batch_size 1 every backward is one sample's gradient.
            next_item_ce(model, ids, mask, targets, reduction="sum").backward()
            acc.accumulate(len(targets))
    traces = acc.layer_traces()
    bias = depth_bias_factors(len(traces), opts.beta, opts.delta) if opts.depth_bias else np.ones(len(traces))
    scores = (np.asarray(traces) * bias).tolist()
    detail = {
        "score": "trace of the diagonal empirical Fisher per layer"
                 + (" times the depth bias (1 + beta*l/L)^delta" if opts.depth_bias else ""),
        "trace": traces,
        "groups": acc.group_traces(),
        "w_final": fisher_layer_weights(traces, opts.gamma, opts.depth_bias, opts.beta, opts.delta),
        "options": opts.model_dump(),
    }
    return LayerScores("fisher", scores, normalise(scores), time.perf_counter() - t0, len(probe), detail)


def gradient(model: PreTrainedModel, probe: ProbeSet, cfg: ImportanceConfig) -> LayerScores:
    """Mean absolute gradient of the (batch-mean) next-item loss over each layer's parameters,
    averaged over batches."""
    t0 = time.perf_counter()
    device = model_device(model)
    groups = layer_param_groups(model)
    totals = np.zeros(len(groups))
    group_tot = [{g: 0.0 for g in gr} for gr in groups]
    batches = 0
    with _gradients_on(model):
        for ids, mask, targets in probe.batches(cfg.batch_size, device):
            model.zero_grad(set_to_none=True)
            next_item_ce(model, ids, mask, targets).backward()
            with torch.no_grad():
                for i, gr in enumerate(groups):
                    abs_sum, numel = 0.0, 0
                    for g, params in gr.items():
                        a = sum(float(p.grad.abs().sum()) for p in params if p.grad is not None)
                        n = sum(p.numel() for p in params)
                        group_tot[i][g] += a / max(1, n)
                        abs_sum, numel = abs_sum + a, numel + n
                    totals[i] += abs_sum / max(1, numel)
            batches += 1
    scores = (totals / max(1, batches)).tolist()
    names = dict.fromkeys(g for gr in groups for g in gr)
    detail = {"score": "mean |dL/dθ| over the layer's parameters (batch-mean loss), averaged over batches",
              "batch_size": cfg.batch_size,
              "groups": {g: [t.get(g, 0.0) / max(1, batches) for t in group_tot] for g in names}}
    return LayerScores("gradient", scores, normalise(scores), time.perf_counter() - t0, len(probe), detail)

