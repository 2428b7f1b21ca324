"""`RunConfig`: everything the compression job does, one section per stage, loaded from YAML.

Each section is the stage's own config (`ImportanceConfig`, `PruneConfig`, ...) or a small model
here; `configs/default.yaml` lists every field with its default (tested value for value).
Cross-stage checks run at load, so a bad combination fails before any data is read.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from compressor.baselines import BASELINES
from compressor.data.config import DataConfig
from compressor.distill.config import DistillConfig
from compressor.errors import CompressorError
from compressor.export import ExportConfig
from compressor.importance import DEFAULT_METHOD, ImportanceConfig
from compressor.lowrank import LowRankConfig
from compressor.prune import ADAPTERS, PruneConfig
from compressor.select import DEFAULT_STRATEGY, SELECTION, VALIDATED, validate_layers
from compressor.teacher import TeacherConfig, build_hf_config


def teacher_shape_problem(cfg: TeacherConfig) -> str | None:
    """Why the Hugging Face config of `cfg` could not be built, or None. The same builder training
    uses runs here, at config load, so a bad shape (hidden size not divisible by heads, an odd
    RoPE head size, ...) fails before data is read or a directory is written."""
    if cfg.pretrained:
        return None  # the pretrained model's own sizes are used
    try:
        build_hf_config(cfg, vocab_size=16)
    except Exception as e:  # ValueError, HF's StrictDataclass...Error: whatever the builder rejects
        return " ".join(str(e).split())[:300] or type(e).__name__
    kv = cfg.num_kv_heads
    if kv is not None and cfg.architecture != "gpt2" and cfg.num_heads % kv:  # HF does not check this
        return f"num_heads {cfg.num_heads} is not a multiple of num_kv_heads {kv}"
    return None


class TeacherSection(TeacherConfig):
    """The run's teacher: a `TeacherConfig` to train, or `path` to one trained already. A section is
    a TeacherConfig, so the stage hands it to `train_teacher` as it is."""

    path: str | None = Field(None, description="use this trained teacher model dir instead of training one")

    @model_validator(mode="after")
    def _buildable(self) -> TeacherSection:
        if self.path is None and (problem := teacher_shape_problem(self)):
            raise ValueError(problem)
        return self


class SelectionConfig(BaseModel):
    """Which teacher layers the student keeps (`compressor.select.choose_layers`)."""

    model_config = ConfigDict(extra="forbid")
    keep: int = Field(2, ge=1, description="decoder layers the student keeps")
    method: str = Field(DEFAULT_METHOD, description="importance method whose scores choose the layers")
    strategy: str = Field(DEFAULT_STRATEGY, description="selection strategy (top_k, distributed, strategic, hybrid), "
                          "or validated: the best of the `candidates` sets on the validation split")
    candidates: list[str] = Field(default_factory=lambda: list(SELECTION),
                                  description="strategies whose sets `validated` compares")
    layers: list[int] | None = Field(None, description="explicit teacher layers; overrides keep/method/strategy")

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, v: str) -> str:
        if v != VALIDATED and v not in SELECTION:
            raise ValueError(f"unknown selection strategy {v!r}; choose one of {', '.join([*SELECTION, VALIDATED])}")
        return v

    @field_validator("candidates")
    @classmethod
    def _known_candidates(cls, v: list[str]) -> list[str]:
        if not v or any(c not in SELECTION for c in v):
            raise ValueError(f"candidates {v}: give one or more of {', '.join(SELECTION)}")
        return v


class DistillSection(DistillConfig):
    """The run's distillation: a `DistillConfig` (handed to `distill` as it is) that can be off."""

    enabled: bool = Field(True, description="false: the student is the truncated (and pruned) model as is")


class EvaluateConfig(BaseModel):
    """Test metrics of every model the run made, the baselines beside them, the paired bootstrap."""

    model_config = ConfigDict(extra="forbid")
    baselines: list[str] = Field(default_factory=lambda: ["mostpop", "ease"])
    bootstrap_resamples: int = Field(2000, ge=100)
    ease_max_items: int = Field(15_000, ge=1, description="EASE is skipped (with a line saying why) above this "
                                "catalogue size: its dense items x items matrices take 16 bytes x items² "
                                "(3.4 GiB at 15,000 items)")

    @field_validator("baselines")
    @classmethod
    def _known_baselines(cls, v: list[str]) -> list[str]:
        if bad := [b for b in v if b not in BASELINES]:
            raise ValueError(f"unknown baseline {bad[0]!r}; choose from {', '.join(sorted(BASELINES))}")
        return v


class SpeedConfig(BaseModel):
    """ONNX Runtime latency and throughput of the teacher's and the student's graphs."""

    model_config = ConfigDict(extra="forbid")
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 64])
    rounds: int = Field(5, ge=1, description="interleaved rounds; the median of all calls is reported")
    calls_per_round: int = Field(20, ge=1)
    threads: int | None = Field(None, description="ONNX Runtime intra-op threads; None = runtime default")


class RunConfig(BaseModel):
    """Everything the job does, one section per stage; `configs/default.yaml` shows every default."""

    model_config = ConfigDict(extra="forbid")
    data: DataConfig = DataConfig()
    teacher: TeacherSection = TeacherSection()
    importance: ImportanceConfig = ImportanceConfig()
    selection: SelectionConfig = SelectionConfig()
    prune: PruneConfig = Field(PruneConfig(), description="width pruning of the student; all ratios 0 = off")
    lowrank: LowRankConfig = Field(LowRankConfig(), description="low-rank factorization after pruning; "
                                   "ratio and energy null = off")
    distill: DistillSection = DistillSection()
    export: ExportConfig = Field(ExportConfig(quantize="auto"), description="the job quantizes too (export.quantize: "
                                 "auto: every method judged by export.quantization's budget, the fastest within it kept)")
    evaluate: EvaluateConfig = EvaluateConfig()
    speed: SpeedConfig = SpeedConfig()

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        """Cross-stage checks that would otherwise fail only when their stage runs."""
        sel = self.selection
        if sel.layers is None and sel.method not in self.importance.methods:
            raise ValueError(f"selection.method {sel.method!r} is not among importance.methods "
                             f"({', '.join(self.importance.methods)}), so it would have no scores to choose by")
        t = self.teacher
        if t.path is None and t.pretrained is None:  # the teacher's shape is known now
            n = t.num_layers
            if self.selection.layers is None and not 1 <= self.selection.keep < n:
                raise ValueError(f"selection.keep {self.selection.keep}: must be between 1 and {n - 1} "
                                 f"for a {n}-layer teacher")
            if self.selection.layers is not None:
                try:  # the truncate stage's own check (range, order, duplicates, removes something)
                    validate_layers(self.selection.layers, n)
                except CompressorError as e:
                    raise ValueError(f"selection.layers: {e}") from e
            if t.architecture == "gpt2":  # the pruning adapter's own reasons, checked before any training
                gpt2 = ADAPTERS["gpt2"]
                for kind, why in (("heads", gpt2.no_head_pruning), ("hidden", gpt2.no_hidden_pruning)):
                    if getattr(self.prune, kind) > 0:
                        raise ValueError(f"prune.{kind}: {why}")
        return self
