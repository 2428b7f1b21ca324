"""A model directory or a baseline evaluated by name, and two evaluations compared: what the
pipeline's evaluate stage and `compressor evaluate` share, so both make the same checks and give
the same numbers."""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedModel

from compressor.baselines import BASELINES, evaluate_baseline
from compressor.data.protocol import RecData
from compressor.data.vocab import ItemVocab
from compressor.errors import CompressorError
from compressor.evaluate import EvalResult, evaluate_model, paired_bootstrap
from compressor.modeling import load_model, model_max_len


def evaluate_named(spec: str | Path, data: RecData, split: str,
                   loaded: tuple[PreTrainedModel, ItemVocab] | None = None, max_len: int | None = None,
                   progress: bool = False) -> tuple[EvalResult, dict]:
    """(result, extra) of a baseline name (a key of BASELINES; extra = {"fit": ...} when it was
    fitted) or a model directory (`loaded`: its (model, vocabulary) when read already; `max_len`:
    its own history window unless given) on `data`'s `split`.

    A model must rank the data's catalogue: one with another item vocabulary is refused (its item
    ids would mean other items)."""
    if str(spec) in BASELINES:
        result, info = evaluate_baseline(str(spec), data, split)
        return result, ({"fit": info} if info else {})
    model, vocab = loaded or load_model(spec)
    if not vocab.same_as(data.vocab):
        raise CompressorError(f"{spec}: its item vocabulary differs from the one evaluated against "
                              f"({vocab.num_items} vs {data.vocab.num_items} items)")
    return evaluate_model(model, data.split(split), max_len or model_max_len(model), progress=progress), {}


def compare(a: EvalResult, b: EvalResult, metrics: tuple[str, ...] = ("ndcg@10",), resamples: int = 2000) -> dict:
    """{metric: paired bootstrap of a - b over the same users} (`evaluate.paired_bootstrap`)."""
    return {m: paired_bootstrap(a.per_user[m], b.per_user[m], resamples) for m in metrics}
