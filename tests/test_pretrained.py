"""A local 'pretrained' LLM (tiny Qwen2 + a real tokenizer, or a real GGUF file, built here) becomes an item teacher."""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from compressor.cli import main
from compressor.errors import ArtifactError
from compressor.modeling import decoder_parts, load_model, recsys_meta
from compressor.pretrained import (
    ITEM_INITS,
    PACKAGED_LLMS,
    PackagedLLM,
    adapt_llm,
    item_texts,
    load_pretrained,
    resolve_pretrained,
    text_embeddings,
)
from compressor.teacher import TeacherConfig, train_teacher
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


def test_centered_item_init_removes_the_common_direction_at_the_llms_scale(tiny_data, tmp_path):
    _fake_llm(tmp_path / "llm", tiny_data)
    text = adapt_llm(tmp_path / "llm", tiny_data, max_len=20, item_init="text")
    centered = adapt_llm(tmp_path / "llm", tiny_data, max_len=20, item_init="centered")
    n = tiny_data.vocab.num_special
    t, c = (m.get_input_embeddings().weight.detach()[n:] for m in (text, centered))
    original = Qwen2ForCausalLM.from_pretrained(tmp_path / "llm").get_input_embeddings().weight.detach()
    # the same rows less their mean, one scale for the table: the LLM's mean token-row norm
    assert torch.allclose(c.mean(0), torch.zeros(c.shape[1]), atol=1e-5)
    assert torch.isclose(c.norm(dim=1).mean(), original.norm(dim=1).mean(), rtol=1e-4)
    scale = c.norm(dim=1).mean() / (t - t.mean(0)).norm(dim=1).mean()
    assert torch.allclose(c, (t - t.mean(0)) * scale, atol=1e-5)
    # mean-pooled rows share a direction; centring takes it away
    cos = lambda x: torch.nn.functional.cosine_similarity(x[:, None], x[None], dim=-1).mean()  # noqa: E731
    assert cos(c) < cos(t)
    assert set(ITEM_INITS) == {"text", "centered", "random"}


def test_unknown_item_init_is_refused(tiny_data, tmp_path):
    with pytest.raises(ValueError, match="unknown item_init 'words'; choose from text, centered, random"):
        TeacherConfig(item_init="words")
    with pytest.raises(ValueError, match="unknown item_init"):
        adapt_llm(tmp_path / "nowhere", tiny_data, max_len=20, item_init="words")


def test_pretrained_teacher_trains_through_the_same_path(tiny_data, tmp_path):
    _fake_llm(tmp_path / "llm", tiny_data)
    cfg = tiny_teacher_config().model_copy(update={"pretrained": str(tmp_path / "llm")})
    cfg.train.epochs = 1
    _, summary = train_teacher(tiny_data, cfg, tmp_path / "teacher")
    model, vocab = load_model(tmp_path / "teacher")
    assert summary["architecture"] == "qwen2" and vocab.same_as(tiny_data.vocab)
    assert recsys_meta(model).adapted_from.endswith("llm")


def _permute_rope(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's layout of q/k rows (what its converter writes; transformers undoes it on load)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_tiny_gguf(model: LlamaForCausalLM, path) -> None:
    """A real GGUF file (fp32 tensors, byte-level BPE tokenizer metadata) of a tiny Llama."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    tokens = [*bytes_to_unicode().values(), "Ġt", "Ġto", "Ġtoy"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_merges(["Ġ t", "Ġt o", "Ġto y"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    names = {"attn_norm": "input_layernorm", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_q.weight", _permute_rope(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", _permute_rope(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads))
        for short, hf in names.items():
            w.add_tensor(f"blk.{i}.{short}.weight", sd[p + hf + ".weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    pytest.importorskip("gguf")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    reference = LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    _write_tiny_gguf(reference, path)
    return path, reference


def test_gguf_file_loads_as_a_plain_savable_model(tiny_gguf, tmp_path):
    path, reference = tiny_gguf
    source = resolve_pretrained(path)
    assert source.gguf_file == path.name and source.directory == path.parent
    model, tokenizer = load_pretrained(source)
    assert type(model) is LlamaForCausalLM and getattr(model.config, "quantization_config", None) is None
    ids = torch.randint(0, 259, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)  # q/k layout undone exactly
    assert tokenizer(" toy", add_special_tokens=False)["input_ids"] == [258]  # the file's merges apply
    model.save_pretrained(tmp_path / "saved")  # a GGUF-loaded model refuses this; ours is plain
    assert LlamaForCausalLM.from_pretrained(tmp_path / "saved").config.num_hidden_layers == 2


def test_gguf_teacher_is_revocabularised(tiny_gguf, tiny_data):
    path, _ = tiny_gguf
    model = adapt_llm(path, tiny_data, max_len=20)
    assert model.config.vocab_size == tiny_data.vocab.size and len(decoder_parts(model).layers) == 2
    assert recsys_meta(model).adapted_from == str(path)


def test_packaged_llm_by_short_name(tiny_gguf, tmp_path, monkeypatch):
    """A short name finds the GGUF inside an installed package (located, never imported), checks
    its sha256, and names the install command when the package or file is missing."""
    path, _ = tiny_gguf
    pkg = tmp_path / "site" / "tiny_llm_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    shutil.copy(path, pkg / "tiny.gguf")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    monkeypatch.setitem(PACKAGED_LLMS, "tiny-llm", PackagedLLM("tiny_llm_pkg", "tiny.gguf", "pip install tiny-llm", digest))
    source = resolve_pretrained("tiny-llm")
    assert source.directory == pkg and source.gguf_file == "tiny.gguf" and source.label == "tiny-llm"
    monkeypatch.setitem(PACKAGED_LLMS, "tiny-llm", PackagedLLM("tiny_llm_pkg", "tiny.gguf", "pip install tiny-llm", "0" * 64))
    with pytest.raises(ArtifactError, match="sha256; reinstall with: pip install tiny-llm"):
        resolve_pretrained("tiny-llm")
    monkeypatch.setitem(PACKAGED_LLMS, "absent-llm", PackagedLLM("no_such_pkg_xyz", "x.gguf", "pip install absent"))
    with pytest.raises(ArtifactError, match="not installed; install it with: pip install absent"):
        resolve_pretrained("absent-llm")
    with pytest.raises(ArtifactError, match="no such GGUF file"):
        resolve_pretrained(tmp_path / "missing.gguf")
    with pytest.raises(ArtifactError, match="smollm2-135m"):  # the error lists the known names
        resolve_pretrained(tmp_path / "nowhere")


def test_cli_names_the_install_command_for_a_missing_llm(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(PACKAGED_LLMS, "absent-llm", PackagedLLM("no_such_pkg_xyz", "x.gguf", "pip install absent"))
    rc = main(["train-teacher", "--data", "ml-latest-small", "--out", str(tmp_path / "t"),
               "pretrained=absent-llm", "train.epochs=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "pip install absent" in err[0]
    assert not (tmp_path / "t").exists()
