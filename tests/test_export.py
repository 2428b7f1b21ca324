"""ONNX export: the artifact directory, parity with PyTorch (left padding, dynamic shapes), refusals."""

from __future__ import annotations

import json
import shutil
from datetime import datetime

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from compressor.artifact import verify_artifact
from compressor.cli import main
from compressor.data import left_pad
from compressor.errors import CompressorError
from compressor.export import (
    ExportConfig,
    check_parity,
    export_artifact,
    export_onnx,
    item_embeddings,
    ort_session,
    parity_histories,
    require_parity,
)
from compressor.modeling import (
    QueryEncoder,
    count_parameters,
    decoder_parts,
    load_model,
    set_recsys_meta,
)
from compressor.teacher import build_teacher
from serving.artifact import load_artifact
from serving.runtime import OnnxEncoder
from tests.conftest import tiny_teacher_config


def test_artifact_layout_manifest_and_parity(tiny_artifact_dir, tiny_teacher_dir, tiny_data):
    m = verify_artifact(tiny_artifact_dir)
    assert {"model.onnx", "item_vocab.json", "items.json", "item_embeddings.npy",
            "user_histories.json"} <= set(m["files"])
    assert sorted(p.name for p in tiny_artifact_dir.iterdir()) == sorted([*m["files"], "manifest.json"])
    p = m["parity"]["model.onnx"]
    assert p["passed"] and p["max_abs_diff"] <= 1e-4 and p["topk_agreement"] >= 0.99
    assert p["n"] == len(tiny_data.split("valid")) and p["padded_rows"] > p["n"] // 3  # padding exercised
    model, vocab = load_model(tiny_teacher_dir)
    assert (m["kind"], m["architecture"], m["num_layers"], m["hidden_size"], m["max_len"]) == (
        "teacher", "llama", 4, 32, 20)
    assert m["vocab_size"] == vocab.size and m["parameters"] == count_parameters(model)
    assert m["serve_model"] == "model.onnx" and m["onnx_files"]["model.onnx"] == m["files"]["model.onnx"]["bytes"]
    assert m["data"]["fingerprint"] == tiny_data.interactions.fingerprint()
    assert {"torch", "transformers", "onnx", "onnxruntime"} <= set(m["versions"])
    assert datetime.fromisoformat(m["created_at"]).tzinfo is not None
    # Embeddings are the output head, row = token; items.json and user histories use dataset ids.
    emb = np.load(tiny_artifact_dir / "item_embeddings.npy")
    assert emb.dtype == np.float32 and np.array_equal(emb, item_embeddings(model)[0])
    items = json.loads((tiny_artifact_dir / "items.json").read_text())
    assert [i["item_id"] for i in items] == vocab.items
    assert next(i for i in items if i["item_id"] == 1)["title"] == "Toy Story (1995)"
    hist = json.loads((tiny_artifact_dir / "user_histories.json").read_text())
    assert hist.keys() == {str(u) for u in tiny_data.sequences}
    u = next(iter(tiny_data.sequences))
    assert hist[str(u)] == [vocab.item(t) for t in tiny_data.sequences[u]]
    assert not [q for q in tiny_artifact_dir.parent.iterdir() if q.name.startswith(".")]  # no temp dirs


