"""Fisher layer weights for `fisher_ld`: where they start and how they move during training.

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

import json
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedModel

from compressor.errors import CompressorError
from compressor.modeling import decoder_parts


def layer_params(model: PreTrainedModel) -> list[list[torch.nn.Parameter]]:
    """The parameters of each decoder layer, in order."""
    return [list(layer.parameters()) for layer in decoder_parts(model).layers]


def grad_traces(loss: torch.Tensor, groups: list[list[torch.nn.Parameter]], retain_graph: bool = False) -> np.ndarray:
    """Σ (∂loss/∂θ)² over each group of parameters: the diagonal Fisher trace per layer."""
    flat = [p for g in groups for p in g]
    grads = torch.autograd.grad(loss, flat, retain_graph=retain_graph, allow_unused=True)
    out, i = [], 0
    for g in groups:
        out.append(sum(float(gr.pow(2).sum()) for gr in grads[i : i + len(g)] if gr is not None))
        i += len(g)
    return np.asarray(out, dtype=np.float64)


def estimate_layer_fisher(model: PreTrainedModel, batches, loss_fn) -> np.ndarray:
    """Mean per-layer Fisher trace of `loss_fn(model, *batch)` over `batches` (model left in eval mode,
    its requires_grad flags restored)."""
    groups = layer_params(model)
    flags = [p.requires_grad for g in groups for p in g]
    for g in groups:
        for p in g:
            p.requires_grad_(True)
    was_training = model.training
    model.eval()  # no dropout: the frozen teacher is used in eval mode too
    total, n = np.zeros(len(groups)), 0
    try:
        for batch in batches:
            total += grad_traces(loss_fn(model, *batch), groups)
            n += 1
    finally:
        for p, f in zip([p for g in groups for p in g], flags, strict=True):
            p.requires_grad_(f)
        model.train(was_training)
    if n == 0:
        raise CompressorError("no batches to estimate the Fisher information from")
    return total / n


def read_fisher_scores(source: str | Path | dict | list, n_layers: int) -> np.ndarray:
    """Per-teacher-layer Fisher scores from an importance file or its parsed content.

    Tolerant of the shapes the importance stage may write: {"methods": {"fisher": {"scores"|
    "weights": [...]}}}, {"fisher": {...}}, {"fisher": [...]}, {"scores": [...]} or a bare list."""
    raw = source
    if isinstance(source, str | Path):
        p = Path(source)
        if not p.exists():
            raise CompressorError(f"{p}: no such importance file")
        try:
            raw = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise CompressorError(f"{p}: not valid JSON ({e})") from e
    node = raw
    for key in ("methods", "fisher"):
        if isinstance(node, dict) and key in node:
            node = node[key]
    if isinstance(node, dict):
        node = next((node[k] for k in ("scores", "weights", "trace", "values") if k in node), None)
    try:
        scores = np.asarray(node, dtype=np.float64)
    except (TypeError, ValueError):
        scores = None
    if scores is None or scores.ndim != 1:
        raise CompressorError("importance: no Fisher scores found (expected methods.fisher.scores)")
    if len(scores) != n_layers:
        raise CompressorError(f"importance: {len(scores)} Fisher scores for a teacher of {n_layers} layers")
    if not np.all(np.isfinite(scores)) or np.any(scores < 0):
        raise CompressorError("importance: Fisher scores must be finite and non-negative")
    return scores


def normalise(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    s = values.sum()
    return values / s if s > 0 else np.full(len(values), 1.0 / len(values))


def mapped_weights(scores: np.ndarray, layer_map: list[int], depth_bias: float = 0.0,
                   depth_power: float = 1.0) -> np.ndarray:
    """Weights of the mapped teacher layers (Σ = 1), with the optional depth bias of eq. 6."""
    n = len(scores)
    w = scores[layer_map] * (1.0 + depth_bias * (np.asarray(layer_map) + 1) / n) ** depth_power
    return normalise(w)


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
