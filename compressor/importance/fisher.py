"""Gradient-based estimators: diagonal empirical Fisher (FISHER-LD eq. 3-6) and gradient magnitude.

The Fisher itself is computed in `compressor.fisher` (per-sample gradients in batches); this
module only turns it into the importance interface's `LayerScores`.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from transformers import PreTrainedModel

from compressor import distributed as dist
from compressor.fisher import (
    ProbeSet,
    depth_bias_factors,
    fisher_layer_weights,
    gradients_only,
    last_item_loss,
    layer_param_groups,
    layer_traces,
    normalise,
)
from compressor.importance.base import ImportanceConfig, LayerScores, model_device


def fisher(model: PreTrainedModel, probe: ProbeSet, cfg: ImportanceConfig) -> LayerScores:
    """Diagonal empirical Fisher of the next-item loss, summed per layer (its trace)."""
    t0 = time.perf_counter()
    opts = cfg.fisher
    lf = layer_traces(model, probe, opts.batch_size)
    traces = lf.traces
    bias = (depth_bias_factors(range(len(traces)), len(traces), opts.depth_beta, opts.depth_delta)
            if opts.use_depth_bias else np.ones(len(traces)))
    scores = (np.asarray(traces) * bias).tolist()
    detail = {
        "score": "trace of the diagonal empirical Fisher per layer (per-sample gradients)"
                 + (" times the depth bias (1 + depth_beta*l/L)^depth_delta" if opts.use_depth_bias else ""),
        "trace": traces,
        "groups": lf.groups,
        "w_final": fisher_layer_weights(traces, opts.weight_scale, opts.use_depth_bias, opts.depth_beta,
                                        opts.depth_delta),
        "options": opts.model_dump(),
        "processes": dist.world_size(),  # torchrun ranks the samples were split over
    }
    return LayerScores("fisher", scores, normalise(scores).tolist(), time.perf_counter() - t0, len(probe), detail)


def gradient(model: PreTrainedModel, probe: ProbeSet, cfg: ImportanceConfig) -> LayerScores:
    """Mean absolute gradient of the (batch-mean) next-item loss over each layer's parameters,
    averaged over batches."""
    t0 = time.perf_counter()
    device = model_device(model)
    groups = layer_param_groups(model)
    totals = np.zeros(len(groups))
    group_tot = [{g: 0.0 for g in gr} for gr in groups]
    batches = 0
    with gradients_only(model):
        for ids, mask, targets in probe.batches(cfg.batch_size, device):
            model.zero_grad(set_to_none=True)
            last_item_loss(model, ids, mask, targets).backward()
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
    return LayerScores("gradient", scores, normalise(scores).tolist(), time.perf_counter() - t0, len(probe), detail)

