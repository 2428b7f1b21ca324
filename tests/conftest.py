"""Shared fixtures: a small slice of the bundled data and tiny teachers built from configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from compressor.data import Interactions, load_interactions, prepare
from compressor.teacher import TeacherConfig, TrainConfig, train_teacher

TINY_USERS = 60


def tiny_interactions(n_users: int = TINY_USERS) -> Interactions:
    """The first `n_users` users of ml-latest-small (real data, a few thousand events)."""
    full = load_interactions("ml-latest-small")
    users = sorted(full.events["user"].unique())[:n_users]
    events = full.events[full.events["user"].isin(users)].reset_index(drop=True)
    items = full.items[full.items["item"].isin(events["item"])].reset_index(drop=True)
    return Interactions(events, items, "ml-latest-small-tiny", full.source)


def tiny_teacher_config(architecture: str = "llama", num_layers: int = 4, **train) -> TeacherConfig:
    return TeacherConfig(
        architecture=architecture, hidden_size=32, num_layers=num_layers, num_heads=4,
        num_kv_heads=2 if architecture != "gpt2" else None, intermediate_size=64, max_len=20,
        dropout=0.0, train=TrainConfig(epochs=2, batch_size=64, lr=3e-3, warmup_steps=5, **train),
    )


@pytest.fixture(scope="session")
def tiny_data():
    return prepare(tiny_interactions())


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory, tiny_data):
    """A 4-layer Llama (hidden 32, GQA 4/2 heads) trained for two epochs on the tiny slice."""
    out = tmp_path_factory.mktemp("teacher") / "teacher"
    train_teacher(tiny_data, tiny_teacher_config(), out)
    return out


# --- exported artifact (shared by test_export, test_serving, test_retrieval, test_runtime) ----------


@pytest.fixture(scope="session")
def tiny_artifact_dir(tmp_path_factory, tiny_teacher_dir, tiny_data):
    """`tiny_teacher_dir` exported to an artifact directory (ONNX parity checked)."""
    from compressor.export import ExportConfig, export_artifact

    out = tmp_path_factory.mktemp("artifact") / "teacher"
    export_artifact(tiny_teacher_dir, out, tiny_data, ExportConfig())
    return out


# --- the whole job on the smoke config (shared by test_pipeline and test_report) --------------

SMOKE = Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml"
# A smaller slice than the smoke config's full data keeps the suite quick; the code path is the same.
SMOKE_FAST = ["data.max_users=150", "evaluate.bootstrap_resamples=200"]


def smoke_config(*overrides: str):
    from compressor.config import load_config
    from compressor.pipeline import RunConfig

    return load_config(RunConfig, SMOKE, [*SMOKE_FAST, *overrides])


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """(run directory, stage records) of one finished smoke run; copy it before changing it."""
    from compressor.pipeline import run

    run_dir = tmp_path_factory.mktemp("run") / "smoke"
    records = run(smoke_config(), run_dir, log=lambda m: None)
    return run_dir, records
