"""Training pieces shared by the one loop (`compressor.training.loop.Trainer`, which trains the
teacher and distils students): optimiser, schedule, seeding, precision, early stopping, weight
averaging, resume checkpoint I/O and RNG states."""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import random
import warnings
from dataclasses import dataclass
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


@dataclass(frozen=True)
class PrecisionChoice:
    """What a training loop computes in, and why (recorded in the stage summary and the report)."""

    precision: str  # "bf16" or "fp32"
    reason: str


def choose_precision(device_type: str, requested: str, *, cuda_bf16: bool = False,
                     cpu_native_bf16: bool = False) -> PrecisionChoice:
    """The decision alone, from the facts about the hardware (a pure function: testable on any CPU).

    `auto` takes bf16 where the hardware runs it natively (a CUDA device with bf16; a CPU with
    AVX512-BF16 or AMX, where SmolLM2-135M trained 1.2-1.3x faster) and fp32 elsewhere: on a CPU
    without native kernels PyTorch emulates bf16, and one 576 -> 1536 Linear's forward + backward
    took 34x longer than in fp32 (AVX2-only EPYC). An explicit `bf16` is obeyed, even where slow."""
    if requested == "fp32":
        return PrecisionChoice("fp32", "fp32 asked for")
    if device_type == "cuda":
        if cuda_bf16:
            return PrecisionChoice("bf16", f"{requested}: this CUDA device supports bf16")
        return PrecisionChoice("fp32", f"{requested}: this CUDA device has no bf16")
    if device_type != "cpu":
        return PrecisionChoice("fp32", f"{requested}: no bf16 autocast on {device_type}")
    if requested == "bf16":
        how = "native (AVX512-BF16/AMX)" if cpu_native_bf16 else "EMULATED: no native bf16 kernels, expect 10-30x slower steps than fp32"
        return PrecisionChoice("bf16", f"bf16 asked for on a CPU, {how}")
    if cpu_native_bf16:
        return PrecisionChoice("bf16", "auto: this CPU has native bf16 kernels (AVX512-BF16 or AMX)")
    return PrecisionChoice("fp32", "auto: this CPU has no native bf16 kernels (bf16 would be emulated)")


@functools.cache
def cpu_has_native_bf16() -> bool:
    """PyTorch's own test of native CPU bf16 (oneDNN: AVX512-BF16 or AMX), asked once."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


_warned_emulated_bf16 = False


def resolve_precision(device: torch.device | str, precision: str) -> PrecisionChoice:
    """`choose_precision` on this machine's facts. An explicit `bf16` on a CPU that would emulate it
    warns once per process, loudly: it is the difference between an hour and a day."""
    global _warned_emulated_bf16
    kind = torch.device(device).type
    cuda_bf16 = kind == "cuda" and torch.cuda.is_bf16_supported()
    native = kind == "cpu" and precision != "fp32" and cpu_has_native_bf16()
    choice = choose_precision(kind, precision, cuda_bf16=cuda_bf16, cpu_native_bf16=native)
    if kind == "cpu" and choice.precision == "bf16" and not native and not _warned_emulated_bf16:
        _warned_emulated_bf16 = True
        warnings.warn("precision: bf16 on a CPU without native bf16 kernels (no AVX512-BF16/AMX): PyTorch "
                      "emulates it and training steps run 10-30x slower than fp32; set precision: auto "
                      "(or fp32)", RuntimeWarning, stacklevel=2)
    return choice


def effective_precision(device: torch.device | str, precision: str) -> str:
    """"bf16" or "fp32": what `autocast` computes in (`resolve_precision` says why)."""
    return resolve_precision(device, precision).precision


def autocast(device: torch.device | str, precision: str):
    """bf16 autocast where `effective_precision` says so; fp32 elsewhere. Parameters, optimizer
    state and saved checkpoints stay fp32 either way (export reads those)."""
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
