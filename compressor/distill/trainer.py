"""`distill`: the nanoGPT-shaped loop — setup, then one loop with validation, early stopping,
best-checkpoint selection on validation NDCG@10, checkpoints for resume, and a JSONL log.

Output in `out_dir`: `student/` (the best student: `save_pretrained` + item vocabulary +
`distill_summary.json`), `train_log.jsonl`, `checkpoint.pt` (everything needed to resume),
`distill_config.yaml` and `result.json`.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from compressor import distributed as dist
from compressor.atomic import atomic_write, atomic_write_json
from compressor.config import dump_config
from compressor.data.protocol import RecData, left_pad, training_windows
from compressor.distill.config import DistillConfig
from compressor.distill.fisher_weights import read_fisher_scores
from compressor.distill.losses import get_loss
from compressor.distill.step import Distiller, attention_implementation, frozen
from compressor.errors import CompressorError
from compressor.evaluate import evaluate_model
from compressor.fisher import estimate_layer_fisher
from compressor.modeling import model_max_len, pick_device, save_model, set_recsys_meta
from compressor.teacher import next_item_loss
from compressor.training import (
    EarlyStopping,
    autocast,
    read_checkpoint,
    resolve_precision,
    save_checkpoint,
    set_seed,
)

CHECKPOINT = "checkpoint.pt"
LOG = "train_log.jsonl"
RESULT = "result.json"
STUDENT_DIR = "student"
BUDGET_STOPS = ("time budget", "step limit")
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


def teacher_fisher(teacher, cfg: DistillConfig, importance: dict | None, windows, max_len, device) -> tuple[np.ndarray, str]:
    """Fisher scores of every teacher layer: given, from `cfg.importance_file`, or estimated now."""
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
        scores = estimate_layer_fisher(teacher, batches, next_item_loss)
    return scores, f"estimated ({len(batches)} batches)"


def _resume_log(path: Path, step: int) -> None:
    """Keep the log rows up to the checkpoint's step (a resumed run rewrites what came after)."""
    if not path.exists():
        return
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    keep = [r for r in rows if r.get("step", 0) <= step and not r.get("final")]
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in keep))


def _config_diff(saved: dict, cfg: DistillConfig) -> list[str]:
    # The fields that define distillation: a pipeline's section (DistillConfig plus `enabled`) compares
    # with a checkpoint `compressor distill` wrote, and the other way round.
    now = cfg.model_dump(mode="json", include=set(DistillConfig.model_fields))
    diff = [k for k in now if k != "train" and k not in CHECKPOINT_FIELDS and now[k] != saved.get(k)]
    diff += [f"train.{k}" for k in now["train"] if k != "max_minutes" and now["train"][k] != saved["train"].get(k)]
    return diff


