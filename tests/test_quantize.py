"""Quantization of the exported query encoder: int8 and fp16 graphs load in ONNX Runtime, keep
the float graph's interface, and agree with it on the top-10 of real users; bad files fail
with one line and exit code 2."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from compressor.errors import CompressorError
from compressor.export import export_onnx, item_embeddings
from compressor.modeling import load_model
from compressor.quantize import compare_onnx, onnx_hidden, quantize_onnx
from compressor.speed import ort_session as session

MAX_LEN = 20


@pytest.fixture(scope="module")
def float_onnx(tiny_teacher_dir, tmp_path_factory):
    model, _ = load_model(tiny_teacher_dir)
    path = export_onnx(model, tmp_path_factory.mktemp("onnx") / "model.onnx", MAX_LEN)
    return path, item_embeddings(model)[0]


@pytest.fixture(scope="module")
def test_split(tiny_data):
    return tiny_data.split("test")


def test_compare_against_itself_is_exact(float_onnx, test_split):
    path, emb = float_onnx
    r = compare_onnx(path, path, test_split.histories, MAX_LEN, emb, test_split.targets)
    assert r["top10_agreement"] == 1.0 and r["max_abs_diff"] == 0.0 and r["ndcg@10_delta"] == 0.0
    assert r["users"] == len(test_split)


@pytest.mark.parametrize("per_channel", [False, True])
def test_int8_loads_and_agrees_with_float_on_top10(float_onnx, test_split, tmp_path, per_channel):
    path, emb = float_onnx
    out = quantize_onnx(path, tmp_path / "model.int8.onnx", "int8", per_channel=per_channel)
    graph = onnx.load(str(out))
    ops = {n.op_type for n in graph.graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops  # really int8 arithmetic
    assert out.stat().st_size < path.stat().st_size
    r = compare_onnx(path, out, test_split.histories, MAX_LEN, emb, test_split.targets)
    assert r["top10_agreement"] >= 0.8, r
    assert abs(r["ndcg@10_delta"]) < 0.05, r
    assert not list(tmp_path.glob(".quantize.*"))  # scratch files are gone


def test_fp16_keeps_the_interface_and_runs(float_onnx, test_split, tmp_path):
    path, emb = float_onnx
    out = quantize_onnx(path, tmp_path / "model.fp16.onnx", "fp16")
    graph = onnx.load(str(out))
    types = {i.name: i.type.tensor_type.elem_type for i in [*graph.graph.input, *graph.graph.output]}
    assert types == {"input_ids": onnx.TensorProto.INT64, "attention_mask": onnx.TensorProto.INT64,
                     "hidden": onnx.TensorProto.FLOAT}
    weights = [t for t in graph.graph.initializer if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    weight_bytes = [sum(t.ByteSize() for t in onnx.load(str(f)).graph.initializer) for f in (path, out)]
    assert weight_bytes[1] < 0.55 * weight_bytes[0]  # (node metadata, not weights, is most of a small file)
    hidden = onnx_hidden(out, test_split.histories[:8], MAX_LEN)  # the CPU provider runs it too
    assert hidden.dtype == np.float32 and np.isfinite(hidden).all()
    r = compare_onnx(path, out, test_split.histories, MAX_LEN, emb, test_split.targets)
    assert r["top10_agreement"] >= 0.95 and r["max_abs_diff"] < 1e-2, r


def test_unloadable_file_is_a_clear_error_and_writes_nothing(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf")
    with pytest.raises(CompressorError, match="not a loadable ONNX model"):
        quantize_onnx(bad, tmp_path / "out.onnx")
    with pytest.raises(CompressorError, match="no such ONNX file"):
        quantize_onnx(tmp_path / "missing.onnx", tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_cli_quantize(float_onnx, tmp_path, capsys):
    from compressor.cli import main

    path, _ = float_onnx
    assert main(["quantize", str(path), "--out", str(tmp_path / "q.onnx"), "--per-tensor"]) == 0
    assert "int8 model saved" in capsys.readouterr().err  # status is logged to stderr
    session(tmp_path / "q.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage")
    assert main(["quantize", str(bad), "--out", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("compressor quantize: error:") and "not a loadable ONNX model" in err[0]
    assert not (tmp_path / "x.onnx").exists()
