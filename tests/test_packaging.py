"""Packaging: what the wheel carries, which extras pull which runtime, what `compressor` imports."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _names(reqs: list[str]) -> set[str]:
    import re

    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in reqs}


def test_cpu_and_gpu_runtimes_are_separate_extras_and_dev_takes_the_cpu_one():
    project = PYPROJECT["project"]
    extras = project["optional-dependencies"]
    core = _names(project["dependencies"])
    runtimes = {"onnxruntime", "onnxruntime-gpu", "faiss-cpu", "faiss-gpu-cu12", "bentoml", "locust"}
    assert not core & runtimes, core & runtimes
    assert "torch==2.13.0" in project["dependencies"]
    assert _names(extras["cpu"]) == {"onnxruntime", "faiss-cpu"}
    assert _names(extras["gpu"]) == {"onnxruntime-gpu", "faiss-gpu-cu12"}
    assert "bentoml" in _names(extras["serve"]) and "locust" in _names(extras["bench"])
    assert _names(extras["llm"]) == {"gguf", "accelerate"}
    dev = next(r for r in extras["dev"] if r.startswith("recsys-compressor["))
    included = set(dev[dev.index("[") + 1 : dev.index("]")].split(","))
    assert {"cpu", "serve", "bench", "llm", "parquet"} <= included and "gpu" not in included
    assert project["requires-python"] == ">=3.11"


def test_compressor_imports_without_the_serving_and_load_test_stacks():
    """Every compressor module imports with bentoml, locust, faiss and onnxruntime unavailable."""
    code = """
import importlib, pkgutil, sys
for name in ("bentoml", "locust", "faiss", "onnxruntime"):
    sys.modules[name] = None  # as if not installed: `import name` raises ImportError
import compressor
mods = [m.name for m in pkgutil.walk_packages(compressor.__path__, "compressor.") if m.name != "compressor.__main__"]
for m in mods:
    importlib.import_module(m)
print(len(mods))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.split()[-1]) > 30


def _source_copy(dst: Path) -> Path:
    """The repository without build outputs, so the build leaves nothing in the working tree."""
    ignore = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache",
                                    "runs", "artifacts", "results")
    shutil.copytree(ROOT, dst, symlinks=True, ignore=ignore)
    return dst


@pytest.mark.packaging
def test_wheel_carries_dataset_configs_and_payloads_and_bundled_configs_resolve(tmp_path):
    src = _source_copy(tmp_path / "src")
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "whl"), str(src)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert time.time() - start < 60
    (wheel,) = (tmp_path / "whl").glob("recsys_compressor-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        "compressor/__main__.py", "compressor/model_card.py",
        "compressor/datasets/ml-latest-small/ratings.csv", "compressor/datasets/ml-latest-small/movies.csv",
        "compressor/datasets/ml-latest-small/README.txt",
        "compressor/configs/default.yaml", "compressor/configs/smoke.yaml", "compressor/configs/pretrained_llm.yaml",
        "benchmarks/payloads/ml-latest-small.json", "serving/service.py",
    }
    assert expected <= names, expected - names
    assert not any(n.startswith("tests/") for n in names)
    # Unpacked (a non-editable install, no repository around it): bundled configs and data resolve.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("from compressor.config import load_config, resolve_config_path; from compressor.pipeline import RunConfig;"
            "from compressor.data import load_interactions;"
            "p = resolve_config_path('default'); cfg = load_config(RunConfig, 'smoke');"
            "print(p); print(len(load_interactions('ml-latest-small').events))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr[-3000:]
    path, events = run.stdout.split()
    assert Path(path).is_relative_to(site) and int(events) == 100836
