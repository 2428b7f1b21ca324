"""The query encoder in ONNX Runtime: item-token histories -> query vectors (B, H).

The graph's contract (left padding with token 0, dynamic batch and length) is documented in
`compressor.export`. CUDA is used when ONNX Runtime has it, CPU otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from compressor.errors import ArtifactError
from serving.settings import ServingSettings, load_settings

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


class OnnxEncoder:
    """One ONNX Runtime session; `run` is thread-safe, so API threads share it."""

    def __init__(self, path: str | Path, max_len: int, intra_threads: int = 1, inter_threads: int = 1,
                 device: str = "auto", hidden_size: int | None = None):
        """`hidden_size`: the width the query vectors must have (the artifact's); the graph is
        checked against the export contract so a wrong or random file fails here, at start-up."""
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
        self.output = self._check_contract(hidden_size)

    def _check_contract(self, hidden_size: int | None) -> str:
        """Inputs input_ids and attention_mask (int64, [batch, length]), one (batch, H) output;
        returns the output's name. A probe run checks the width the graph really produces."""
        where = f"{self.path}: not the exported query encoder"
        inputs = {i.name: i for i in self.session.get_inputs()}
        if set(inputs) != {"input_ids", "attention_mask"}:
            raise ArtifactError(f"{where}: inputs {sorted(inputs)}, expected attention_mask, input_ids")
        bad = [n for n, i in inputs.items() if i.type != "tensor(int64)" or len(i.shape) != 2]
        if bad:
            raise ArtifactError(f"{where}: inputs {bad} are not 2-d int64 tensors")
        outputs = self.session.get_outputs()
        if not outputs:
            raise ArtifactError(f"{where}: the graph has no output")
        name = outputs[0].name
        try:
            probe = self.session.run([name], {"input_ids": np.ones((2, 3), dtype=np.int64),
                                              "attention_mask": np.ones((2, 3), dtype=np.int64)})[0]
        except Exception as e:  # ORT's own exception types
            raise ArtifactError(f"{where}: a probe batch fails ({str(e)[:200]})") from e
        width = hidden_size if hidden_size is not None else (probe.shape[-1] if probe.ndim == 2 else -1)
        if probe.shape != (2, width) or probe.dtype != np.float32 or not np.isfinite(probe).all():
            raise ArtifactError(f"{where}: a (2, 3) batch gave {probe.dtype} {probe.shape}, expected "
                                f"finite float32 (2, {hidden_size if hidden_size is not None else 'H'})")
        return name

    @classmethod
    def from_settings(cls, s: ServingSettings, path: str | Path, max_len: int,
                      hidden_size: int | None = None) -> OnnxEncoder:
        return cls(path, max_len, s.ort_intra_threads, s.ort_inter_threads, s.device, hidden_size)

    @classmethod
    def from_env(cls, path: str | Path, max_len: int, hidden_size: int | None = None) -> OnnxEncoder:
        """Threads and device from the RECSYS_* settings as they are now (serving/settings.py):
        RECSYS_ORT_INTRA_THREADS (alias RECSYS_ORT_THREADS), RECSYS_ORT_INTER_THREADS, RECSYS_DEVICE."""
        return cls.from_settings(load_settings(), path, max_len, hidden_size)

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def encode(self, histories: Sequence[Sequence[int]]) -> np.ndarray:
        """Token histories (oldest first, non-empty) -> (B, H) float32 query vectors."""
        ids, mask = left_pad(histories, self.max_len)
        return self.session.run([self.output], {"input_ids": ids, "attention_mask": mask})[0]
