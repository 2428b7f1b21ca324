"""Pruning: shrunk tensors and configs reload, 0% changes nothing, Fisher finds dead units,
unstructured sparsity hits its target, and the CLI's errors are one line with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoConfig, AutoModelForCausalLM

from compressor.data import left_pad
from compressor.errors import CompressorError
from compressor.fisher import ProbeSet
from compressor.modeling import decoder_parts, item_scores, load_model, save_model
from compressor.prune import PruneConfig, find_adapter, measure_sparsity, prune_dir, prune_model
from compressor.prune.adapters import HeadLayout
from compressor.prune.scoring import fisher_unit_scores
from compressor.prune.structured import apply_structured, full_head_plan, plan_channels, plan_heads
from compressor.teacher import build_teacher
from tests.conftest import tiny_teacher_config

MAX_LEN = 20


def _logits(model, data, n: int = 32) -> torch.Tensor:
    ids, mask = left_pad(data.split("test").histories[:n], MAX_LEN)
    with torch.no_grad():
        return item_scores(model.eval(), torch.from_numpy(ids), torch.from_numpy(mask))


@pytest.fixture()
def teacher(tiny_teacher_dir):
    model, _ = load_model(tiny_teacher_dir)
    return model


def _mha_model(tiny_data):
    """Qwen2 without GQA (4 query = 4 key/value heads) and no head-count constraint in its config."""
    cfg = tiny_teacher_config("qwen2")
    cfg.num_kv_heads = 4
    return build_teacher(cfg, tiny_data.vocab, seed=1).eval()


def _zero_heads(model, heads: list[int], layers=None) -> None:
    """Make heads useless: their output-projection columns and query rows become 0."""
    hd = find_adapter(model).layout(model.config).head_dim
    with torch.no_grad():
        for i, layer in enumerate(decoder_parts(model).layers):
            if layers is None or i in layers:
                for h in heads:
                    layer.self_attn.o_proj.weight[:, h * hd : (h + 1) * hd] = 0
                    layer.self_attn.q_proj.weight[h * hd : (h + 1) * hd] = 0


def test_zero_ratios_change_nothing(teacher, tiny_data):
    before = _logits(teacher, tiny_data)
    model, report = prune_model(teacher, tiny_data, PruneConfig(), MAX_LEN, progress=False)
    assert torch.equal(_logits(model, tiny_data), before)
    assert report["params_after"] == report["params_before"]
    # The surgery itself with every unit kept rebuilds an identical model.
    adapter = find_adapter(teacher)
    full = apply_structured(teacher, adapter, full_head_plan(adapter.layout(teacher.config), 4),
                            plan_channels(torch.ones(4, 64), 0.0))
    assert full is not teacher
    assert torch.equal(_logits(full, tiny_data), before)


def test_structured_pruning_shrinks_tensors_and_config_and_reloads(tiny_teacher_dir, tiny_data, tmp_path):
    cfg = PruneConfig(heads=0.5, mlp=0.5, scorer="fisher", samples=32)
    out, _ = prune_dir(tiny_teacher_dir, tmp_path / "pruned", cfg, tiny_data, progress=False)
    raw = json.loads((out / "config.json").read_text())
    assert (raw["num_attention_heads"], raw["head_dim"], raw["intermediate_size"]) == (2, 8, 32)
    assert raw["num_attention_heads"] % raw["num_key_value_heads"] == 0
    assert raw["recsys"]["max_len"] == MAX_LEN and raw["recsys"]["pruning"]["heads"] == 0.5
    stock = AutoModelForCausalLM.from_pretrained(out)  # stock class, stock config: no custom code
    attn, mlp = stock.model.layers[0].self_attn, stock.model.layers[0].mlp
    kv = raw["num_key_value_heads"]
    assert attn.q_proj.weight.shape == (16, 32) and attn.o_proj.weight.shape == (32, 16)
    assert attn.k_proj.weight.shape == (8 * kv, 32) and attn.v_proj.weight.shape == (8 * kv, 32)
    assert mlp.gate_proj.weight.shape == (32, 32) and mlp.down_proj.weight.shape == (32, 32)
    report = json.loads((out / "prune_report.json").read_text())
    assert report["params_after"] < report["params_before"]
    assert report["structured"]["heads"]["after"] == 2 and report["structured"]["mlp"]["after"] == 32
    assert all(len(k) == 2 for k in report["structured"]["heads"]["kept_per_layer"])
    reloaded, vocab = load_model(out)
    assert vocab.size == tiny_data.vocab.size
    # What was saved is what was pruned in memory.
    pruned, _ = prune_model(load_model(tiny_teacher_dir)[0], tiny_data, cfg, MAX_LEN, progress=False)
    assert torch.allclose(_logits(reloaded, tiny_data), _logits(pruned, tiny_data), atol=1e-5)


def test_fisher_removes_a_useless_head_first_and_keeps_the_function(tiny_data):
    model = _mha_model(tiny_data)
    _zero_heads(model, [2])
    before = _logits(model, tiny_data)
    pruned, report = prune_model(model, tiny_data, PruneConfig(heads=0.25, samples=32), MAX_LEN, progress=False)
    heads = report["structured"]["heads"]
    assert heads["after"] == 3
    assert all(2 not in kept for kept in heads["kept_per_layer"])
    assert all(layer[2] == 0 and min(layer[:2] + layer[3:]) > 0 for layer in heads["scores"])
    # Removing a head that contributed nothing leaves the recommendations as they were.
    assert torch.allclose(_logits(pruned, tiny_data), before, atol=1e-4)


def test_fisher_prefers_the_useless_head_in_one_layer_only(teacher, tiny_data):
    _zero_heads(teacher, [1], layers=[0])
    probe = ProbeSet.from_data(tiny_data, MAX_LEN, 32)
    scores = fisher_unit_scores(teacher, find_adapter(teacher), probe, channels=False, progress=False,
                                batch_size=16).heads
    assert scores[0].argmin() == 1 and scores[0, 1] == 0
    assert (scores[1:] > 0).all()


def test_gqa_whole_group_removed_consistently(teacher, tiny_data):
    """4 query heads over 2 key/value heads: with group 0 dead, halving the heads drops that
    key/value head together with its query heads, and the function is unchanged."""
    _zero_heads(teacher, [0, 1])
    before = _logits(teacher, tiny_data)
    pruned, report = prune_model(teacher, tiny_data, PruneConfig(heads=0.5, samples=32), MAX_LEN, progress=False)
    heads = report["structured"]["heads"]
    assert (heads["after"], heads["kv_after"]) == (2, 1)
    assert heads["kept_per_layer"] == [[2, 3]] * 4 and heads["kv_kept_per_layer"] == [[1]] * 4
    assert pruned.config.num_key_value_heads == 1
    assert torch.allclose(_logits(pruned, tiny_data), before, atol=1e-4)


def test_dead_mlp_channels_are_the_ones_removed(teacher, tiny_data):
    dead = list(range(0, 64, 4))  # 16 of 64 channels = 25%
    with torch.no_grad():
        for layer in decoder_parts(teacher).layers:
            layer.mlp.down_proj.weight[:, dead] = 0
    before = _logits(teacher, tiny_data)
    pruned, report = prune_model(teacher, tiny_data, PruneConfig(mlp=0.25, samples=32), MAX_LEN, progress=False)
    assert pruned.config.intermediate_size == 48
    assert torch.allclose(_logits(pruned, tiny_data), before, atol=1e-4)


def _rms_norms(model):
    return [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]


def test_dead_hidden_dimensions_are_the_ones_removed_and_the_function_kept(teacher, tiny_data):
    """8 of 32 dimensions that nothing writes (item table columns, o_proj and down_proj rows all
    0) carry nothing: Fisher scores them 0 and removes exactly them. With the RMS norms' weights
    rescaled for averaging over 24 instead of 32 dimensions, the recommendations are unchanged,
    so every tensor was sliced along the right dimension."""
    dead = list(range(1, 32, 4))
    with torch.no_grad():
        teacher.get_input_embeddings().weight[:, dead] = 0  # tied: the item side of the head too
        for layer in decoder_parts(teacher).layers:
            layer.self_attn.o_proj.weight[dead] = 0
            layer.mlp.down_proj.weight[dead] = 0
    pruned, report = prune_model(teacher, tiny_data, PruneConfig(hidden=0.25, samples=32), MAX_LEN, progress=False)
    for norm in _rms_norms(teacher) + _rms_norms(pruned):
        norm.variance_epsilon = 1e-12  # 1e-6 alone would tell a mean over 32 from one over 24 at 1e-4
    before = _logits(teacher, tiny_data)
    width = report["structured"]["hidden"]
    assert (width["before"], width["after"]) == (32, 24) and pruned.config.hidden_size == 24
    assert set(width["kept"]).isdisjoint(dead)
    assert all(width["scores"][d] == 0 for d in dead) and min(s for i, s in enumerate(width["scores"]) if i not in dead) > 0
    assert pruned.config.head_dim == 8 and pruned.config.num_attention_heads == 4  # heads keep their size
    assert pruned.get_input_embeddings().weight.shape == (tiny_data.vocab.size, 24)
    assert pruned.get_output_embeddings().weight.data_ptr() == pruned.get_input_embeddings().weight.data_ptr()
    assert not torch.allclose(_logits(pruned, tiny_data), before, atol=1e-4)  # the norms average over fewer
    with torch.no_grad():
        for norm in _rms_norms(pruned):
            norm.weight *= (32 / 24) ** 0.5
    assert torch.allclose(_logits(pruned, tiny_data), before, atol=1e-4)


def test_width_pruning_with_heads_reloads_as_a_stock_model(tiny_teacher_dir, tiny_data, tmp_path):
    cfg = PruneConfig(hidden=0.5, heads=0.5, scorer="magnitude")
    out, report = prune_dir(tiny_teacher_dir, tmp_path / "narrow", cfg, progress=False)
    raw = json.loads((out / "config.json").read_text())
    assert (raw["hidden_size"], raw["num_attention_heads"], raw["head_dim"]) == (16, 2, 8)
    assert raw["recsys"]["pruning"]["hidden"] == 0.5
    stock = AutoModelForCausalLM.from_pretrained(out)
    attn, mlp = stock.model.layers[0].self_attn, stock.model.layers[0].mlp
    assert attn.q_proj.weight.shape == (16, 16) and attn.o_proj.weight.shape == (16, 16)
    assert mlp.up_proj.weight.shape == (64, 16) and mlp.down_proj.weight.shape == (16, 64)
    assert stock.model.norm.weight.shape == (16,) and stock.model.layers[1].input_layernorm.weight.shape == (16,)
    assert report["params_after"] < report["params_before"] / 2
    pruned, _ = prune_model(load_model(tiny_teacher_dir)[0], None, cfg, MAX_LEN)
    assert torch.allclose(_logits(load_model(out)[0], tiny_data), _logits(pruned, tiny_data), atol=1e-5)


def test_width_follows_what_the_config_accepts():
    """Llama wants hidden_size divisible by the head count: the nearest such width is kept."""
    from compressor.prune.structured import plan_hidden

    plan = plan_hidden(torch.arange(32.0), 0.4, lambda w: w % 4 == 0)  # 19.2 removed -> 20 kept
    assert plan.size == 20 and plan.keep == list(range(12, 32))
    with pytest.raises(CompressorError, match="no hidden size"):
        plan_hidden(torch.arange(4.0), 0.5, lambda w: False)


def test_magnitude_scorer_needs_no_data(teacher):
    pruned, report = prune_model(teacher, None, PruneConfig(heads=0.5, mlp=0.25, scorer="magnitude",
                                                             unstructured_criterion="magnitude"), MAX_LEN)
    assert report["structured"]["mlp"]["after"] == 48 and pruned.config.num_attention_heads == 2
    with pytest.raises(CompressorError, match="needs data"):
        prune_model(teacher, None, PruneConfig(mlp=0.25), MAX_LEN)


def test_plan_heads_respects_config_constraints():
    layout = HeadLayout(heads=4, kv_heads=2, head_dim=8)
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    # 3 heads cannot be K' groups x r' heads with K' <= 2, r' <= 2: the nearest count, more kept on ties.
    plan = plan_heads(scores, layout, 0.25, lambda h, kv: True)
    assert plan.heads == 4
    plan = plan_heads(scores, layout, 0.5, lambda h, kv: True)
    assert (plan.heads, plan.kv_heads, plan.q_keep, plan.kv_keep) == (2, 1, [[0, 1]], [[0]])
    plan = plan_heads(scores, layout, 0.5, lambda h, kv: kv == 2)  # e.g. a config pinning kv heads
    assert (plan.q_keep, plan.kv_keep) == ([[0, 2]], [[0, 1]])
    plan = plan_heads(scores, layout, 0.75, lambda h, kv: True)
    assert plan.q_keep == [[0]]  # never fewer than one head


@pytest.mark.parametrize("scope", ["global", "per_layer"])
@pytest.mark.parametrize("criterion", ["magnitude", "fisher_weighted"])
def test_unstructured_sparsity_hits_target_and_persists(tiny_teacher_dir, tiny_data, tmp_path, scope, criterion):
    cfg = PruneConfig(sparsity=0.4, scope=scope, unstructured_criterion=criterion, samples=32)
    out, report = prune_dir(tiny_teacher_dir, tmp_path / "sparse", cfg, tiny_data, progress=False)
    assert json.loads((out / "prune_report.json").read_text())["sparsity"] == report["sparsity"]  # what was saved
    assert abs(report["sparsity"]["total"] - 0.4) < 0.01
    if scope == "per_layer":
        assert all(abs(s - 0.4) < 0.01 for s in report["sparsity"]["per_layer"])
    model, _ = load_model(out)
    measured = measure_sparsity(model)
    assert abs(measured["total"] - 0.4) < 0.01
    original, _ = load_model(tiny_teacher_dir)  # embeddings, norms and biases are never pruned
    assert torch.equal(model.get_input_embeddings().weight, original.get_input_embeddings().weight)


def test_gpt2_mlp_pruning_reloads_and_heads_are_refused(tiny_data, tmp_path):
    model = build_teacher(tiny_teacher_config("gpt2"), tiny_data.vocab).eval()
    pruned, report = prune_model(model, tiny_data, PruneConfig(mlp=0.5, samples=16), MAX_LEN, progress=False)
    assert pruned.config.n_inner == 32 and pruned.transformer.h[0].mlp.c_fc.weight.shape == (32, 32)
    save_model(pruned, tiny_data.vocab, tmp_path / "g")
    assert load_model(tmp_path / "g")[0].transformer.h[0].mlp.c_proj.weight.shape == (32, 32)
    with pytest.raises(CompressorError, match="GPT-2"):
        prune_model(model, tiny_data, PruneConfig(heads=0.5, samples=16), MAX_LEN, progress=False)
    with pytest.raises(CompressorError, match="GPT-2 derives the head size"):
        prune_model(model, tiny_data, PruneConfig(hidden=0.5, samples=16), MAX_LEN, progress=False)


def _phi3_dir(tiny_data, path):
    """Phi-3 fuses q|k|v and gate|up: a layout no adapter knows."""
    cfg = AutoConfig.for_model("phi3", vocab_size=tiny_data.vocab.size, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=64, pad_token_id=0,
                               bos_token_id=None, eos_token_id=None)
    save_model(AutoModelForCausalLM.from_config(cfg), tiny_data.vocab, path)
    return path


def test_unknown_family_is_a_clear_error(tiny_data, tmp_path):
    model, _ = load_model(_phi3_dir(tiny_data, tmp_path / "phi3"))
    with pytest.raises(CompressorError, match="model without the expected modules"):
        prune_model(model, tiny_data, PruneConfig(mlp=0.5, scorer="magnitude"), MAX_LEN)


@pytest.mark.parametrize("field, value", [("heads", 1.0), ("mlp", -0.1), ("hidden", 1.0), ("sparsity", 1.5), ("scorer", "random"),
                                          ("unstructured_criterion", "taylor"), ("scope", "layer")])
def test_bad_config_values_are_rejected(field, value):
    with pytest.raises(ValidationError):
        PruneConfig(**{field: value})
    with pytest.raises(ValidationError):
        PruneConfig(head_ratio=0.5)  # extra keys are errors


def _error_line(err: str) -> str:
    """The CLI's error is one line (model-loading progress bars may precede it)."""
    lines = [line for line in err.strip().splitlines() if "error" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("args, message", [
    (["--heads", "1.5"], "heads"),
    (["--mlp", "-0.2"], "mlp"),
    (["--hidden", "1.5"], "hidden"),
    (["--sparsity", "1"], "sparsity"),
    (["--heads", "0.5", "--scorer", "random"], "scorer"),
    ([], "nothing to prune"),
])
def test_cli_bad_ratios_exit_2(tiny_teacher_dir, tmp_path, capsys, args, message):
    from compressor.cli import main

    assert main(["prune", str(tiny_teacher_dir), "--out", str(tmp_path / "o"), *args]) == 2
    assert message in _error_line(capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


def test_cli_unknown_family_exit_2(tiny_data, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "compressor.cli", "prune", str(_phi3_dir(tiny_data, tmp_path / "phi3")),
                           "--out", str(tmp_path / "o"), "--mlp", "0.5", "--scorer", "magnitude"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert _error_line(proc.stderr).startswith("compressor prune: error: model without the expected modules")
    assert not (tmp_path / "o").exists()


def test_cli_prune_writes_a_loadable_model(tiny_teacher_dir, tmp_path):
    from compressor.cli import main

    out = tmp_path / "p"
    assert main(["prune", str(tiny_teacher_dir), "--out", str(out), "--mlp", "0.5", "--scorer", "magnitude",
                 "--sparsity", "0.2", "--set", "unstructured_criterion=magnitude"]) == 0
    model, _ = load_model(out)
    assert model.config.intermediate_size == 32
    assert abs(measure_sparsity(model)["total"] - 0.2) < 0.01
