"""Helpers every stage uses to treat any Hugging Face causal-LM decoder as a recommender.

The parts are found through one helper (`decoder_parts`), so Llama, Qwen2, Mistral, GPT-2 and
other families go through the same code. A history is a left-padded row of item tokens; the
recommendation is the output head applied to the last position's final hidden state.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from compressor.atomic import atomic_directory
from compressor.data.vocab import VOCAB_FILE, ItemVocab
from compressor.errors import ArtifactError
from compressor.model_card import CARD_FILE, build_card

_FINAL_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm", "norm_f")


@dataclass
class DecoderParts:
    """Where a decoder keeps its pieces; names differ by family, roles do not."""

    base: nn.Module  # the model without its head (`model.model`, `model.transformer`)
    embed: nn.Embedding
    layers: nn.ModuleList
    layers_attr: str  # attribute of `base` that holds `layers`
    norm: nn.Module | None
    head: nn.Linear


def decoder_parts(model: PreTrainedModel) -> DecoderParts:
    """Find embeddings, decoder layers, final norm and output head of a causal LM."""
    base = model.base_model
    n = model.config.num_hidden_layers
    layers_attr = None
    for name, child in base.named_children():
        if isinstance(child, nn.ModuleList) and len(child) == n:
            layers_attr = name
            break
    if layers_attr is None:
        raise ArtifactError(
            f"{type(model).__name__}: no ModuleList of {n} decoder layers found on {type(base).__name__}"
        )
    norm = next((getattr(base, a) for a in _FINAL_NORM_NAMES if isinstance(getattr(base, a, None), nn.Module)), None)
    head = model.get_output_embeddings()
    if head is None:
        raise ArtifactError(f"{type(model).__name__}: no output head (is it a causal LM?)")
    return DecoderParts(base, model.get_input_embeddings(), getattr(base, layers_attr), layers_attr, norm, head)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each history's first real item, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def hidden_states(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    output_hidden_states: bool = False,
    output_attentions: bool = False,
):
    """Run the decoder body (no head); returns the Hugging Face output object."""
    return model.base_model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        output_hidden_states=output_hidden_states,
        output_attentions=output_attentions,
        use_cache=False,
    )


def last_hidden(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The final hidden state at the newest position, (B, H): the user's query vector."""
    return hidden_states(model, input_ids, attention_mask).last_hidden_state[:, -1]


def item_scores(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scores of every token for the next item, (B, V)."""
    return model.get_output_embeddings()(last_hidden(model, input_ids, attention_mask))


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _model_dir_hint(directory: Path) -> str:
    """' (did you mean DIR/student?)' when a child of `directory` is a model directory."""
    kids = sorted(c for c in directory.iterdir() if c.is_dir() and is_model_dir(c)) if directory.is_dir() else []
    return f" (did you mean {kids[0]}?)" if kids else ""


def _load_error(directory: Path, e: BaseException) -> ArtifactError:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    return ArtifactError(f"{directory}: could not load the model, its files are damaged or not a "
                         f"Hugging Face checkpoint ({type(e).__name__}: {first})")


def require_model_dir(directory: str | Path) -> Path:
    """`directory` if it has this project's model files (config.json + item vocabulary), else an
    ArtifactError that points at a model directory inside it (`DIR/student` of a distillation)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: no such model directory")
    for name, what in ((VOCAB_FILE, "not a model directory of this project?"),
                       ("config.json", "not a Hugging Face checkpoint")):
        if not (directory / name).exists():
            raise ArtifactError(f"{directory}: no {name} ({what}){_model_dir_hint(directory)}")
    return directory


def load_model_config(directory: str | Path) -> PretrainedConfig:
    """The Hugging Face config of a model directory; a missing or corrupt config.json is an ArtifactError."""
    directory = require_model_dir(directory)
    try:
        return AutoConfig.from_pretrained(directory)
    except Exception as e:  # OSError (bad JSON), ValueError/KeyError (unknown model_type), ...
        raise _load_error(directory, e) from e


def load_model(directory: str | Path, attn: str = "sdpa") -> tuple[PreTrainedModel, ItemVocab]:
    """Load a model directory written by `save_model` (any causal-LM family).

    The one place model files are read: every way they can be missing or damaged (no vocabulary,
    corrupt config.json, truncated model.safetensors, ...) is an ArtifactError naming the directory."""
    directory = require_model_dir(directory)
    vocab = ItemVocab.load(directory)
    config = load_model_config(directory)  # config errors first: they name the file
    try:
        if RecsysMeta.of(config).lowrank:
            model = load_factorized(directory, config, attn)
        else:
            model = AutoModelForCausalLM.from_pretrained(directory, config=config, attn_implementation=attn,
                                                         dtype=torch.float32)
    except Exception as e:  # SafetensorError (truncated weights), OSError, ValueError, RuntimeError (shapes)
        raise _load_error(directory, e) from e
    if model.config.vocab_size != vocab.size:
        raise ArtifactError(
            f"{directory}: model vocab_size {model.config.vocab_size} != item vocabulary size {vocab.size}"
        )
    model.eval()
    return model, vocab


# ---------------------------------------------------------------------------- low-rank checkpoints
# A factorized model (compressor.lowrank) is not a stock checkpoint: a stock LlamaForCausalLM has one
# q_proj.weight where it has q_proj.u / q_proj.v. Its ranks are in `config.recsys["lowrank"]`, and
# `load_model` rebuilds those modules before loading the tensors (model files are read here only).


class LowRankLinear(nn.Module):
    """y = U(V x) + b: a dense (in → out) linear as two thinner ones through rank r."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.v = nn.Linear(in_features, rank, bias=False)
        self.u = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.u(self.v(x))


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight of an nn.Linear or a GPT-2 Conv1D (which stores (in, out))."""
    return module.weight.T if isinstance(module, Conv1D) else module.weight


def set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def restructure(model: PreTrainedModel, ranks: dict[str, int]) -> PreTrainedModel:
    """Swap each dense linear named in `ranks` for an (untrained) `LowRankLinear` of that rank:
    the module tree a saved factorized checkpoint's tensors fit."""
    for path, r in ranks.items():
        try:
            m = model.get_submodule(path)
        except AttributeError as e:
            raise ArtifactError(f"recorded low-rank module {path!r} is not in {type(model).__name__}") from e
        o, i = dense_weight(m).shape
        set_module(model, path, LowRankLinear(i, o, int(r), m.bias is not None).to(m.weight.dtype))
    return model


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    index = directory / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists()
             else ["model.safetensors"])
    state = {}
    for f in files:
        if not (directory / f).exists():
            raise ArtifactError(f"{directory}: missing weight file {f}")
        state.update(load_file(directory / f))
    return state


