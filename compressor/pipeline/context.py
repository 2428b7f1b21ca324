"""One run's shared state and the one way a stage runs: fingerprint, skip when up to date, record.

A stage is `fn(ctx) -> StageResult`, a small dataclass. Its fields made with `output()` are paths
(relative to the run directory, or absolute for inputs given from outside it): they become the
record's `outputs`, which the skip check verifies and later stages and the report read. The other
fields, plus the `details` mapping spread at the top level, become the record's `summary`. A
record is `stages/<name>.json`; a skipped stage's result is rebuilt from it (`Context.result`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, TypeVar

from pydantic import BaseModel

from compressor import distributed as dist
from compressor.artifact import verify_artifact
from compressor.atomic import atomic_write_json
from compressor.errors import ArtifactError
from compressor.modeling import is_model_dir

if TYPE_CHECKING:
    from compressor.data.protocol import RecData
    from compressor.pipeline.config import RunConfig

LOG = logging.getLogger("compressor").info
# Under torchrun these stages run on every rank (data-parallel inside); the others on rank 0 alone.
DATA_PARALLEL_STAGES = ("teacher", "importance", "distill")
R = TypeVar("R", bound="StageResult")


def output(optional: bool = False):
    """A result field holding one of the stage's output paths (`optional`: may be None, then not recorded)."""
    return field(default=None, metadata={"output": True}) if optional else field(metadata={"output": True})


def details():
    """A result field holding what only the report reads; its keys sit at the summary's top level."""
    return field(default_factory=dict, metadata={"details": True})


@dataclass
class StageResult:
    """Base of every stage's typed result; subclasses set `stage` and declare their fields."""

    stage: ClassVar[str]

    def outputs(self) -> dict[str, str]:
        return {f.name: str(getattr(self, f.name)) for f in dataclasses.fields(self)
                if f.metadata.get("output") and getattr(self, f.name) is not None}

    def summary(self) -> dict:
        out: dict = {}
        for f in dataclasses.fields(self):
            if f.metadata.get("details"):
                out.update(getattr(self, f.name))
            elif not f.metadata.get("output"):
                out[f.name] = getattr(self, f.name)
        return out

    @classmethod
    def from_record(cls: type[R], rec: StageRecord) -> R:
        fields = dataclasses.fields(cls)
        spread = next((f.name for f in fields if f.metadata.get("details")), None)
        named = {f.name for f in fields if not f.metadata.get("output") and f.name != spread}
        kwargs: dict = {f.name: Path(rec.outputs[f.name]) for f in fields
                        if f.metadata.get("output") and f.name in rec.outputs}
        kwargs |= {k: v for k, v in rec.summary.items() if k in named}
        if spread:
            kwargs[spread] = {k: v for k, v in rec.summary.items() if k not in named}
        return cls(**kwargs)


@dataclass
class StageRecord:
    """What a finished stage left: its fingerprint, outputs (paths relative to the run dir), summary."""

    name: str
    fingerprint: str
    seconds: float
    outputs: dict[str, str]
    summary: dict = field(default_factory=dict)
    skipped: bool = False
    finished_at: str = ""

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "skipped"}


