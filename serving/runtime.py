"""The query encoder in ONNX Runtime: item-token histories -> query vectors (B, H).

The graph's contract (left padding with token 0, dynamic batch and length) is documented in
`compressor.export`. CUDA is used when ONNX Runtime has it, CPU otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from compressor.errors import ArtifactError

PAD_ID = 0
DEVICES = {
    "auto": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "cpu": ("CPUExecutionProvider",),
}


def left_pad(histories: Sequence[Sequence[int]], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Newest `max_len` tokens of each history, left-padded to the longest: (input_ids, attention_mask)."""
    width = min(max_len, max(len(h) for h in histories))
    ids = np.full((len(histories), width), PAD_ID, dtype=np.int64)
    mask = np.zeros((len(histories), width), dtype=np.int64)
    for i, h in enumerate(histories):
        h = np.asarray(h[-width:], dtype=np.int64)
        ids[i, width - len(h):] = h
        mask[i, width - len(h):] = 1
    return ids, mask


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError as e:
        raise ValueError(f"{name}={value!r} is not an integer") from e


class OnnxEncoder:
    """One ONNX Runtime session; `run` is thread-safe, so API threads share it."""

    def __init__(self, path: str | Path, max_len: int, intra_threads: int = 1, inter_threads: int = 1,
                 device: str = "auto"):
        if device not in DEVICES:
            raise ValueError(f"device {device!r}: choose one of {sorted(DEVICES)}")
        available = ort.get_available_providers()
        providers = [p for p in DEVICES[device] if p in available]
        if device == "cuda" and "CUDAExecutionProvider" not in providers:
            raise ArtifactError("device=cuda but this onnxruntime has no CUDAExecutionProvider")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_threads
        opts.inter_op_num_threads = inter_threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as e:  # ORT raises its own exception types for corrupt graphs
            raise ArtifactError(f"{path}: ONNX Runtime cannot load the graph ({e})") from e
        self.max_len = max_len
        self.path = Path(path)
        self.output = self.session.get_outputs()[0].name

    @classmethod
    def from_env(cls, path: str | Path, max_len: int) -> OnnxEncoder:
        """Threads and device from RECSYS_ORT_INTRA_THREADS (alias RECSYS_ORT_THREADS),
        RECSYS_ORT_INTER_THREADS and RECSYS_DEVICE (auto|cpu|cuda)."""
        intra = _env_int("RECSYS_ORT_INTRA_THREADS", _env_int("RECSYS_ORT_THREADS", 1))
        inter = _env_int("RECSYS_ORT_INTER_THREADS", 1)
        return cls(path, max_len, intra, inter, os.environ.get("RECSYS_DEVICE", "auto"))

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def encode(self, histories: Sequence[Sequence[int]]) -> np.ndarray:
        """Token histories (oldest first, non-empty) -> (B, H) float32 query vectors."""
        ids, mask = left_pad(histories, self.max_len)
        return self.session.run([self.output], {"input_ids": ids, "attention_mask": mask})[0]