def load_factorized(directory: str | Path, config, attn: str = "sdpa") -> PreTrainedModel:
    """Build the model from `config`, factorize the recorded modules, load the saved tensors.
    Every tensor must fit and every parameter must be loaded (tied ones through their twin)."""
    directory = Path(directory)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)
    restructure(model, RecsysMeta.of(config).lowrank["ranks"])
    state = _read_tensors(directory)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatch: ranks and tensors disagree
        raise ArtifactError(f"{directory}: tensors do not fit the recorded low-rank shapes ({e})") from e
    # Tied parameters (the output head = the item embeddings) are saved once, under one name.
    shared: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        shared.setdefault(id(p), []).append(name)
    twins = {n for names in shared.values() if len(names) > 1 and any(x in state for x in names) for n in names}
    buffers = {n for n, _ in model.named_buffers()}
    missing = [k for k in missing if k not in twins and k not in buffers]
    if missing or unexpected:
        raise ArtifactError(f"{directory}: low-rank checkpoint does not match its recorded ranks "
                            f"(missing {missing[:3]}, unexpected {list(unexpected)[:3]})")
    return model.eval()


def save_model(model: PreTrainedModel, vocab: ItemVocab, directory: str | Path, extra: dict | None = None) -> Path:
    """Write checkpoint + item vocabulary (+ extra JSON files) + a model card (README.md)
    atomically (`atomic.atomic_directory`: a temp dir, then rename)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    dataset = next((v["data"] for v in (extra or {}).values() if isinstance(v, dict) and isinstance(v.get("data"), str)), None)
    if dataset:  # recorded in the config, so students cut from this model still name their data
        set_recsys_meta(model, dataset=dataset)
    with atomic_directory(directory) as tmp:
        model.save_pretrained(tmp)
        vocab.save(tmp)
        for name, payload in (extra or {}).items():
            (tmp / name).write_text(json.dumps(payload, indent=2, default=str))
        (tmp / CARD_FILE).write_text(_card(model, vocab, extra or {}), encoding="utf-8")
    return directory


def _card(model: PreTrainedModel, vocab: ItemVocab, extra: dict) -> str:
    meta = recsys_meta(model)
    summaries = [v for v in extra.values() if isinstance(v, dict)]
    metrics = next((s["best_valid"] for s in summaries if isinstance(s.get("best_valid"), dict)), None)
    fingerprint = next((s["data_fingerprint"] for s in summaries if s.get("data_fingerprint")), None)
    adapted = meta.adapted_from
    return build_card(
        kind=meta.kind or "model", architecture=model.config.model_type, parameters=count_parameters(model),
        num_layers=model.config.num_hidden_layers, hidden_size=model.config.hidden_size, num_items=vocab.num_items,
        dataset=meta.dataset, metrics=metrics, metrics_split="valid",
        base_model=Path(adapted).name if adapted else None, teacher_layers=meta.teacher_layers,
        data_fingerprint=fingerprint,
    )


def is_model_dir(directory: str | Path) -> bool:
    d = Path(directory)
    return (d / "config.json").exists() and (d / VOCAB_FILE).exists()


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class QueryEncoder(nn.Module):
    """What gets exported and served: (input_ids, attention_mask) -> last-position hidden state.

    Histories are left-padded (B, T) int64 rows; the output (B, H) is the query vector whose
    inner product with the item embeddings (`model.get_output_embeddings().weight`) scores
    every item. Scoring stays outside the graph so Faiss can retrieve over millions of items."""

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return last_hidden(self.model, input_ids, attention_mask)


class RecsysMeta(BaseModel):
    """This project's metadata in a checkpoint's `config.json`, under `recsys`. Stock
    `from_pretrained` keeps it as a plain dict attribute of the config; this is its one reader."""

    # Keys a newer version wrote survive a load and save here; a wrong type is a damaged file.
    model_config = ConfigDict(extra="allow")
    max_len: int | None = Field(None, ge=1, description="longest history (items) the model reads; "
                                "the window it was trained with")
    kind: str | None = Field(None, description="teacher or student")
    dataset: str | None = Field(None, description="name of the data the model was trained on")
    adapted_from: str | None = Field(None, description="the pretrained LLM a teacher was re-vocabularised from")
    teacher_layers: list[int] | None = Field(None, description="a student's teacher index of each of its layers")
    teacher_num_layers: int | None = Field(None, description="depth of the teacher a student was cut from")
    distilled_with: str | None = Field(None, description="distillation method (LOSSES key)")
    pruning: dict | None = Field(None, description="what compressor.prune removed (ratios, scorer)")
    lowrank: dict | None = Field(None, description="compressor.lowrank's ranks per module; load_model "
                                 "rebuilds the factorized layers from them")

    @classmethod
    def of(cls, config: PretrainedConfig) -> RecsysMeta:
        raw = getattr(config, "recsys", None)
        try:
            return cls.model_validate(raw if isinstance(raw, dict) else {})
        except ValidationError as e:
            first = e.errors()[0]
            raise ArtifactError(f"config.json: recsys.{'.'.join(map(str, first['loc']))}: {first['msg']}") from e

    def to_json(self) -> dict:
        return self.model_dump(mode="json", exclude_none=True)


def recsys_meta(model: PreTrainedModel) -> RecsysMeta:
    """The model's `config.recsys` metadata (empty for a checkpoint of another tool)."""
    return RecsysMeta.of(model.config)


