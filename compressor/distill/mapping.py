"""Which teacher layer each student layer learns from, and the `Adapt` projections between them."""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel

from compressor.errors import CompressorError
from compressor.modeling import recsys_meta


def uniform_map(n_student: int, n_teacher: int) -> list[int]:
    """Evenly spaced teacher layers ending at the last one (PKD-skip / TinyBERT mapping):
    student layer i ↔ teacher layer round((i+1)·L/K) − 1."""
    return [round((i + 1) * n_teacher / n_student) - 1 for i in range(n_student)]


def validate_map(layer_map: list[int], n_student: int, n_teacher: int) -> list[int]:
    if len(layer_map) != n_student:
        raise CompressorError(
            f"layer map {layer_map} has {len(layer_map)} entries; the student has {n_student} layers"
        )
    bad = [t for t in layer_map if not isinstance(t, int) or not 0 <= t < n_teacher]
    if bad:
        raise CompressorError(
            f"layer map {layer_map}: teacher layer(s) {bad} out of range 0..{n_teacher - 1}"
        )
    return list(layer_map)


def resolve_layer_map(spec: str | list[int], student: PreTrainedModel, teacher: PreTrainedModel) -> list[int]:
    """The teacher layer index for every student layer, validated."""
    k, n = student.config.num_hidden_layers, teacher.config.num_hidden_layers
    if isinstance(spec, list):
        return validate_map(spec, k, n)
    if spec == "source":
        s_meta, t_meta = recsys_meta(student), recsys_meta(teacher)
        src, cut = s_meta.teacher_layers, t_meta.teacher_layers
        if src is None:
            # Not a truncated student (e.g. built from scratch): the fallback.
            return uniform_map(k, n)
        if cut is not None and s_meta.teacher_num_layers != n and s_meta.teacher_num_layers == t_meta.teacher_num_layers:
            # The teacher is itself cut from the student's original (e.g. recovery of a factorized
            # or pruned student from the unchanged one): both lists index the original's layers.
            missing = [t for t in src if t not in cut]
            if missing:
                raise CompressorError(f"the student's layers come from original layer(s) {missing}, which the "
                                      f"teacher (cut to original layers {cut}) does not have; give distill.layer_map")
            return validate_map([cut.index(t) for t in src], k, n)
        return validate_map([int(t) for t in src], k, n)
    if spec == "uniform":
        return uniform_map(k, n)
    raise CompressorError(f"unknown layer map {spec!r}; use source, uniform or a list of teacher layers")


def hidden_size(model: PreTrainedModel) -> int:
    cfg = model.config
    return getattr(cfg, "hidden_size", None) or cfg.n_embd


def make_adapter(d_student: int, d_teacher: int) -> nn.Module:
    """Identity when sizes agree (a truncated student), else a learnable projection S→T."""
    return nn.Identity() if d_student == d_teacher else nn.Linear(d_student, d_teacher)


class Adapters(nn.Module):
    """One `Adapt` per student layer plus one for the embeddings; trained, never saved in the student."""

    def __init__(self, student: PreTrainedModel, teacher: PreTrainedModel):
        super().__init__()
        ds, dt = hidden_size(student), hidden_size(teacher)
        self.layers = nn.ModuleList(make_adapter(ds, dt) for _ in range(student.config.num_hidden_layers))
        self.embed = make_adapter(ds, dt)

    def forward(self, i: int, h):
        return self.layers[i](h)
