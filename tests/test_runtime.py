"""ONNX Runtime query encoder: left padding, parity with PyTorch per row, thread settings, errors."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from compressor.errors import ArtifactError
from compressor.modeling import QueryEncoder, load_model
from serving.runtime import OnnxEncoder, left_pad


def test_left_pad_keeps_newest_and_pads_left():
    ids, mask = left_pad([[5, 6, 7], [8], [1, 2, 3, 4, 9]], max_len=4)
    assert ids.tolist() == [[0, 5, 6, 7], [0, 0, 0, 8], [2, 3, 4, 9]]
    assert mask.tolist() == [[0, 1, 1, 1], [0, 0, 0, 1], [1, 1, 1, 1]]
    assert left_pad([[3, 4]], max_len=50)[0].shape == (1, 2)  # padded to the longest row only


def test_batched_rows_equal_single_rows_and_torch(tiny_artifact_dir, tiny_teacher_dir, tiny_data):
    enc = OnnxEncoder(tiny_artifact_dir / "model.onnx", max_len=20)
    hists = [h[-n:] for h, n in zip(tiny_data.split("valid").histories[:6], (1, 3, 20, 7, 2, 30), strict=True)]
    batch = enc.encode(hists)
    single = np.vstack([enc.encode([h]) for h in hists])
    assert batch.shape == (6, 32) and np.abs(batch - single).max() < 1e-5  # padding does not leak
    model, _ = load_model(tiny_teacher_dir)
    ids, mask = left_pad(hists, 20)
    with torch.no_grad():
        ref = QueryEncoder(model)(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    assert np.abs(batch - ref).max() < 1e-5


def test_threads_and_device_from_env(tiny_artifact_dir, monkeypatch):
    monkeypatch.setenv("RECSYS_ORT_THREADS", "2")
    monkeypatch.setenv("RECSYS_ORT_INTER_THREADS", "1")
    monkeypatch.setenv("RECSYS_DEVICE", "cpu")
    enc = OnnxEncoder.from_env(tiny_artifact_dir / "model.onnx", 20)
    assert enc.session.get_session_options().intra_op_num_threads == 2
    assert enc.providers == ["CPUExecutionProvider"]
    monkeypatch.setenv("RECSYS_ORT_THREADS", "two")
    with pytest.raises(ValueError, match="RECSYS_ORT_THREADS='two'"):
        OnnxEncoder.from_env(tiny_artifact_dir / "model.onnx", 20)


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="a GPU is present")
def test_cuda_without_gpu_is_a_clear_error(tiny_artifact_dir):
    with pytest.raises(ArtifactError, match="no CUDAExecutionProvider"):
        OnnxEncoder(tiny_artifact_dir / "model.onnx", 20, device="cuda")


def test_corrupt_graph_is_an_artifact_error(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"not a graph")
    with pytest.raises(ArtifactError, match="cannot load the graph"):
        OnnxEncoder(tmp_path / "model.onnx", 20)
