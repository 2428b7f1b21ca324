"""Fisher layer weights for `fisher_ld`: where they start and how they move during training.
The Fisher itself is computed in `compressor.fisher`; this module holds the weights' life cycle.

Start (paper eqs. 3-6): w_l ∝ tr(F_l) of the teacher layer each student layer is mapped to,
F_l = E[(∂L_task/∂θ_l)²] (diagonal empirical Fisher, one squared gradient per batch), read from
the importance stage's `importance.json` or estimated here from a few training batches;
renormalised over the mapped layers so Σw = 1 (`uniform_ld` uses w = 1/K, the same total),
with the optional depth bias w·(1 + β·l/L)^δ.

Update (eq. 9): every `ema_every` steps, w ← (1−η)·w + η·w_current, where w_current is the
normalised Fisher trace of each *student* layer from that step's gradient of the task loss
alone. The teacher is frozen, so its Fisher cannot change; the student's is what drifts. The
task-loss gradient (not the total loss) is used on purpose: the total includes the layer term
itself, which would feed each weight back into its own estimate.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from compressor.errors import CompressorError
from compressor.fisher import depth_bias_factors, normalise
from compressor.importance import layer_scores


def read_fisher_scores(source: str | Path | dict, n_layers: int) -> np.ndarray:
    """Per-teacher-layer Fisher scores from an `importance.json` (path, or its parsed content),
    read and checked by the importance stage's own reader."""
    scores = np.asarray(layer_scores(source, "fisher", n_layers), dtype=np.float64)
    if np.any(scores < 0):
        raise CompressorError("importance: Fisher scores must be non-negative")
    return scores


def mapped_weights(scores: np.ndarray, layer_map: list[int], depth_bias: float = 0.0,
                   depth_power: float = 1.0) -> np.ndarray:
    """Weights of the mapped teacher layers (Σ = 1), with the optional depth bias of eq. 6."""
    return normalise(scores[layer_map] * depth_bias_factors(layer_map, len(scores), depth_bias, depth_power))


class LayerWeights:
    """w_l of each student layer, with the EMA update of eq. 9; `history` keeps every update."""

    def __init__(self, initial: np.ndarray, eta: float = 0.1):
        self.w = normalise(initial)
        self.eta = eta
        self.history: list[list[float]] = [self.w.tolist()]

    def update(self, current: np.ndarray) -> np.ndarray:
        self.w = (1 - self.eta) * self.w + self.eta * normalise(current)
        self.history.append(self.w.tolist())
        return self.w

    def tensor(self, device) -> torch.Tensor:
        return torch.as_tensor(self.w, dtype=torch.float32, device=device)

    def state_dict(self) -> dict:
        return {"w": self.w.tolist(), "eta": self.eta, "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.w = np.asarray(state["w"], dtype=np.float64)
        self.eta = state["eta"]
        self.history = [list(h) for h in state["history"]]
