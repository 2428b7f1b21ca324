"""The one training loop (`Trainer`, RecBole's `Trainer` and nanoGPT's loop in one): it trains the
teacher (`teacher.TeacherTask`) and distils students (`distill.trainer.DistillTask`). It owns the
epochs and steps, validation and early stopping, the time cap, checkpoints and resume (one
fingerprint check, one RNG save/restore), DDP / FSDP wrapping and who writes; a `Task` owns its
models and what one step, one validation and one checkpoint entry are."""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from compressor import distributed as dist
from compressor.atomic import atomic_write
from compressor.errors import CompressorError
from compressor.modeling import pick_device
from compressor.training import (
    EarlyStopping,
    PrecisionChoice,
    read_checkpoint,
    resolve_precision,
    rng_state,
    save_checkpoint,
    set_rng_state,
    set_seed,
)

log = logging.getLogger("compressor")


def check_fingerprint(path: Path, saved: object, now: object) -> None:
    """A checkpoint resumes only the run it was written for: the same fingerprint (what is trained,
    on what). Dict fingerprints name the fields that differ."""
    if saved == now:
        return
    which = ""
    if isinstance(saved, dict) and isinstance(now, dict):
        which = f" (different config: {', '.join(sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k)))})"
    raise CompressorError(f"{path}: written for another configuration or data{which}; delete it or use another --out")


# ---------------------------------------------------------------------------- the training loop

# Why a run ended. A resume lifts a budget stop (the time cap, the step limit): the run goes on
# from there, and stops again at once while the same budget is still spent.
BUDGET_STOPS = ("time cap", "step limit")
# TrainConfig fields that say how (or how long) to train, not what: a resume may change them.
RESUMABLE_FIELDS = ("max_minutes", "device", "parallel")


class Task(Protocol):
    """What `Trainer` trains: the teacher (`teacher.TeacherTask`) or a student (`distill.trainer.DistillTask`).

    The trainer owns the order of batches, validation and early stopping, the time cap, checkpoints,
    the RNG states, DDP / FSDP wrapping and who writes; the task owns its models and what one step,
    one validation and one checkpoint entry are."""

    module: nn.Module  # the training forward (its call returns the batch's loss): what DDP / FSDP wrap
    units: list[nn.Module]  # FSDP shards each of these (the decoder layers) and then `module`
    find_unused: bool  # DDP must look for parameters a step may leave unused
    steps_per_epoch: int

    def attach(self, par: dist.Parallel) -> None:
        """Told what the steps run through, once wrapped (FSDP's optimizer must hold the shards)."""

    def batches(self, epoch: int, rng: np.random.Generator) -> Iterable:
        """This rank's batches of one epoch; everything random is drawn from `rng` (seeded, resumed)."""

    def step(self, batch) -> dict:
        """One optimisation step; returns its log row, with "loss"."""

    def gather(self) -> None:
        """Every rank, before a validation or a checkpoint (FSDP: the whole weights, on rank 0)."""

    def validate(self) -> tuple[dict, dict]:
        """Rank 0: (the metrics early stopping judges, further fields for the epoch's history row)."""

    def snapshot(self) -> dict:
        """Rank 0: the weights the last validation judged, kept while they are the best."""

    def state_dict(self) -> dict:
        """Every rank (it may gather); rank 0's entries go into the checkpoint."""

    def load_state_dict(self, ck: dict) -> None: ...

    def finish(self, best: dict | None) -> None:
        """Every rank, at the end: load the best weights (`best` on rank 0 only; None = never validated)."""


