"""benchmarks.lowrank's own pieces (the stage itself is tested in test_lowrank.py)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.lowrank import valid_loss
from compressor.data import left_pad
from compressor.modeling import item_scores, load_model


def test_valid_loss_is_the_per_user_next_item_cross_entropy(tiny_teacher_dir, tiny_data):
    model, _ = load_model(tiny_teacher_dir)
    losses = valid_loss(model, tiny_data, max_len=20)
    valid = tiny_data.split("valid")
    assert losses.shape == (len(valid),)
    ids, mask = left_pad(valid.histories, 20)
    with torch.no_grad():
        logits = item_scores(model.eval(), torch.from_numpy(ids), torch.from_numpy(mask))
    expected = F.cross_entropy(logits, torch.as_tensor(np.asarray(valid.targets)), reduction="none").numpy()
    np.testing.assert_allclose(losses, expected, rtol=1e-4, atol=1e-5)


def test_recovery_config_gives_the_recovery_its_distill_fields(tmp_path):
    """An LLM student recovers with the LLM distill settings (relative layer loss, its batch and
    rate); the benchmark's own epochs, cap and seed win, and recent windows only when given."""
    from benchmarks.pruning import PruningBenchConfig, recovery_distill_config

    yaml_path = tmp_path / "distill.yaml"
    yaml_path.write_text("layer_loss: relative\ntrain:\n  batch_size: 16\n  lr: 3.0e-4\n  recent_windows: 3\n")
    cfg = PruningBenchConfig(recovery_epochs=1, recovery_minutes=9.0, recovery_config=str(yaml_path), seed=4)
    d = recovery_distill_config(cfg)
    assert d.layer_loss == "relative" and d.train.batch_size == 16 and d.train.lr == 3.0e-4
    assert (d.train.epochs, d.train.max_minutes, d.train.seed, d.train.recent_windows) == (1, 9.0, 4, 3)
    d = recovery_distill_config(cfg.model_copy(update={"recovery_recent_windows": 1}))
    assert d.train.recent_windows == 1
    plain = recovery_distill_config(PruningBenchConfig(recovery_epochs=1))
    assert plain.layer_loss != "relative" and plain.train.recent_windows is None


def test_bad_recovery_config_is_one_line_exit_2(tmp_path, capsys):
    from benchmarks.lowrank import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("layer_loss: cosine\n")
    assert main(["--model", str(tmp_path), "--out", str(tmp_path / "o"), "--recovery-config", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "layer_loss" in err[0]
