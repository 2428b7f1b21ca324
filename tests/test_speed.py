"""compressor.speed: interleaved ONNX Runtime timing of real graphs, and what it records.

Two hand-built graphs with the exported model's inputs: `light` does one small product, `heavy`
thirty 256x256 ones per history, so heavy is many times slower at batch 64 whatever the load."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressor.speed import compare_latency, machine_info, ort_session


def _graph(path, products: int):
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((1, 256)).astype(np.float32), "w_in"),
             numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")]
    nodes = [helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
             helper.make_node("ReduceSum", ["m", "axes"], ["n"], keepdims=1),  # (B, 1): history lengths
             helper.make_node("MatMul", ["n", "w_in"], ["h0"])]
    for i in range(products):
        inits.append(numpy_helper.from_array(rng.standard_normal((256, 256)).astype(np.float32) / 16, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [f"h{i}", f"w{i}"], [f"h{i + 1}"]))
    nodes.append(helper.make_node("Identity", [f"h{products}"], ["query"]))
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"]) for n in ("input_ids", "attention_mask")]
    graph = helper.make_graph(nodes, "probe", inputs, [helper.make_tensor_value_info("query", TensorProto.FLOAT, ["batch", 256])],
                              initializer=inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    d = tmp_path_factory.mktemp("graphs")
    return {"light": _graph(d / "light.onnx", 0), "heavy": _graph(d / "heavy.onnx", 30)}


def test_every_graph_is_timed_at_every_batch_size_and_the_figures_agree(graphs):
    histories = [np.arange(1, n + 1) for n in (3, 7, 12, 30)]  # longer than max_len: cut to the newest
    timing = compare_latency(graphs, histories, max_len=20, batch_sizes=(1, 64), rounds=2, calls_per_round=3,
                             threads=1)
    assert set(timing) == {"light", "heavy"}
    for per_batch in timing.values():
        assert set(per_batch) == {"batch_1", "batch_64"}
        for b, t in (("batch_1", per_batch["batch_1"]), ("batch_64", per_batch["batch_64"])):
            size = int(b.split("_")[1])
            assert t["calls"] == 2 * 3 and t["ms_p90"] >= t["ms_median"]
            assert t["per_second"] == pytest.approx(size * 1000.0 / t["ms_median"])
    # 30 products of 256x256 per history against none: interleaving keeps the load fair to both
    assert timing["heavy"]["batch_64"]["ms_median"] > 3 * timing["light"]["batch_64"]["ms_median"]


def test_sessions_take_the_thread_count_and_the_machine_is_described(graphs):
    session = ort_session(graphs["light"], threads=2)
    assert session.get_session_options().intra_op_num_threads == 2
    assert session.get_session_options().inter_op_num_threads == 1
    out = session.run(None, {"input_ids": np.ones((2, 5), np.int64), "attention_mask": np.ones((2, 5), np.int64)})
    assert out[0].shape == (2, 256)
    info = machine_info()
    assert set(info) == {"cpu", "cores", "python", "onnxruntime", "providers"}
    assert "CPUExecutionProvider" in info["providers"] and info["cores"] >= 1
