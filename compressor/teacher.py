"""The teacher: a stock `transformers` causal LM whose vocabulary is the item catalogue.

`TeacherConfig` names an architecture and sizes and builds the Hugging Face config;
`train_teacher` trains it on next-item prediction (full softmax over the catalogue) and saves
it with `save_pretrained`, the item vocabulary and a training summary.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from compressor import distributed as dist
from compressor.data.protocol import RecData, training_windows, window_batches
from compressor.data.vocab import PAD_ID, ItemVocab
from compressor.errors import CompressorError
from compressor.evaluate import evaluate_model
from compressor.modeling import (
    add_hidden_dropout,
    count_parameters,
    decoder_parts,
    hidden_states,
    save_model,
    set_recsys_meta,
)
from compressor.pretrained import adapt_llm, check_item_init
from compressor.sampled_softmax import SampledNextItemLoss, train_proposal
from compressor.training import (
    WeightAverage,
    autocast,
    cosine_schedule,
    device_description,
    make_optimizer,
    set_seed,
)
from compressor.training.loop import RESUMABLE_FIELDS, Loop, Trainer

SUMMARY_FILE = "training_summary.json"
CHECKPOINT_FILE = "checkpoint.pt"
log = logging.getLogger("compressor")


class TrainConfig(BaseModel):
    """How a recommender is trained (teacher here; distillation reuses the same fields)."""

    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(40, ge=1, description="passes over the training windows (the cosine schedule spans them)")
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = Field(100, ge=0)
    patience: int = Field(8, ge=0, description="validation rounds without NDCG@10 gain before stopping")
    eval_every: int = Field(1, ge=1, description="epochs between validation rounds")
    max_minutes: float | None = Field(
        None, gt=0, description="a wall-clock safety cap (None = none): when it cuts training the record, "
        "report and console say so, since the result then depends on the machine's speed")
    hidden_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on embeddings and each layer's output while training")
    random_windows: bool = Field(
        False, description="re-cut the training windows at a random offset every epoch (augmentation: "
        "each item is predicted from a different amount of context); teacher training only")
    recent_windows: int | None = Field(
        None, ge=1, description="train on each user's newest N windows only (None = all): the recent past, "
        "where validation and test items are; what makes an LLM epoch affordable on a CPU")
    embedding_lr: float | None = Field(
        None, gt=0, description="learning rate of the item table (None = lr): a pretrained LLM's new "
        "item table wants a higher rate than its decoder")
    group_by_length: bool = Field(
        False, description="batch windows of similar length together and pad each batch only to its "
        "longest window: less compute spent on padding (22% of a default teacher epoch's tokens)")
    ema_decay: float | None = Field(
        None, gt=0, lt=1, description="keep an exponential moving average of the weights (decay per step; "
        "0.998 averages about the last 500 steps): validation, early stopping and the saved model use the "
        "average, and the history records the raw weights' validation beside it (None = off); teacher "
        "training only")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto = bf16 autocast where the hardware runs bf16 natively (a CUDA device that "
        "supports it; a CPU with AVX512-BF16 or AMX), fp32 elsewhere; bf16 = bf16 autocast even where a CPU "
        "emulates it (10-30x slower steps, warned); fp32 = never. The stage record and the report say what "
        "was chosen and why")
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp", description="under torchrun: ddp = every rank holds the whole model, gradients all-reduced; "
        "fsdp = parameters, gradients and optimizer state sharded over the ranks (fully_shard per decoder "
        "layer), for teachers whose training state does not fit one device (teacher training only); "
        "one process ignores it")
    loss: Literal["full", "sampled"] = Field(
        "full", description="teacher training only: full = softmax over the whole catalogue (exact; its logits "
        "take batch x positions x items x 4 bytes); sampled = softmax over each target and `sampled_negatives` "
        "negatives shared by the batch, logQ-corrected (compressor/sampled_softmax.py), for catalogues whose "
        "full logits do not fit; DDP or one process")
    sampled_negatives: int = Field(1024, ge=1, description="negatives per batch with loss: sampled")
    sampled_alpha: float = Field(0.75, ge=0, description="with loss: sampled, negatives are drawn with probability "
                                 "proportional to (training count + 1)^alpha (0 = uniform)")
    seed: int = 0
    device: str = "auto"


# The teacher's recipe: the generic defaults above plus windows re-cut every epoch (which let
# training run longer before validation stalled), length-grouped batches, and the number of
# epochs of an 8-layer teacher that fits the default job in 15 minutes on 2 cores, chosen on
# validation (docs/results/default.md, "How the teacher recipe was chosen").
# fp32: the small teacher gains little from bf16, and fp32 gives the same model on every CPU (auto
# would train in bf16 on a CPU with AMX and in fp32 on one without, so the default job's numbers
# would depend on the machine).
TEACHER_TRAIN = TrainConfig(epochs=30, random_windows=True, group_by_length=True, precision="fp32")


class TeacherConfig(BaseModel):
    """The teacher's architecture. Any `AutoModelForCausalLM` family name works as `architecture`."""

    model_config = ConfigDict(extra="forbid")
    architecture: str = Field("llama", description="HF model_type: llama, qwen2, mistral, gpt2, ...")
    hidden_size: int = Field(64, ge=8)
    num_layers: int = Field(8, ge=1)
    num_heads: int = Field(2, ge=1)
    num_kv_heads: int | None = Field(None, description="grouped-query attention; None = num_heads")
    intermediate_size: int = Field(256, ge=1)
    max_len: int = Field(50, ge=2, description="longest history the model reads")
    dropout: float = Field(0.2, ge=0, lt=1)
    tie_embeddings: bool = True
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    pretrained: str | None = Field(
        None, description="a local pretrained HF causal LM to adapt to the item vocabulary and fine-tune "
        "(its own sizes replace architecture/hidden_size/num_layers/...; see configs/pretrained_llm.yaml)")
    item_init: str = Field(
        "text", description="with `pretrained`: how the new item table starts (compressor.pretrained.ITEM_INITS): "
        "the LLM's mean embedding of each item's text, the same centred and rescaled, or random")
    train: TrainConfig = TEACHER_TRAIN

    @field_validator("item_init")
    @classmethod
    def _known_item_init(cls, v: str) -> str:
        return check_item_init(v)

    @field_validator("train", mode="before")
    @classmethod
    def _teacher_train_defaults(cls, v):
        """A partial `train:` section overrides the teacher's recipe, not the generic defaults."""
        return {**TEACHER_TRAIN.model_dump(), **v} if isinstance(v, dict) else v