def set_recsys_meta(model: PreTrainedModel, **fields) -> None:
    """Update fields of the model's metadata (None removes one); unknown names are kept as given."""
    meta = recsys_meta(model).to_json() | fields
    model.config.recsys = RecsysMeta.model_validate(meta).to_json()


def model_max_len(model: PreTrainedModel | PretrainedConfig) -> int:
    """The longest history the model reads: `recsys.max_len`, which every model this project trains
    records; else the size of its position table, which the teacher builder sets to max_len (a
    model built but never trained). Every stage and command reads the window from here."""
    config = model if isinstance(model, PretrainedConfig) else model.config
    recorded = RecsysMeta.of(config).max_len
    if recorded is not None:
        return recorded
    for name in ("max_position_embeddings", "n_positions"):
        if value := getattr(config, name, None):
            return int(value)
    raise ArtifactError("the model records no max_len (config.json: recsys.max_len) and has no position table")


def add_hidden_dropout(model: PreTrainedModel, p: float) -> list:
    """Dropout on the embeddings and on every decoder layer's output, in training mode only.

    Llama-family decoders have attention dropout but no hidden-state dropout, which small
    recommendation datasets need (SASRec uses both). Hooks add it without changing the
    architecture, so checkpoints stay stock; the caller removes the returned handles."""
    parts = decoder_parts(model)

    def hook(module: nn.Module, args, output):
        if not module.training or p <= 0:
            return output
        if isinstance(output, tuple):
            return (torch.nn.functional.dropout(output[0], p, True), *output[1:])
        return torch.nn.functional.dropout(output, p, True)

    return [parts.embed.register_forward_hook(hook)] + [layer.register_forward_hook(hook) for layer in parts.layers]
