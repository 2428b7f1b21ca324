"""The teacher: built from a config, trained a few steps, saved and reloaded by `from_pretrained`."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM

from compressor.data import VOCAB_FILE, Interactions, ItemVocab, left_pad, prepare
from compressor.evaluate import evaluate_model
from compressor.modeling import RecsysMeta, decoder_parts, item_scores, load_model, recsys_meta
from compressor.teacher import SUMMARY_FILE, TeacherConfig, build_teacher, train_teacher
from tests.conftest import tiny_teacher_config


def test_tiny_teacher_trains_saves_and_reloads(tiny_teacher_dir, tiny_data):
    summary = json.loads((tiny_teacher_dir / SUMMARY_FILE).read_text())
    losses = [h["loss"] for h in summary["history"]]
    assert losses[-1] < losses[0]
    assert (tiny_teacher_dir / VOCAB_FILE).exists()
    # A stock `from_pretrained` loads it; our loader agrees and carries the metadata.
    hf = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    model, vocab = load_model(tiny_teacher_dir)
    assert vocab.same_as(tiny_data.vocab)
    # save_model records the data's name too, so students cut from this teacher name it on their cards
    assert recsys_meta(model) == RecsysMeta(max_len=20, kind="teacher", dataset=tiny_data.name)
    ids, mask = left_pad(tiny_data.split("valid").histories[:4], 20)
    ids, mask = torch.from_numpy(ids), torch.from_numpy(mask)
    with torch.no_grad():
        assert torch.allclose(item_scores(hf, ids, mask), item_scores(model, ids, mask), atol=1e-6)
    # The saved model is the best validation state, not the last one.
    best = summary["best_valid"]["ndcg@10"]
    assert evaluate_model(model, tiny_data.split("valid"), 20).metrics["ndcg@10"] == pytest.approx(best, abs=1e-9)


def chain_data(n_items: int = 30, run: int = 8, users: int = 300):
    """Every user walks a fixed cycle of items (the next item is always the current one + 1, mod
    n_items) for `run` steps from their own start: a next-item task with one right answer, whose
    every transition appears in some user's training part."""
    rows = [(u, 100 + (u % n_items + t) % n_items, t) for u in range(users) for t in range(run)]
    items = pd.DataFrame({"item": range(100, 100 + n_items), "title": [f"item {i}" for i in range(n_items)],
                          "genres": ""})
    return prepare(Interactions(pd.DataFrame(rows, columns=["user", "item", "timestamp"]), items, "chain", "chain"))


@pytest.mark.parametrize("architecture", ["gpt2", "qwen2"])
def test_other_decoder_families_take_the_same_path_and_learn_a_deterministic_chain(architecture, tmp_path):
    """Trained on the chain, every test item ranks first (NDCG@10 = 1); untrained, far from it."""
    data = chain_data()
    cfg = tiny_teacher_config(architecture, num_layers=2)
    cfg.train.epochs = 8
    untrained = evaluate_model(build_teacher(cfg, data.vocab).eval(), data.split("test"), cfg.max_len).metrics
    model, summary = train_teacher(data, cfg, tmp_path / architecture)
    assert summary["architecture"] == architecture
    reloaded, _ = load_model(tmp_path / architecture)
    assert reloaded.config.model_type == architecture
    assert len(decoder_parts(reloaded).layers) == 2
    metrics = evaluate_model(reloaded, data.split("test"), cfg.max_len).metrics
    assert metrics["ndcg@10"] == pytest.approx(1.0) and metrics["hr@5"] == 1.0
    assert untrained["ndcg@10"] < 0.5


def test_vocab_size_follows_the_catalogue(tiny_data):
    model = build_teacher(tiny_teacher_config(), tiny_data.vocab)
    assert model.config.vocab_size == tiny_data.vocab.size
    assert model.get_output_embeddings().weight.shape[0] == tiny_data.vocab.size


