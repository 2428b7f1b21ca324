"""Which MatMuls of an exported graph quantization hurts most: Fisher-weighted weight error.

An ONNX MatMul's constant weight is a torch Linear's weight transposed (the exporter folds the
transpose, so the initializer's name says nothing): `matmul_parameters` finds each one's torch
parameter by value. The sensitivity of a parameter W to a quantizer Q is the second-order
estimate of the loss increase under the diagonal empirical Fisher F of the last-item loss on
validation histories (`compressor.fisher.parameter_fisher`):

    s(W) = Σ_ij F_ij · (W_ij − Q(W)_ij)²

with Q simulated in numpy as the method stores the weight (int8 symmetric per tensor or per
output channel; int4 asymmetric in blocks along the input dimension; fp16 rounding). It ranks
weight error only: the error of dynamically quantized activations is not in it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from transformers import PreTrainedModel

from compressor.data.protocol import Split
from compressor.errors import CompressorError
from compressor.fisher import ProbeSet, parameter_fisher
from compressor.quantize import weight_matmuls


def _key(a: np.ndarray) -> tuple:
    a = np.ascontiguousarray(a, dtype=np.float32)
    return a.shape, hashlib.sha1(a.tobytes()).hexdigest()


def matmul_parameters(onnx_path: str | Path, model: PreTrainedModel) -> dict[str, str]:
    """{MatMul node name: torch parameter name} for every weight MatMul of the graph (found by
    value: the initializer equals the parameter transposed); unmatched nodes are left out."""
    graph = onnx.load(str(onnx_path))
    consts = {i.name: i for i in graph.graph.initializer}
    for n in graph.graph.node:
        if n.op_type == "Constant":
            value = next((a.t for a in n.attribute if a.name == "value"), None)
            if value is not None:
                consts[n.output[0]] = value
    by_value = {}
    for name, p in model.named_parameters():
        if p.ndim == 2:
            w = p.detach().float().cpu().numpy()
            by_value.setdefault(_key(w.T), name)  # MatMul(x, W^T) == Linear(x)
    nodes = {n.name: n for n in graph.graph.node}
    out = {}
    for node in weight_matmuls(graph):
        b = numpy_helper.to_array(consts[nodes[node].input[1]])
        if (name := by_value.get(_key(b))) is not None:
            out[node] = name
    return out


# --- what each method stores instead of W (torch layout: out x in) ------------------------------


def _int8(w: np.ndarray, per_channel: bool) -> np.ndarray:
    amax = np.abs(w).max(axis=1, keepdims=True) if per_channel else np.abs(w).max()
    scale = np.maximum(amax, 1e-12) / 127.0
    return np.clip(np.round(w / scale), -127, 127) * scale


def _int4(w: np.ndarray, block_size: int) -> np.ndarray:
    out, k = w.shape
    pad = (-k) % block_size
    blocks = np.pad(w, ((0, 0), (0, pad))).reshape(out, -1, block_size)
    lo, hi = np.minimum(blocks.min(-1, keepdims=True), 0), np.maximum(blocks.max(-1, keepdims=True), 0)
    scale = np.maximum(hi - lo, 1e-12) / 15.0
    zero = np.round(-lo / scale)
    deq = (np.clip(np.round(blocks / scale) + zero, 0, 15) - zero) * scale
    return deq.reshape(out, -1)[:, :k]


# quantizer name -> fn(weight, per_channel, block_size) -> the weight as the quantized graph holds it
SIMULATED: dict[str, Callable[[np.ndarray, bool, int], np.ndarray]] = {
    "int8": lambda w, pc, bs: _int8(w, pc),
    "int8_static": lambda w, pc, bs: _int8(w, pc),
    "int4": lambda w, pc, bs: _int4(w, bs),
    "fp16": lambda w, pc, bs: w.astype(np.float16).astype(np.float32),
}


def fisher_sensitivity(model: PreTrainedModel, split: Split, node_params: dict[str, str], quantizer: str,
                       max_len: int, per_channel: bool = True, block_size: int = 32, samples: int = 128,
                       batch_size: int = 16, seed: int = 0) -> dict[str, float]:
    """{node: Σ F·(W − Q(W))²} for the nodes of `node_params`, Fisher from `samples` histories of
    `split` (validation), Q the `quantizer`'s weight storage."""
    if quantizer not in SIMULATED:
        raise CompressorError(f"no simulated weight error for {quantizer!r}; have {', '.join(SIMULATED)}")
    if not node_params:
        raise CompressorError("no MatMul of the graph matches a parameter of the model (a different model?)")
    named = dict(model.named_parameters())
    names = sorted(set(node_params.values()))
    probe = ProbeSet.from_split(split, max_len, samples, seed)
    fisher = parameter_fisher(model, [named[n] for n in names], probe, batch_size=batch_size, per_sample=False)
    score = {}
    for name, f in zip(names, fisher, strict=True):
        w = named[name].detach().float().cpu().numpy()
        err = w - SIMULATED[quantizer](w, per_channel, block_size)
        score[name] = float((f.cpu().numpy().astype(np.float64) * err.astype(np.float64) ** 2).sum())
    return {node: score[p] for node, p in node_params.items()}

