"""The teacher: a stock `transformers` causal LM whose vocabulary is the item catalogue.

`TeacherConfig` names an architecture and sizes and builds the Hugging Face config;
`train_teacher` trains it on next-item prediction (full softmax over the catalogue) and saves
it with `save_pretrained`, the item vocabulary and a training summary.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from compressor.data.protocol import RecData, training_windows, window_batches
from compressor.data.vocab import PAD_ID, ItemVocab
from compressor.evaluate import evaluate_model
from compressor.modeling import (
    add_hidden_dropout,
    count_parameters,
    hidden_states,
    pick_device,
    save_model,
    set_recsys_meta,
)
from compressor.training import (
    EarlyStopping,
    autocast,
    cosine_schedule,
    device_description,
    make_optimizer,
    set_seed,
)

SUMMARY_FILE = "training_summary.json"


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
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto = bf16 autocast on a CUDA device that supports it, fp32 elsewhere")
    seed: int = 0
    device: str = "auto"


# The teacher's recipe: the generic defaults above plus windows re-cut every epoch (which let
# training run longer before validation stalled), length-grouped batches, and the number of
# epochs of an 8-layer teacher that fits the default job in 15 minutes on 2 cores, chosen on
# validation (README: "The teacher recipe").
TEACHER_TRAIN = TrainConfig(epochs=24, random_windows=True, group_by_length=True)


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
    train: TrainConfig = TEACHER_TRAIN

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


def train_recommender(
    model: PreTrainedModel,
    data: RecData,
    max_len: int,
    train: TrainConfig,
    desc: str = "train",
) -> dict:
    """Train `model` in place on next-item prediction; keeps the best validation state.

    Returns a summary: epochs run, best validation metrics, seconds per epoch, history."""
    set_seed(train.seed)
    device = pick_device(train.device)
    model.to(device)
    seqs = data.train_sequences()
    windows = training_windows(seqs, max_len, per_sequence=train.recent_windows)
    # random cuts add at most one window per sequence; the schedule clamps at its end
    n_windows = len(windows) + (len(seqs) if train.random_windows and not train.recent_windows else 0)
    steps_per_epoch = -(-n_windows // train.batch_size)
    opt = make_optimizer(model, train.lr, train.weight_decay, train.betas, train.embedding_lr)
    sched = cosine_schedule(opt, steps_per_epoch * train.epochs, train.warmup_steps)
    stopper = EarlyStopping(train.patience)
    valid = data.split("valid")
    rng = np.random.default_rng(train.seed)
    best_state, best_metrics, history = None, {}, []
    start = time.time()
    stop_reason = "epochs"
    hooks = add_hidden_dropout(model, train.hidden_dropout) if train.hidden_dropout > 0 else []
    bar = tqdm(range(train.epochs), desc=desc, unit="epoch")
    for epoch in bar:
        model.train()
        t0, losses = time.time(), []
        if train.random_windows:
            windows = training_windows(seqs, max_len, rng, per_sequence=train.recent_windows)
        # progress inside the epoch too: an LLM epoch on a CPU takes many minutes
        steps = tqdm(window_batches(windows, max_len, train.batch_size, rng, train.group_by_length), desc=f"{desc} epoch {epoch + 1}",
                     unit="step", total=-(-len(windows) // train.batch_size), leave=False)
        for ids, mask, labels in steps:
            with autocast(device, train.precision):
                loss = next_item_loss(model, *(torch.from_numpy(x).to(device) for x in (ids, mask, labels)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            steps.set_postfix(loss=f"{losses[-1]:.3f}")
        row = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "epoch_seconds": time.time() - t0}
        if (epoch + 1) % train.eval_every == 0 or epoch + 1 == train.epochs:
            metrics = evaluate_model(model, valid, max_len).metrics
            row["valid"] = metrics
            done = stopper.step(metrics["ndcg@10"])
            if stopper.improved:
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                best_metrics = {**metrics, "epoch": epoch + 1}
            bar.set_postfix(loss=f"{row['loss']:.3f}", ndcg10=f"{metrics['ndcg@10']:.4f}",
                            best=f"{stopper.best:.4f}")
            if done:
                stop_reason = "early stopping"
        history.append(row)
        if stop_reason == "early stopping":
            break
        if train.max_minutes is not None and (time.time() - start) / 60 > train.max_minutes:
            stop_reason = "time cap"
            break
    bar.close()
    if stop_reason == "time cap":
        # loud on purpose: the same config would give another model on a faster or slower machine
        warnings.warn(f"{desc}: stopped by the time cap ({train.max_minutes} min) after {len(history)} of "
                      f"{train.epochs} epochs: results depend on machine speed", stacklevel=2)
    for h in hooks:
        h.remove()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return {
        "epochs_run": len(history),
        "stop_reason": stop_reason,
        "best_valid": best_metrics,
        "train_seconds": time.time() - start,
        "seconds_per_epoch": float(np.mean([h["epoch_seconds"] for h in history])),
        "train_windows": len(windows),
        "epochs_planned": train.epochs,
        "device": device_description(device),
        "history": history,
    }


def train_teacher(data: RecData, cfg: TeacherConfig, out: str | Path) -> tuple[PreTrainedModel, dict]:
    """Build, train and save the teacher; returns the model and its training summary."""
    if cfg.pretrained:
        from compressor.pretrained import adapt_llm

        set_seed(cfg.train.seed)
        model = adapt_llm(cfg.pretrained, data, cfg.max_len)
    else:
        model = build_teacher(cfg, data.vocab, cfg.train.seed)
    summary = train_recommender(model, data, cfg.max_len, cfg.train, desc="teacher")
    summary.update(
        architecture=model.config.model_type, parameters=count_parameters(model), data=data.name,
        data_fingerprint=data.interactions.fingerprint(), config=cfg.model_dump(),
    )
    set_recsys_meta(model, max_len=cfg.max_len, kind="teacher")
    save_model(model.cpu(), data.vocab, out, {SUMMARY_FILE: summary})
    return model, summary
