"""A local 'pretrained' LLM (tiny Qwen2 + a real tokenizer, built here) becomes an item teacher."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from compressor.modeling import decoder_parts, load_model, recsys_meta
from compressor.pretrained import adapt_llm, item_texts, text_embeddings
from compressor.teacher import train_teacher
from tests.conftest import tiny_teacher_config


def _fake_llm(directory, data):
    """A word-level tokenizer over the catalogue's words and a 3-layer Qwen2 'LLM' saved locally."""
    words = sorted({w for t in item_texts(data) for w in t.replace("(", " ").replace(")", " ").split()})
    vocab = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    cfg = Qwen2Config(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(directory)
    fast.save_pretrained(directory)
    return fast


def test_llm_is_revocabularised_with_item_text_embeddings(tiny_data, tmp_path):
    tok = _fake_llm(tmp_path / "llm", tiny_data)
    model = adapt_llm(tmp_path / "llm", tiny_data, max_len=20)
    assert model.config.vocab_size == tiny_data.vocab.size
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert len(decoder_parts(model).layers) == 3
    # An item's row is the mean of the LLM's embeddings of its title words.
    original = Qwen2ForCausalLM.from_pretrained(tmp_path / "llm")
    first = text_embeddings(original, tok, [item_texts(tiny_data)[0]])[0]
    assert torch.allclose(model.get_input_embeddings().weight[tiny_data.vocab.num_special], first, atol=1e-6)


def test_pretrained_teacher_trains_through_the_same_path(tiny_data, tmp_path):
    _fake_llm(tmp_path / "llm", tiny_data)
    cfg = tiny_teacher_config().model_copy(update={"pretrained": str(tmp_path / "llm")})
    cfg.train.epochs = 1
    _, summary = train_teacher(tiny_data, cfg, tmp_path / "teacher")
    model, vocab = load_model(tmp_path / "teacher")
    assert summary["architecture"] == "qwen2" and vocab.same_as(tiny_data.vocab)
    assert recsys_meta(model)["adapted_from"].endswith("llm")
