"""One forward pass that also returns what the losses read: per-layer hidden states, the
embedding output, attention maps and value projections, for any decoder family.

Layer outputs are taken with forward hooks on the decoder layers, so every layer — the last
one included — is the raw residual stream *before* the final norm. (Hugging Face's
`output_hidden_states` replaces its last element by the normed `last_hidden_state`, which would
make the last layer incomparable with the others.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedModel

from compressor.errors import CompressorError
from compressor.modeling import decoder_parts, hidden_states


@dataclass(frozen=True)
class Request:
    """What to capture besides the final hidden state (layer indices of this model)."""

    layers: frozenset[int] = frozenset()
    attentions: frozenset[int] = frozenset()
    values: frozenset[int] = frozenset()
    embeddings: bool = False

    def keys(self) -> list[str]:
        """Flat names used by the teacher cache."""
        return (["last"] + [f"h{i}" for i in sorted(self.layers)] + [f"a{i}" for i in sorted(self.attentions)]
                + [f"v{i}" for i in sorted(self.values)] + (["emb"] if self.embeddings else []))


@dataclass
class Features:
    last: torch.Tensor  # (B, T, H) final hidden state (after the final norm): what the head reads
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # layer i output, pre final norm
    attentions: dict[int, torch.Tensor] = field(default_factory=dict)  # (B, heads, T, T) probabilities
    values: dict[int, torch.Tensor] = field(default_factory=dict)  # (B, T, W) value projections
    embeddings: torch.Tensor | None = None  # (B, T, H) input of the first decoder layer

    def to_flat(self) -> dict[str, torch.Tensor]:
        out = {"last": self.last, **{f"h{i}": v for i, v in self.hidden.items()},
               **{f"a{i}": v for i, v in self.attentions.items()}, **{f"v{i}": v for i, v in self.values.items()}}
        if self.embeddings is not None:
            out["emb"] = self.embeddings
        return out

    @classmethod
    def from_flat(cls, flat: dict[str, torch.Tensor]) -> Features:
        f = cls(flat["last"], embeddings=flat.get("emb"))
        for k, v in flat.items():
            if k[0] in "hav" and k[1:].isdigit():
                {"h": f.hidden, "a": f.attentions, "v": f.values}[k[0]][int(k[1:])] = v
        return f


def _first(x):
    return x[0] if isinstance(x, tuple | list) else x


def value_projection(layer: nn.Module) -> tuple[nn.Module, slice | None]:
    """The module producing a layer's attention values (and which slice of its output they are).

    Llama/Qwen2/Mistral: `self_attn.v_proj`; GPT-2: the last third of `attn.c_attn`."""
    for name, mod in layer.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("v_proj", "value"):
            return mod, None
        if leaf == "c_attn":
            width = mod.nf if hasattr(mod, "nf") else mod.out_features
            return mod, slice(2 * width // 3, width)
    raise CompressorError(f"{type(layer).__name__}: no value projection found (needed by minilm)")


def needs_eager(model: PreTrainedModel) -> bool:
    return getattr(model.config, "_attn_implementation", "eager") != "eager"


def extract(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor, req: Request) -> Features:
    """Run the decoder body once and capture what `req` asks for (attentions need eager attention)."""
    parts = decoder_parts(model)
    n = len(parts.layers)
    for i in req.layers | req.attentions | req.values:
        if not 0 <= i < n:
            raise CompressorError(f"layer {i} requested from a model with {n} layers")
    if req.attentions and needs_eager(model):
        raise CompressorError("attention maps need attn_implementation='eager' (see set_attn_implementation)")
    hid: dict[int, torch.Tensor] = {}
    val: dict[int, torch.Tensor] = {}
    emb: list[torch.Tensor] = []
    handles = []

    def keep_output(i):
        return lambda mod, args, out: hid.__setitem__(i, _first(out))

    def keep_value(i, sl):
        return lambda mod, args, out: val.__setitem__(i, out if sl is None else out[..., sl])

    def keep_input(mod, args, kwargs):
        emb.append(args[0] if args else kwargs["hidden_states"])

    try:
        for i in req.layers:
            handles.append(parts.layers[i].register_forward_hook(keep_output(i)))
        for i in req.values:
            mod, sl = value_projection(parts.layers[i])
            handles.append(mod.register_forward_hook(keep_value(i, sl)))
        if req.embeddings:
            handles.append(parts.layers[0].register_forward_pre_hook(keep_input, with_kwargs=True))
        out = hidden_states(model, ids, mask, output_attentions=bool(req.attentions))
    finally:
        for h in handles:
            h.remove()
    attn = {i: out.attentions[i] for i in req.attentions}
    return Features(out.last_hidden_state, hid, attn, val, emb[0] if emb else None)


class TeacherCache:
    """The frozen teacher's captured outputs per training window, filled on first use.

    Exact, not an approximation: the teacher runs in eval mode and every window is left-padded
    to the same `max_len`, so a window's outputs do not depend on which batch it lands in.
    Above `max_mb` of storage the cache switches itself off and the teacher runs every step."""

    def __init__(self, n_windows: int, max_mb: float = 2048.0):
        self.n = n_windows
        self.max_bytes = max_mb * 2**20
        self.store: dict[str, torch.Tensor] = {}
        self.done: dict[str, torch.Tensor] = {}
        self.enabled = True
        self.hits = self.misses = 0

    def _bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.store.values())

    @torch.no_grad()
    def features(self, teacher: PreTrainedModel, idx: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                 req: Request) -> Features:
        if not self.enabled:
            return extract(teacher, ids, mask, req)
        keys = req.keys()
        missing = torch.zeros(len(idx), dtype=torch.bool, device=idx.device)
        for k in keys:
            missing |= ~self.done[k][idx] if k in self.done else True
        self.hits += int((~missing).sum())
        self.misses += int(missing.sum())
        if missing.any():
            rows = missing.nonzero().squeeze(1)
            fresh = extract(teacher, ids[rows], mask[rows], req).to_flat()
            for k in keys:
                if k not in self.store:
                    t = fresh[k]
                    need = self.n * t[0].numel() * t.element_size()
                    if self._bytes() + need > self.max_bytes:
                        self.enabled, self.store, self.done = False, {}, {}
                        return extract(teacher, ids, mask, req)
                    self.store[k] = torch.empty((self.n, *t.shape[1:]), dtype=t.dtype, device=t.device)
                    self.done[k] = torch.zeros(self.n, dtype=torch.bool, device=idx.device)
                self.store[k][idx[rows]] = fresh[k]
                self.done[k][idx[rows]] = True
        return Features.from_flat({k: self.store[k][idx] for k in keys})
