"""Quantization with a quality budget on a tiny trained Llama: every method writes a valid graph
that ONNX Runtime runs, its agreement with the float graph is measured, a budget no method meets
is refused (no graph chosen, served or written), the export stage records and serves what passes
(as serving loads it), and Fisher-guided mixed precision keeps the most sensitive MatMuls in float."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import pytest

from compressor.errors import CompressorError
from compressor.export import ExportConfig, export_artifact, export_onnx, item_embeddings
from compressor.modeling import load_model
from compressor.quantize import bf16_support, onnx_hidden, weight_matmuls
from compressor.quantize_budget import PLAIN, QuantizeConfig, search_quantization
from compressor.quantize_sensitivity import SIMULATED, matmul_parameters

MAX_LEN = 20
FAST = {"speed_rounds": 1, "speed_calls": 2, "bootstrap_resamples": 100, "fisher_samples": 32}


@pytest.fixture(scope="module")
def tiny(tiny_teacher_dir, tmp_path_factory):
    model, _ = load_model(tiny_teacher_dir)
    path = export_onnx(model, tmp_path_factory.mktemp("qb") / "model.onnx", MAX_LEN)
    return model, path


@pytest.fixture(scope="module")
def every_method(tiny, tiny_data, tmp_path_factory):
    """One search over every method (budget 0.95): the result and its output directory."""
    model, path = tiny
    out = tmp_path_factory.mktemp("search")
    res = search_quantization(path, out, tiny_data.split("valid"), *item_embeddings(model), MAX_LEN,
                              QuantizeConfig(**FAST), model, log=lambda m: None)
    return res, out


EXPECTED_OPS = {"int8_per_tensor": "MatMulInteger", "int8": "MatMulInteger", "int8_static": "QuantizeLinear",
                "int4": "MatMulNBits", "fisher_mixed": None, "fp16": None}


@pytest.mark.parametrize("method", list(EXPECTED_OPS))
def test_every_method_writes_a_valid_graph_that_runs_and_is_judged(every_method, tiny_data, method):
    res, out = every_method
    row = res.doc["methods"][method]
    assert "error" not in row, row
    graph = onnx.load(str(res.graphs[method]))
    onnx.checker.check_model(graph)
    ops = Counter(n.op_type for n in graph.graph.node)
    if EXPECTED_OPS[method]:
        assert ops[EXPECTED_OPS[method]] > 0, ops  # really quantized arithmetic, not a copy
    if method == "fp16":
        assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.graph.initializer)
    hidden = onnx_hidden(res.graphs[method], tiny_data.split("valid").histories[:8], MAX_LEN)
    assert hidden.dtype == np.float32 and np.isfinite(hidden).all()
    assert 0 < row["topk_agreement"] <= 1 and row["max_abs_diff"] > 0
    assert row["ndcg@10_float"] == res.doc["methods"]["float"]["ndcg@10"]
    b = row["bootstrap_ndcg@10"]
    assert b["ci_low"] <= b["mean_diff"] <= b["ci_high"] and b["n_users"] == len(tiny_data.split("valid"))
    assert row["file_bytes"] == res.graphs[method].stat().st_size
    assert row["batch_1_ms"] > 0 and row["batch_64_per_second"] > 0
    assert row["passed"] == (row["topk_agreement"] >= 0.95 and row["ndcg@10"] >= 0.98 * row["ndcg@10_float"])
    assert (row["why"] is None) == row["passed"]


def test_the_chosen_graph_is_the_fastest_within_the_budget(every_method):
    res, _ = every_method
    rows = res.doc["methods"]
    passing = [n for n, r in rows.items() if n != "float" and r["passed"]]
    assert passing  # fp16 keeps the ranking of a tiny model
    if not rows["fisher_mixed"]["kept_float"]:  # int8 met the budget: fisher_mixed is the same graph
        assert rows["fisher_mixed"]["same_as"] == "int8"
        passing.remove("fisher_mixed")
    assert res.chosen == min(passing, key=lambda n: rows[n]["batch_1_ms"]) and res.refusal is None
    assert res.doc["budget"]["min_topk_agreement"] == 0.95 and res.doc["bf16"]["why"]
    json.dumps(res.doc)  # the record is JSON


def test_a_budget_nothing_meets_is_refused(tiny, tiny_data, tmp_path):
    model, path = tiny
    res = search_quantization(path, tmp_path, tiny_data.split("valid"), *item_embeddings(model), MAX_LEN,
                              QuantizeConfig(methods=["int4", "int8_per_tensor"], min_topk_agreement=1.0, **FAST),
                              log=lambda m: None)
    assert res.chosen is None and res.chosen_path is None
    assert "no quantized graph within the budget" in res.refusal and "int4: top-10 agreement" in res.refusal


def test_fisher_mixed_keeps_the_most_sensitive_matmuls_in_float(tiny, tiny_data, tmp_path):
    """int4 on the tiny model misses 0.95 agreement: the Fisher ranking decides what stays float."""
    model, path = tiny
    nodes = weight_matmuls(onnx.load(str(path)))
    params = matmul_parameters(path, model)
    assert set(params) == set(nodes) and len(set(params.values())) == len(nodes)  # every weight found, once
    assert all(p.startswith("model.layers.") and p.endswith("_proj.weight") for p in params.values())
    cfg = QuantizeConfig(methods=["int4", "fisher_mixed"], mixed_base="int4", mixed_max_float=1.0, **FAST)
    res = search_quantization(path, tmp_path, tiny_data.split("valid"), *item_embeddings(model), MAX_LEN, cfg,
                              model, log=lambda m: None)
    int4, mixed = res.doc["methods"]["int4"], res.doc["methods"]["fisher_mixed"]
    assert not int4["passed"], int4  # otherwise this test shows nothing
    assert mixed["passed"] and mixed["kept_float"], mixed
    sens = [mixed["sensitivity"][params[n]] for n in mixed["kept_float"]]
    rest = [v for p, v in mixed["sensitivity"].items() if p not in {params[n] for n in mixed["kept_float"]}]
    assert min(sens) >= max(rest)  # the kept ones are the most sensitive
    assert mixed["search"][0]["float_nodes"] == 0 and mixed["search"][-1]["passed"] is not None
    ops = Counter(n.op_type for n in onnx.load(str(res.graphs["fisher_mixed"])).graph.node)
    assert ops["MatMulNBits"] == len(nodes) - len(mixed["kept_float"])


def test_simulated_weight_errors_order_as_the_formats_do():
    w = np.random.default_rng(0).normal(size=(16, 64)).astype(np.float32) * np.linspace(0.1, 3, 16)[:, None]
    err = {name: float(((w - SIMULATED[name](w, pc, 32)) ** 2).sum()) for name, pc in
           (("fp16", True), ("int8", True), ("int4", True))}
    per_tensor = float(((w - SIMULATED["int8"](w, False, 32)) ** 2).sum())
    assert 0 < err["fp16"] < err["int8"] < per_tensor and err["int8"] < err["int4"]


def test_unknown_method_and_bad_exclusion_are_clear_errors(tiny, tmp_path):
    from compressor.quantize import quantize_onnx

    with pytest.raises(ValueError, match="unknown quantization methods"):
        QuantizeConfig(methods=["int3"])
    with pytest.raises(ValueError, match="power of 2"):
        QuantizeConfig(block_size=48)
    with pytest.raises(CompressorError, match="not weight MatMuls"):
        quantize_onnx(tiny[1], tmp_path / "x.onnx", "int4", exclude=["no_such_node"])
    assert not (tmp_path / "x.onnx").exists()
    assert set(PLAIN) | {"fisher_mixed"} == set(QuantizeConfig().methods)


def test_bf16_is_checked_on_this_build():
    runs, why = bf16_support()
    assert isinstance(runs, bool) and "ONNX Runtime" in why


@pytest.mark.parametrize("method", list(EXPECTED_OPS))
def test_serving_runs_every_method_graph(every_method, tiny_data, method):
    """serving.runtime loads the graph as the service does (MatMulNBits, QDQ, fp16 included) and
    returns what ONNX Runtime returned to the judge."""
    from serving.runtime import OnnxEncoder

    res, _ = every_method
    hists = [list(h) for h in tiny_data.split("valid").histories[:4]]
    got = OnnxEncoder(res.graphs[method], MAX_LEN).encode(hists)
    assert got.shape == (4, 32) and np.isfinite(got).all()


def test_export_serves_a_graph_within_the_budget_as_serving_loads_it(tiny_teacher_dir, tiny_data, tmp_path):
    from serving.artifact import load_artifact
    from serving.runtime import OnnxEncoder

    method = "int4"
    budget = QuantizeConfig(min_topk_agreement=0.5, max_ndcg_drop=1.0, **FAST)
    cfg = ExportConfig(quantize=method, serve_quantized=True, parity_users=24, quantized_min_topk_agreement=0.5,
                       quantization=budget)
    m = export_artifact(tiny_teacher_dir, tmp_path / "a", tiny_data, cfg).manifest
    name = f"model.{method}.onnx"
    assert m["serve_model"] == name and m["quantization"]["served"] and m["quantization"]["method"] == method
    assert m["quantization"]["budget"]["min_topk_agreement"] == 0.5 and m["quantization"]["chosen"] == method
    assert m["parity"][name]["passed"]  # the export gate, against PyTorch
    a = load_artifact(tmp_path / "a")
    assert a.onnx_path.name == name
    assert OnnxEncoder(a.onnx_path, MAX_LEN).encode([[1, 2, 3]]).shape == (1, 32)
    assert not list((tmp_path / "a").glob(".quantize*"))


def test_export_below_the_budget_serves_float_and_says_why(tiny_teacher_dir, tiny_data, tmp_path):
    budget = QuantizeConfig(methods=["int4"], min_topk_agreement=1.0, **FAST)
    cfg = ExportConfig(quantize="auto", serve_quantized=True, parity_users=24, quantization=budget)
    m = export_artifact(tiny_teacher_dir, tmp_path / "a", tiny_data, cfg).manifest
    assert m["serve_model"] == "model.onnx" and set(m["onnx_files"]) == {"model.onnx"}  # nothing kept
    q = m["quantization"]
    assert q["served"] is False and q["chosen"] is None and "int4: top-10 agreement" in q["refusal"]


def test_cli_quantizes_an_artifact_or_refuses_in_one_line(tiny_artifact_dir, tmp_path, capsys):
    from compressor.cli import main

    fast = [f"{k}={v}" for k, v in FAST.items()]
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_artifact_dir), "--out", str(out), "--method", "fp16", *fast]) == 0
    doc = json.loads((out / "quantization.json").read_text())
    assert doc["chosen"] == "fp16" and (out / "model.fp16.onnx").is_file() and (out / "quantization.png").is_file()
    capsys.readouterr()
    bad = tmp_path / "r"
    assert main(["quantize", str(tiny_artifact_dir), "--out", str(bad), "--method", "int4",
                 "min_topk_agreement=1.0", *fast]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and err[0].startswith("compressor quantize: error:"), err
    assert "no quantized graph within the budget" in err[0] and "int4: top-10 agreement" in err[0]
    assert not list(bad.glob("*.onnx")) and (bad / "quantization.md").is_file()
