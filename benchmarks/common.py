"""Helpers shared by the benchmark runners: machine description, atomic writes, Markdown tables."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from compressor.atomic import atomic_path, atomic_write


def machine_info() -> dict:
    """What the numbers were measured on: every absolute time is only meaningful with this."""
    from compressor.speed import machine_info as runtime_info

    base = runtime_info()
    try:
        import psutil

        mem_gb = round(psutil.virtual_memory().total / 2**30, 1)
    except Exception:  # psutil is a dependency, but the description must never fail a run
        mem_gb = None
    return {
        "cpu": base["cpu"], "logical_cores": base["cores"], "memory_gb": mem_gb,
        "os": f"{platform.system()} {platform.release()}", "python": base["python"],
        "onnxruntime": base["onnxruntime"],
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _jsonable(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_json(path: str | Path, payload: dict) -> Path:
    return atomic_write(path, json.dumps(payload, indent=2, default=_jsonable) + "\n")


def save_figure(fig, path: str | Path) -> Path:
    """Save a matplotlib figure atomically as PNG and close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
    return Path(path)


def write_results(out: str | Path, name: str, doc: dict, markdown, plot) -> None:
    """A benchmark's three outputs under `out`: NAME.json (`doc`), NAME.md (`markdown(doc)`) and
    NAME.png (`plot(doc, path)`), each written atomically."""
    out = Path(out)
    write_json(out / f"{name}.json", doc)
    atomic_write(out / f"{name}.md", markdown(doc))
    plot(doc, out / f"{name}.png")


def md_table(headers: list[str], rows: list[list]) -> str:
    def cell(v) -> str:
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_md(info: dict) -> str:
    return (f"{info['cpu']}, {info['logical_cores']} logical cores, {info['memory_gb']} GB RAM, "
            f"{info['os']}, Python {info['python']} (1-min load average at start {info['load_average_1m']}; "
            f"{info['date']})")


def open_unit_ratios(v: list[float]) -> list[float]:
    """A pydantic validator body: a non-empty list of ratios, each strictly between 0 and 1."""
    if not v or any(not 0 < r < 1 for r in v):
        raise ValueError(f"ratios must be in (0, 1), got {v}")
    return v


def run_guarded(name: str, body) -> int:
    """Run a benchmark's `body()`; bad input (config validation, CompressorError) is one line on
    stderr and exit code 2, as the CLI does."""
    import sys

    from pydantic import ValidationError

    from compressor.errors import CompressorError

    try:
        body()
    except ValidationError as e:
        first = e.errors()[0]
        print(f"{name}: error: {'.'.join(map(str, first['loc']))}: {first['msg']}", file=sys.stderr)
        return 2
    except CompressorError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    return 0
