"""Latency and throughput of exported models in ONNX Runtime, compared within one run.

Models are timed interleaved (A, B, A, B, ...) over several rounds, so machine noise hits
them alike; ratios between them are what a report should quote, with absolute times beside
them and the machine they came from.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import numpy as np

from compressor.data.protocol import left_pad


def ort_session(path: str | Path, threads: int | None = None):
    """An ONNX Runtime session on CUDA when available, else CPU; `threads` = intra-op threads."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    available = ort.get_available_providers()
    providers: list = ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        # under torchrun each process takes its own GPU (LOCAL_RANK); alone, GPU 0
        gpu = {"device_id": int(os.environ.get("LOCAL_RANK", "0"))}
        providers.insert(0, ("CUDAExecutionProvider", gpu))
    return ort.InferenceSession(str(path), opts, providers=[p for p in providers
                                                          if (p[0] if isinstance(p, tuple) else p) in available])


def machine_info() -> dict:
    import onnxruntime as ort

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "onnxruntime": ort.__version__, "providers": ort.get_available_providers()}


def compare_latency(
    models: dict[str, str | Path],
    histories: list[np.ndarray],
    max_len: int,
    batch_sizes: tuple[int, ...] = (1, 64),
    rounds: int = 5,
    calls_per_round: int = 20,
    threads: int | None = None,
) -> dict:
    """Median milliseconds per call and items/second for each model at each batch size.

    Returns {name: {"batch_<b>": {"ms_median", "ms_p90", "per_second"}}}; the inputs are real
    histories (left-padded to `max_len`), the same for every model."""
    sessions = {name: ort_session(p, threads) for name, p in models.items()}
    rng = np.random.default_rng(0)
    out: dict[str, dict] = {name: {} for name in models}
    for b in batch_sizes:
        pick = rng.choice(len(histories), size=b, replace=len(histories) < b)
        ids, mask = left_pad([histories[i] for i in pick], max_len)
        feed = {"input_ids": ids, "attention_mask": mask}
        for s in sessions.values():  # warm-up
            s.run(None, feed)
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for _ in range(rounds):
            for name, s in sessions.items():
                for _ in range(calls_per_round):
                    t0 = time.perf_counter()
                    s.run(None, feed)
                    times[name].append(time.perf_counter() - t0)
        for name, ts in times.items():
            ms = np.asarray(ts) * 1000
            med = float(np.median(ms))
            out[name][f"batch_{b}"] = {"ms_median": med, "ms_p90": float(np.quantile(ms, 0.9)),
                                       "per_second": b * 1000.0 / med, "calls": len(ms)}
    return out
