"""The GPT-2 loader (lora_course.gpt2) against transformers' own GPT2LMHeadModel: random weights
saved exactly as a download holds them (``save_pretrained(safe_serialization=True)``), loaded
into the course's book-style GPTModel, equal logits. No download: the weights are random, the
shapes are real. Every malformed input gets its own test of the error message."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_course.gpt import GPTConfig, GPTModel, save_gpt
from lora_course.gpt2 import (GPT2FormatError, config_from_hf, convert_gpt2_state_dict, gpt2_shapes, load_gpt2,
                              read_hf_config)

transformers = pytest.importorskip("transformers")

SMALL = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32)


def _save_hf(path, **config):
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config)).eval()
    model.save_pretrained(path, safe_serialization=True)
    return model


def _max_logit_difference(hf_model, course_model, vocab, length, seed=1):
    ids = torch.randint(vocab, (2, length), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return (hf_model(ids).logits - course_model(ids)).abs().max().item()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A small random GPT-2 saved by transformers, and the model that saved it."""
    path = tmp_path_factory.mktemp("gpt2-small-random")
    return path, _save_hf(path, **SMALL)


def _variant(src, dst, edit_tensors=None, edit_config=None):
    """Copy a saved GPT-2 folder to ``dst``, changing its tensors and/or its config."""
    dst.mkdir()
    tensors = load_file(str(src / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    if edit_tensors:
        tensors = edit_tensors(tensors)
    if edit_config:
        edit_config(config)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / "model.safetensors"))
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_small_gpt2_logits_equal_transformers(small):
    path, hf_model = small
    model = load_gpt2(path)
    assert not model.training
    assert _max_logit_difference(hf_model, model, SMALL["vocab_size"], SMALL["n_positions"]) <= 1e-4
    # The head is an untied copy of the token embedding (the book's layout).
    assert torch.equal(model.out_head.weight, model.tok_emb.weight)
    assert model.out_head.weight.data_ptr() != model.tok_emb.weight.data_ptr()
    assert model.cfg == GPTConfig(vocab_size=100, context_length=32, emb_dim=64, n_heads=4, n_layers=2,
                                  drop_rate=0.0, qkv_bias=True)


def test_conv1d_transpose_and_qkv_split(small):
    """The converter by hand, on one block, against HF's own Conv1D modules."""
    path, hf_model = small
    model = load_gpt2(path)
    block = hf_model.transformer.h[0]
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        q, k, v = block.attn.c_attn(x).split(64, dim=-1)  # Conv1D: x @ W (64 x 192) + b
        att = model.trf_blocks[0].att
        assert torch.allclose(att.W_query(x), q, atol=1e-6)
        assert torch.allclose(att.W_key(x), k, atol=1e-6)
        assert torch.allclose(att.W_value(x), v, atol=1e-6)
        assert torch.allclose(model.trf_blocks[0].ff.layers[0](x), block.mlp.c_fc(x), atol=1e-6)


@pytest.mark.parametrize("prefix", ["", "model.decoder."])
def test_other_key_prefixes_load(small, tmp_path, prefix):
    """A download of openai-community/gpt2 has no 'transformer.' prefix; other tools add others."""
    path, hf_model = small
    rename = lambda ts: {prefix + k.removeprefix("transformer."): v for k, v in ts.items()}  # noqa: E731
    model = load_gpt2(_variant(path, tmp_path / "renamed", edit_tensors=rename))
    assert _max_logit_difference(hf_model, model, SMALL["vocab_size"], 16) <= 1e-4


def test_conversion_does_not_modify_its_input(small):
    path, _ = small
    tensors = load_file(str(path / "model.safetensors"))
    before = {k: v.clone() for k, v in tensors.items()}
    cfg = config_from_hf(read_hf_config(path / "config.json"))
    convert_gpt2_state_dict(tensors, cfg)
    assert all(torch.equal(before[k], tensors[k]) for k in before)


