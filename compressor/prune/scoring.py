"""Importance of heads, MLP channels and single weights: the numbers pruning ranks by.

Heads and channels (Kwon et al. 2022, "A Fast Post-Training Pruning Framework for
Transformers"): a mask variable m = 1 multiplies each head's output and each MLP channel's
activation; its Fisher importance is I = sum over samples of (dL_n / dm)^2. The masks here are
(B, units) tensors, so one backward pass gives every sample's own gradient (an exact
per-sample empirical Fisher, not squared batch gradients). Magnitude is the alternative: the
L2 norm of all weights that read from or write to the unit.

Single weights (unstructured pruning): |theta|, or Fisher-weighted theta^2 * F with F the
diagonal empirical Fisher (squared mini-batch gradients), the saliency of Optimal Brain Damage.

The loss is the project's importance loss: next-item cross-entropy at the last position of
validation histories (the test split is never read).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from compressor.data.protocol import RecData, left_pad
from compressor.data.vocab import PAD_ID
from compressor.modeling import decoder_parts, item_scores
from compressor.prune.adapters import FamilyAdapter, submodule


@dataclass
class ProbeBatches:
    """Left-padded validation histories and their targets, served in batches."""

    ids: torch.Tensor
    mask: torch.Tensor
    targets: torch.Tensor
    batch_size: int

    @classmethod
    def from_data(cls, data: RecData, max_len: int, samples: int, batch_size: int, seed: int = 0) -> ProbeBatches:
        split = data.split("valid").subset(samples, seed)
        ids, mask = left_pad(split.histories, max_len)
        return cls(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(split.targets), batch_size)

    def __len__(self) -> int:
        return len(self.targets)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for a in range(0, len(self), self.batch_size):
            yield self.ids[a : a + self.batch_size], self.mask[a : a + self.batch_size], self.targets[a : a + self.batch_size]


def per_sample_loss(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B,) next-item cross-entropy of each history's target, padding token excluded."""
    logits = item_scores(model, ids, mask)
    logits[:, PAD_ID] = float("-inf")
    return F.cross_entropy(logits, targets, reduction="none")


@dataclass
class UnitScores:
    """Importance per layer of each query head (L, H) and MLP channel (L, I); higher = keep."""

    method: str
    heads: torch.Tensor | None
    channels: torch.Tensor | None
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


@contextlib.contextmanager
def _frozen(model: torch.nn.Module):
    """Only the mask variables need gradients; freezing the weights saves their backward."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def fisher_unit_scores(model: PreTrainedModel, adapter: FamilyAdapter, probe: ProbeBatches,
                       heads: bool = True, channels: bool = True, progress: bool = True) -> UnitScores:
    """Kwon et al.'s mask Fisher: sum over samples of the squared per-sample mask gradient."""
    start = time.time()
    layers = decoder_parts(model).layers
    n_heads = adapter.layout(model.config).heads
    n_channels = adapter.channels(model.config)
    device = next(model.parameters()).device
    masks: dict = {}
    handles = []
    for i, layer in enumerate(layers):
        if heads:
            handles.append(submodule(layer, adapter.head_out).register_forward_pre_hook(_head_mask_hook(n_heads, masks, ("h", i))))
        if channels:
            handles.append(submodule(layer, adapter.channel_out).register_forward_pre_hook(_channel_mask_hook(masks, ("c", i))))
    head_f = torch.zeros(len(layers), n_heads, dtype=torch.float64)
    chan_f = torch.zeros(len(layers), n_channels, dtype=torch.float64)
    was_training = model.training
    model.eval()  # no dropout: the scores should describe the deployed function
    try:
        with _frozen(model):
            for ids, mask, targets in tqdm(probe, desc="fisher (heads/channels)", disable=not progress, leave=False,
                                           total=-(-len(probe) // probe.batch_size)):
                b = len(ids)
                for i in range(len(layers)):
                    if heads:
                        masks[("h", i)] = torch.ones(b, n_heads, device=device, requires_grad=True)
                    if channels:
                        masks[("c", i)] = torch.ones(b, n_channels, device=device, requires_grad=True)
                loss = per_sample_loss(model, ids.to(device), mask.to(device), targets.to(device)).sum()
                grads = torch.autograd.grad(loss, list(masks.values()))
                for (kind, i), g in zip(masks.keys(), grads, strict=True):
                    (head_f if kind == "h" else chan_f)[i] += g.detach().double().pow(2).sum(0).cpu()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return UnitScores("fisher", head_f.float() if heads else None, chan_f.float() if channels else None,
                      samples=len(probe), seconds=time.time() - start)


def _unit_sq_norms(layer, rules, units: int) -> torch.Tensor:
    """Sum of squared weights per unit over every tensor a rule names (absent ones skipped)."""
    total = torch.zeros(units, dtype=torch.float64)
    for name, dim in rules:
        w = submodule(layer, name)
        if w is not None:
            total += w.detach().double().movedim(dim, 0).reshape(units, -1).pow(2).sum(1).cpu()
    return total


def magnitude_unit_scores(model: PreTrainedModel, adapter: FamilyAdapter, probe: ProbeBatches | None = None,
                          heads: bool = True, channels: bool = True, progress: bool = True) -> UnitScores:
    """L2 norm of the weights of each unit; a key/value head's weights are shared out equally
    among the query heads of its group."""
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
    return UnitScores("magnitude", torch.stack(head_s).float() if heads else None,
                      torch.stack(chan_s).float() if channels else None, seconds=time.time() - start)


# name -> fn(model, adapter, probe | None, heads=bool, channels=bool) -> UnitScores
PRUNE_SCORERS: dict[str, Callable[..., UnitScores]] = {
    "fisher": fisher_unit_scores,
    "magnitude": magnitude_unit_scores,
}
SCORERS_NEED_DATA = {"fisher"}


def parameter_fisher(model: PreTrainedModel, params: list[torch.nn.Parameter], probe: ProbeBatches,
                     progress: bool = True) -> list[torch.Tensor]:
    """Diagonal empirical Fisher of `params`: mean over mini-batches of the squared gradient of
    the batch's mean next-item loss."""
    device = next(model.parameters()).device
    fisher = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    was_training = model.training
    model.eval()
    n = 0
    try:
        for ids, mask, targets in tqdm(probe, desc="fisher (weights)", disable=not progress, leave=False,
                                       total=-(-len(probe) // probe.batch_size)):
            loss = per_sample_loss(model, ids.to(device), mask.to(device), targets.to(device)).mean()
            grads = torch.autograd.grad(loss, params)
            for f, g in zip(fisher, grads, strict=True):
                f += g.detach().float().pow(2)
            n += 1
    finally:
        model.train(was_training)
    return [f / max(1, n) for f in fisher]


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
