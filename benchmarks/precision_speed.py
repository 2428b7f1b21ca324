"""fp32 against bf16 autocast, in training steps of the LLM teacher, measured in one run.

    python -m benchmarks.precision_speed --out benchmarks/results/precision_speed [--steps 8 --rounds 3]

The LLM config's teacher (SmolLM2-135M with an item table over the bundled catalogue, histories
of 20, batch 16, AdamW) takes optimisation steps on real training windows, alternating fp32 and
bf16 autocast round by round so both see the same machine load; the median step time of each
precision and their ratio are written with the machine's bf16 facts (PyTorch's native-kernel
check). On a CPU without native bf16 `precision: auto` trains in fp32, so the ratio says how much
longer that CPU's teacher stage takes than a native-bf16 CPU's, other things equal. (The item
table starts random here: step time does not depend on it.)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import machine_info
from compressor.atomic import atomic_write, atomic_write_json
from compressor.data.protocol import prepare, training_windows, window_batches
from compressor.pretrained import adapt_llm
from compressor.teacher import NextItemLoss
from compressor.training import autocast, cpu_has_native_bf16, make_optimizer

PRECISIONS = ("fp32", "bf16")


def run(steps: int = 8, rounds: int = 3, max_len: int = 20, batch_size: int = 16, llm: str = "smollm2-135m") -> dict:
    data = prepare("ml-latest-small")
    model = adapt_llm(llm, data, max_len, item_init="random")
    model.train()
    loss_fn = NextItemLoss(model)
    opt = make_optimizer(model, 1e-4, 0.01, (0.9, 0.98), embedding_lr=1e-3)
    windows = training_windows(data.train_sequences(), max_len)
    batches = list(window_batches(windows, max_len, batch_size, np.random.default_rng(0), False))
    times: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    b = 0
    for r in range(rounds + 1):  # round 0 warms both up and is not kept
        for precision in PRECISIONS:
            for _ in range(steps):
                ids, mask, labels = (torch.from_numpy(x) for x in batches[b % len(batches)])
                b += 1
                t0 = time.perf_counter()
                with autocast("cpu", precision):
                    loss = loss_fn(ids, mask, labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if r:
                    times[precision].append(time.perf_counter() - t0)
            print(f"round {r} {precision}: {np.median(times[precision]) if r else 0:.3f} s/step", flush=True)
    median = {p: float(np.median(t)) for p, t in times.items()}
    return {
        "what": "median seconds per teacher training step (forward, backward, AdamW), fp32 vs bf16 autocast",
        "llm": llm, "max_len": max_len, "batch_size": batch_size, "steps_per_round": steps, "rounds": rounds,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": {**machine_info(), "cpu_native_bf16": cpu_has_native_bf16()},
        "seconds_per_step": median, "fp32_over_bf16": median["fp32"] / median["bf16"],
        "all_step_seconds": times,
    }


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "precision_speed.json", results)
    s = results["seconds_per_step"]
    atomic_write(out / "precision_speed.md", "\n".join([
        "| precision | s / step (median) |", "|---|---|",
        *(f"| {p} | {s[p]:.3f} |" for p in PRECISIONS),
        f"| fp32 / bf16 | {results['fp32_over_bf16']:.2f}x |", ""]))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/precision_speed"))
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    write(run(args.steps, args.rounds), args.out)


if __name__ == "__main__":
    main()
