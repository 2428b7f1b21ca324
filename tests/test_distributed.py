"""torchrun data parallelism: the helpers alone and on 2 real gloo processes, Fisher sums split
over ranks equal one process's, FSDP state round trips, an FSDP teacher trains end to end, the
sampled teacher loss and candidate distillation train under DDP (negatives drawn per rank).

The multi-process tests launch `torch.distributed.run` (torchrun) with OMP_NUM_THREADS=1, as CI
does; nothing in torch.distributed is mocked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from compressor import distributed as dist
from compressor.errors import CompressorError

ROOT = Path(__file__).resolve().parent.parent


def torchrun(*args: str, nproc: int = 2, timeout: float = 600) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node N ARGS` from the repository root, one thread per rank."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_alone_every_helper_is_the_single_process_answer(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not dist.launched() and not dist.active()
    assert (dist.rank(), dist.world_size(), dist.is_main()) == (0, 1, True)
    order = np.array([3, 1, 2])
    assert dist.shard(order) is order and dist.split(7) == slice(0, 7)
    assert dist.broadcast_object({"a": 1}) == {"a": 1} and dist.all_gather_object(5) == [5]
    assert dist.on_main(lambda x: x + 1, 1) == 2
    with dist.session("export", supported=False):  # no torchrun: nothing to join, nothing refused
        assert not dist.active()


def test_a_command_that_does_not_shard_is_refused_under_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(CompressorError, match="does not run under torchrun"), dist.session("export", False):
        pass
    monkeypatch.setenv(dist.TIMEOUT_ENV, "soon")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(CompressorError, match="positive number of minutes"), dist.session("run", True):
        pass


@pytest.fixture(scope="module")
def two_ranks(tiny_teacher_dir, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("dist") / "result.json"
    proc = torchrun("-m", "tests.distributed_worker", str(out), str(tiny_teacher_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_two_ranks_split_gather_and_fail_together(two_ranks):
    h = two_ranks["helpers"]
    assert two_ranks["world_size"] == 2
    # DistributedSampler's split: padded with its own first entries, then strided
    assert h["shards"] == [[0, 20, 40, 60, 80, 100], [10, 30, 50, 70, 90, 0]]
    assert h["splits"] == [[0, 5], [5, 11]] and h["sum"] == [3.0]
    assert h["errors"][0] == "ValueError: boom on rank 0"
    assert h["errors"][1].startswith("CompressorError: rank 0 failed") and "boom on rank 0" in h["errors"][1]
    assert h["alone"] == [1, [5.0]]


def test_fisher_on_two_ranks_equals_one_process_on_the_same_samples(two_ranks, tiny_teacher_dir):
    from tests.distributed_worker import fisher_values

    one, two = fisher_values(str(tiny_teacher_dir)), two_ranks["fisher"]
    assert two["samples"] == one["samples"] == 37
    assert np.allclose(two["traces"], one["traces"], rtol=1e-5, atol=0)
    for g in one["groups"]:
        assert np.allclose(two["groups"][g], one["groups"][g], rtol=1e-5, atol=0)
    for a, b in zip(two["weights"], one["weights"], strict=True):
        assert np.allclose(a, b, rtol=1e-4, atol=1e-12)
    assert np.allclose(two["layer"], one["layer"], rtol=1e-5, atol=0)
    assert min(one["traces"]) > 0  # real gradients, not an empty sum compared with itself


def test_fsdp_state_round_trips_through_the_plain_checkpoint_formats(two_ranks):
    f = two_ranks["fsdp"]
    assert f == {"sharded": True, "states_equal": True, "plain_optimizer_loads": True}


def test_an_fsdp_teacher_trains_on_two_ranks_and_saves_its_best_state(tmp_path):
    from compressor.evaluate import evaluate_model
    from compressor.modeling import load_model
    from compressor.teacher import SUMMARY_FILE
    from tests.test_teacher import RESUME_OVERRIDES, _ratings_dir

    data = _ratings_dir(tmp_path / "data")
    out = tmp_path / "teacher"
    proc = torchrun("-m", "compressor", "train-teacher", "--data", str(data), "--out", str(out),
                    *RESUME_OVERRIDES, "train.epochs=2", "train.parallel=fsdp",
                    "train.ema_decay=null")  # weight averaging needs the whole model: refused under FSDP
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["world_size"] == 2 and summary["parallel"] == "fsdp" and summary["epochs_run"] == 2
    assert not (tmp_path / "teacher.checkpoint").exists()
    model, vocab = load_model(out)
    from compressor.data import prepare

    valid = prepare(str(data), vocab=vocab).split("valid")
    # the saved weights are the gathered best validation state
    assert evaluate_model(model, valid, 20).metrics["ndcg@10"] == pytest.approx(summary["best_valid"]["ndcg@10"], abs=1e-9)
    # weight averaging keeps a whole copy of the model: under FSDP it is one line, exit 2, no model
    refused = torchrun("-m", "compressor", "train-teacher", "--data", str(data), "--out", str(tmp_path / "ema"),
                       *RESUME_OVERRIDES, "train.epochs=1", "train.parallel=fsdp")
    assert refused.returncode != 0 and "train.ema_decay needs the whole model on every rank" in refused.stderr
    assert not (tmp_path / "ema").exists()


def test_the_sampled_loss_under_ddp_draws_per_rank_and_keeps_the_ranks_equal(two_ranks):
    """Each rank draws its own negatives (seed + rank): no communication, world_size x negatives
    seen by the averaged gradient; DDP still leaves every rank with the same weights."""
    s = two_ranks["sampled"]
    assert len(s["negatives"][0]) == len(s["negatives"][1]) == 3
    assert all(a != b for a, b in zip(*s["negatives"], strict=True))
    assert s["weights"][0] == s["weights"][1]
    assert all(np.isfinite(x) for r in s["losses"] for x in r)


def test_a_sampled_teacher_and_candidate_distillation_train_on_two_ranks(tmp_path):
    """teacher.train.loss=sampled and distill.output=candidates under torchrun (2 gloo processes),
    as the full loss: every step's loss finite, the teacher's falling over its epochs, rank 0's saved
    weights the best validation state, both runs recorded as world size 2."""
    from compressor.data import prepare
    from compressor.evaluate import evaluate_model
    from compressor.modeling import load_model, save_model
    from compressor.teacher import SUMMARY_FILE
    from compressor.truncate import truncate
    from tests.test_teacher import RESUME_OVERRIDES, _ratings_dir

    data = _ratings_dir(tmp_path / "data")
    out = tmp_path / "teacher"
    proc = torchrun("-m", "compressor", "train-teacher", "--data", str(data), "--out", str(out),
                    *RESUME_OVERRIDES, "train.epochs=3", "train.loss=sampled", "train.sampled_negatives=64")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["world_size"] == 2 and summary["parallel"] == "ddp" and summary["epochs_run"] == 3
    losses = [h["loss"] for h in summary["history"] if "loss" in h]
    assert len(losses) == 3 and all(np.isfinite(losses)) and losses[-1] < losses[0]
    model, vocab = load_model(out)
    valid = prepare(str(data), vocab=vocab).split("valid")
    assert evaluate_model(model, valid, 20).metrics["ndcg@10"] == pytest.approx(summary["best_valid"]["ndcg@10"], abs=1e-9)

    save_model(truncate(model, [1]), vocab, tmp_path / "student")
    proc = torchrun("-m", "tests.distributed_worker", "distill", str(tmp_path / "d.json"), str(out),
                    str(tmp_path / "student"), str(data), str(tmp_path / "distill"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    d = json.loads((tmp_path / "d.json").read_text())
    assert d["world_size"] == 2 and d["steps"] > 0 and d["students"][0] == d["students"][1]
    result = json.loads((tmp_path / "distill" / "result.json").read_text())
    assert result["world_size"] == 2 and result["config"]["output"] == "candidates"
    rows = [json.loads(x) for x in (tmp_path / "distill" / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "kd" in r]
    assert len(steps) == d["steps"] and all(np.isfinite(r[k]) for r in steps for k in ("loss", "task", "kd"))


def test_the_cli_refuses_commands_that_do_not_shard_under_torchrun(monkeypatch, tmp_path, capsys):
    from compressor.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["quantize", str(tmp_path / "m.onnx"), "--out", str(tmp_path / "q.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "`compressor quantize` does not run under torchrun" in err
    assert not list(tmp_path.iterdir())


def test_fsdp_is_for_teacher_training_only():
    from compressor.distill import DistillConfig

    with pytest.raises(ValueError, match="parallel=fsdp is for teacher training"):
        DistillConfig(train={"parallel": "fsdp"})
