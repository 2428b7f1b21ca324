"""Truncation into a real student: exact copies of chosen teacher layers, reloadable, any family."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from compressor.cli import main
from compressor.errors import CompressorError
from compressor.evaluate import evaluate_model
from compressor.importance import load_importance
from compressor.modeling import decoder_parts, load_model, position_ids, recsys_meta, save_model
from compressor.pipeline import RunConfig
from compressor.select import top_k
from compressor.teacher import build_teacher
from compressor.truncate import TRUNCATION_FILE, truncate, truncate_dir, validated
from tests.conftest import tiny_teacher_config


def batch(vocab_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab_size, (4, 9), generator=g)
    mask = torch.ones_like(ids)
    for row, pad in enumerate((0, 3, 5, 8)):  # left padding of different lengths
        ids[row, :pad] = 0
        mask[row, :pad] = 0
    return ids, mask


def additive_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) causal + padding mask, 0 where a query may attend, a large negative elsewhere."""
    T = mask.shape[1]
    allowed = torch.tril(torch.ones(T, T, dtype=torch.bool))[None, None] & mask.bool()[:, None, None, :]
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)


@torch.no_grad()
def llama_by_hand(model, layers: list[int], ids, mask) -> torch.Tensor:
    """Logits from running teacher layers `layers` one after another, outside the HF forward."""
    parts = decoder_parts(model)
    pos = position_ids(mask)
    h = parts.embed(ids)
    rope = parts.base.rotary_emb(h, pos)
    for i in layers:
        h = parts.layers[i](h, attention_mask=additive_mask(mask), position_ids=pos, position_embeddings=rope)
    return parts.head(parts.norm(h))


@torch.no_grad()
def gpt2_by_hand(model, layers: list[int], ids, mask) -> torch.Tensor:
    base = model.transformer
    h = base.wte(ids) + base.wpe(position_ids(mask))
    for i in layers:
        h = base.h[i](h, None, additive_mask(mask))
    return model.lm_head(base.ln_f(h))


@torch.no_grad()
def logits(model, ids, mask) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False).logits


def test_keeping_all_layers_is_exact(tiny_teacher_dir):
    teacher, vocab = load_model(tiny_teacher_dir)
    student = truncate(teacher, [0, 1, 2, 3])
    assert student is not teacher
    ids, mask = batch(vocab.size)
    assert torch.equal(logits(teacher, ids, mask), logits(student, ids, mask))
    # a deep copy: changing the student leaves the teacher alone
    with torch.no_grad():
        decoder_parts(student).layers[0].mlp.down_proj.weight.zero_()
    assert decoder_parts(teacher).layers[0].mlp.down_proj.weight.abs().sum() > 0


def test_truncated_student_reloads_and_runs_the_chosen_layers(tiny_teacher_dir, tmp_path):
    teacher, vocab = load_model(tiny_teacher_dir)
    out = truncate_dir(tiny_teacher_dir, tmp_path / "student", [0, 3], info={"chosen_by": "test"})
    # a plain from_pretrained works (the item vocabulary travels beside it)
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert plain.config.num_hidden_layers == 2 and len(plain.model.layers) == 2
    assert [layer.self_attn.layer_idx for layer in plain.model.layers] == [0, 1]
    student, student_vocab = load_model(out)
    assert student_vocab.items == vocab.items
    meta = recsys_meta(student)
    assert meta.kind == "student" and meta.teacher_layers == [0, 3]
    assert meta.teacher_num_layers == 4 and meta.max_len == recsys_meta(teacher).max_len == 20
    record = json.loads((out / TRUNCATION_FILE).read_text())
    assert record["teacher_layers"] == [0, 3] and record["chosen_by"] == "test"
    assert record["student_parameters"] < record["teacher_parameters"]

    ids, mask = batch(vocab.size)
    real = mask.bool()
    expected = llama_by_hand(teacher, [0, 3], ids, mask)
    torch.testing.assert_close(logits(student, ids, mask)[real], expected[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(plain, ids, mask)[real], expected[real], atol=1e-5, rtol=1e-5)
    # and it is not just the teacher again
    assert not torch.allclose(logits(teacher, ids, mask)[real], expected[real], atol=1e-3)
    # the KV cache works with re-indexed layers: incremental decoding matches the full pass
    full = ids[1:2, 3:]
    with torch.no_grad():
        first = student(input_ids=full[:, :-1], use_cache=True)
        step = student(input_ids=full[:, -1:], past_key_values=first.past_key_values, use_cache=True)
        whole = student(input_ids=full, use_cache=False)
    torch.testing.assert_close(step.logits[:, -1], whole.logits[:, -1], atol=1e-5, rtol=1e-5)


def test_gpt2_truncation(tiny_data, tmp_path):
    teacher = build_teacher(tiny_teacher_config("gpt2", num_layers=3), tiny_data.vocab).eval()
    student = truncate(teacher, [0, 2])
    assert student.config.n_layer == 2 and len(student.transformer.h) == 2
    save_model(student, tiny_data.vocab, tmp_path / "gpt2")
    reloaded, _ = load_model(tmp_path / "gpt2")
    ids, mask = batch(tiny_data.vocab.size, seed=1)
    real = mask.bool()
    expected = gpt2_by_hand(teacher, [0, 2], ids, mask)
    torch.testing.assert_close(logits(reloaded, ids, mask)[real], expected[real], atol=1e-5, rtol=1e-5)
    assert recsys_meta(reloaded).teacher_layers == [0, 2]


def test_qwen2_truncation_reindexes_layer_types(tiny_data):
    teacher = build_teacher(tiny_teacher_config("qwen2", num_layers=4), tiny_data.vocab).eval()
    teacher.config.layer_types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    student = truncate(teacher, [1, 2])
    assert student.config.layer_types == ["sliding_attention", "full_attention"]
    assert student.config.num_hidden_layers == 2


def test_truncate_rejects_bad_layers(tiny_teacher_dir, tmp_path):
    teacher, _ = load_model(tiny_teacher_dir)
    with pytest.raises(CompressorError, match="out of range"):
        truncate(teacher, [0, 4])
    with pytest.raises(CompressorError, match="removes nothing"):
        truncate_dir(tiny_teacher_dir, tmp_path / "s", [0, 1, 2, 3])
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("argv, message", [
    (["--layers", "0,9"], "out of range"),
    (["--layers", "1,1"], "more than once"),
    (["--layers", "x"], "integer"),
    (["--keep", "4"], "between 1 and 3"),
    (["--keep", "0"], "between 1 and 3"),
    (["--keep", "2", "--method", "magic"], "unknown importance method"),
    (["--keep", "2", "--strategy", "best"], "unknown selection strategy"),
    (["--keep", "2", "--layers", "0,1"], "either"),
    ([], "either"),
    (["--layers", "0,1", "--method", "fisher"], "go with --keep"),
    (["--keep", "2", "--importance", "/nonexistent/importance.json"], "no such importance file"),
])
def test_cli_truncate_errors(tiny_teacher_dir, tmp_path, capsys, argv, message):
    code = main(["truncate", str(tiny_teacher_dir), "--out", str(tmp_path / "s"), *argv])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "s").exists()


