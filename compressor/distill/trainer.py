"""`distill`: a student trained against a frozen teacher by the one training loop
(`training.Trainer`: validation, early stopping on NDCG@10, best-state selection, the time cap,
checkpoints for resume, a JSONL log); `DistillTask` is what distillation gives that loop.

Output in `out_dir`: `student/` (the best student: `save_pretrained` + item vocabulary +
`distill_summary.json`), `train_log.jsonl`, `checkpoint.pt` (everything needed to resume),
`distill_config.yaml` and `result.json`.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedModel

from compressor import distributed as dist
from compressor.atomic import atomic_write_json
from compressor.config import dump_config
from compressor.data.protocol import RecData, left_pad, training_windows
from compressor.data.vocab import ItemVocab
from compressor.distill.config import DistillConfig
from compressor.distill.fisher_weights import read_fisher_scores
from compressor.distill.losses import get_loss
from compressor.distill.step import Distiller, attention_implementation, frozen
from compressor.errors import CompressorError
from compressor.evaluate import evaluate_model
from compressor.fisher import estimate_layer_fisher
from compressor.modeling import load_model, model_max_len, save_model, set_recsys_meta
from compressor.sampled_softmax import Proposal, SampledNextItemLoss, train_proposal
from compressor.teacher import next_item_loss
from compressor.training import autocast
from compressor.training.loop import RESUMABLE_FIELDS, Loop, Trainer

CHECKPOINT = "checkpoint.pt"
LOG = "train_log.jsonl"
RESULT = "result.json"
STUDENT_DIR = "student"
# Fields that say when checkpoints are written, not what is trained: a resume may change them.
CHECKPOINT_FIELDS = ("checkpoint_every", "checkpoint_minutes")


@dataclass
class DistillResult:
    method: str
    best_valid: dict
    best_step: int
    steps: int
    epochs: float
    seconds: float  # wall clock of the whole run (training + validation), over resumes
    seconds_per_step: float  # mean time of one optimisation step (validation excluded)
    stop_reason: str
    layer_map: list[int]
    layer_weights: list[float]  # final w (uniform for methods without Fisher weights)
    fisher_source: str | None
    fisher_seconds: float  # estimating the teacher's Fisher here (0 when read from importance.json)
    log_path: Path
    model_dir: Path
    world_size: int = 1  # torchrun processes that trained it (data parallel)
    precision: str = "fp32"  # what the steps computed in (`training.resolve_precision`)
    precision_reason: str = ""
    model: PreTrainedModel | None = field(default=None, repr=False)

    def to_json(self) -> dict:
        return {f: (str(v) if isinstance(v, Path) else v)
                for f in self.__dataclass_fields__ if f != "model" for v in [getattr(self, f)]}


def check_compatible(teacher: PreTrainedModel, student: PreTrainedModel, data: RecData) -> None:
    """Teacher, student and data must share one item vocabulary (the logits are compared item by item)."""
    vt, vs = teacher.config.vocab_size, student.config.vocab_size
    if vt != vs:
        raise CompressorError(f"student and teacher have different item vocabularies ({vs} vs {vt} tokens)")
    if vt != data.vocab.size:
        raise CompressorError(f"the data's item vocabulary has {data.vocab.size} tokens, the models {vt}")


def batch_tensors(windows: list[np.ndarray], idx: np.ndarray, max_len: int, device) -> tuple[torch.Tensor, ...]:
    """(window indices, input ids, mask, labels) of windows `idx`, as `window_batches` builds them."""
    chunk = [windows[i] for i in idx]
    ids, mask = left_pad([w[:-1] for w in chunk], max_len)
    labels, lmask = left_pad([w[1:] for w in chunk], max_len)
    labels[lmask == 0] = -100
    return tuple(torch.from_numpy(x).to(device) for x in (idx.astype(np.int64), ids, mask, labels))


def teacher_fisher(teacher, cfg: DistillConfig, importance: dict | None, windows, max_len, device,
                   proposal: Proposal | None = None) -> tuple[np.ndarray, str]:
    """Fisher scores of every teacher layer: given, from `cfg.importance_file`, or estimated now
    (with `proposal`, i.e. distill.output=candidates, from the sampled softmax's gradients, so no
    batch x positions x items logits are formed here either)."""
    n = teacher.config.num_hidden_layers
    if importance is not None:
        return read_fisher_scores(importance, n), "importance (given)"
    if cfg.importance_file:
        return read_fisher_scores(cfg.importance_file, n), cfg.importance_file
    order = np.random.default_rng(cfg.train.seed + 1).permutation(len(windows))
    bs = cfg.train.batch_size
    batches = [batch_tensors(windows, order[a : a + bs], max_len, device)[1:]
               for a in range(0, min(len(order), cfg.fisher_batches * bs), bs)]
    with autocast(device, cfg.train.precision):  # gradients of the fp32 parameters stay fp32
        loss = next_item_loss if proposal is None else SampledNextItemLoss.as_function(proposal, cfg.candidates_negatives)
        scores = estimate_layer_fisher(teacher, batches, loss)
    return scores, f"estimated ({len(batches)} batches)"


def distill_dirs(teacher_dir: str | Path, student_dir: str | Path, data: Callable[[ItemVocab], RecData],
                 cfg: DistillConfig, out_dir: str | Path, **kw) -> DistillResult:
    """`distill` on two model directories, for the pipeline and `compressor distill` alike: both are
    read (once), must share one item vocabulary, and `data(vocabulary)` is what they are trained on."""
    teacher, t_vocab = load_model(teacher_dir)
    student, s_vocab = load_model(student_dir)
    if not t_vocab.same_as(s_vocab):
        raise CompressorError(f"{student_dir} and {teacher_dir} have different item vocabularies "
                              f"({s_vocab.num_items} vs {t_vocab.num_items} items)")
    return distill(teacher, student, data(t_vocab), cfg, out_dir, **kw)


def fingerprint(cfg: DistillConfig) -> dict:
    """What a distillation checkpoint is of: the fields that define distillation, flat (`train.lr`),
    less the ones a resume may change (checkpoint times, the time cap, device). A pipeline's section
    (DistillConfig plus `enabled`) compares with a checkpoint `compressor distill` wrote."""
    now = cfg.model_dump(mode="json", include=set(DistillConfig.model_fields))
    train = now.pop("train")
    return {**{k: v for k, v in now.items() if k not in CHECKPOINT_FIELDS},
            **{f"train.{k}": v for k, v in train.items() if k not in RESUMABLE_FIELDS}}


class DistillTask:
    """A `Distiller` as a `training.Task`: batches of shuffled windows, validation of the student."""

    def __init__(self, d: Distiller, windows: list[np.ndarray], valid, max_len: int, batch_size: int):
        self.d, self.windows, self.valid, self.max_len, self.batch_size = d, windows, valid, max_len, batch_size
        self.module, self.units, self.find_unused = d.forward, [], d.find_unused
        # each rank runs ceil(windows / ranks) windows an epoch (DistributedSampler's split)
        self.steps_per_epoch = math.ceil(math.ceil(len(windows) / dist.world_size()) / batch_size)

    def attach(self, par: dist.Parallel) -> None:
        self.d.net = par.net

    def batches(self, epoch: int, rng: np.random.Generator):
        # every rank draws the same permutation and keeps its share of it (alone: all of it)
        order, bs = dist.shard(rng.permutation(len(self.windows))), self.batch_size
        return (batch_tensors(self.windows, order[b * bs : (b + 1) * bs], self.max_len, self.d.device)
                for b in range(self.steps_per_epoch))

    def step(self, batch) -> dict:
        return self.d.step(*batch)

    def gather(self) -> None:
        pass  # DDP: every rank holds the whole student

    def validate(self) -> tuple[dict, dict]:
        return evaluate_model(self.d.student, self.valid, self.max_len).metrics, {}

    def snapshot(self) -> dict:
        return {k: v.detach().clone() for k, v in self.d.student.state_dict().items()}

    def state_dict(self) -> dict:
        scores = self.d.fisher_scores
        return {"distiller": self.d.state_dict(), "method": self.d.cfg.method, "layer_map": self.d.layer_map,
                "fisher_source": self.d.fisher_source, "fisher_scores": None if scores is None else scores.tolist()}

    def load_state_dict(self, ck: dict) -> None:
        self.d.load_state_dict(ck["distiller"])

    def finish(self, best: dict | None) -> None:
        if best is not None:
            self.d.student.load_state_dict(best)
        dist.broadcast_module(self.d.student)  # rank 0 alone kept the best state
        self.d.student.eval()


def distill(teacher: PreTrainedModel, student: PreTrainedModel, data: RecData, cfg: DistillConfig,
            out_dir: str | Path, importance: dict | None = None, max_len: int | None = None,
            progress: bool = True, resume: bool = False, max_steps: int | None = None) -> DistillResult:
    """Train `student` (in place) against the frozen `teacher` (`DistillTask` in `training.Trainer`);
    keep the best validation state.

    `importance`: parsed importance.json (else `cfg.importance_file`, else estimated);
    `resume`: continue from `out_dir/checkpoint.pt` if there is one; `max_steps`: stop after this
    many optimisation steps in total (a checkpoint is written there, as at the time cap, which
    distillation checks before every step).

    Under torchrun every rank trains on its share of each epoch's windows (DDP all-reduces the
    gradients; the teacher's starting Fisher and the EMA traces are averaged over ranks); rank 0
    validates, decides and writes every file."""
    loss = get_loss(cfg.method)
    check_compatible(teacher, student, data)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    max_len = max_len or model_max_len(student)
    t = cfg.train
    log_path = out / LOG
    loop = Loop(desc=f"distill {cfg.method}", checkpoint=out / CHECKPOINT, fingerprint=fingerprint(cfg),
                required=frozenset({"distiller"}), what="distillation", resume=resume, log=log_path,
                stop_between_steps=True, validate_at_start=cfg.eval_at_start, checkpoint_every=cfg.checkpoint_every,
                checkpoint_minutes=cfg.checkpoint_minutes, max_steps=max_steps, progress=progress)
    fisher_seconds = 0.0

    def make_task(device: torch.device, ck: dict | None) -> DistillTask:
        nonlocal fisher_seconds
        teacher.to(device)
        student.to(device)
        windows = training_windows(data.train_sequences(), max_len, per_sequence=t.recent_windows)
        if not windows:
            raise CompressorError(f"{data.name}: no training windows")
        # candidates' negatives: drawn in proportion to the training counts (to the power candidates_alpha)
        proposal = (train_proposal(data.train_sequences(), data.vocab.size, cfg.candidates_alpha, data.vocab.num_special)
                    if cfg.output == "candidates" else None)
        scores, source = None, None
        if loss.fisher and ck is not None:
            scores, source = np.asarray(ck["fisher_scores"]), ck.get("fisher_source")
        elif loss.fisher:
            t0 = time.time()
            # before the teacher is frozen: its Fisher needs its gradients
            scores, source = teacher_fisher(teacher, cfg, importance, windows, max_len, device, proposal)
            fisher_seconds = time.time() - t0
        # DistillConfig's fields only (a pipeline's section adds `enabled`): `compressor distill
        # --config` reads the file back as it is
        dist.on_main(dump_config, DistillConfig.model_validate(cfg.model_dump(include=set(DistillConfig.model_fields))),
                     out / "distill_config.yaml")
        stack.enter_context(frozen(teacher))
        stack.enter_context(attention_implementation([teacher, student], "eager" if loss.attentions else None))
        steps_per_epoch = math.ceil(math.ceil(len(windows) / dist.world_size()) / t.batch_size)
        d = Distiller(teacher, student, cfg, data.vocab.num_special, len(windows), steps_per_epoch * t.epochs, scores,
                      proposal)
        d.fisher_source = source
        return DistillTask(d, windows, data.split("valid"), max_len, t.batch_size)

    with contextlib.ExitStack() as stack:
        fit = Trainer(t, loop).fit(make_task)
    d, p = fit.task.d, fit.progress
    steps, scores = d.step_n, d.fisher_scores
    result = DistillResult(
        method=cfg.method, best_valid=p.best_metrics, best_step=p.best_step, steps=steps,
        epochs=p.epoch + p.batch / fit.steps_per_epoch, seconds=p.elapsed,
        seconds_per_step=p.step_time / max(1, steps), stop_reason=p.stop_reason, layer_map=d.layer_map,
        layer_weights=d.weights.w.tolist(), fisher_source=d.fisher_source, fisher_seconds=fisher_seconds,
        log_path=log_path, model_dir=out / STUDENT_DIR, world_size=dist.world_size(),
        precision=fit.precision.precision, precision_reason=fit.precision.reason, model=student,
    )
    summary = {**result.to_json(), "config": cfg.model_dump(mode="json"),
               "fisher_scores": None if scores is None else scores.tolist(),
               "weights_history": d.weights.history, "train_windows": len(fit.task.windows), "max_len": max_len}
    set_recsys_meta(student, kind="student", max_len=max_len, distilled_with=cfg.method)

    def save() -> None:
        save_model(student, data.vocab, out / STUDENT_DIR, {"distill_summary.json": summary})
        atomic_write_json(out / RESULT, summary)

    dist.on_main(save)  # the other ranks wait until the student is on disk
    return result
