"""Truncation: a real student checkpoint whose decoder layers are copies of chosen teacher layers.

The student is built from the teacher's config with `num_hidden_layers = k` (so every per-layer
index, e.g. attention `layer_idx` used by the KV cache, is fresh), per-layer config lists such as
`layer_types` are re-indexed, and the teacher's weights are copied in: student layer i gets
teacher layer `layers[i]`, everything outside the layers (embeddings, positions, final norm,
head) as is. It records `teacher_layers` in its metadata for distillation's layer mapping.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from transformers import AutoModelForCausalLM, PreTrainedModel

from compressor.data.protocol import RecData
from compressor.data.vocab import ItemVocab
from compressor.evaluate import evaluate_model
from compressor.modeling import (
    count_parameters,
    decoder_parts,
    load_model,
    load_model_config,
    model_max_len,
    recsys_meta,
    save_model,
    set_recsys_meta,
)
from compressor.select import (
    DEFAULT_STRATEGY,
    SELECTION,
    LayerChoice,
    choose_layers,
    propose_layer_sets,
    validate_layers,
)

TRUNCATION_FILE = "truncation.json"
# Config lists that are not per layer even when their length happens to equal the depth.
_NOT_PER_LAYER = {"architectures"}


def _per_layer_fields(config, num_layers: int) -> list[str]:
    """Config attributes holding one entry per decoder layer (layer_types, no_rope_layers, ...)."""
    return [k for k, v in config.to_dict().items()
            if k not in _NOT_PER_LAYER and isinstance(v, list | tuple) and len(v) == num_layers]


def student_config(teacher: PreTrainedModel, layers: list[int]):
    """The teacher's config for a depth of len(layers), per-layer fields re-indexed."""
    L = teacher.config.num_hidden_layers
    config = copy.deepcopy(teacher.config)
    for name in _per_layer_fields(teacher.config, L):
        value = getattr(teacher.config, name)
        setattr(config, name, type(value)(value[i] for i in layers))
    config.num_hidden_layers = len(layers)  # GPT-2's n_layer through its attribute_map
    return config


def truncate(model: PreTrainedModel, layers: list[int]) -> PreTrainedModel:
    """A new student keeping teacher layers `layers` (increasing, unique, in range) in order."""
    parts = decoder_parts(model)
    L = len(parts.layers)
    layers = validate_layers(layers, L, allow_all=True)
    config = student_config(model, layers)
    student = AutoModelForCausalLM.from_config(
        config, attn_implementation=getattr(model.config, "_attn_implementation", None), dtype=model.dtype)
    # State-dict keys of the layers look like "<prefix>.<i>.<rest>" ("model.layers.3.mlp...").
    prefix = next(n for n, m in model.named_modules() if m is parts.layers)
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.*)$")
    new_index = {t: s for s, t in enumerate(layers)}
    state = {}
    for key, value in model.state_dict().items():
        m = pattern.match(key)
        if m is None:
            state[key] = value
        elif int(m.group(1)) in new_index:
            state[f"{prefix}.{new_index[int(m.group(1))]}.{m.group(2)}"] = value
    # strict: every student tensor must come from the teacher, and nothing may be left over.
    student.load_state_dict(state, strict=True)
    student.to(next(model.parameters()).device)
    student.train(model.training)
    set_recsys_meta(student, kind="student", teacher_layers=layers, teacher_num_layers=L,
                    max_len=recsys_meta(model).max_len)
    return student


def truncate_dir(teacher_dir: str | Path, out_dir: str | Path, layers: list[int],
                 info: dict | None = None) -> Path:
    """Load a teacher directory, keep `layers` (fewer than all), save the student (`save_truncated`)."""
    teacher, vocab = load_model(teacher_dir)
    return save_truncated(teacher, vocab, teacher_dir, out_dir, layers, info)


def save_truncated(teacher: PreTrainedModel, vocab: ItemVocab, teacher_dir: str | Path, out_dir: str | Path,
                   layers: list[int], info: dict | None = None) -> Path:
    """Keep `layers` (fewer than all) of `teacher` (read from `teacher_dir`), save the student with
    its item vocabulary and a `truncation.json` (teacher, layers, parameters, and `info` such as
    the method and strategy that chose the layers)."""
    L = teacher.config.num_hidden_layers
    layers = validate_layers(layers, L)
    student = truncate(teacher, layers)
    record = {
        "teacher_dir": str(teacher_dir), "teacher_num_layers": L, "teacher_layers": layers,
        "teacher_parameters": count_parameters(teacher), "student_parameters": count_parameters(student),
        **(info or {}),
    }
    return save_model(student, vocab, out_dir, {TRUNCATION_FILE: record})


def choose_and_truncate(teacher_dir: str | Path, out_dir: str | Path, data: Callable[[ItemVocab], RecData], *,
                        layers: list[int] | None = None, keep: int | None = None, method: str = "",
                        strategy: str = DEFAULT_STRATEGY, candidates: Sequence[str] = tuple(SELECTION),
                        scores: Callable[[int, Callable[[], tuple[PreTrainedModel, ItemVocab]]], list[float]]
                        | None = None,
                        info: dict | None = None) -> LayerChoice:
    """The truncation stage, for the pipeline and `compressor truncate` alike: choose the kept
    layers (`select.choose_layers`: an explicit list, or `keep` layers by `strategy` over
    `scores(num_layers, teacher)`, the validated strategy judging proposals on `data(vocab)`'s
    validation split) and save the student. The choice is checked against the teacher's config
    before the teacher is read, once, when first needed (`teacher()` gives the model and its
    vocabulary). `info`: more for `truncation.json`, read when the student is saved."""
    num_layers = load_model_config(teacher_dir).num_hidden_layers  # GPT-2's n_layer too
    read: list = []

    def teacher() -> tuple[PreTrainedModel, ItemVocab]:
        if not read:
            read.append(load_model(teacher_dir))
        return read[0]

    def judge(strategies: list[str], found: list[float], k: int):
        model, vocab = teacher()
        return validated(model, strategies, found, k, data(vocab), model_max_len(model))

    choice = choose_layers(num_layers, layers=layers, keep=keep, method=method, strategy=strategy,
                           candidates=candidates, judge=judge,
                           scores=None if scores is None else lambda: scores(num_layers, teacher))
    save_truncated(*teacher(), teacher_dir, out_dir, choice.layers, {**choice.why, **(info or {})})
    return choice


def validated(teacher: PreTrainedModel, strategies: list[str], scores: list[float], k: int,
              data: RecData, max_len: int) -> tuple[list[int], list[dict]]:
    """Let each strategy propose k layers, truncate the teacher to every distinct proposal and keep
    the one with the best validation NDCG@10 (untrained, so it measures the layers themselves).
    The test split is never touched. Returns the layers and one row per proposal."""
    valid = data.split("valid")
    rows = []
    for layers, names in propose_layer_sets(strategies, scores, k).items():
        ndcg = evaluate_model(truncate(teacher, list(layers)).eval(), valid, max_len).metrics["ndcg@10"]
        rows.append({"layers": list(layers), "strategies": names, "valid_ndcg@10": ndcg})
    best = max(rows, key=lambda r: r["valid_ndcg@10"])  # first of equals: the earlier strategy
    return best["layers"], rows