@dataclass
class Loop:
    """How a `Trainer` runs: where its checkpoint and log go, and when it checks its budgets."""

    desc: str = "train"
    checkpoint: Path | None = None  # resume file (None = no checkpoints)
    fingerprint: object = None  # what a checkpoint must carry to be resumed (`check_fingerprint`)
    required: frozenset[str] = frozenset()  # the task's own checkpoint entries
    what: str = "training"  # the checkpoint's kind, in messages
    resume: bool = True  # continue from `checkpoint` when there is one
    log: Path | None = None  # JSONL, rank 0: a row per step and per validation
    # the time cap: checked before every step, or only between epochs (whole epochs are the unit:
    # the teacher's history, schedule and report count epochs)
    stop_between_steps: bool = False
    validate_at_start: bool = False
    checkpoint_every: int = 0  # steps between extra checkpoints (0 = none; one at each epoch's end)
    checkpoint_minutes: float = 0.0  # minutes between extra checkpoints (0 = none)
    max_steps: int | None = None  # the step limit, over resumes
    progress: bool = True


@dataclass
class Progress:
    """Where a run stands; the checkpoint's `loop` entry."""

    epoch: int = 0  # epochs finished
    batch: int = 0  # batches finished in the current epoch
    epoch_rng: dict | None = None  # the data RNG's state at the current epoch's start
    step: int = 0
    elapsed: float = 0.0  # wall clock over resumes (validation included)
    step_time: float = 0.0  # seconds inside optimisation steps
    finished: bool = False
    stop_reason: str = "epochs"  # epochs, early stopping, time cap, step limit
    last_eval_step: int = -1
    best_metrics: dict = field(default_factory=dict)
    best_step: int = 0
    best_epoch: int = 0
    history: list[dict] = field(default_factory=list)  # a row per finished epoch
    epoch_losses: list[float] = field(default_factory=list)  # this epoch's step losses so far
    epoch_seconds: float = 0.0  # this epoch's training time so far


@dataclass
class Fit:
    """What `Trainer.fit` did."""

    task: Task
    progress: Progress
    device: torch.device
    precision: PrecisionChoice
    parallel: str  # single, ddp or fsdp
    steps_per_epoch: int
    resumed_from_epoch: int | None


def _progress(path: Path, loop) -> Progress:
    """A checkpoint's `loop` entry, or a one-line error for one an older version of the loop wrote."""
    names = {f.name for f in fields(Progress)}
    if not isinstance(loop, dict) or not loop.keys() <= names or loop.get("epoch_rng") is None:
        raise CompressorError(f"{path}: written by another version of this tool, cannot resume; delete it or "
                              "use another --out")
    return Progress(**loop)


