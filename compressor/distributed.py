"""Data parallelism under torchrun: who this process is, and the few collectives the stages use.

`torchrun --nproc_per_node N -m compressor run ...` starts N copies of the command, each with
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in its environment. `session()` joins
them into one process group (gloo on CPU; on CUDA, nccl for GPU tensors and gloo for CPU
ones). Every other helper is a no-op in a single process, so code calls them unconditionally.

The roles, everywhere in the project:
- every rank trains on its own shard of the batches; DDP all-reduces the gradients;
- statistics (Fisher sums and counts) are summed over ranks with `all_reduce_sum`;
- rank 0 alone evaluates, decides (early stopping, the time cap) and writes files; the other
  ranks wait for its answer in `broadcast_object` / `on_main`, which is also their barrier.

Multi-machine runs need the output directory on storage every machine sees: later stages read
what rank 0 wrote.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from compressor.errors import CompressorError

T = TypeVar("T")
# How long a rank waits in a collective. Rank 0 evaluates, exports and times models alone while
# the others wait, which on a CPU can take far longer than torch's 30-minute default; a crashed
# rank does not make the others wait this long, since torchrun stops the whole group.
TIMEOUT_ENV = "COMPRESSOR_DIST_TIMEOUT_MINUTES"
DEFAULT_TIMEOUT_MINUTES = 360.0


def launched() -> bool:
    """True when torchrun (or another launcher) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


# True while rank 0 runs something alone inside `on_main`: the helpers then act as in a single
# process, so code that shards its work (Fisher) does not wait for ranks that are not running it.
_alone = False


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and not _alone


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if active() else 0


def is_main() -> bool:
    return rank() == 0


def backend() -> str:
    # One group serves both kinds of tensors: DDP's gradients on the GPU go through nccl, while
    # the CPU tensors of broadcast/all-reduce helpers (numpy sums, Python objects) use gloo.
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def _timeout() -> timedelta:
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_MINUTES))
    try:
        minutes = float(raw)
    except ValueError:
        minutes = float("nan")
    if not minutes > 0:  # NaN fails too
        raise CompressorError(f"{TIMEOUT_ENV}={raw!r}: give a positive number of minutes")
    return timedelta(minutes=minutes)


@contextlib.contextmanager
def session(command: str, supported: bool) -> Iterator[None]:
    """Join the torchrun process group for the duration of one command (nothing to do alone).

    A command that does not shard its work (`supported=False`) would have N processes write the
    same files at once, so it is refused with a one-line error instead."""
    if not launched() or active():
        yield
        return
    if not supported:
        raise CompressorError(f"`compressor {command}` does not run under torchrun "
                              f"(WORLD_SIZE={os.environ['WORLD_SIZE']}): run it as one process")
    if not dist.is_available():
        raise CompressorError("this torch build has no torch.distributed: run as one process")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # "cuda" = this rank's GPU
    dist.init_process_group(backend(), timeout=_timeout())
    try:
        yield
    finally:
        # Sharded modules live in reference cycles (FSDP's hooks): collect them, and the gloo work
        # objects they hold, while the interpreter is whole. Left to interpreter shutdown, their
        # tensors were freed from gloo threads after Python was gone ("terminate called without an
        # active exception", SIGABRT, seen after an FSDP teacher had been saved).
        gc.collect()
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """`obj` as rank `src` holds it, on every rank (pickled: small objects only)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: T) -> list[T]:
    if not active():
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over ranks, in place; returns it."""
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def sum_array(a: np.ndarray) -> np.ndarray:
    """A numpy array summed over ranks, in float64 (Fisher traces: no precision lost to the sum)."""
    if not active():
        return a
    return all_reduce_sum(torch.from_numpy(np.array(a, dtype=np.float64))).numpy()


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Every rank's parameters and buffers become rank `src`'s (e.g. the best validation state,
    which only rank 0 kept)."""
    if not active():
        return
    with torch.no_grad():
        for t in module.state_dict().values():
            dist.broadcast(t, src=src)


def on_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run `fn` on rank 0 only and hand its result to every rank; the others wait (the barrier).
    Inside `fn` this process acts alone (`active()` is False), whatever `fn` calls.

    When rank 0 fails, the other ranks raise a CompressorError with its message instead of
    waiting for a broadcast that never comes; rank 0 raises its own exception."""
    global _alone
    if not active():
        return fn(*args, **kwargs)
    if is_main():
        _alone = True
        try:
            result = fn(*args, **kwargs)
        except BaseException as e:
            _alone = False
            broadcast_object(("error", f"{type(e).__name__}: {e}"))
            raise
        _alone = False
        return broadcast_object(("ok", result))[1]
    status, value = broadcast_object(None)
    if status == "error":
        raise CompressorError(f"rank 0 failed, so rank {rank()} stops: {value}")
    return value


