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
