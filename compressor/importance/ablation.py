"""The ground truth: remove one decoder layer at a time and measure what the recommender loses.

A removed layer passes its input through unchanged (`skip_layers`), which is exactly what a
student without that layer computes. The score is the increase of the validation next-item loss
(cross-entropy at the last position); the NDCG@10 drop is recorded beside it.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from compressor.evaluate import METRICS, target_ranks
from compressor.fisher import ProbeSet, last_item_logits, normalise
from compressor.importance.base import (
    ImportanceConfig,
    LayerScores,
    model_device,
    skip_layers,
)
from compressor.modeling import decoder_parts


@torch.no_grad()
def loss_and_ndcg(model: PreTrainedModel, probe: ProbeSet, batch_size: int) -> tuple[float, float]:
    """Mean next-item CE and full-ranking NDCG@10 (seen items excluded) over the probe users."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    ce_sum, ranks = 0.0, []
    try:
        for a, (ids, mask, targets) in zip(range(0, len(probe), batch_size), probe.batches(batch_size, device),
                                           strict=True):
            logits = last_item_logits(model, ids, mask).float()
            ce_sum += float(F.cross_entropy(logits, targets, reduction="sum"))
            scores = logits.cpu().numpy()
            r, _ = target_ranks(scores, probe.histories[a : a + batch_size], targets.cpu().numpy())
            ranks.append(r)
    finally:
        model.train(was_training)
    ndcg = METRICS["ndcg@10"]
    return ce_sum / len(probe), float(ndcg.fn(np.concatenate(ranks), ndcg.k).mean())


def ablation(model: PreTrainedModel, probe: ProbeSet, cfg: ImportanceConfig) -> LayerScores:
    t0 = time.perf_counter()
    L = len(decoder_parts(model).layers)
    base_loss, base_ndcg = loss_and_ndcg(model, probe, cfg.batch_size)
    losses, ndcgs = [], []
    for i in tqdm(range(L), desc="ablation", leave=False):
        with skip_layers(model, [i]):
            loss, ndcg = loss_and_ndcg(model, probe, cfg.batch_size)
        losses.append(loss)
        ndcgs.append(ndcg)
    scores = [x - base_loss for x in losses]
    detail = {
        "score": "validation loss increase when the layer is skipped (next-item CE, last position)",
        "base_loss": base_loss, "base_ndcg@10": base_ndcg,
        "loss_without": losses, "ndcg@10_without": ndcgs,
        "ndcg@10_drop": [base_ndcg - x for x in ndcgs],
    }
    return LayerScores("ablation", scores, normalise(scores), time.perf_counter() - t0, len(probe), detail)


def ablation_greedy(model: PreTrainedModel, probe: ProbeSet, cfg: ImportanceConfig) -> LayerScores:
    """Iterative ablation: repeatedly drop the layer whose removal (given those already dropped)
    raises the validation loss least. score = removal step (1 = dropped first), so `top_k` keeps
    exactly the greedy survivors for every k. Costs L(L+1)/2 - 1 validation passes."""
    t0 = time.perf_counter()
    L = len(decoder_parts(model).layers)
    remaining, removed, steps = list(range(L)), [], []
    bar = tqdm(total=L * (L + 1) // 2 - 1, desc="greedy ablation", leave=False)
    while len(remaining) > 1:
        trials = []
        for i in remaining:
            with skip_layers(model, [*removed, i]):
                trials.append((*loss_and_ndcg(model, probe, cfg.batch_size), i))
            bar.update()
        loss, ndcg, drop = min(trials)
        removed.append(drop)
        remaining.remove(drop)
        steps.append({"removed": drop, "loss": loss, "ndcg@10": ndcg})
    bar.close()
    order = removed + remaining
    scores = [0.0] * L
    for rank, i in enumerate(order):
        scores[i] = float(rank + 1)
    detail = {"score": "greedy removal order (1 = removed first; the last survivor scores L)",
              "removal_order": order, "steps": steps}
    return LayerScores("ablation_greedy", scores, normalise(scores), time.perf_counter() - t0, len(probe), detail)