def test_model_dir_without_vocab_is_rejected(tiny_teacher_dir, tmp_path):
    from compressor.errors import ArtifactError

    model, _ = load_model(tiny_teacher_dir)
    model.save_pretrained(tmp_path / "novocab")
    with pytest.raises(ArtifactError, match=VOCAB_FILE):
        load_model(tmp_path / "novocab")
    ItemVocab.from_items([1, 2]).save(tmp_path / "novocab")
    with pytest.raises(ArtifactError, match="vocab_size"):
        load_model(tmp_path / "novocab")


def test_same_config_and_seed_give_the_same_teacher(tiny_data, tmp_path):
    """Training length comes from epochs and early stopping, never the clock, and everything random
    (initialisation, window cuts, length-grouped batch order, dropout) is seeded: two runs agree exactly."""
    cfg = tiny_teacher_config(num_layers=2)
    cfg.train.epochs, cfg.train.random_windows, cfg.train.group_by_length = 2, True, True
    runs = [train_teacher(tiny_data, cfg, tmp_path / f"t{i}")[1] for i in range(2)]
    assert runs[0]["stop_reason"] == "epochs" and runs[0]["epochs_run"] == 2
    assert [h["loss"] for h in runs[0]["history"]] == [h["loss"] for h in runs[1]["history"]]
    assert runs[0]["best_valid"] == runs[1]["best_valid"]
    a, _ = load_model(tmp_path / "t0")
    b, _ = load_model(tmp_path / "t1")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_weight_average_follows_its_formula():
    from compressor.training import WeightAverage

    net = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.zeros_(net.weight)
    average = WeightAverage(net, decay=0.5)
    expected = torch.zeros(1, 2)
    for n, value in enumerate([1.0, 3.0, 5.0], start=1):
        net.weight.data.fill_(value)
        average.update(net)
        decay = min(0.5, (1 + n) / (10 + n))  # the warm-up ramp: 2/11, 3/12, then 0.5 caps it
        expected = decay * expected + (1 - decay) * value
        assert torch.allclose(average.model.weight, expected)
    assert not average.model.weight.requires_grad


def test_weight_averaging_leaves_training_alone_and_judges_the_average(tiny_data, tmp_path):
    """With `ema_decay` the raw trajectory is the plain run's, step for step (its validation is
    logged as `valid_raw`); validation, early stopping and the saved model are the average's."""
    cfg = tiny_teacher_config(num_layers=2)
    cfg.train.epochs = 3
    _, plain = train_teacher(tiny_data, cfg, tmp_path / "plain")
    cfg.train.ema_decay = 0.9
    model, averaged = train_teacher(tiny_data, cfg, tmp_path / "ema")
    assert [h["loss"] for h in averaged["history"]] == [h["loss"] for h in plain["history"]]
    assert [h["valid_raw"] for h in averaged["history"]] == [h["valid"] for h in plain["history"]]
    assert [h["valid"] for h in averaged["history"]] != [h["valid"] for h in plain["history"]]
    best = max(averaged["history"], key=lambda h: h["valid"]["ndcg@10"])
    assert averaged["best_valid"]["epoch"] == best["epoch"] and averaged["ema_decay"] == 0.9
    # the saved model is the best epoch's average: its validation is the recorded one
    from compressor.teacher import _validate

    assert _validate(load_model(tmp_path / "ema")[0], tiny_data.split("valid"), cfg.max_len, None) == best["valid"]


def test_time_cap_is_off_by_default_and_loud_when_it_cuts(tiny_data, tmp_path):
    cfg = tiny_teacher_config(num_layers=2)
    assert TeacherConfig().train.max_minutes is None and cfg.train.max_minutes is None
    cfg.train.epochs, cfg.train.max_minutes = 3, 1e-6
    with pytest.warns(UserWarning, match="time cap .* after 1 of 3 epochs: results depend on machine speed"):
        _, summary = train_teacher(tiny_data, cfg, tmp_path / "t")
    assert summary["stop_reason"] == "time cap" and summary["epochs_run"] == 1 and summary["epochs_planned"] == 3