@pytest.mark.slow
def test_real_124m_shape_logits_equal_transformers(tmp_path):
    """GPT-2 small at its real shape (124,439,808 parameters, random weights): about 10 s and
    1.5 GB of RAM on a 2-core laptop, most of it building the two models."""
    hf_model = _save_hf(tmp_path)  # GPT2Config() defaults are GPT-2 small
    assert sum(p.numel() for p in hf_model.parameters()) == 124_439_808
    ids = torch.randint(50257, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf_model(ids).logits
    del hf_model
    model = load_gpt2(tmp_path)
    with torch.no_grad():
        assert (model(ids) - expected).abs().max().item() <= 1e-4
    # the book's untied layout: one more 50257 x 768 matrix
    assert sum(p.numel() for p in model.parameters()) == 163_037_184 == 124_439_808 + 50257 * 768


# --------------------------------------------------------------------------------------------
# Clear errors
# --------------------------------------------------------------------------------------------
def test_folder_without_files_says_which_files_and_where(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"has no config\.json and no model\.safetensors.*huggingface\.co"):
        load_gpt2(tmp_path)
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        load_gpt2(tmp_path / "nowhere")


def test_pickle_only_folder_is_refused(tmp_path, small):
    shutil.copy(small[0] / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match=r"pytorch_model\.bin is a pickle file"):
        load_gpt2(tmp_path)


def test_course_checkpoint_is_recognised(tmp_path, small):
    shutil.copy(small[0] / "config.json", tmp_path / "config.json")
    save_gpt(GPTModel(GPTConfig(vocab_size=100)), tmp_path / "model.safetensors")
    with pytest.raises(GPT2FormatError, match=r"model\.safetensors is not a GPT-2 checkpoint: it is a lora_course"):
        load_gpt2(tmp_path)


def test_bert_like_file_is_recognised(tmp_path, small):
    shutil.copy(small[0] / "config.json", tmp_path / "config.json")
    save_file({"embeddings.word_embeddings.weight": torch.zeros(100, 64),
               "encoder.layer.0.attention.self.query.weight": torch.zeros(64, 64)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(GPT2FormatError, match="not a GPT-2 checkpoint: .*BERT-like"):
        load_gpt2(tmp_path)


def test_bert_config_is_refused(tmp_path, small):
    path = _variant(small[0], tmp_path / "bert", edit_config=lambda c: c.update(model_type="bert"))
    with pytest.raises(GPT2FormatError, match=r"config\.json describes a 'bert' model, not GPT-2"):
        load_gpt2(path)


def test_missing_tensor_is_named(tmp_path, small):
    drop = lambda ts: {k: v for k, v in ts.items() if k != "transformer.h.1.mlp.c_fc.bias"}  # noqa: E731
    with pytest.raises(GPT2FormatError, match=r"missing the tensor 'transformer\.h\.1\.mlp\.c_fc\.bias'"):
        load_gpt2(_variant(small[0], tmp_path / "missing", edit_tensors=drop))


def test_config_that_disagrees_with_the_tensors(tmp_path, small):
    path = _variant(small[0], tmp_path / "deeper", edit_config=lambda c: c.update(n_layer=3))
    with pytest.raises(GPT2FormatError, match=r"disagree: .*config\.json says n_layer = 3, but the tensors .* n_layer = 2"):
        load_gpt2(path)


def test_checkpoint_of_another_shape(tmp_path, small):
    """The 124M config.json beside the small weights: every size disagrees; the first is named."""
    path = _variant(small[0], tmp_path / "other", edit_config=lambda c: c.update(n_embd=768, vocab_size=50257))
    with pytest.raises(GPT2FormatError, match=r"says vocab_size = 50257, but the tensors .* vocab_size = 100"):
        load_gpt2(path)


def test_one_tensor_of_the_wrong_shape(tmp_path, small):
    def narrow(ts):
        ts["transformer.h.0.attn.c_attn.weight"] = ts["transformer.h.0.attn.c_attn.weight"][:, :128]
        return ts

    with pytest.raises(GPT2FormatError, match=r"'transformer\.h\.0\.attn\.c_attn\.weight' has shape \(64, 128\), "
                                              r"but a GPT-2 of this .* needs \(64, 192\)"):
        load_gpt2(_variant(small[0], tmp_path / "narrow", edit_tensors=narrow))


def test_unexpected_tensor_is_named(tmp_path, small):
    extra = lambda ts: {**ts, "transformer.h.0.attn.adapter": torch.zeros(3)}  # noqa: E731
    with pytest.raises(GPT2FormatError, match=r"has a tensor 'h\.0\.attn\.adapter' that GPT-2 does not have"):
        load_gpt2(_variant(small[0], tmp_path / "extra", edit_tensors=extra))


def test_damaged_files(tmp_path, small):
    shutil.copy(small[0] / "config.json", tmp_path / "config.json")
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(GPT2FormatError, match="not a readable safetensors file"):
        load_gpt2(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(GPT2FormatError, match=r"config\.json is not a JSON file"):
        load_gpt2(tmp_path)


def test_unsupported_settings_are_refused():
    base = {"model_type": "gpt2", **SMALL}
    with pytest.raises(GPT2FormatError, match="activation_function = 'relu'"):
        config_from_hf({**base, "activation_function": "relu"})
    with pytest.raises(GPT2FormatError, match="n_inner = 100"):
        config_from_hf({**base, "n_inner": 100})
    with pytest.raises(GPT2FormatError, match="has no n_head"):
        config_from_hf({k: v for k, v in base.items() if k != "n_head"})


def test_expected_shapes_count_gpt2_small():
    cfg = config_from_hf({"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024,
                          "vocab_size": 50257})
    shapes = gpt2_shapes(cfg)
    assert len(shapes) == 4 + 12 * 12
    total = sum(torch.Size(s).numel() for s in shapes.values())
    assert total == 124_439_808  # GPT-2 small's published count (tied head: no extra matrix)
