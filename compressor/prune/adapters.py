"""Where heads, MLP channels and the model width live inside one decoder layer, per model family.

`decoder_parts` finds the layers of any causal LM; inside a layer the module names differ by
family. An adapter says, declaratively, which tensor rows/columns belong to a query head, a
key/value head, an MLP channel and a hidden (residual-stream) dimension, which module's *input*
carries the merged heads / channels (where mask variables are applied), and which config fields
hold the counts. Pruning is then one generic slicing of the state dict.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from compressor.errors import CompressorError
from compressor.modeling import decoder_parts

# A slice rule: (parameter name relative to the layer, dimension that indexes the unit).
Rule = tuple[str, int]


@dataclass(frozen=True)
class HeadLayout:
    """Attention shape of a model: query heads, key/value heads (GQA) and head size."""

    heads: int
    kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        """Query heads sharing one key/value head."""
        return self.heads // self.kv_heads


@dataclass(frozen=True)
class FamilyAdapter:
    """Module names of one family. `q_rules` are indexed by query-head rows (head_dim each),
    `kv_rules` by key/value-head rows, `channel_rules` by MLP intermediate channels."""

    name: str
    required: tuple[str, ...]  # modules (relative to a layer) whose presence identifies the family
    head_out: str | None  # module whose input is the merged heads (B, T, heads*head_dim)
    channel_out: str  # module whose input is the MLP intermediate activation (B, T, channels)
    q_rules: tuple[Rule, ...]
    kv_rules: tuple[Rule, ...]
    channel_rules: tuple[Rule, ...]
    channels_field: str  # config field with the intermediate size
    head_fields: tuple[str, str, str] | None  # config fields: heads, kv heads, head size
    no_head_pruning: str = ""  # why heads cannot shrink for this family (empty = they can)
    # tensors indexed by a hidden dimension (the residual stream every layer reads and writes);
    # None = the family cannot be made narrower, `no_hidden_pruning` says why
    hidden_rules: tuple[Rule, ...] | None = None
    no_hidden_pruning: str = ""

    def matches(self, layer: nn.Module) -> bool:
        return all(submodule(layer, path) is not None for path in self.required)

    def layout(self, config) -> HeadLayout:
        heads = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return HeadLayout(heads, kv, head_dim)

    def channels(self, config) -> int:
        value = getattr(config, self.channels_field, None)
        # GPT-2 stores n_inner=None for the default 4 * hidden.
        return int(value) if value else 4 * config.hidden_size

    def head_updates(self, layout: HeadLayout, heads: int, kv_heads: int) -> dict:
        if self.head_fields is None:
            raise CompressorError(f"{self.name}: {self.no_head_pruning}")
        h, kv, hd = self.head_fields
        # head_dim is written explicitly: most families derive it as hidden_size // heads.
        return {hd: layout.head_dim, h: heads, kv: kv_heads}


def submodule(module: nn.Module, path: str):
    """The module or parameter at a dotted path ("self_attn.q_proj.weight"), or None."""
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


_GATED_Q = (("self_attn.q_proj.weight", 0), ("self_attn.q_proj.bias", 0), ("self_attn.o_proj.weight", 1))
_GATED_KV = tuple((f"self_attn.{p}_proj.{w}", 0) for p in ("k", "v") for w in ("weight", "bias"))
_GATED_MLP = (("mlp.gate_proj.weight", 0), ("mlp.gate_proj.bias", 0), ("mlp.up_proj.weight", 0),
              ("mlp.up_proj.bias", 0), ("mlp.down_proj.weight", 1))
# what reads the residual stream (norms, the input side of q/k/v and gate/up) and what writes it
# (the output side of o_proj and down_proj); Gemma's extra feed-forward norms are skipped when absent
_GATED_HIDDEN = (
    *((f"{norm}.weight", 0) for norm in ("input_layernorm", "post_attention_layernorm",
                                         "pre_feedforward_layernorm", "post_feedforward_layernorm")),
    *((f"self_attn.{p}_proj.weight", 1) for p in ("q", "k", "v")),
    ("self_attn.o_proj.weight", 0), ("self_attn.o_proj.bias", 0),
    ("mlp.gate_proj.weight", 1), ("mlp.up_proj.weight", 1), ("mlp.down_proj.weight", 0), ("mlp.down_proj.bias", 0),
)

ADAPTERS: dict[str, FamilyAdapter] = {
    # Llama, Qwen2/3, Mistral, Gemma and the many families that copied their names.
    "gated": FamilyAdapter(
        name="gated",
        required=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
        head_out="self_attn.o_proj", channel_out="mlp.down_proj",
        q_rules=_GATED_Q, kv_rules=_GATED_KV, channel_rules=_GATED_MLP,
        channels_field="intermediate_size",
        head_fields=("num_attention_heads", "num_key_value_heads", "head_dim"),
        hidden_rules=_GATED_HIDDEN,
    ),
    # GPT-2 (Conv1D: weights are (in, out)). Its attention derives head size from n_embd / n_head
    # and fuses q|k|v, so a stock GPT2Config cannot describe fewer heads of the same size.
    "gpt2": FamilyAdapter(
        name="gpt2",
        required=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
        head_out="attn.c_proj", channel_out="mlp.c_proj",
        q_rules=(), kv_rules=(), channel_rules=(("mlp.c_fc.weight", 1), ("mlp.c_fc.bias", 0), ("mlp.c_proj.weight", 0)),
        channels_field="n_inner", head_fields=None,
        no_head_pruning="GPT-2 derives the head size from n_embd / n_head, so fewer heads would not "
                        "reload with from_pretrained; prune its MLP channels instead",
        no_hidden_pruning="GPT-2 derives the head size from n_embd / n_head, so a narrower model would "
                          "change every head; prune its MLP channels instead",
    ),
}


def find_adapter(model: PreTrainedModel) -> FamilyAdapter:
    """The adapter whose modules every decoder layer has, or a CompressorError."""
    layers = decoder_parts(model).layers
    for adapter in ADAPTERS.values():
        if all(adapter.matches(layer) for layer in layers):
            return adapter
    names = sorted({n.split(".")[0] + "." + n.split(".")[1] for n, _ in layers[0].named_modules() if n.count(".") >= 1})
    raise CompressorError(
        f"model without the expected modules: {type(model).__name__} layers have {', '.join(names) or 'no submodules'}; "
        f"known families: {', '.join(f'{a.name} ({a.required[0]}, ...)' for a in ADAPTERS.values())}"
    )


def layer_prefixes(model: PreTrainedModel) -> list[str]:
    """State-dict prefix of each decoder layer ("model.layers.3.")."""
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(layer)] + "." for layer in decoder_parts(model).layers]


def unit_rows(units: torch.Tensor, size: int) -> torch.Tensor:
    """Row indices of whole units (heads of `size` rows each), in order."""
    return (units[:, None] * size + torch.arange(size, device=units.device)).reshape(-1)


def model_hidden_keys(model: PreTrainedModel) -> list[Rule]:
    """State-dict keys outside the layers indexed by a hidden dimension: the item table (and the
    head, tied or not: every name a shared tensor has), the final norm."""
    parts = decoder_parts(model)
    tensors = [(parts.embed.weight, 1), (parts.head.weight, 1)]
    if parts.norm is not None:
        tensors += [(p, 0) for p in parts.norm.parameters(recurse=False)]
    dims = {id(p): dim for p, dim in tensors}
    state_names = model.state_dict(keep_vars=True)
    return [(name, dims[id(p)]) for name, p in state_names.items() if id(p) in dims]


def slice_rules(state: dict, prefix: str, rules: tuple[Rule, ...], rows: torch.Tensor) -> None:
    """Keep `rows` along each rule's dimension (rules whose tensor is absent, e.g. no bias, are skipped)."""
    for name, dim in rules:
        key = prefix + name
        if key in state:
            state[key] = state[key].index_select(dim, rows.to(state[key].device)).contiguous()
