"""Teacher-training throughput, one process against two torchrun processes (DDP, gloo on CPU).

    python -m benchmarks.ddp_throughput --users 150 --repeats 3 --out benchmarks/results/ddp_throughput

Each run is the real command, `compressor train-teacher` for one epoch of the default (small)
teacher architecture (Llama, hidden 64, 16 layers, 1.67 M parameters with the full catalogue)
on the first `--users` users of ml-latest-small, started as

    1 process, 2 threads      python -m compressor train-teacher ...          (the machine's default)
    1 process, 1 thread       OMP_NUM_THREADS=1 python -m compressor ...     (per-core reference)
    2 processes, 1 thread     torchrun --standalone --nproc_per_node 2 -m compressor ...

and read back from its `training_summary.json`: the epoch's training seconds (validation and
start-up excluded) and its windows, so samples/s = windows / epoch seconds. Every process keeps
`train.batch_size` windows per step, so two ranks take twice the windows per optimizer step
(the usual DDP convention; the cosine schedule is laid out over the steps each rank runs). The
three set-ups run interleaved, `--repeats` rounds, so load from other jobs hits them alike; the
report gives each run, the medians and the ratios to the 2-thread single process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import (
    machine_info,
    machine_md,
    md_table,
    run_guarded,
    write_atomic,
    write_json,
)

SETUPS = {  # name: (processes, threads per process)
    "1 process x 2 threads": (1, 2),
    "1 process x 1 thread": (1, 1),
    "2 processes x 1 thread (DDP)": (2, 1),
}


def subset(users: int, out: Path) -> Path:
    """The first `users` users of ml-latest-small as a ratings.csv folder (what --data reads)."""
    from compressor.data import load_interactions

    full = load_interactions("ml-latest-small")
    keep = sorted(full.events["user"].unique())[:users]
    events = full.events[full.events["user"].isin(keep)]
    out.mkdir(parents=True, exist_ok=True)
    events.rename(columns={"user": "userId", "item": "movieId"}).to_csv(out / "ratings.csv", index=False)
    return out


def one_run(processes: int, threads: int, data: Path, work: Path, overrides: list[str], timeout: float) -> dict:
    out = work / f"teacher-{processes}x{threads}-{time.monotonic_ns()}"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
    head = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
            if processes > 1 else [sys.executable])
    cmd = [*head, "-m", "compressor", "train-teacher", "-q", "--data", str(data), "--out", str(out), *overrides]
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # SIGTERM, not SIGKILL: torchrun stops its workers on SIGTERM (they run in sessions of their
        # own, so killing torchrun alone would leave them training)
        proc.terminate()
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        return {"processes": processes, "threads": threads, "timed_out_after_seconds": timeout,
                "samples_per_second": None, "load_average_1m_before": round(load, 2)}
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    s = json.loads((out / "training_summary.json").read_text())
    seconds = s["history"][0]["epoch_seconds"]
    return {"processes": processes, "threads": threads, "world_size": s["world_size"], "windows": s["train_windows"],
            "epoch_seconds": seconds, "samples_per_second": s["train_windows"] / seconds,
            "command_seconds": wall, "load_average_1m_before": round(load, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=150, help="first N users of ml-latest-small (sets the steps)")
    ap.add_argument("--batch-size", type=int, default=32, help="windows per step per process (the recipe's)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=60, help="seconds one command may take (a run past "
                    "it is recorded as timed out: oversubscribed threads on a loaded machine can stall)")
    ap.add_argument("--out", default="benchmarks/results/ddp_throughput")
    args = ap.parse_args(argv)

    def body() -> None:
        from compressor.errors import CompressorError

        if args.users < 3 or args.repeats < 1 or args.batch_size < 1:
            raise CompressorError("--users >= 3, --repeats >= 1 and --batch-size >= 1, please")
        info = machine_info()
        overrides = ["train.epochs=1", "train.random_windows=false", f"train.batch_size={args.batch_size}",
                     "train.max_minutes=null"]
        runs: list[dict] = []
        with tempfile.TemporaryDirectory(prefix="ddp-throughput-") as tmp:
            data = subset(args.users, Path(tmp) / "data")
            for r in range(args.repeats):
                for name, (processes, threads) in SETUPS.items():
                    row = {"setup": name, "round": r + 1,
                           **one_run(processes, threads, data, Path(tmp), overrides, args.timeout)}
                    runs.append(row)
                    print(f"round {r + 1} {name}: " + (f"{row['samples_per_second']:.1f} samples/s ({row['windows']} "
                          f"windows in {row['epoch_seconds']:.2f} s)" if row["samples_per_second"] else
                          f"timed out after {args.timeout:g} s"), file=sys.stderr)

        def rate(name: str, r: int) -> float | None:
            return next(x["samples_per_second"] for x in runs if x["setup"] == name and x["round"] == r)

        def med(values: list) -> float | None:
            values = [v for v in values if v is not None]
            return statistics.median(values) if values else None

        rounds = range(1, args.repeats + 1)
        median = {name: med([rate(name, r) for r in rounds]) for name in SETUPS}
        # ratios within a round (the set-ups ran back to back), against both single-process set-ups
        ratios = {f"{name} / {ref}": [rate(name, r) / rate(ref, r) if rate(name, r) and rate(ref, r) else None
                                      for r in rounds]
                  for ref in list(SETUPS)[:2] for name in SETUPS if name != ref}
        doc = {"machine": info, "users": args.users, "batch_size_per_process": args.batch_size,
               "teacher": "default TeacherConfig (llama, hidden 64, 16 layers, max_len 50)", "runs": runs,
               "median_samples_per_second": median, "ratios_per_round": ratios, "method": __doc__}
        rows = [[x["round"], x["setup"], x.get("windows"), x.get("epoch_seconds"),
                 x["samples_per_second"] if x["samples_per_second"] else f"timed out (> {args.timeout:g} s)",
                 x["load_average_1m_before"]] for x in runs]
        md = ["# Teacher-training throughput: 1 process vs 2 torchrun processes (DDP, gloo, CPU)", "",
              f"Machine: {machine_md(info)}.", "",
              f"One epoch of `compressor train-teacher` (default teacher architecture) on the first {args.users} "
              f"users of ml-latest-small, {args.batch_size} windows per step per process, fp32; samples/s = "
              "training windows / the epoch's training seconds (start-up and validation excluded). "
              f"{args.repeats} interleaved rounds.", "",
              md_table(["round", "setup", "windows", "epoch s", "samples/s", "load avg before"], rows), "",
              md_table(["setup", "median samples/s"], [[n, median[n]] for n in SETUPS]), "",
              md_table(["ratio (same round)", *[f"round {r}" for r in rounds], "median"],
                       [[k, *v, med(v)] for k, v in ratios.items()]), ""]
        out = Path(args.out)
        write_json(out / "ddp_throughput.json", doc)
        write_atomic(out / "ddp_throughput.md", "\n".join(md))
        print("\n".join(md))

    return run_guarded("ddp_throughput", body)


if __name__ == "__main__":
    sys.exit(main())
