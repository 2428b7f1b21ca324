"""`Distiller`: the state of one distillation run and its optimisation step.

The loop (`training.Trainer`, run by `trainer.distill`) owns data order, validation, checkpoints
and the budget; this class owns the models, adapters, optimiser, layer weights and what happens
in one step.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel

from compressor import distributed as dist
from compressor.distill.config import DistillConfig
from compressor.distill.features import TeacherCache, extract
from compressor.distill.fisher_weights import LayerWeights, mapped_weights
from compressor.distill.losses import Batch, Context, get_loss
from compressor.distill.mapping import Adapters, resolve_layer_map
from compressor.distill.outputs import make_output
from compressor.fisher import grad_traces, layer_params
from compressor.sampled_softmax import Proposal
from compressor.training import autocast, cosine_schedule, make_optimizer


@contextmanager
def attention_implementation(models: list[PreTrainedModel], impl: str | None):
    """Temporarily switch models to `impl` (attention maps need "eager"); None = leave as is."""
    old = [getattr(m.config, "_attn_implementation", None) for m in models]
    try:
        if impl is not None:
            for m in models:
                if getattr(m.config, "_attn_implementation", None) != impl:
                    m.set_attn_implementation(impl)
        yield
    finally:
        for m, o in zip(models, old, strict=True):
            if o is not None and getattr(m.config, "_attn_implementation", None) != o:
                m.set_attn_implementation(o)


@contextmanager
def frozen(model: nn.Module):
    """Eval mode and no gradients for the teacher; its flags and mode are restored afterwards."""
    flags = [p.requires_grad for p in model.parameters()]
    mode = model.training
    model.eval().requires_grad_(False)
    try:
        yield model
    finally:
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)
        model.train(mode)


def unique_params(model: nn.Module) -> list[nn.Parameter]:
    return list({id(p): p for p in model.parameters()}.values())


class _Forward(nn.Module):
    """The step's forward (both models and the loss) as one module over student and adapters:
    DDP acts through a module's `__call__`. The frozen teacher is not a submodule, so DDP neither
    broadcasts nor synchronises it."""

    def __init__(self, trained: nn.Module, compute):
        super().__init__()
        self.trained = trained
        self.compute = compute

    def forward(self, *batch: torch.Tensor):
        return self.compute(*batch)


class Distiller:
    """Student + frozen teacher + adapters + optimiser + layer weights for one method."""

    def __init__(self, teacher: PreTrainedModel, student: PreTrainedModel, cfg: DistillConfig, n_special: int,
                 n_windows: int, total_steps: int, fisher_scores: np.ndarray | None = None,
                 proposal: Proposal | None = None):
        self.cfg, self.teacher, self.student = cfg, teacher, student
        self.loss = get_loss(cfg.method)
        # how items are scored (distill.output); `proposal` draws the candidates' negatives
        self.output = make_output(cfg, self.loss, n_special, proposal)
        self.n_special = n_special
        self.device = next(student.parameters()).device
        self.layer_map = resolve_layer_map(cfg.layer_map, student, teacher)
        k = student.config.num_hidden_layers
        self.adapters = Adapters(student, teacher).to(self.device)
        self.modules = nn.ModuleDict({"student": student, "adapters": self.adapters})
        # under torchrun: gradients all-reduced by DDP. Learnable adapters (student and teacher
        # widths differ) may go unused by a method, which DDP must then be told to look for.
        self.find_unused = any(p.requires_grad for p in self.adapters.parameters())
        self.forward = _Forward(self.modules, self.compute)
        self.net = self.forward  # what a step calls: `training.Trainer` puts the DDP wrapper here
        t = cfg.train
        self.opt = make_optimizer(self.modules, t.lr, t.weight_decay, t.betas)
        self.sched = cosine_schedule(self.opt, total_steps, t.warmup_steps)
        if self.loss.fisher:
            if fisher_scores is None:
                raise ValueError(f"{cfg.method} needs Fisher scores of the teacher layers")
            init = mapped_weights(fisher_scores, self.layer_map, cfg.depth_bias, cfg.depth_power)
        else:
            init = np.full(k, 1.0 / k)
        self.fisher_scores, self.fisher_source = fisher_scores, None  # where the scores came from (set by `distill`)
        self.weights = LayerWeights(init, cfg.ema_eta)
        self.dynamic = self.loss.dynamic and cfg.ema
        self.layer_groups = layer_params(student)
        self.student_params = unique_params(student)
        # θ₀ for the drift penalty: the student as it arrives (the copied teacher layers).
        self.init_params = [p.detach().clone() for p in self.student_params] if cfg.l2 == "drift" else None
        self.decoupled_l2 = self.loss.l2 and cfg.l2 != "none" and cfg.l2_mode == "decoupled" and cfg.lam > 0
        self.ctx = Context(cfg, self.layer_map, teacher.config.num_hidden_layers, k, self.adapters,
                           self.weights.tensor(self.device), self.l2)
        self.s_req, self.t_req = self.loss.request(self.ctx)
        self.cache = TeacherCache(n_windows) if cfg.cache_teacher and self.loss.uses_teacher else None
        self.step_n = 0

    @torch.no_grad()
    def apply_decoupled_l2(self, lr: float) -> float:
        """θ ← θ − lr·λ·(θ − θ₀) (drift) or θ ← θ·(1 − lr·λ) (weights); returns the L2 value before."""
        value = float(self.l2())
        step = lr * self.cfg.lam
        for i, p in enumerate(self.student_params):
            p.sub_(step * (p - self.init_params[i]) if self.cfg.l2 == "drift" else step * p)
        return value

    def l2(self) -> torch.Tensor:
        if self.cfg.l2 == "drift":
            return sum((p - p0).pow(2).sum() for p, p0 in zip(self.student_params, self.init_params, strict=True))
        if self.cfg.l2 == "weights":
            return sum(p.pow(2).sum() for p in self.student_params)
        return torch.zeros((), device=self.device)

    def teacher_features(self, idx: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor):
        if self.cache is not None:
            return self.cache.features(self.teacher, idx, ids, mask, self.t_req)
        with torch.no_grad():
            return extract(self.teacher, ids, mask, self.t_req)

    def compute(self, idx, ids, mask, labels) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
        """Forward both models; returns (total loss, raw terms, task loss)."""
        keep = labels != -100
        tf = self.teacher_features(idx, ids, mask) if self.loss.uses_teacher else None
        sf = extract(self.student, ids, mask, self.s_req)
        t_last = tf.last[keep] if tf is not None and self.loss.item_kd else None
        out = self.output(self.student, self.teacher, sf.last[keep], t_last, labels[keep])
        batch = Batch(keep, out.task, out.s_logits, out.t_logits, sf, tf, out.target, out.kd)
        total, terms = self.loss(batch, self.ctx)
        return total, terms, out.task

    def step(self, idx: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> dict:
        """One optimisation step; returns the log row."""
        t0 = time.perf_counter()
        self.student.train()
        self.adapters.train()
        with autocast(self.device, self.cfg.train.precision):  # bf16 on a CUDA device that has it
            total, terms, task = self.net(idx, ids, mask, labels)
        row: dict = {}
        if self.dynamic and (self.step_n + 1) % self.cfg.ema_every == 0:
            # eq. 9: Fisher trace of each student layer from the task loss alone (extra backward).
            current = grad_traces(task, self.layer_groups, retain_graph=True)
            # the mean over ranks (autograd.grad bypasses DDP): every rank keeps the same weights
            current = dist.sum_array(current) / dist.world_size()
            row["weights"] = self.weights.update(current).tolist()
            self.ctx.weights = self.weights.tensor(self.device)
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(self.modules.parameters(), 1.0)
        self.opt.step()
        if self.decoupled_l2:
            row["l2"] = self.apply_decoupled_l2(self.sched.get_last_lr()[0])
        self.sched.step()
        self.step_n += 1
        return {"step": self.step_n, "loss": float(total.detach()), **terms,
                "lr": self.sched.get_last_lr()[0], "step_seconds": time.perf_counter() - t0, **row}

    def state_dict(self) -> dict:
        return {"student": self.student.state_dict(), "adapters": self.adapters.state_dict(),
                "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "weights": self.weights.state_dict(), "step": self.step_n,
                "init_params": self.init_params}

    def load_state_dict(self, state: dict) -> None:
        self.student.load_state_dict(state["student"])
        self.adapters.load_state_dict(state["adapters"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.weights.load_state_dict(state["weights"])
        self.ctx.weights = self.weights.tensor(self.device)
        self.step_n = state["step"]
        if state.get("init_params") is not None:
            self.init_params = [p.to(self.device) for p in state["init_params"]]
