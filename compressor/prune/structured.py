"""Structured pruning: remove whole attention heads, MLP channels and hidden dimensions so the
tensors really shrink.

Why every layer keeps the same number of heads and channels: the checkpoint must load with
stock `from_pretrained`, and stock configs (LlamaConfig, Qwen2Config, ...) hold one
`num_attention_heads`, one `num_key_value_heads` and one `intermediate_size` for all layers
(transformers 5.23's per-layer config overrides are rejected by LlamaConfig's validation).
So the ratio fixes one count per layer, and the scores decide *which* units each layer keeps.

Grouped-query attention: a query head reads its group's key/value head, so heads cannot move
between groups. A plan keeps K' of the K key/value heads and the same r' query heads in each
kept group (K' * r' heads); among the shapes with the wanted head count, the one keeping the
most (per-layer normalised) importance wins. Counts a config cannot express (LlamaConfig wants
hidden_size divisible by the head count) are skipped for the nearest count it can.

Width (hidden dimensions): the residual stream is one vector space every layer reads and writes,
so a dimension goes everywhere at once: item table, norms, each layer's input and output sides.
The head size stays (written explicitly in the config); the norms then average over fewer
dimensions, an approximation the distillation that follows repairs. A student narrower than its
teacher is where distillation's `Adapt` projections stop being identities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from compressor.errors import CompressorError
from compressor.prune.adapters import (
    FamilyAdapter,
    HeadLayout,
    layer_prefixes,
    model_hidden_keys,
    slice_rules,
    unit_rows,
)


@dataclass
class HeadPlan:
    """Query heads and key/value heads each layer keeps (original indices, ascending)."""

    heads: int
    kv_heads: int
    q_keep: list[list[int]]
    kv_keep: list[list[int]]


@dataclass
class ChannelPlan:
    channels: int
    keep: list[list[int]]


@dataclass
class HiddenPlan:
    """Hidden dimensions the whole model keeps (original indices, ascending)."""

    size: int
    keep: list[int]


def keep_count(total: int, ratio: float, minimum: int = 1) -> int:
    """Units left after removing floor(ratio * total), never fewer than `minimum`."""
    return max(minimum, total - math.floor(ratio * total + 1e-9))


def config_accepts(config, updates: dict) -> bool:
    """Whether the model's own config class validates these field values (e.g. LlamaConfig
    wants hidden_size % num_attention_heads == 0)."""
    try:
        type(config).from_dict({**config.to_dict(), **updates})
    except Exception:  # noqa: BLE001 - any validation failure means "cannot express"
        return False
    return True


def _layer_choice(scores: torch.Tensor, layout: HeadLayout, kv_keep: int, per_group: int) -> tuple[float, list[int], list[int]]:
    """Best kv_keep groups with their best per_group query heads each: (kept score, q, kv)."""
    grouped = scores.view(layout.kv_heads, layout.group)
    top = grouped.topk(per_group, dim=1)
    groups = top.values.sum(1).topk(kv_keep).indices.sort().values
    q = sorted(int(g) * layout.group + int(j) for g in groups for j in top.indices[g])
    return float(top.values.sum(1)[groups].sum()), q, [int(g) for g in groups]


def plan_heads(scores: torch.Tensor, layout: HeadLayout, ratio: float, accepts) -> HeadPlan:
    """Choose the kept heads per layer from (L, H) scores; `accepts(heads, kv_heads)` says
    which counts the config can express."""
    target = keep_count(layout.heads, ratio)
    shapes = [(k, r) for k in range(1, layout.kv_heads + 1) for r in range(1, layout.group + 1) if accepts(k * r, k)]
    if not shapes:
        raise CompressorError(f"no head count the model config accepts for {layout}")
    counts = {k * r for k, r in shapes}
    count = min(counts, key=lambda c: (abs(c - target), -c))  # nearest; ties keep more heads
    # Normalise per layer so every layer has the same say in the shared GQA shape.
    norm = scores.double() / scores.double().sum(1, keepdim=True).clamp_min(1e-30)
    best = None
    for k, r in shapes:
        if k * r != count:
            continue
        choice = [_layer_choice(s, layout, k, r) for s in norm]
        total = sum(c[0] for c in choice)
        if best is None or total > best[0] + 1e-12:
            best = (total, k, r, choice)
    _, k, r, choice = best
    return HeadPlan(k * r, k, [c[1] for c in choice], [c[2] for c in choice])


def plan_channels(scores: torch.Tensor, ratio: float) -> ChannelPlan:
    """The top `keep_count` channels of each layer by score."""
    n = keep_count(scores.shape[1], ratio)
    return ChannelPlan(n, [sorted(int(i) for i in s.topk(n).indices) for s in scores])


def plan_hidden(scores: torch.Tensor, ratio: float, accepts) -> HiddenPlan:
    """The top dimensions by score, as many as the nearest width the config accepts
    (`accepts(width)`; Llama wants a multiple of the head count)."""
    target = keep_count(len(scores), ratio)
    widths = [w for w in range(1, len(scores) + 1) if accepts(w)]
    if not widths:
        raise CompressorError("no hidden size the model config accepts")
    size = min(widths, key=lambda w: (abs(w - target), -w))  # nearest; ties keep more
    return HiddenPlan(size, sorted(int(i) for i in scores.topk(size).indices))


def full_head_plan(layout: HeadLayout, n_layers: int) -> HeadPlan:
    return HeadPlan(layout.heads, layout.kv_heads, [list(range(layout.heads))] * n_layers,
                    [list(range(layout.kv_heads))] * n_layers)


def apply_structured(model: PreTrainedModel, adapter: FamilyAdapter, heads: HeadPlan | None,
                     channels: ChannelPlan | None, hidden: HiddenPlan | None = None) -> PreTrainedModel:
    """A new model of the same class with the plan's units only.

    The state dict is sliced, the config gets the new counts (and an explicit head_dim), and
    the model is rebuilt from that config and loaded strictly: what comes out is exactly what
    `from_pretrained` will build from the saved checkpoint."""
    layout = adapter.layout(model.config)
    state = dict(model.state_dict())
    updates: dict = {}
    for i, prefix in enumerate(layer_prefixes(model)):
        if heads is not None:
            slice_rules(state, prefix, adapter.q_rules, unit_rows(torch.tensor(heads.q_keep[i]), layout.head_dim))
            slice_rules(state, prefix, adapter.kv_rules, unit_rows(torch.tensor(heads.kv_keep[i]), layout.head_dim))
        if channels is not None:
            slice_rules(state, prefix, adapter.channel_rules, torch.tensor(channels.keep[i]))
        if hidden is not None:
            slice_rules(state, prefix, adapter.hidden_rules, torch.tensor(hidden.keep))
    if hidden is not None:
        slice_rules(state, "", tuple(model_hidden_keys(model)), torch.tensor(hidden.keep))
        # the head size is derived from hidden_size unless written down
        updates.update(adapter.head_updates(layout, layout.heads, layout.kv_heads), hidden_size=hidden.size)
    if heads is not None:
        updates.update(adapter.head_updates(layout, heads.heads, heads.kv_heads))
    if channels is not None:
        updates[adapter.channels_field] = channels.channels
    config = type(model.config).from_dict({**model.config.to_dict(), **updates})
    param = next(model.parameters())
    new = type(model)._from_config(config, attn_implementation=model.config._attn_implementation, dtype=param.dtype)
    try:
        new.load_state_dict(state, strict=True)
    except RuntimeError as e:  # a tensor the family's rules do not know (a new norm, a new projection)
        raise CompressorError(f"{type(model).__name__}: pruning left tensors of the old shape: "
                              f"{str(e).splitlines()[-1].strip()[:300]}") from e
    new.to(param.device)
    new.train(model.training)
    return new