def distill(teacher: PreTrainedModel, student: PreTrainedModel, data: RecData, cfg: DistillConfig,
            out_dir: str | Path, importance: dict | None = None, max_len: int | None = None,
            progress: bool = True, resume: bool = False, max_steps: int | None = None) -> DistillResult:
    """Train `student` (in place) against the frozen `teacher`; keep the best validation state.

    `importance`: parsed importance.json (else `cfg.importance_file`, else estimated);
    `resume`: continue from `out_dir/checkpoint.pt` if there is one; `max_steps`: stop after this
    many optimisation steps in total (a checkpoint is written there, as at the time budget).

    Under torchrun every rank trains on its share of each epoch's windows (DDP all-reduces the
    gradients; the teacher's starting Fisher and the EMA traces are averaged over ranks); rank 0
    validates, decides (early stopping, budgets, checkpoint times) and writes every file."""
    loss = get_loss(cfg.method)
    check_compatible(teacher, student, data)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    max_len = max_len or model_max_len(student)
    t = cfg.train
    device = pick_device(t.device)
    precision = resolve_precision(device, t.precision)  # decided (and warned about) once
    set_seed(t.seed)
    if dist.world_size() > 1:
        torch.manual_seed(t.seed + dist.rank())  # own dropout masks per rank
    teacher.to(device)
    student.to(device)
    windows = training_windows(data.train_sequences(), max_len, per_sequence=t.recent_windows)
    if not windows:
        raise CompressorError(f"{data.name}: no training windows")
    # each rank runs ceil(windows / ranks) windows an epoch (DistributedSampler's split)
    steps_per_epoch = math.ceil(math.ceil(len(windows) / dist.world_size()) / t.batch_size)
    ckpt_path, log_path = out / CHECKPOINT, out / LOG
    ck = (read_checkpoint(ckpt_path, device, {"config", "distiller", "loop"}, "distillation")
          if resume and ckpt_path.exists() else None)
    if ck is not None and (diff := _config_diff(ck["config"], cfg)):
        raise CompressorError(f"{ckpt_path}: written with a different config ({', '.join(diff)}); "
                              "use another --out or drop --resume")
    scores, fisher_source, fisher_seconds = None, None, 0.0
    if loss.fisher and ck is not None:
        scores, fisher_source = np.asarray(ck["fisher_scores"]), ck.get("fisher_source")
    elif loss.fisher:
        t0 = time.time()
        scores, fisher_source = teacher_fisher(teacher, cfg, importance, windows, max_len, device)
        fisher_seconds = time.time() - t0
    valid = data.split("valid")
    with frozen(teacher), attention_implementation([teacher, student], "eager" if loss.attentions else None):
        d = Distiller(teacher, student, cfg, data.vocab.num_special, len(windows), steps_per_epoch * t.epochs, scores)
        rng = np.random.default_rng(t.seed)
        stopper = EarlyStopping(t.patience)
        st = {"epoch": 0, "batch": 0, "epoch_rng": rng.bit_generator.state, "best_state": None,
              "best_metrics": {}, "best_step": 0, "elapsed": 0.0, "step_time": 0.0, "finished": False,
              "stop_reason": "epochs", "last_eval_step": -1}
        if ck is not None:
            d.load_state_dict(ck["distiller"])
            stopper.load_state_dict(ck["stopper"])
            rngs = ck["torch_rng"] if isinstance(ck["torch_rng"], list) else [ck["torch_rng"]]  # one per rank
            torch.set_rng_state(rngs[dist.rank() % len(rngs)].cpu())
            st.update(ck["loop"])
            if not st["finished"]:
                st["stop_reason"] = "epochs"  # a budget stop is lifted by resuming
            dist.on_main(_resume_log, log_path, d.step_n)
        elif dist.is_main():
            log_path.write_text("")
        dist.on_main(dump_config, cfg, out / "distill_config.yaml")
        # rank 0 keeps the log; the other ranks' rows (their own batches) go nowhere
        log = log_path.open("a") if dist.is_main() else open(os.devnull, "w")  # noqa: SIM115

        def validate(final: bool = False) -> None:
            """Rank 0 validates and decides; every rank learns whether training is over."""
            if dist.is_main():
                _validate(final)
            st["finished"], st["stop_reason"] = dist.broadcast_object((st["finished"], st["stop_reason"]))
            st["last_eval_step"] = d.step_n

        def _validate(final: bool) -> None:
            m = evaluate_model(student, valid, max_len).metrics
            done = stopper.step(m["ndcg@10"]) if not final else False
            better = stopper.improved if not final else m["ndcg@10"] > stopper.best
            if better:
                st["best_state"] = {k: v.detach().clone() for k, v in student.state_dict().items()}
                st["best_metrics"], st["best_step"] = m, d.step_n
                if final:
                    stopper.best = m["ndcg@10"]
            st["last_eval_step"] = d.step_n
            log.write(json.dumps({"step": d.step_n, "epoch": st["epoch"], "valid": m, "best": better,
                                  **({"final": True} if final else {})}) + "\n")
            log.flush()
            if done:
                st["finished"], st["stop_reason"] = True, "early stopping"

        last_checkpoint = time.time()

        def checkpoint() -> None:
            """Every rank calls it at the same step (its RNG state is gathered); rank 0 writes."""
            nonlocal last_checkpoint
            last_checkpoint = time.time()
            rngs = dist.all_gather_object(torch.get_rng_state())
            if dist.is_main():
                save_checkpoint({"config": cfg.model_dump(mode="json"), "method": cfg.method,
                                 "distiller": d.state_dict(), "stopper": stopper.state_dict(), "torch_rng": rngs,
                                 "loop": dict(st), "layer_map": d.layer_map, "fisher_source": fisher_source,
                                 "fisher_scores": None if scores is None else scores.tolist()}, ckpt_path)

        def control() -> tuple[str | None, bool]:
            """(budget stop or None, checkpoint due by the clock), decided by rank 0's clock: ranks
            that stopped or checkpointed at different steps would wait for each other forever."""
            stop = None
            if t.max_minutes is not None and (time.time() - start) / 60 > t.max_minutes:
                stop = "time budget"
            elif max_steps is not None and d.step_n >= max_steps:
                stop = "step limit"
            due = bool(cfg.checkpoint_minutes) and time.time() - last_checkpoint >= 60 * cfg.checkpoint_minutes
            return dist.broadcast_object((stop, due)) if dist.world_size() > 1 else (stop, due)

        start = time.time() - st["elapsed"]
        if d.step_n == 0 and st["last_eval_step"] < 0 and cfg.eval_at_start:
            validate()
        bar = tqdm(total=steps_per_epoch * t.epochs, initial=d.step_n, desc=f"distill {cfg.method}",
                   unit="step", disable=not progress or not dist.is_main())
        while not st["finished"] and st["epoch"] < t.epochs:
            rng.bit_generator.state = st["epoch_rng"]
            # every rank draws the same permutation and keeps its share of it (alone: all of it)
            order = dist.shard(rng.permutation(len(windows)))
            for b in range(st["batch"], steps_per_epoch):
                stop, clock_due = control()
                if stop is not None:
                    st["stop_reason"] = stop
                    break
                row = d.step(*batch_tensors(windows, order[b * t.batch_size : (b + 1) * t.batch_size], max_len, device))
                st["step_time"] += row["step_seconds"]
                st["batch"] = b + 1
                log.write(json.dumps({**row, "epoch": st["epoch"] + st["batch"] / steps_per_epoch}) + "\n")
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.3f}", best=f"{stopper.best:.4f}")
                due = cfg.checkpoint_every and d.step_n % cfg.checkpoint_every == 0
                if due or clock_due:
                    st["elapsed"] = time.time() - start
                    log.flush()  # the log rows up to this step, as the checkpoint's resume keeps them
                    checkpoint()
            if st["stop_reason"] in BUDGET_STOPS:
                break
            st["epoch"], st["batch"], st["epoch_rng"] = st["epoch"] + 1, 0, rng.bit_generator.state
            if st["epoch"] % t.eval_every == 0 or st["epoch"] == t.epochs:
                validate()
            st["elapsed"] = time.time() - start
            checkpoint()
        bar.close()
        st["elapsed"] = time.time() - start
        if st["stop_reason"] in BUDGET_STOPS:
            checkpoint()  # before the closing validation, so a resume replays exactly this run
            if st["last_eval_step"] != d.step_n:
                validate(final=True)
        else:
            st["finished"] = True
            checkpoint()
        log.close()
    if st["best_state"] is not None:
        student.load_state_dict(st["best_state"])
    dist.broadcast_module(student)  # rank 0 alone kept the best state
    student.eval()
    steps = d.step_n
    result = DistillResult(
        method=cfg.method, best_valid=st["best_metrics"], best_step=st["best_step"], steps=steps,
        epochs=st["epoch"] + st["batch"] / steps_per_epoch, seconds=st["elapsed"],
        seconds_per_step=st["step_time"] / max(1, steps), stop_reason=st["stop_reason"], layer_map=d.layer_map,
        layer_weights=d.weights.w.tolist(), fisher_source=fisher_source, fisher_seconds=fisher_seconds,
        log_path=log_path,
        model_dir=out / STUDENT_DIR, world_size=dist.world_size(),
        precision=precision.precision, precision_reason=precision.reason, model=student,
    )
    summary = {**result.to_json(), "config": cfg.model_dump(mode="json"),
               "fisher_scores": None if scores is None else scores.tolist(),
               "weights_history": d.weights.history, "train_windows": len(windows), "max_len": max_len}
    set_recsys_meta(student, kind="student", max_len=max_len, distilled_with=cfg.method)

    def save() -> None:
        save_model(student, data.vocab, out / STUDENT_DIR, {"distill_summary.json": summary})
        atomic_write_json(out / RESULT, summary)

    dist.on_main(save)  # the other ranks wait until the student is on disk
    return result