@pytest.mark.parametrize("batch,width", [(1, 1), (1, 20), (3, 2), (5, 20)])
def test_graph_matches_torch_on_dynamic_shapes(tiny_artifact_dir, tiny_teacher_dir, tiny_data, batch, width):
    """Batch 1 and length 1 were never traced (examples are 2 x 8); left-padded rows included."""
    model, _ = load_model(tiny_teacher_dir)
    hists = [h[-max(1, width - i):] for i, h in enumerate(tiny_data.split("valid").histories[:batch])]
    ids, mask = left_pad(hists, width)
    with torch.no_grad():
        ref = QueryEncoder(model)(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    got = ort_session(tiny_artifact_dir / "model.onnx").run(None, {"input_ids": ids, "attention_mask": mask})[0]
    assert got.shape == (batch, 32) and np.abs(got - ref).max() < 1e-5


def test_broken_graph_fails_parity(tiny_artifact_dir, tiny_teacher_dir, tiny_data, tmp_path):
    graph = onnx.load(str(tiny_artifact_dir / "model.onnx"))
    big = max((t for t in graph.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and t.dims),
              key=lambda t: np.prod(t.dims))
    w = numpy_helper.to_array(big)
    big.CopyFrom(numpy_helper.from_array((w + np.random.default_rng(0).normal(0, 0.5, w.shape)).astype(np.float32),
                                         big.name))
    onnx.save(graph, str(tmp_path / "broken.onnx"))
    model, _ = load_model(tiny_teacher_dir)
    parity = check_parity(tmp_path / "broken.onnx", model, parity_histories(tiny_data, 32, 20), 20, 1e-4, 0.99)
    assert not parity["passed"] and parity["max_abs_diff"] > 1e-2
    with pytest.raises(CompressorError, match=r"max abs diff .* > atol"):
        require_parity(parity, "broken graph")
    # the default, scale-aware gate catches it too: the error is large relative to the vectors
    relative = check_parity(tmp_path / "broken.onnx", model, parity_histories(tiny_data, 32, 20), 20, None, 0.0,
                            rtol=1e-4)
    assert not relative["passed"] and relative["max_rel_diff"] > 1e-2
    with pytest.raises(CompressorError, match=r"max relative diff .* > rtol"):
        require_parity(relative, "broken graph")
    # and so does the default gate, which judges what serving uses: the ranked items' scores
    default = ExportConfig()
    ranked = check_parity(tmp_path / "broken.onnx", model, parity_histories(tiny_data, 32, 20), 20, default.atol,
                          0.0, rtol=default.rtol, score_rtol=default.score_rtol)
    assert not ranked["passed"] and ranked["max_score_rel_diff"] > 10 * default.score_rtol
    with pytest.raises(CompressorError, match=r"ranked items' scores differ by .* > score_rtol"):
        require_parity(ranked, "broken graph")


def test_default_gate_judges_the_ranking_and_reports_the_hidden_state_difference(tiny_artifact_dir,
                                                                                 tiny_teacher_dir, tiny_data):
    """Float rounding that a hidden-state threshold would reject (as one ill-conditioned LLM
    history did at rtol 1e-4) passes the default gate when the ranking and ranked scores match."""
    model, _ = load_model(tiny_teacher_dir)
    histories = parity_histories(tiny_data, 32, 20)
    cfg = ExportConfig()
    strict = check_parity(tiny_artifact_dir / "model.onnx", model, histories, 20, None, cfg.min_topk_agreement,
                          rtol=1e-12, score_rtol=cfg.score_rtol)
    assert not strict["passed"] and strict["max_rel_diff"] > 1e-12  # rounding is there to see
    parity = check_parity(tiny_artifact_dir / "model.onnx", model, histories, 20, cfg.atol, cfg.min_topk_agreement,
                          rtol=cfg.rtol, score_rtol=cfg.score_rtol)
    assert cfg.rtol is None and parity["passed"] and parity["topk_agreement"] == 1.0, parity
    assert parity["median_rel_diff"] <= parity["p99_rel_diff"] <= parity["max_rel_diff"]
    assert parity["median_score_rel_diff"] <= parity["max_score_rel_diff"] < cfg.score_rtol / 10
    assert parity["max_score_rel_diff"] < cfg.score_rtol


def test_relative_gate_is_scale_free(tiny_teacher_dir, tiny_data, tmp_path):
    """Scaling the query vector (as LLM outlier dimensions do) scales the absolute error, not the
    relative one: the relative gate passes a correct graph at any scale."""
    model, _ = load_model(tiny_teacher_dir)
    norm = decoder_parts(model).norm
    with torch.no_grad():
        norm.weight.mul_(1000.0)
    path = export_onnx(model, tmp_path / "big.onnx", 20)
    parity = check_parity(path, model, parity_histories(tiny_data, 32, 20), 20, None, 0.99, rtol=1e-4)
    assert parity["passed"], parity
    assert parity["max_abs_diff"] > parity["max_rel_diff"] * 10  # absolute error grew with the scale


def test_cli_refuses_threshold_zero_and_keeps_old_artifact(tiny_artifact_dir, tiny_teacher_dir, tmp_path, capsys):
    out = tmp_path / "art"
    shutil.copytree(tiny_artifact_dir, out)
    before = (out / "manifest.json").read_bytes()
    rc = main(["export", str(tiny_teacher_dir), "--out", str(out), "--set", "atol=0", "--set", "parity_users=16"])
    err = capsys.readouterr().err
    assert rc == 2 and "rejected" in err and "> atol 0" in err and "no artifact written" in err
    assert (out / "manifest.json").read_bytes() == before and verify_artifact(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # nothing half-written beside it


def test_gpt2_family_exports_with_parity_eager_attention(tiny_data, tmp_path):
    """Learned absolute positions (GPT-2) must also be right under left padding; eager attention
    (the other exportable implementation) is traced here, sdpa by the fixture."""
    model = build_teacher(tiny_teacher_config("gpt2", num_layers=2), tiny_data.vocab).eval()
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"
    set_recsys_meta(model, max_len=20, kind="teacher")
    path = export_onnx(model, tmp_path / "gpt2.onnx", 20)
    parity = check_parity(path, model, parity_histories(tiny_data, 40, 20), 20, 1e-4, 0.99)
    assert parity["passed"], parity


def test_quantized_artifact_is_checked_and_served(tiny_teacher_dir, tiny_data, tmp_path):
    cfg = ExportConfig(quantize="int8", serve_quantized=True, parity_users=24, quantized_min_topk_agreement=0.5)
    m = export_artifact(tiny_teacher_dir, tmp_path / "q", tiny_data, cfg).manifest
    assert m["serve_model"] == "model.int8.onnx" and set(m["onnx_files"]) == {"model.onnx", "model.int8.onnx"}
    q = m["parity"]["model.int8.onnx"]
    assert q["atol"] is None and q["passed"] and 0.5 <= q["topk_agreement"] <= 1 and q["max_abs_diff"] > 0
    assert m["parity"]["model.onnx"]["max_abs_diff"] <= 1e-4
    a = load_artifact(tmp_path / "q")  # verifies every file first
    assert a.onnx_path.name == "model.int8.onnx"
    assert OnnxEncoder(a.onnx_path, 20).encode([[1, 2, 3]]).shape == (1, 32)


def test_unexportable_attention_is_refused(tiny_data, tmp_path):
    model = build_teacher(tiny_teacher_config(num_layers=1), tiny_data.vocab)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(CompressorError, match="does not export"):
        export_onnx(model, tmp_path / "m.onnx", 20)
    assert not (tmp_path / "m.onnx").exists()


def test_graph_metadata_names_its_producer_opset_io_and_data(tiny_artifact_dir):
    import json

    import onnx

    manifest = json.loads((tiny_artifact_dir / "manifest.json").read_text())
    graph = onnx.load(str(tiny_artifact_dir / "model.onnx"), load_external_data=False)
    props = {p.key: p.value for p in graph.metadata_props}
    opset = next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))
    assert manifest["onnx"]["opset"] == opset == int(props["opset"])
    assert manifest["onnx"]["ir_version"] == graph.ir_version == int(props["ir_version"])
    assert props["producer"] == "recsys-compressor" and props["producer_version"]
    assert json.loads(props["inputs"]) == ["input_ids", "attention_mask"] and json.loads(props["outputs"]) == ["hidden"]
    assert props["data_fingerprint"] == manifest["data"]["fingerprint"]
    assert json.loads(props["teacher_layers"]) == manifest["teacher_layers"]