def test_cli_truncate(tiny_teacher_dir, tmp_path):
    assert main(["truncate", str(tiny_teacher_dir), "--out", str(tmp_path / "a"), "--layers", "0,2"]) == 0
    assert recsys_meta(load_model(tmp_path / "a")[0]).teacher_layers == [0, 2]
    # --keep with an importance file: the layers the file's selection lists
    imp = tmp_path / "imp"
    assert main(["analyze", str(tiny_teacher_dir), "--methods", "block_influence", "--samples", "8",
                 "--keep", "2", "--out", str(imp)]) == 0
    assert main(["truncate", str(tiny_teacher_dir), "--out", str(tmp_path / "b"), "--keep", "2",
                 "--method", "block_influence", "--strategy", "top_k", "--importance", str(imp)]) == 0
    chosen = load_importance(imp)["selections"]["top_k/block_influence/k=2"]
    assert recsys_meta(load_model(tmp_path / "b")[0]).teacher_layers == chosen
    # --keep without a file: computed on the fly from --data
    assert main(["truncate", str(tiny_teacher_dir), "--out", str(tmp_path / "c"), "--keep", "1",
                 "--method", "block_influence", "--samples", "8"]) == 0
    record = json.loads((tmp_path / "c" / TRUNCATION_FILE).read_text())
    # the default strategy is the pipeline's (one source: compressor.select.DEFAULT_STRATEGY)
    assert record["importance"] == "computed" and record["strategy"] == RunConfig().selection.strategy == "top_k"
    assert record["teacher_layers"] == top_k(record["scores"], 1)


def test_validated_keeps_the_proposal_best_on_validation(tiny_teacher_dir, tiny_data):
    teacher, _ = load_model(tiny_teacher_dir)
    scores = [0.1, 0.9, 0.2, 0.3]  # top_k [1, 3], strategic [0, 3], distributed [1, 3]
    max_len = recsys_meta(teacher).max_len
    layers, rows = validated(teacher, ["strategic", "top_k", "distributed"], scores, 2, tiny_data, max_len)
    assert [r["layers"] for r in rows] == [[0, 3], [1, 3]]
    assert rows[1]["strategies"] == ["top_k", "distributed"]
    valid = tiny_data.split("valid")
    for r in rows:  # each number is that set's untrained student on the validation split
        assert r["valid_ndcg@10"] == evaluate_model(truncate(teacher, r["layers"]), valid, max_len).metrics["ndcg@10"]
    assert layers == max(rows, key=lambda r: r["valid_ndcg@10"])["layers"]


def test_cli_truncate_validated(tiny_teacher_dir, tmp_path, capsys):
    out = tmp_path / "v"
    assert main(["truncate", str(tiny_teacher_dir), "--out", str(out), "--keep", "2",
                 "--method", "block_influence", "--strategy", "validated", "--samples", "8"]) == 0
    record = json.loads((out / TRUNCATION_FILE).read_text())
    assert record["strategy"] == "validated" and record["candidates"]
    best = max(record["candidates"], key=lambda r: r["valid_ndcg@10"])
    assert record["teacher_layers"] == best["layers"]
    assert "validation NDCG@10" in capsys.readouterr().err  # status is logged to stderr
