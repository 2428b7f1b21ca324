"""Unstructured pruning: zero the lowest-scoring single weights of the decoder layers, for good.

The weights are overwritten with zeros (no mask buffers, no parametrizations), so the saved
checkpoint is an ordinary dense one. Dense runtimes (PyTorch, ONNX Runtime's CPU kernels) do
the same multiply-adds on zeros: this shrinks a compressed file and can feed a sparse kernel,
but it does not make a dense model faster.

Prunable weights are the matrices of the decoder layers (attention and MLP projections); the
embeddings / output head, norms and biases are never touched.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from compressor.modeling import decoder_parts

SCOPES = ("global", "per_layer")


def prunable_weights(model: PreTrainedModel) -> list[tuple[int, str, torch.nn.Parameter]]:
    """(layer index, name inside the layer, weight) of every matrix in the decoder layers."""
    return [(i, name, p) for i, layer in enumerate(decoder_parts(model).layers)
            for name, p in layer.named_parameters() if p.dim() >= 2]


def _zero_lowest(params: list[torch.nn.Parameter], scores: list[torch.Tensor], sparsity: float) -> None:
    """Zero exactly round(sparsity * n) weights with the lowest scores (ties broken by position)."""
    flat = torch.cat([s.reshape(-1).cpu() for s in scores])
    k = round(sparsity * flat.numel())
    if k == 0:
        return
    drop = torch.zeros(flat.numel(), dtype=torch.bool)
    drop[torch.argsort(flat, stable=True)[:k]] = True
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            p[drop[offset : offset + n].view_as(p).to(p.device)] = 0
            offset += n


def sparsify(model: PreTrainedModel, sparsity: float, scores: list[torch.Tensor], scope: str) -> None:
    """Zero the lowest-scoring fraction `sparsity` of the prunable weights, over all layers at
    once (`global`) or within each decoder layer (`per_layer`). `scores` align with
    `prunable_weights(model)`."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; choose one of {', '.join(SCOPES)}")
    weights = prunable_weights(model)
    if len(scores) != len(weights):
        raise ValueError(f"{len(scores)} score tensors for {len(weights)} prunable weights")
    if scope == "global":
        _zero_lowest([p for _, _, p in weights], scores, sparsity)
        return
    for layer in sorted({i for i, _, _ in weights}):
        idx = [j for j, (i, _, _) in enumerate(weights) if i == layer]
        _zero_lowest([weights[j][2] for j in idx], [scores[j] for j in idx], sparsity)


def measure_sparsity(model: PreTrainedModel) -> dict:
    """Fraction of exact zeros: per decoder layer and in total over the prunable weights, and
    over every parameter of the model (embeddings included, tied ones counted once)."""
    per_layer: dict[int, list[int]] = {}
    for i, _, p in prunable_weights(model):
        zeros, n = per_layer.setdefault(i, [0, 0])
        per_layer[i] = [zeros + int((p == 0).sum()), n + p.numel()]
    z = sum(v[0] for v in per_layer.values())
    n = sum(v[1] for v in per_layer.values())
    params = {id(p): p for p in model.parameters()}.values()
    all_zeros = sum(int((p == 0).sum()) for p in params)
    all_n = sum(p.numel() for p in params)
    return {
        "per_layer": [v[0] / max(1, v[1]) for _, v in sorted(per_layer.items())],
        "total": z / max(1, n),
        "prunable_weights": n,
        "model_total": all_zeros / max(1, all_n),
    }
