"""compressor.modeling: parts of any decoder family, left padding, scores, the recsys metadata and
its one max_len reader, save/load. Tiny models built from configs, never downloaded."""

from __future__ import annotations

import json

import pytest
import torch

from compressor.data.protocol import left_pad
from compressor.errors import ArtifactError
from compressor.modeling import (
    RecsysMeta,
    add_hidden_dropout,
    count_parameters,
    decoder_parts,
    item_scores,
    last_hidden,
    load_model,
    model_max_len,
    position_ids,
    recsys_meta,
    save_model,
    set_recsys_meta,
)
from compressor.teacher import build_teacher
from tests.conftest import tiny_teacher_config


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request, tiny_data):
    return build_teacher(tiny_teacher_config(request.param), tiny_data.vocab).eval()


def test_decoder_parts_find_every_role_under_each_familys_names(model):
    parts = decoder_parts(model)
    assert len(parts.layers) == 4 and parts.layers_attr == ("layers" if model.config.model_type == "llama" else "h")
    assert parts.embed is model.get_input_embeddings() and parts.head is model.get_output_embeddings()
    assert parts.norm is not None and parts.head.weight is parts.embed.weight  # tied: the head is the item table


def test_positions_count_from_the_first_real_item():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_left_padding_does_not_change_a_users_scores(model):
    """The same history alone and beside a longer one (so padded) scores every item the same."""
    short, long = [5, 9, 3], [7, 2, 8, 4, 6, 11]
    ids, mask = (torch.from_numpy(a) for a in left_pad([short, long], 20))
    alone_ids, alone_mask = (torch.from_numpy(a) for a in left_pad([short], 20))
    with torch.no_grad():
        padded = item_scores(model, ids, mask)[0]
        alone = item_scores(model, alone_ids, alone_mask)[0]
        query = last_hidden(model, alone_ids, alone_mask)
    assert ids[0, :3].tolist() == [0, 0, 0]  # it really was padded
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone, query[0] @ model.get_output_embeddings().weight.T, atol=1e-5, rtol=1e-5)


def test_count_parameters_counts_a_tied_table_once(model):
    every = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    assert count_parameters(model) == every - model.get_input_embeddings().weight.numel()


def test_recsys_meta_is_typed_and_set_merges_and_none_removes(model):
    set_recsys_meta(model, max_len=20, kind="teacher", future_key={"a": 1})
    set_recsys_meta(model, teacher_layers=[0, 2])
    meta = recsys_meta(model)
    assert meta.max_len == 20 and meta.teacher_layers == [0, 2] and meta.kind == "teacher"
    assert model.config.recsys == {"max_len": 20, "kind": "teacher", "teacher_layers": [0, 2], "future_key": {"a": 1}}
    set_recsys_meta(model, teacher_layers=None, future_key=None)
    assert model.config.recsys == {"max_len": 20, "kind": "teacher"}


def test_a_damaged_recsys_entry_is_an_artifact_error(model):
    model.config.recsys = {"max_len": "long"}
    with pytest.raises(ArtifactError, match="recsys.max_len"):
        recsys_meta(model)
    model.config.recsys = {}


def test_max_len_is_the_recorded_window_else_the_position_table(model):
    model.config.recsys = {}
    assert model_max_len(model) == 20 == model_max_len(model.config)  # tiny config: max_len 20 positions
    set_recsys_meta(model, max_len=7)
    assert model_max_len(model) == 7
    model.config.recsys = {}


def test_max_len_without_any_record_is_a_clear_error():
    from transformers import PretrainedConfig

    with pytest.raises(ArtifactError, match="recsys.max_len"):
        model_max_len(PretrainedConfig())


def test_save_and_load_round_trip_weights_vocabulary_meta_and_card(tmp_path, tiny_data):
    model = build_teacher(tiny_teacher_config(), tiny_data.vocab, seed=3).eval()
    set_recsys_meta(model, max_len=20, kind="teacher")
    out = save_model(model, tiny_data.vocab, tmp_path / "m", {"extra.json": {"data": "tiny"}})
    assert out.stat().st_mode & 0o777 != 0o700  # an ordinary directory, not mkdtemp's private one
    again = save_model(model, tiny_data.vocab, tmp_path / "m")  # replaces the directory as a whole
    assert again == out and not (out / "extra.json").exists()
    loaded, vocab = load_model(out)
    assert vocab.same_as(tiny_data.vocab) and recsys_meta(loaded) == RecsysMeta(max_len=20, kind="teacher", dataset="tiny")
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert json.loads((out / "config.json").read_text())["recsys"]["max_len"] == 20
    assert (out / "README.md").read_text().startswith("---")


def test_hidden_dropout_acts_in_training_only_and_its_hooks_come_off(tiny_data):
    model = build_teacher(tiny_teacher_config(), tiny_data.vocab)
    ids, mask = (torch.from_numpy(a) for a in left_pad([[1, 2, 3, 4]], 20))
    model.eval()
    with torch.no_grad():
        before = last_hidden(model, ids, mask)
    handles = add_hidden_dropout(model, 0.5)
    assert len(handles) == 1 + 4  # embeddings and each layer
    with torch.no_grad():
        assert torch.equal(last_hidden(model, ids, mask), before)  # eval: no dropout
        model.train()
        torch.manual_seed(0)
        assert not torch.allclose(last_hidden(model, ids, mask), before)
    for h in handles:
        h.remove()
    model.eval()
    with torch.no_grad():
        assert torch.equal(last_hidden(model, ids, mask), before)
