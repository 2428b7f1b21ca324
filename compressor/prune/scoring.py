"""Importance of heads, MLP channels, hidden dimensions and single weights: what pruning ranks by.

Heads and channels (Kwon et al. 2022, "A Fast Post-Training Pruning Framework for
Transformers"): a mask variable m = 1 multiplies each head's output and each MLP channel's
activation; its Fisher importance is I = sum over samples of (dL_n / dm)^2. The masks here are
(B, units) tensors, so one backward pass gives every sample's own gradient (an exact
per-sample empirical Fisher, not squared batch gradients). A hidden dimension (the width of
the residual stream) gets one mask variable shared by every place the stream is written (the
embeddings and each layer's output), so its gradient sums the first-order effect of removing
that dimension everywhere. Magnitude is the alternative: the L2 norm of all weights that read
from or write to the unit.

Single weights (unstructured pruning): |theta|, or Fisher-weighted theta^2 * F with F the
diagonal Fisher from `compressor.fisher.parameter_fisher` (squared mini-batch gradients), the
saliency of Optimal Brain Damage.

The loss is the project's importance loss: next-item cross-entropy at the last position of
validation histories (the test split is never read).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from compressor.fisher import ProbeSet, gradients_only, last_item_loss
from compressor.modeling import decoder_parts
from compressor.prune.adapters import FamilyAdapter, model_hidden_keys, submodule


@dataclass
class UnitScores:
    """Importance per layer of each query head (L, H) and MLP channel (L, I), and of each hidden
    dimension (D,) of the whole model; higher = keep."""

    method: str
    heads: torch.Tensor | None
    channels: torch.Tensor | None
    hidden: torch.Tensor | None = None
    samples: int = 0
    seconds: float = 0.0
    detail: dict = field(default_factory=dict)


def _head_mask_hook(heads: int, masks: dict, key):
    def hook(module, args):
        x = args[0]  # (B, T, heads * head_dim): heads merged, before the output projection
        b, t, width = x.shape
        m = masks[key].to(x.dtype)
        return (x.view(b, t, heads, width // heads) * m[:, None, :, None]).view(b, t, width), *args[1:]

    return hook


def _channel_mask_hook(masks: dict, key):
    def hook(module, args):
        return args[0] * masks[key].to(args[0].dtype)[:, None, :], *args[1:]  # (B, T, channels)

    return hook


def _stream_mask_hook(masks: dict):
    def hook(module, args, output):
        m = masks["d"]
        if isinstance(output, tuple):  # decoder layers of some families return (hidden, ...)
            return output[0] * m.to(output[0].dtype)[:, None, :], *output[1:]
        return output * m.to(output.dtype)[:, None, :]  # (B, T, hidden)

    return hook


def fisher_unit_scores(model: PreTrainedModel, adapter: FamilyAdapter, probe: ProbeSet,
                       heads: bool = True, channels: bool = True, progress: bool = True,
                       batch_size: int = 32, hidden: bool = False) -> UnitScores:
    """Kwon et al.'s mask Fisher: sum over samples of the squared per-sample mask gradient."""
    start = time.time()
    parts = decoder_parts(model)
    layers = parts.layers
    n_heads = adapter.layout(model.config).heads
    n_channels = adapter.channels(model.config)
    width = model.config.hidden_size
    device = next(model.parameters()).device
    masks: dict = {}
    handles = []
    for i, layer in enumerate(layers):
        if heads:
            handles.append(submodule(layer, adapter.head_out).register_forward_pre_hook(_head_mask_hook(n_heads, masks, ("h", i))))
        if channels:
            handles.append(submodule(layer, adapter.channel_out).register_forward_pre_hook(_channel_mask_hook(masks, ("c", i))))
    if hidden:  # one variable for every write into the stream: removing a dimension removes it everywhere
        handles += [m.register_forward_hook(_stream_mask_hook(masks)) for m in (parts.embed, *layers)]
    head_f = torch.zeros(len(layers), n_heads, dtype=torch.float64)
    chan_f = torch.zeros(len(layers), n_channels, dtype=torch.float64)
    hidden_f = torch.zeros(width, dtype=torch.float64)
    try:
        # only the mask variables need gradients; no weight gradient is computed
        with gradients_only(model, params=[]):
            for ids, mask, targets in tqdm(probe.batches(batch_size, device), desc="fisher (heads/channels)",
                                           disable=not progress, leave=False, total=-(-len(probe) // batch_size)):
                b = len(ids)
                for i in range(len(layers)):
                    if heads:
                        masks[("h", i)] = torch.ones(b, n_heads, device=device, requires_grad=True)
                    if channels:
                        masks[("c", i)] = torch.ones(b, n_channels, device=device, requires_grad=True)
                if hidden:
                    masks["d"] = torch.ones(b, width, device=device, requires_grad=True)
                loss = last_item_loss(model, ids, mask, targets, reduction="sum")
                grads = torch.autograd.grad(loss, list(masks.values()))
                for key, g in zip(masks.keys(), grads, strict=True):
                    g2 = g.detach().double().pow(2).sum(0).cpu()
                    if key == "d":
                        hidden_f += g2
                    else:
                        (head_f if key[0] == "h" else chan_f)[key[1]] += g2
    finally:
        for h in handles:
            h.remove()
    return UnitScores("fisher", head_f.float() if heads else None, chan_f.float() if channels else None,
                      hidden_f.float() if hidden else None, samples=len(probe), seconds=time.time() - start)


def _unit_sq_norms(layer, rules, units: int) -> torch.Tensor:
    """Sum of squared weights per unit over every tensor a rule names (absent ones skipped)."""
    total = torch.zeros(units, dtype=torch.float64)
    for name, dim in rules:
        w = submodule(layer, name)
        if w is not None:
            total += w.detach().double().movedim(dim, 0).reshape(units, -1).pow(2).sum(1).cpu()
    return total


def magnitude_unit_scores(model: PreTrainedModel, adapter: FamilyAdapter, probe: ProbeSet | None = None,
                          heads: bool = True, channels: bool = True, progress: bool = True,
                          batch_size: int = 32, hidden: bool = False) -> UnitScores:
    """L2 norm of the weights of each unit; a key/value head's weights are shared out equally
    among the query heads of its group; a hidden dimension's weights are every layer's and the
    item table's."""
    start = time.time()
    layers = decoder_parts(model).layers
    head_s, chan_s = [], []
    for layer in layers:
        if heads:
            lay = adapter.layout(model.config)
            kv = _unit_sq_norms(layer, adapter.kv_rules, lay.kv_heads).repeat_interleave(lay.group) / lay.group
            head_s.append((_unit_sq_norms(layer, adapter.q_rules, lay.heads) + kv).sqrt())
        if channels:
            chan_s.append(_unit_sq_norms(layer, adapter.channel_rules, adapter.channels(model.config)).sqrt())
    hidden_s = None
    if hidden:
        width = model.config.hidden_size
        state = model.state_dict()  # tied tables appear under each name: counted once
        seen = {}
        for name, dim in model_hidden_keys(model):
            seen.setdefault(state[name].data_ptr(), (name, dim))
        hidden_s = sum((_unit_sq_norms(layer, adapter.hidden_rules, width) for layer in layers),
                       torch.zeros(width, dtype=torch.float64))
        for name, dim in seen.values():
            hidden_s += state[name].detach().double().movedim(dim, 0).reshape(width, -1).pow(2).sum(1).cpu()
        hidden_s = hidden_s.sqrt().float()
    return UnitScores("magnitude", torch.stack(head_s).float() if heads else None,
                      torch.stack(chan_s).float() if channels else None, hidden_s, seconds=time.time() - start)


# name -> fn(model, adapter, probe | None, heads=, channels=, progress=, batch_size=, hidden=) -> UnitScores
PRUNE_SCORERS: dict[str, Callable[..., UnitScores]] = {
    "fisher": fisher_unit_scores,
    "magnitude": magnitude_unit_scores,
}
SCORERS_NEED_DATA = {"fisher"}


def _magnitude(w: torch.Tensor, fisher: torch.Tensor | None) -> torch.Tensor:
    return w.detach().abs().float()


def _fisher_weighted(w: torch.Tensor, fisher: torch.Tensor | None) -> torch.Tensor:
    """theta^2 * F: the second-order loss increase of setting theta to 0 (Optimal Brain Damage)."""
    return w.detach().float().pow(2) * fisher


# name -> fn(weight, fisher | None) -> score of each element (higher = keep)
WEIGHT_CRITERIA: dict[str, Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]] = {
    "magnitude": _magnitude,
    "fisher_weighted": _fisher_weighted,
}
CRITERIA_NEED_DATA = {"fisher_weighted"}


def summarize(scores: torch.Tensor | None) -> list[list[float]] | None:
    """Scores as nested lists for the JSON report (rounded: they are for reading, not reuse)."""
    return None if scores is None else np.round(scores.double().numpy(), 8).tolist()
