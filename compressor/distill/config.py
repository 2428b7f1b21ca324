"""`DistillConfig`: every knob of the distillation stage, with the FISHER-LD paper's defaults."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from compressor.distill.losses import LOSSES
from compressor.teacher import TrainConfig

# Distillation fine-tunes an already-trained student (a truncated teacher), so the budget is
# a few epochs with a short warm-up and the paper's weight decay (0.01).
DISTILL_TRAIN = TrainConfig(
    epochs=4, batch_size=64, lr=1e-3, weight_decay=0.01, warmup_steps=20, patience=2,
    eval_every=1, max_minutes=None, precision="fp32",  # fp32 as the teacher's recipe: the same student on every CPU
)


class DistillConfig(BaseModel):
    """Loss weights, layer mapping, Fisher-weight dynamics and the training budget.

    The loss of `fisher_ld` is
        alpha·CE + beta·T²·KL(teacher‖student, T) + gamma·Σ_l w_l·MSE(h_l^T, Adapt(h_l^S)) + lam·L2
    and the baselines reuse the same coefficients for the terms they share (see `losses.py`)."""

    model_config = ConfigDict(extra="forbid")
    method: str = Field("fisher_ld", description="a key of compressor.distill.LOSSES")
    alpha: float = Field(0.3, ge=0, description="weight of the task loss (the next-item CE: full softmax, or "
                         "the sampled softmax with output: candidates)")
    beta: float = Field(0.4, ge=0, description="weight of T²·KL(teacher ‖ student) on the item logits (and of "
                        "the terms dkd and ranking_kd put in its place)")
    gamma: float = Field(0.25, ge=0, description="weight of the intermediate (layer/attention) term")
    lam: float = Field(0.05, ge=0, description="weight of the L2 term (see `l2`)")
    l2: Literal["drift", "weights", "none"] = Field(
        "drift",
        description="drift: Σ‖θ−θ₀‖² over student parameters, θ₀ = the student at the start "
        "(L2-SP: keeps the copied teacher layers from wandering); weights: Σ‖θ‖²; none",
    )
    l2_mode: Literal["decoupled", "loss"] = Field(
        "decoupled",
        description="decoupled: after each AdamW step θ ← θ − lr·λ·∂(½L2)/∂θ, as AdamW decouples weight "
        "decay (Loshchilov & Hutter); loss: λ·L2 added to the loss, where Adam's per-parameter scaling "
        "makes λ = 0.05 pin every weight with a small task gradient to θ₀ (measured: a 2-layer tiny "
        "student's loss fell 0.7% in 10 steps instead of 17%)",
    )
    temperature: float = Field(4.0, gt=0)
    output: Literal["full", "candidates"] = Field(
        "full", description="how the step scores items (compressor/distill/outputs.py): full = both models' "
        "logits over the whole catalogue at every position (exact; batch x positions x items x 4 bytes, "
        "several copies); candidates = logits on each position's target, the teacher's top "
        "`candidates_topk` items and `candidates_negatives` items shared by the batch only: the task loss "
        "is the logQ-corrected sampled softmax over them and KD the T²·KL over them, for catalogues whose "
        "full logits do not fit. dkd and ranking_kd need the full logits")
    candidates_topk: int = Field(
        100, ge=1, description="with output: candidates, the teacher's highest-scoring items per position "
        "scored exactly in both models (found without gradients, a catalogue chunk at a time)")
    candidates_search: Literal["auto", "exact", "hnsw"] = Field(
        "auto", description="with output: candidates, how the teacher's top items are found: exact (every "
        "item scored each step: positions x items x hidden work), hnsw (a Faiss graph over the frozen "
        "teacher's item table, built once: approximate, ~log(items) per position), auto = hnsw from "
        "100,000 items (compressor.sampled_softmax.HNSW_TOPK_ITEMS)")
    candidates_negatives: int = Field(
        1024, ge=1, description="with output: candidates, negatives drawn per step and shared by the "
        "batch (each rank draws its own under torchrun)")
    candidates_alpha: float = Field(
        0.75, ge=0, description="with output: candidates, negatives are drawn with probability "
        "proportional to (training count + 1)^alpha (0 = uniform)")
    rkd_distance: float = Field(
        7.5, ge=0, description="rkd: weight of the distance-wise term (Huber on mean-normalised pairwise "
        "distances of the query vectors); the paper's λ_D = 25 beside a task weight of 1, times alpha "
        "(0.3) so the ratio to the task loss is the paper's")
    rkd_angle: float = Field(
        15.0, ge=0, description="rkd: weight of the angle-wise term (Huber on triplet-angle cosines); "
        "the paper's λ_A = 50 times alpha, as rkd_distance")
    dkd_alpha: float = Field(
        1.0, ge=0, description="dkd: weight of target-class KD (target vs rest), times beta; the paper's α")
    dkd_beta: float = Field(
        8.0, ge=0, description="dkd: weight of non-target-class KD (the distribution over the other items), "
        "times beta; the paper's β for CIFAR-100 (with T = 4, our `temperature`)")
    rank_k: int = Field(
        10, ge=1, description="ranking_kd: how many of the teacher's top items the student learns to rank "
        "(10 = the list NDCG@10 and HR@10 score)")
    rank_temperature: float = Field(
        1.0, gt=0, description="ranking_kd: softmax temperature τ of the listwise term (× τ²); 1 keeps "
        "the margins between the teacher's top items, which a higher τ flattens")
    layer_loss: Literal["mse", "relative"] = Field(
        "mse", description="the layer term of fisher_ld / fisher_ld_static / uniform_ld: mse = mean "
        "(h_T − Adapt(h_S))² (the paper's form); relative = ‖h_T − Adapt(h_S)‖² / ‖h_T‖² per position, "
        "so LLM outlier dimensions do not dominate")
    layer_map: Literal["source", "uniform"] | list[int] = Field(
        "source",
        description="student layer i ↔ teacher layer map[i]; source = the teacher layers a truncated "
        "student came from (recsys meta `teacher_layers`), uniform = evenly spaced ending at the "
        "last teacher layer; or an explicit list",
    )
    importance_file: str | None = Field(
        None, description="importance.json with Fisher scores per teacher layer; None = estimate "
        "them from `fisher_batches` training batches before distilling",
    )
    fisher_batches: int = Field(8, ge=1, description="batches for the on-the-fly teacher Fisher")
    depth_bias: float = Field(0.0, ge=0, description="paper eq. 6 β: w·(1+β·l/L)^δ; 0 = off")
    depth_power: float = Field(1.0, gt=0, description="paper eq. 6 δ")
    ema: bool = Field(True, description="update the Fisher weights during training (paper eq. 9)")
    ema_eta: float = Field(0.1, gt=0, le=1, description="η in w ← (1−η)·w + η·w_current")
    ema_every: int = Field(10, ge=1, description="steps between weight updates")
    cache_teacher: bool = Field(
        True, description="keep the frozen teacher's outputs per training window after their "
        "first computation (exact: eval mode, fixed padding), so later epochs skip its forward",
    )
    eval_at_start: bool = Field(
        True, description="validate the untouched student too, so the best checkpoint is never "
        "worse on validation than where training started",
    )
    checkpoint_every: int = Field(0, ge=0, description="steps between checkpoints; 0 = at each validation")
    checkpoint_minutes: float = Field(
        5.0, ge=0, description="also checkpoint after this many minutes of training since the last "
        "checkpoint, so a kill mid-epoch loses at most that much; 0 = off",
    )
    train: TrainConfig = DISTILL_TRAIN

    @field_validator("train", mode="before")
    @classmethod
    def _distill_train_defaults(cls, v):
        """A partial `train:` section overrides the distillation defaults, not the teacher's."""
        return {**DISTILL_TRAIN.model_dump(), **v} if isinstance(v, dict) else v

    @field_validator("train")
    @classmethod
    def _fixed_windows(cls, v: TrainConfig) -> TrainConfig:
        if v.random_windows:
            raise ValueError("train.random_windows is for teacher training: distillation caches the "
                             "teacher's outputs per fixed window")
        if v.ema_decay is not None:
            raise ValueError("train.ema_decay is for teacher training: distillation keeps its best "
                             "validation snapshot")
        if v.loss != "full":
            raise ValueError("train.loss is for teacher training: distillation samples with distill.output=candidates")
        if v.parallel == "fsdp":
            raise ValueError("train.parallel=fsdp is for teacher training: distillation runs DDP (the "
                             "student is the small model; the frozen teacher is replicated on every rank)")
        return v

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        if v not in LOSSES:
            raise ValueError(f"unknown distillation method {v!r}; choose one of {', '.join(LOSSES)}")
        return v

    @model_validator(mode="after")
    def _output_fits_method(self) -> DistillConfig:
        if self.output != "full" and LOSSES[self.method].full_logits:
            raise ValueError(f"distill.method={self.method} reads the full-catalogue logits: it needs "
                             "distill.output=full")
        return self