@dataclass
class Context:
    """Shared state of one run: config, run dir, finished stage records, and the prepared data
    once a stage has read it (the teacher stage prepares it; a later stage of a resumed run does)."""

    cfg: RunConfig
    run_dir: Path
    records: dict[str, StageRecord] = field(default_factory=dict)
    data: RecData | None = None
    log: Callable[[str], None] = LOG
    fingerprint: str | None = None  # of the stage running now

    def path(self, rel: str | Path) -> Path:
        """A path of the run directory (an absolute `rel`, such as a given teacher, as it is)."""
        return self.run_dir / rel

    def work_dir(self, rel: str) -> Path:
        """The running stage's resumable working directory: kept after a kill (same fingerprint,
        so a checkpoint in it resumes), emptied when the fingerprint changed, since partial work
        there then belongs to another configuration or another input."""
        d = self.path(rel)

        def prepare() -> None:
            marker = d / ".stage_fingerprint"
            if d.exists() and (not marker.exists() or marker.read_text() != self.fingerprint):
                self.log(f"{d}: partial work from another configuration or input, starting over")
                shutil.rmtree(d)
            d.mkdir(parents=True, exist_ok=True)
            marker.write_text(self.fingerprint or "")

        dist.on_main(prepare)  # under torchrun: rank 0 prepares it while the others wait
        return d

    def has(self, result_type: type[StageResult]) -> bool:
        return result_type.stage in self.records

    def result(self, result_type: type[R]) -> R:
        """The typed result of a finished stage (this run's or an earlier run's, from its record)."""
        return result_type.from_record(self.records[result_type.stage])


def fingerprint(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def record_path(run_dir: Path, name: str) -> Path:
    return run_dir / "stages" / f"{name}.json"


def load_record(run_dir: Path, name: str) -> StageRecord | None:
    p = record_path(run_dir, name)
    if not p.exists():
        return None
    try:
        raw = json.loads(p.read_text())
        return StageRecord(**raw)
    except (json.JSONDecodeError, TypeError) as e:
        raise ArtifactError(f"{p}: corrupt stage record ({e}); delete it to rerun the stage") from e


def _outputs_intact(ctx: Context, rec: StageRecord) -> None:
    """Raise ArtifactError when a finished stage's outputs are gone or damaged."""
    for key, rel in rec.outputs.items():
        p = ctx.path(rel)
        if not p.exists():
            raise ArtifactError(f"{p}: output {key!r} of finished stage {rec.name!r} is missing")
        if p.is_dir() and (p / "manifest.json").exists():
            verify_artifact(p)
        elif p.is_dir() and (p / "config.json").exists() and not is_model_dir(p):
            raise ArtifactError(f"{p}: model directory of stage {rec.name!r} lacks its item vocabulary")


def _save_record(run_dir: Path, rec: StageRecord) -> StageRecord:
    atomic_write_json(record_path(run_dir, rec.name), rec.to_json())
    return rec


def run_stage(ctx: Context, name: str, config: BaseModel | dict | None, upstream: list[str],
              fn: Callable[[Context], StageResult]) -> StageRecord:
    """Run `fn` unless a record with the same fingerprint exists and its outputs are intact."""
    cfg_json = config.model_dump(mode="json") if isinstance(config, BaseModel) else (config or {})
    fp = fingerprint({"stage": name, "config": cfg_json,
                      "upstream": {u: ctx.records[u].fingerprint for u in upstream if u in ctx.records}})
    old = load_record(ctx.run_dir, name)
    if old is not None and old.fingerprint == fp:
        try:
            _outputs_intact(ctx, old)
        except ArtifactError as e:
            raise ArtifactError(f"{e}; the run directory is damaged: rerun with --force {name} "
                                "(or delete the run directory)") from e
        old.skipped = True
        ctx.records[name] = old
        ctx.log(f"[{name}] up to date, skipped")
        return old
    ctx.log(f"[{name}] running")
    ctx.fingerprint = fp
    t0 = time.time()
    # under torchrun the data-parallel stages run on every rank, the others on rank 0 alone
    result = fn(ctx) if name in DATA_PARALLEL_STAGES else dist.on_main(fn, ctx)
    if result.stage != name:
        raise TypeError(f"stage {name!r} returned the result of stage {result.stage!r}")
    rec = StageRecord(name, fp, round(time.time() - t0, 2), result.outputs(), result.summary(),
                      finished_at=datetime.now(UTC).isoformat(timespec="seconds"))
    rec = dist.on_main(_save_record, ctx.run_dir, rec)  # every rank holds rank 0's record
    ctx.records[name] = rec
    ctx.log(f"[{name}] done in {rec.seconds:.1f} s")
    return rec