class Trainer:
    """The one training loop (RecBole's `Trainer`, nanoGPT's loop) for every `Task`.

    Under torchrun every rank trains on its share of each epoch's batches; rank 0 validates, decides
    (early stopping, budgets, checkpoint times; broadcast, since ranks that stopped at different
    steps would wait for each other forever) and writes the checkpoint and the log."""

    def __init__(self, train, loop: Loop):
        self.train, self.loop = train, loop  # train: a teacher.TrainConfig

    def fit(self, make_task: Callable[[torch.device, dict | None], Task]) -> Fit:
        """Seed, read the checkpoint (if resuming), build the task (`make_task(device, checkpoint)`),
        wrap it, train, and leave the best weights in it."""
        t, lp = self.train, self.loop
        set_seed(t.seed)
        if dist.world_size() > 1:
            # own dropout masks per rank; weights initialised before this are alike everywhere
            torch.manual_seed(t.seed + dist.rank())
        device = pick_device(t.device)
        precision = resolve_precision(device, t.precision)  # decided (and warned about) once
        ck = None
        if lp.checkpoint is not None and lp.resume and lp.checkpoint.exists():
            ck = read_checkpoint(lp.checkpoint, "cpu", {"fingerprint", "loop", *lp.required}, lp.what)
            check_fingerprint(lp.checkpoint, ck["fingerprint"], lp.fingerprint)
        self.task = task = make_task(device, ck)
        par = dist.Parallel(task.module, t.parallel, units=task.units, find_unused_parameters=task.find_unused,
                            device=device)
        task.attach(par)
        self.stopper = EarlyStopping(t.patience)
        self.rng = np.random.default_rng(t.seed)
        self.p = Progress(epoch_rng=self.rng.bit_generator.state)
        self.best_state = None
        if ck is not None:
            task.load_state_dict(ck)
            self.stopper.load_state_dict(ck["stopper"])
            set_rng_state(ck["torch_rng"][dist.rank() % len(ck["torch_rng"])])
            self.best_state = ck["best_state"]
            self.p = _progress(lp.checkpoint, ck["loop"])
            if not self.p.finished:
                self.p.stop_reason = "epochs"  # a budget stop is lifted by resuming
            log.info(f"{lp.desc}: resuming from {lp.checkpoint} at step {self.p.step} (epoch {self.p.epoch})")
        self._open_log(resumed=ck is not None)
        try:
            self._run()
        finally:
            self.log_file.close()
        task.finish(self.best_state)
        resumed = (ck["loop"]["epoch"] or None) if ck is not None else None
        return Fit(task, self.p, device, precision, par.mode, task.steps_per_epoch, resumed)

    def _open_log(self, resumed: bool) -> None:
        """Rank 0 keeps the log (a resumed run's rows after the checkpoint's step are dropped); the
        other ranks' rows go nowhere."""
        path = self.loop.log
        if path is None or not dist.is_main():
            self.log_file = open(os.devnull, "w")  # noqa: SIM115
            return
        if resumed and path.exists():
            rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
            keep = [r for r in rows if r.get("step", 0) <= self.p.step and not r.get("final")]
            atomic_write(path, "".join(json.dumps(r) + "\n" for r in keep))
        elif not resumed:
            path.write_text("")
        self.log_file = path.open("a")

    def _run(self) -> None:
        t, lp, p, task = self.train, self.loop, self.p, self.task
        if lp.checkpoint is not None and dist.is_main():
            lp.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        self.start = time.time() - p.elapsed
        self.last_checkpoint = time.time()
        if p.step == 0 and p.last_eval_step < 0 and lp.validate_at_start:
            self._validate()
        bar = tqdm(total=task.steps_per_epoch * t.epochs, initial=p.step, desc=lp.desc, unit="step",
                   **({} if lp.progress and dist.is_main() else {"disable": True}))
        while not p.finished and p.epoch < t.epochs:
            self.rng.bit_generator.state = p.epoch_rng
            t0, first = time.time() - p.epoch_seconds, p.batch
            for b, batch in enumerate(task.batches(p.epoch, self.rng)):
                if b < first:
                    continue  # done before the checkpoint this run resumed from
                stop, clock_due = self._control(b == first)
                if stop is not None:
                    p.stop_reason = stop
                    break
                s0 = time.perf_counter()
                row = task.step(batch)
                p.step_time += time.perf_counter() - s0
                p.step, p.batch = p.step + 1, b + 1
                p.epoch_losses.append(row["loss"])
                self.log_file.write(json.dumps({"step": p.step, **row, "epoch": p.epoch + p.batch / task.steps_per_epoch})
                                    + "\n")
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.3f}", best=f"{self.stopper.best:.4f}")
                if (lp.checkpoint_every and p.step % lp.checkpoint_every == 0) or clock_due:
                    p.epoch_seconds = time.time() - t0
                    self._checkpoint()
            p.epoch_seconds = time.time() - t0
            if p.stop_reason in BUDGET_STOPS:
                break
            self._end_epoch()
        bar.close()
        if p.stop_reason in BUDGET_STOPS:
            self._checkpoint()  # before the closing validation, so a resume replays exactly this run
            if p.last_eval_step != p.step:
                self._validate(final=True)
        elif not p.finished:  # resumed after the last epoch's checkpoint
            p.finished = True
            self._checkpoint()
        p.elapsed = time.time() - self.start
        if p.stop_reason == "time cap" and dist.is_main():
            # loud on purpose: the same config would give another model on a faster or slower machine
            done = p.epoch + p.batch / max(1, task.steps_per_epoch)
            warnings.warn(f"{lp.desc}: stopped by the time cap ({t.max_minutes} min) after {round(done, 2):g} of "
                          f"{t.epochs} epochs: results depend on machine speed", stacklevel=3)

    def _control(self, first: bool) -> tuple[str | None, bool]:
        """(budget stop or None, checkpoint due by the clock) before a step, by rank 0's clock.
        `first`: the first step of this epoch in this process."""
        lp, t, p = self.loop, self.train, self.p
        if not (lp.stop_between_steps or lp.max_steps is not None or lp.checkpoint_minutes or first):
            return None, False
        stop = None
        # between epochs: not before a fresh run's first step (every run trains at least one epoch)
        cap_due = lp.stop_between_steps or (first and p.step > 0)
        if cap_due and t.max_minutes is not None and (time.time() - self.start) / 60 > t.max_minutes:
            stop = "time cap"
        elif lp.max_steps is not None and p.step >= lp.max_steps:
            stop = "step limit"
        due = bool(lp.checkpoint_minutes) and time.time() - self.last_checkpoint >= 60 * lp.checkpoint_minutes
        return dist.broadcast_object((stop, due)) if dist.world_size() > 1 else (stop, due)

    def _end_epoch(self) -> None:
        """The epoch's history row (loss averaged over every rank's steps), validation when due, a checkpoint."""
        t, p = self.train, self.p
        total, count = dist.sum_array(np.array([np.sum(p.epoch_losses), len(p.epoch_losses)]))
        row = {"epoch": p.epoch + 1, "loss": float(total / count), "epoch_seconds": p.epoch_seconds}
        p.epoch, p.batch, p.epoch_rng = p.epoch + 1, 0, self.rng.bit_generator.state
        p.epoch_losses, p.epoch_seconds = [], 0.0
        if p.epoch % t.eval_every == 0 or p.epoch == t.epochs:
            row.update(self._validate())
        p.history.append(row)
        p.finished = p.finished or p.epoch == t.epochs
        self._checkpoint()

    def _validate(self, final: bool = False) -> dict:
        """Rank 0 validates and decides; every rank learns whether training is over. `final`: the
        closing validation after a budget stop, which may keep the weights but counts no round."""
        p = self.p
        self.task.gather()
        out = {}
        if dist.is_main():
            metrics, extra = self.task.validate()
            value = metrics["ndcg@10"]
            done = False if final else self.stopper.step(value)
            better = value > self.stopper.best if final else self.stopper.improved
            if better:
                self.best_state = self.task.snapshot()
                p.best_metrics, p.best_step, p.best_epoch = metrics, p.step, p.epoch
                if final:
                    self.stopper.best = value
            if done:
                p.finished, p.stop_reason = True, "early stopping"
            self.log_file.write(json.dumps({"step": p.step, "epoch": p.epoch, "valid": metrics, "best": better,
                                       **({"final": True} if final else {})}) + "\n")
            self.log_file.flush()
            out = {"valid": metrics, **extra}
        p.finished, p.stop_reason = dist.broadcast_object((p.finished, p.stop_reason))
        p.last_eval_step = p.step
        return out

    def _checkpoint(self) -> None:
        """Everything a resume needs. Every rank calls it at the same step (the task's state and the
        RNG states are gathered); rank 0 writes."""
        lp, p = self.loop, self.p
        if lp.checkpoint is None:
            return
        self.last_checkpoint = time.time()
        p.elapsed = time.time() - self.start
        self.task.gather()
        entries = self.task.state_dict()
        rngs = dist.all_gather_object(rng_state())
        if dist.is_main():
            self.log_file.flush()  # the log rows up to this step, as a resume from here keeps them
            save_checkpoint({"fingerprint": lp.fingerprint, **entries, "stopper": self.stopper.state_dict(),
                             "best_state": self.best_state, "torch_rng": rngs, "world_size": dist.world_size(),
                             "loop": asdict(p)}, lp.checkpoint)