def build_hf_config(cfg: TeacherConfig, vocab_size: int) -> PretrainedConfig:
    """The Hugging Face config for `cfg`; GPT-2 spells its fields differently."""
    if cfg.hidden_size % cfg.num_heads:
        raise ValueError(f"hidden_size {cfg.hidden_size} is not divisible by num_heads {cfg.num_heads}")
    common = {"vocab_size": vocab_size, "pad_token_id": PAD_ID, "bos_token_id": None,
              "eos_token_id": None, "tie_word_embeddings": cfg.tie_embeddings}
    if cfg.architecture == "gpt2":
        return AutoConfig.for_model(
            "gpt2", n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_heads,
            n_inner=cfg.intermediate_size, n_positions=cfg.max_len, resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, **common,
        )
    return AutoConfig.for_model(
        cfg.architecture, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads or cfg.num_heads,
        intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.max_len,
        attention_dropout=cfg.dropout, **common,
    )


def build_teacher(cfg: TeacherConfig, vocab: ItemVocab, seed: int = 0) -> PreTrainedModel:
    set_seed(seed)
    hf = build_hf_config(cfg, vocab.size)
    return AutoModelForCausalLM.from_config(hf, attn_implementation=cfg.attn_implementation)


def next_item_loss(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Full-softmax cross-entropy over the catalogue at every real position.

    The head runs only on positions with a label, which saves most of the (N, V) logits."""
    h = hidden_states(model, ids, mask).last_hidden_state
    keep = labels != -100
    logits = model.get_output_embeddings()(h[keep])
    logits[:, PAD_ID] = float("-inf")
    return F.cross_entropy(logits, labels[keep])


class NextItemLoss(nn.Module):
    """The training forward as one module. DDP and FSDP act through a module's `__call__`, so
    the whole loss (decoder body and item head) runs inside it for gradients to be synchronised."""

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return next_item_loss(self.model, ids, mask, labels)


def _prefixed(state: dict, prefix: str = "model.") -> dict:
    return {prefix + k: v for k, v in state.items()}


def _unprefixed(state: dict, prefix: str = "model.") -> dict:
    return {k.removeprefix(prefix): v for k, v in state.items()}


class TeacherTask:
    """Next-item training of one model, as a `training.Task`: the teacher, or a student fine-tuned
    without distillation. `model` is trained in place and ends with its best validation state.

    Under FSDP a copy is sharded, so `model` stays whole (on the CPU) for rank 0's validation and
    the result. With `train.ema_decay` the weight average is the model: validated, kept and saved
    (the raw weights' validation goes into the history as `valid_raw`)."""

    def __init__(self, model: PreTrainedModel, data: RecData, max_len: int, train: TrainConfig,
                 device: torch.device):
        self.model, self.max_len, self.train, self.device = model, max_len, train, device
        self.sharded = dist.active() and train.parallel == "fsdp"
        self.trained = copy.deepcopy(model) if self.sharded else model.to(device)
        if self.sharded and train.ema_decay is not None:
            raise CompressorError("train.ema_decay needs the whole model on every rank: use train.parallel=ddp")
        # the average lives where validation runs (rank 0), next to the weights it follows
        self.average = WeightAverage(self.trained, train.ema_decay) if train.ema_decay is not None and dist.is_main() else None
        self.seqs = data.train_sequences()
        self.windows = training_windows(self.seqs, max_len, per_sequence=train.recent_windows)
        # random cuts add at most one window per sequence; the schedule clamps at its end
        n_windows = len(self.windows) + (len(self.seqs) if train.random_windows and not train.recent_windows else 0)
        # each rank runs ceil(windows / ranks) windows an epoch (DistributedSampler's split)
        per_rank = -(-n_windows // dist.world_size())
        self.steps_per_epoch = -(-per_rank // train.batch_size)
        self.hooks = add_hidden_dropout(self.trained, train.hidden_dropout) if train.hidden_dropout > 0 else []
        self.module = self.objective(data)
        self.units, self.find_unused = list(decoder_parts(self.trained).layers), False
        self.valid = data.split("valid")
        self.steps, self._gathered = 0, (-1, None)

    def objective(self, data: RecData) -> nn.Module:
        """The per-batch training loss as a module over the trained model, called on (ids, mask,
        labels): the full-softmax cross-entropy over the catalogue. The seam for another objective
        (a sampled softmax, `train.loss`): DDP / FSDP wrap this module, so the whole loss runs inside its call."""
        if self.train.loss == "full":
            return NextItemLoss(self.trained)
        if self.sharded:
            raise CompressorError("teacher.train.loss=sampled reads the item head's weight directly: use "
                                  "train.parallel=ddp (FSDP shards it)")
        proposal = train_proposal(self.seqs, data.vocab.size, self.train.sampled_alpha)
        return SampledNextItemLoss(self.trained, proposal, self.train.sampled_negatives)

    def attach(self, par: dist.Parallel) -> None:
        self.par = par
        # after sharding: FSDP's optimizer must hold the sharded parameters
        t = self.train
        self.opt = make_optimizer(self.trained, t.lr, t.weight_decay, t.betas, t.embedding_lr)
        self.sched = cosine_schedule(self.opt, self.steps_per_epoch * t.epochs, t.warmup_steps)

    def batches(self, epoch: int, rng: np.random.Generator):
        t = self.train
        if t.random_windows:
            self.windows = training_windows(self.seqs, self.max_len, rng, per_sequence=t.recent_windows)
        if dist.world_size() == 1:
            mine, batch_rng = self.windows, rng
        else:
            # every rank draws the same permutation and keeps its share of it; the order inside
            # the share comes from a per-rank generator, so `rng` stays in step on every rank
            mine = [self.windows[i] for i in dist.shard(rng.permutation(len(self.windows)))]
            batch_rng = np.random.default_rng([t.seed, epoch, dist.rank()])
        return window_batches(mine, self.max_len, t.batch_size, batch_rng, t.group_by_length)

    def loss(self, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss of one batch: `objective`'s module, through its DDP / FSDP wrapper."""
        return self.par.net(ids, mask, labels)

    def step(self, batch) -> dict:
        ids, mask, labels = (torch.from_numpy(x).to(self.device) for x in batch)
        self.trained.train()
        with autocast(self.device, self.train.precision):
            loss = self.loss(ids, mask, labels)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trained.parameters(), 1.0)
        self.opt.step()
        self.sched.step()
        if self.average is not None:
            self.average.update(self.trained)
        self.steps += 1
        return {"loss": loss.item()}

    def gather(self) -> None:
        """FSDP: the whole weights exist only when gathered (every rank takes part), once per step."""
        if self.sharded and self._gathered[0] != self.steps:
            self._gathered = (self.steps, self.par.full_state())
            if dist.is_main():
                self.model.load_state_dict(_unprefixed(self._gathered[1]))

    def _judged(self) -> PreTrainedModel:
        return self.average.model if self.average is not None else self.model

    def validate(self) -> tuple[dict, dict]:
        metrics = _validate(self._judged(), self.valid, self.max_len, self.device if self.sharded else None)
        raw = {"valid_raw": _validate(self.model, self.valid, self.max_len, None)} if self.average is not None else {}
        return metrics, raw

    def snapshot(self) -> dict:
        return {k: v.detach().clone() for k, v in self._judged().state_dict().items()}

    def state_dict(self) -> dict:
        state = self._gathered[1] if self.sharded else self.par.full_state()
        optimizer = self.par.optimizer_state(self.opt)
        if not dist.is_main():
            return {}
        return {"model": _unprefixed(state), "optimizer": optimizer, "scheduler": self.sched.state_dict(),
                "average": self.average.state_dict() if self.average is not None else None}

    def load_state_dict(self, ck: dict) -> None:
        self.par.load_full_state(_prefixed(ck["model"]))
        self.par.load_optimizer_state(self.opt, ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        if self.average is not None:
            self.average.load_state_dict(ck["average"])

    def finish(self, best: dict | None) -> None:
        for h in self.hooks:
            h.remove()
        # never validated (a time cap before the first validation): the final weights, gathered
        if self.sharded and dist.broadcast_object(best is None):
            state = self.par.full_state()
            if dist.is_main():
                self.model.load_state_dict(_unprefixed(state))
        if best is None and self.average is not None:  # never validated: the average is still the model
            best = self.average.model.state_dict()
        if best is not None:
            self.model.load_state_dict(best)
        dist.broadcast_module(self.model)  # rank 0 alone kept the best state
        self.model.eval()


def train_recommender(
    model: PreTrainedModel,
    data: RecData,
    max_len: int,
    train: TrainConfig,
    desc: str = "train",
    checkpoint_dir: str | Path | None = None,
    fingerprint: str = "",
) -> dict:
    """Train `model` in place on next-item prediction (`TeacherTask` in `training.Trainer`); keeps
    the best validation state.

    `checkpoint_dir`: write `checkpoint.pt` there after every epoch and resume from one found
    there, which must carry `fingerprint` (what it was trained on and for). The time cap stops
    training between epochs. Returns a summary: epochs run, best validation metrics, seconds per
    epoch, history."""
    ckpt = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
    loop = Loop(desc=desc, checkpoint=ckpt, fingerprint=fingerprint, required=frozenset({"model", "optimizer"}),
                what="teacher training")
    fit = Trainer(train, loop).fit(lambda device, ck: TeacherTask(model, data, max_len, train, device))
    p = fit.progress
    return {
        "epochs_run": len(p.history),
        "stop_reason": p.stop_reason,
        "best_valid": {**p.best_metrics, "epoch": p.best_epoch} if p.best_metrics else {},
        "train_seconds": p.elapsed,
        "seconds_per_epoch": float(np.mean([h["epoch_seconds"] for h in p.history])),
        "train_windows": len(fit.task.windows),
        "epochs_planned": train.epochs,
        "device": device_description(fit.device),
        "precision": fit.precision.precision,
        "precision_reason": fit.precision.reason,
        "world_size": dist.world_size(),
        "parallel": fit.parallel,
        "ema_decay": train.ema_decay,
        "resumed_from_epoch": fit.resumed_from_epoch,
        "history": p.history,
    }


def _validate(model: PreTrainedModel, valid, max_len: int, device: torch.device | None) -> dict:
    """Validation metrics; `device`: move the (CPU-held) model there for the pass and back."""
    if device is None or device.type == "cpu":
        return evaluate_model(model, valid, max_len).metrics
    try:
        return evaluate_model(model.to(device), valid, max_len).metrics
    finally:
        model.cpu()


def training_fingerprint(cfg: TeacherConfig, data: RecData) -> str:
    """What a teacher checkpoint was trained on and for: the config (less the fields a resume may
    change: time cap, device, parallel mode) and the data."""
    c = cfg.model_dump(mode="json")
    c["train"] = {k: v for k, v in c["train"].items() if k not in RESUMABLE_FIELDS}
    payload = {"config": c, "data": data.interactions.fingerprint(), "items": data.vocab.size}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def train_teacher(data: RecData, cfg: TeacherConfig, out: str | Path,
                  checkpoint_dir: str | Path | None = None) -> tuple[PreTrainedModel, dict]:
    """Build, train and save the teacher; returns the model and its training summary.

    `checkpoint_dir`: resumable training (see `train_recommender`); its checkpoint is deleted
    once the model is saved. Under torchrun every rank trains and rank 0 saves."""
    if cfg.pretrained:
        set_seed(cfg.train.seed)
        model = adapt_llm(cfg.pretrained, data, cfg.max_len, cfg.item_init)
    else:
        model = build_teacher(cfg, data.vocab, cfg.train.seed)
    summary = train_recommender(model, data, cfg.max_len, cfg.train, desc="teacher",
                                checkpoint_dir=checkpoint_dir, fingerprint=training_fingerprint(cfg, data))
    summary.update(
        architecture=model.config.model_type, parameters=count_parameters(model), data=data.name,
        data_fingerprint=data.interactions.fingerprint(), config=cfg.model_dump(),
    )
    set_recsys_meta(model, max_len=cfg.max_len, kind="teacher")

    def save() -> None:
        save_model(model.cpu(), data.vocab, out, {SUMMARY_FILE: summary})
        if checkpoint_dir is not None:  # the model is the result now; a rerun trains afresh
            (Path(checkpoint_dir) / CHECKPOINT_FILE).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                Path(checkpoint_dir).rmdir()  # when empty (the pipeline keeps its marker file there)

    dist.on_main(save)  # the other ranks wait until the model is on disk
    return model, summary
