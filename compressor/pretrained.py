"""A real pretrained LLM as the teacher: re-vocabularise it to the item catalogue, then fine-tune.

A text LLM's vocabulary is word pieces, not items. `adapt_llm` keeps its decoder layers (the
part layer importance and truncation work on), and replaces its input embeddings and output
head by an item table of the catalogue's size. Each item's row starts as the mean of the LLM's
own embeddings of the item's text (title and genres) through the LLM's tokenizer, so the
items begin where the language model puts their names. Fine-tuning then trains it on
next-item prediction like any teacher. Everything is read from the local path: no download.
"""

from __future__ import annotations

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


def load_tokenizer(path: Path):
    """The LLM's own tokenizer: `tokenizer.json` exactly as shipped when there is one (transformers 5
    may otherwise substitute its family's class), else whatever AutoTokenizer finds."""
    if (path / "tokenizer.json").exists():
        return PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
    return AutoTokenizer.from_pretrained(path)


def adapt_llm(path: str | Path, data: RecData, max_len: int) -> PreTrainedModel:
    """Load a local causal LM and give it the item vocabulary of `data` (tied input/output table)."""
    path = Path(path).expanduser()
    if not (path / "config.json").exists():
        raise ArtifactError(f"{path}: not a Hugging Face model directory (no config.json)")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
        tokenizer = load_tokenizer(path)
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path}: could not load the LLM or its tokenizer ({e})") from e
    decoder_parts(model)  # fails early, with a clear message, on a model without decoder layers
    items = text_embeddings(model, tokenizer, item_texts(data))
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
    set_recsys_meta(model, max_len=max_len, kind="teacher", adapted_from=str(path))
    return model