def shard(order: np.ndarray) -> np.ndarray:
    """This rank's part of `order`, as `torch.utils.data.DistributedSampler` splits a dataset:
    padded with its own first entries to a multiple of the world size, then every world-size-th
    entry from position `rank`. Every rank gets the same count, so every rank runs the same
    number of steps (DDP hangs otherwise); alone, `order` unchanged."""
    n = world_size()
    if n == 1:
        return order
    total = -(-len(order) // n) * n
    padded = np.concatenate([order, np.resize(order, total - len(order))]) if total > len(order) else order
    return padded[rank() : total : n]


def split(n: int) -> slice:
    """This rank's contiguous block of `n` items, no item repeated or left out (for sums such as
    Fisher, where padding would count a sample twice); blocks differ in size by at most one."""
    w, r = world_size(), rank()
    return slice(r * n // w, (r + 1) * n // w)


def wrap_ddp(module: nn.Module, find_unused_parameters: bool = False) -> nn.Module:
    """`module` under DistributedDataParallel (gradients all-reduced in backward); alone, itself.

    Call the returned module for the training forward: DDP hooks its `__call__`, and a backward
    through a forward that bypassed it would not be synchronised."""
    if not active():
        return module

    device = next(module.parameters()).device
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused_parameters)


class Parallel:
    """One module trained over the ranks; `net` is what the loop calls (its forward gives the loss).

    mode "ddp": every rank holds the whole module and DDP all-reduces the gradients in backward.
    mode "fsdp": `fully_shard` on each of `units` (the decoder layers) and on the module itself:
    parameters, gradients and optimizer state are split over the ranks (each holds 1/N), and a
    unit's parameters are all-gathered only while it runs. The whole state exists only when asked
    for (`full_state`, a collective: every rank must call it), on rank 0, in CPU memory.
    One process: `net` is the module itself, whatever the mode.

    Checkpoints hold the plain formats (`module.state_dict()`, `optimizer.state_dict()`) in every
    mode, so a run may resume under another mode or world size."""

    def __init__(self, module: nn.Module, mode: str = "ddp", units: list[nn.Module] | None = None,
                 find_unused_parameters: bool = False, device: torch.device | None = None):
        self.mode = mode if active() else "single"
        self.module = module
        if self.mode == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            # the mesh names the device the shards live on (fully_shard moves them there)
            mesh = init_device_mesh((device or torch.device("cpu")).type, (world_size(),))
            for unit in units or []:
                fully_shard(unit, mesh=mesh)
            fully_shard(module, mesh=mesh)
            self.net = module
        elif self.mode == "ddp":
            self.net = wrap_ddp(module, find_unused_parameters)
        else:
            self.net = module

    @property
    def sharded(self) -> bool:
        return self.mode == "fsdp"

    def full_state(self) -> dict[str, torch.Tensor] | None:
        """The module's state dict with whole tensors on rank 0, None on the other ranks."""
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
            )

            state = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            return state if is_main() else None
        return self.module.state_dict() if is_main() else None

    def load_full_state(self, state: dict[str, torch.Tensor]) -> None:
        """Every rank passes the whole state (each read the checkpoint); fsdp keeps its shard."""
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
            )

            set_model_state_dict(self.module, state, options=StateDictOptions(full_state_dict=True))
        else:
            self.module.load_state_dict(state)

    def optimizer_state(self, opt: torch.optim.Optimizer) -> dict | None:
        """`opt.state_dict()`'s plain format (states keyed by parameter position) on rank 0."""
        if not self.sharded:
            return opt.state_dict() if is_main() else None
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        full = get_optimizer_state_dict(self.module, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not is_main():
            return None
        # the distributed API keys states by parameter name; positions follow the groups' order
        position = {name: i for i, name in enumerate(n for g in full["param_groups"] for n in g["params"])}
        groups, start = [], 0
        for g in full["param_groups"]:
            groups.append({**g, "params": list(range(start, start + len(g["params"])))})
            start += len(g["params"])
        # each parameter gets tensors of its own: the gathered dict may share one `step` tensor
        # among parameters, which AdamW would then advance once per parameter sharing it
        state = {position[n]: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
                 for n, s in full["state"].items()}
        return {"state": state, "param_groups": groups}

    def load_optimizer_state(self, opt: torch.optim.Optimizer, state: dict) -> None:
        if not self.sharded:
            opt.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        names = {id(p): n for n, p in self.module.named_parameters()}
        order = [names[id(p)] for g in opt.param_groups for p in g["params"]]
        groups, start = [], 0
        for g, saved in zip(opt.param_groups, state["param_groups"], strict=True):
            groups.append({**saved, "params": order[start : start + len(g["params"])]})
            start += len(g["params"])
        # own tensors per parameter here too (a checkpoint written elsewhere may share them)
        named = {"state": {order[int(i)]: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
                           for i, s in state["state"].items()}, "param_groups": groups}
        set_optimizer_state_dict(self.module, opt, named, options=StateDictOptions(full_state_dict=True))


def bar_options() -> dict:
    """tqdm keyword arguments: no bars on ranks other than 0. (On rank 0 nothing is passed, so
    TQDM_DISABLE and the callers' own settings keep working: tqdm reads them as defaults.)"""
    return {} if is_main() else {"disable": True}