def _ratings_dir(path, n_users: int = 40):
    from tests.conftest import tiny_interactions

    inter = tiny_interactions(n_users)
    path.mkdir(parents=True, exist_ok=True)
    inter.events.rename(columns={"user": "userId", "item": "movieId"}).to_csv(path / "ratings.csv", index=False)
    return path


# a 2-layer teacher with dropout and windows re-cut every epoch: every RNG the loop uses is in play
RESUME_OVERRIDES = ["hidden_size=32", "num_layers=2", "num_heads=2", "intermediate_size=64", "max_len=20",
                    "train.epochs=4", "train.batch_size=64", "train.warmup_steps=5", "train.hidden_dropout=0.1",
                    "train.ema_decay=0.9"]  # the weight average is resumed too


def test_a_killed_train_teacher_resumes_and_ends_as_an_uninterrupted_run(tmp_path):
    """SIGKILL after the first epoch's checkpoint; the rerun resumes there and ends with the same
    weights and metrics as a run never interrupted (CPU: the same operations in the same order)."""
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    from compressor.teacher import CHECKPOINT_FILE

    data = _ratings_dir(tmp_path / "data")
    # every run in a fresh process with the same settings: in the full suite, the in-process
    # reference drifted from the killed run at the 1e-7 level (thread settings changed by earlier
    # tests sum floats in another order)
    def train(out_dir) -> None:
        subprocess.run([sys.executable, "-m", "compressor", "train-teacher", "-q", "--data", str(data), "--out",
                        str(out_dir), *RESUME_OVERRIDES], check=True, stdout=subprocess.DEVNULL)

    train(tmp_path / "ref")
    out = tmp_path / "killed"
    ckpt = tmp_path / "killed.checkpoint" / CHECKPOINT_FILE
    cmd = [sys.executable, "-m", "compressor", "train-teacher", "-q", "--data", str(data), "--out", str(out),
           *RESUME_OVERRIDES]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not ckpt.exists():
            assert proc.poll() is None, f"ended before a checkpoint appeared: {proc.stderr.read()[-2000:]}"
            assert time.time() < deadline
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    saved = torch.load(ckpt, weights_only=True)
    assert 1 <= saved["loop"]["epoch"] < 4 and not out.exists()  # killed mid-training
    train(out)
    ref, resumed = (json.loads((tmp_path / d / SUMMARY_FILE).read_text()) for d in ("ref", "killed"))
    assert resumed["resumed_from_epoch"] == saved["loop"]["epoch"] and ref["resumed_from_epoch"] is None
    assert resumed["best_valid"] == ref["best_valid"]
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in ref["history"]]
    a, b = load_file(tmp_path / "ref" / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not ckpt.parent.exists()  # the finished model replaces its checkpoint


def test_a_checkpoint_of_another_config_is_refused_and_a_crafted_one_runs_nothing(tmp_path, capsys):
    from compressor.cli import main
    from compressor.teacher import CHECKPOINT_FILE
    from tests.test_distill import _Payload

    data = _ratings_dir(tmp_path / "data")
    ck_dir = tmp_path / "t.checkpoint"
    ck_dir.mkdir()
    base = ["train-teacher", "-q", "--data", str(data), "--out", str(tmp_path / "t"), *RESUME_OVERRIDES]
    torch.save({"fingerprint": "0" * 16, "model": {}, "optimizer": {}, "loop": {}}, ck_dir / CHECKPOINT_FILE)
    assert main(base) == 2
    assert "another configuration or data" in capsys.readouterr().err
    marker = tmp_path / "pwned"
    torch.save({"fingerprint": _Payload(marker), "model": {}, "optimizer": {}, "loop": {}}, ck_dir / CHECKPOINT_FILE)
    assert main(base) == 2
    assert "refused" in capsys.readouterr().err and not marker.exists()
    assert not (tmp_path / "t").exists()


def test_auto_precision_takes_bf16_only_where_the_hardware_runs_it_natively():
    from compressor.training import choose_precision

    def pick(device, requested, **facts):
        return choose_precision(device, requested, **facts).precision

    # a CPU without native bf16 kernels (AVX2 only): auto is fp32, an explicit bf16 is obeyed but said to be emulated
    assert pick("cpu", "auto", cpu_native_bf16=False) == "fp32"
    emulated = choose_precision("cpu", "bf16", cpu_native_bf16=False)
    assert emulated.precision == "bf16" and "EMULATED" in emulated.reason
    # a CPU with AVX512-BF16 / AMX: auto is bf16
    assert pick("cpu", "auto", cpu_native_bf16=True) == "bf16"
    assert "native" in choose_precision("cpu", "auto", cpu_native_bf16=True).reason
    # CUDA follows the device's own support; fp32 is fp32 everywhere
    assert pick("cuda", "auto", cuda_bf16=True) == "bf16" and pick("cuda", "auto", cuda_bf16=False) == "fp32"
    assert pick("cuda", "bf16", cuda_bf16=False) == "fp32"
    assert {pick(d, "fp32", cuda_bf16=True, cpu_native_bf16=True) for d in ("cpu", "cuda")} == {"fp32"}
    assert pick("mps", "auto") == "fp32"


def test_precision_on_this_cpu_follows_pytorch_own_check_and_autocast_obeys_it():
    from compressor.training import autocast, cpu_has_native_bf16, effective_precision

    cpu = torch.device("cpu")
    auto = "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    assert cpu_has_native_bf16() == (auto == "bf16")
    assert [effective_precision(cpu, p) for p in ("auto", "bf16", "fp32")] == [auto, "bf16", "fp32"]
    for precision, dtype in (("auto", getattr(torch, {"bf16": "bfloat16", "fp32": "float32"}[auto])),
                             ("fp32", torch.float32), ("bf16", torch.bfloat16)):
        with autocast(cpu, precision):
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == dtype


def test_explicit_bf16_on_a_cpu_that_emulates_it_warns_once(monkeypatch):
    from compressor import training

    monkeypatch.setattr(training, "cpu_has_native_bf16", lambda: False)  # the AVX2-only machine's answer
    monkeypatch.setattr(training, "_warned_emulated_bf16", False)
    with pytest.warns(RuntimeWarning, match="emulates it"):
        assert training.resolve_precision("cpu", "bf16").precision == "bf16"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        training.resolve_precision("cpu", "bf16")  # once per process, not once per step
        assert training.resolve_precision("cpu", "auto").precision == "fp32"


def test_bf16_on_a_cpu_trains_records_bf16_and_saves_fp32_weights(tiny_data, tmp_path):
    cfg = tiny_teacher_config(num_layers=2)
    cfg.train.epochs, cfg.train.precision = 1, "bf16"
    _, summary = train_teacher(tiny_data, cfg, tmp_path / "t")
    assert summary["precision"] == "bf16" and summary["device"].startswith("cpu")
    assert "bf16 asked for on a CPU" in summary["precision_reason"]
    assert np.isfinite(summary["history"][0]["loss"]) and summary["best_valid"]["ndcg@10"] >= 0
    model, _ = load_model(tmp_path / "t")
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # what export reads: fp32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_training_on_cuda_records_bf16_and_saves_fp32_weights(tiny_data, tmp_path):
    cfg = tiny_teacher_config(num_layers=2)
    cfg.train.epochs, cfg.train.device = 1, "cuda"
    _, summary = train_teacher(tiny_data, cfg, tmp_path / "t")
    expected = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    assert summary["precision"] == expected
    model, _ = load_model(tmp_path / "t")
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # what export reads: fp32
