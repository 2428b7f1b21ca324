"""Forward-only estimators read from hidden states and attention maps (no gradients).

- `block_influence` (ShortGPT): 1 - cos(input, output) of each layer, averaged over real
  (non-padding) positions: a layer that barely turns the residual stream scores near 0.
- `angular` (Gromov et al.): arccos(cos(x_l, x_{l+n})) / pi between the input of layer l and the
  output of layer l+n-1 at the last position (the recommendation query); a layer's score is the
  mean distance of the blocks of n layers that contain it.
- `attention`: how concentrated each layer's attention is, 1 - entropy / log(#keys), averaged
  over heads and real query positions with at least two keys (computed from real maps, eager).
"""

from __future__ import annotations

import contextlib
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from compressor.errors import CompressorError
from compressor.fisher import ProbeSet, normalise
from compressor.importance.base import (
    ImportanceConfig,
    LayerScores,
    capture_layer_io,
    model_device,
)
from compressor.modeling import decoder_parts, hidden_states


def _layer_cosines(model: PreTrainedModel, probe: ProbeSet, cfg: ImportanceConfig, n: int):
    """Per layer: sum over real positions of cos(in, out) and count; per block of n layers
    starting at l: sum over users of the last-position cos(in_l, out_{l+n-1})."""
    device = model_device(model)
    with capture_layer_io(model) as rec:
        L = len(rec)
        cos_sum, count = np.zeros(L), 0
        block_sum = np.zeros(max(0, L - n + 1))
        for ids, mask, _ in probe.batches(cfg.batch_size, device):
            hidden_states(model, ids, mask)
            real = mask.bool()
            count += int(real.sum())
            for i, r in enumerate(rec):
                cos_sum[i] += float(F.cosine_similarity(r["in"][real], r["out"][real], dim=-1).sum())
            for i in range(len(block_sum)):
                c = F.cosine_similarity(rec[i]["in"][:, -1], rec[i + n - 1]["out"][:, -1], dim=-1)
                block_sum[i] += float(c.clamp(-1, 1).sum())
    return cos_sum / max(1, count), block_sum / max(1, len(probe)), count


@torch.no_grad()
def block_influence(model: PreTrainedModel, probe: ProbeSet, cfg: ImportanceConfig) -> LayerScores:
    t0 = time.perf_counter()
    cos, _, positions = _layer_cosines(model, probe, cfg, 1)
    scores = (1 - cos).tolist()
    detail = {"score": "1 - cos(layer input, layer output), mean over real positions (ShortGPT BI)",
              "positions": positions}
    return LayerScores("block_influence", scores, normalise(scores), time.perf_counter() - t0, len(probe), detail)


@torch.no_grad()
def angular(model: PreTrainedModel, probe: ProbeSet, cfg: ImportanceConfig) -> LayerScores:
    t0 = time.perf_counter()
    L = len(decoder_parts(model).layers)
    n = cfg.angular_block
    if n > L:
        raise CompressorError(f"angular_block {n} is larger than the model's {L} layers")
    _, block_cos, _ = _layer_cosines(model, probe, cfg, n)
    dist = np.arccos(np.clip(block_cos, -1, 1)) / math.pi  # d(l, n) for blocks starting at l
    scores = [float(np.mean([dist[s] for s in range(max(0, i - n + 1), min(i, L - n) + 1)])) for i in range(L)]
    best = int(np.argmin(dist))
    detail = {"score": f"angular distance arccos(cos(x_l, x_(l+{n})))/pi at the last position, "
                       f"mean over the blocks of {n} layer(s) containing the layer (Gromov et al.)",
              "block": n, "block_distance": dist.tolist(),
              "most_redundant_block": list(range(best, best + n))}
    return LayerScores("angular", scores, normalise(scores), time.perf_counter() - t0, len(probe), detail)


@contextlib.contextmanager
def eager_attention(model: PreTrainedModel):
    """Attention maps exist only with the eager implementation: switch, then switch back."""
    before = getattr(model.config, "_attn_implementation", None)
    if before != "eager":
        try:
            model.set_attn_implementation("eager")
        except (AttributeError, ValueError) as e:
            raise CompressorError(
                f"{type(model).__name__}: cannot switch to eager attention for attention maps ({e}); "
                "load the model with attn_implementation='eager'") from e
    try:
        yield
    finally:
        if before not in (None, "eager"):
            model.set_attn_implementation(before)


@torch.no_grad()
def attention(model: PreTrainedModel, probe: ProbeSet, cfg: ImportanceConfig) -> LayerScores:
    t0 = time.perf_counter()
    device = model_device(model)
    L = len(decoder_parts(model).layers)
    conc_sum, rows = np.zeros(L), 0
    last_sum, last_rows = np.zeros(L), 0
    with eager_attention(model):
        for ids, mask, _ in probe.batches(cfg.batch_size, device):
            out = hidden_states(model, ids, mask, output_attentions=True)
            if not out.attentions or len(out.attentions) != L:
                raise CompressorError(f"{type(model).__name__} returned no attention maps")
            # Keys a real query may see: the real positions up to and including itself.
            n_keys = mask.long().cumsum(-1)  # (B, T)
            valid = mask.bool() & (n_keys >= 2)
            log_n = torch.log(n_keys.clamp(min=2).float())
            last_valid = valid[:, -1]
            rows += int(valid.sum())
            last_rows += int(last_valid.sum())
            for i, a in enumerate(out.attentions):  # (B, heads, T, T)
                a = a.float()
                ent = -(a * torch.log(a.clamp(min=1e-12))).sum(-1).mean(1)  # (B, T), mean over heads
                conc = 1 - ent / log_n
                conc_sum[i] += float(conc[valid].sum())
                last_sum[i] += float(conc[:, -1][last_valid].sum())
    scores = (conc_sum / max(1, rows)).tolist()
    detail = {"score": "attention concentration 1 - H(row)/log(#keys), mean over heads and real queries",
              "query_rows": rows, "last_position": (last_sum / max(1, last_rows)).tolist()}
    return LayerScores("attention", scores, normalise(scores), time.perf_counter() - t0, len(probe), detail)
