"""Pieces shared by every training loop (teacher, distillation): optimiser, schedule, seeding,
resume checkpoints."""

from __future__ import annotations

import copy
import math
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compressor.atomic import atomic_path
from compressor.errors import CompressorError


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                   embedding_lr: float | None = None) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms and biases).

    `embedding_lr`: a rate of its own for the input item table (tied to the head): a pretrained
    LLM's decoder wants a gentle rate, its new item table a much higher one."""
    params = {id(p): p for p in model.parameters() if p.requires_grad}
    groups = []
    if embedding_lr is not None and hasattr(model, "get_input_embeddings"):
        table = model.get_input_embeddings().weight
        if params.pop(id(table), None) is not None:
            groups.append({"params": [table], "weight_decay": weight_decay, "lr": embedding_lr})
    decay = [p for p in params.values() if p.dim() >= 2]
    no_decay = [p for p in params.values() if p.dim() < 2]
    groups += [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def effective_precision(device: torch.device | str, precision: str) -> str:
    """What `autocast` gives: "bf16" on a CUDA device that supports it (`precision` auto or bf16)
    and on a CPU when asked for explicitly (`precision: bf16`), "fp32" otherwise.

    `auto` stays fp32 on a CPU so that a default config trains the same model on any CPU. On a
    CPU with native bf16 (AVX512-BF16 or AMX) an LLM trains faster in bf16 (SmolLM2-135M:
    forward + backward 1.8x at one thread, epochs 1.2-1.3x at two; README "The LLM teacher"),
    so the LLM config asks for it."""
    kind = torch.device(device).type
    if kind == "cuda":
        use = precision in ("auto", "bf16") and torch.cuda.is_bf16_supported()
    else:
        use = kind == "cpu" and precision == "bf16"
    return "bf16" if use else "fp32"


def autocast(device: torch.device | str, precision: str):
    """bf16 autocast where `effective_precision` says so; fp32 elsewhere. Parameters, optimizer
    state and saved checkpoints stay fp32 either way (export reads those)."""
    import contextlib

    if effective_precision(device, precision) == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def device_description(device: torch.device) -> str:
    """What trained: `cuda (NVIDIA H200)` or `cpu (2 threads)`, for summaries and the report."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    n = torch.get_num_threads()
    return f"{device.type} ({n} thread{'' if n == 1 else 's'})"


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine decay to 10% of the peak rate."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class EarlyStopping:
    """Tracks the best validation value; `step` returns True when patience has run out."""

    def __init__(self, patience: int, higher_is_better: bool = True):
        self.patience = patience
        self.sign = 1.0 if higher_is_better else -1.0
        self.best = -math.inf
        self.bad_rounds = 0

    def step(self, value: float) -> bool:
        if self.sign * value > self.best:
            self.best = self.sign * value
            self.bad_rounds = 0
        else:
            self.bad_rounds += 1
        return self.bad_rounds > self.patience

    @property
    def improved(self) -> bool:
        return self.bad_rounds == 0

    def state_dict(self) -> dict:
        return {"best": self.best, "bad_rounds": self.bad_rounds}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.bad_rounds = state["best"], state["bad_rounds"]


class WeightAverage:
    """An exponential moving average of a model's weights (Polyak averaging), held in a frozen copy.

    Averaging the last few hundred steps' weights smooths the step-to-step noise of small-batch
    training, which a single final or best-epoch snapshot keeps. The decay ramps up as
    min(decay, (1 + n) / (10 + n)) over the first updates, so the random initial weights fade fast."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(model).eval()
        self.model.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        # parameters() of two copies of one architecture line up, tied weights listed once in both
        torch._foreach_lerp_(list(self.model.parameters()), [p.detach() for p in model.parameters()], 1 - decay)

    def state_dict(self) -> dict:
        return {"updates": self.updates, "model": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.updates = state["updates"]
        self.model.load_state_dict(state["model"])


# ---------------------------------------------------------------------------- resume checkpoints


def save_checkpoint(obj: dict, path: Path) -> None:
    """Write atomically (temp file, then rename): a kill mid-write leaves the previous checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def read_checkpoint(path: Path, device, required: set[str], what: str) -> dict:
    """Read a resume checkpoint without executing anything it contains.

    `weights_only=True` restricts unpickling to tensors, numbers, strings and containers, so a
    crafted checkpoint (a pickle `__reduce__` payload) is refused instead of run. That is why
    checkpoints hold RNG states as tensors and plain dicts, never generator objects."""
    try:
        ck = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError (corrupt zip), EOFError, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CompressorError(f"{path}: not a checkpoint this tool wrote, refused ({first[:160]}); "
                              "delete it or use another --out") from e
    if not isinstance(ck, dict) or not required <= ck.keys():
        raise CompressorError(f"{path}: not a {what} checkpoint (missing {'/'.join(sorted(required))})")
    return ck


def rng_state() -> dict:
    """The torch generators' states (CPU, and every CUDA device's), as tensors a checkpoint keeps."""
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"].cpu())
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
