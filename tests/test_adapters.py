"""Adapter files: what they hold, that they reproduce the model, and that bad files are refused
without touching the model. References are the original model's own outputs and tensors (kept
aside before saving) and counts computed by hand from the layer shapes."""
import copy
import hashlib
import json
import os

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lora_course import (AdapterError, load_adapter, lora_disabled, lora_state_dict, mark_only_lora_as_trainable,
                         merge_lora_, read_adapter, replace_linear_with_lora, save_adapter)
from lora_course.adapters import base_fingerprint, inspect_adapter, set_adapter_trainable
from lora_course.gpt import GPTConfig, GPTModel
from lora_course.training import make_classifier

CFG = GPTConfig(vocab_size=40, context_length=8, emb_dim=16, n_heads=2, n_layers=2)
TARGETS = ["W_query", "W_value", "ff.layers.0"]


def base_model(seed=0, cfg=CFG):
    torch.manual_seed(seed)
    return GPTModel(cfg).eval()


def adapted(base, seed=1, rank=2, alpha=4, scaling="alpha/rank"):
    """A 2-class classifier with LoRA on TARGETS; B and the head get random values (as if trained)."""
    model = make_classifier(base)
    replace_linear_with_lora(model, rank, alpha, scaling=scaling, target_modules=TARGETS)
    mark_only_lora_as_trainable(model, ["out_head"])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora.B") or name.startswith("out_head"):
                p.copy_(torch.randn(p.shape, generator=g))
    return model.eval()


def tokens(n=3):
    return torch.randint(0, CFG.vocab_size, (n, CFG.context_length), generator=torch.Generator().manual_seed(7))


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_round_trip_reproduces_outputs_exactly(tmp_path):
    base = base_model()
    model = adapted(base)
    path = tmp_path / "a.safetensors"
    save_adapter(model, path, modules_to_save=["out_head"])
    fresh = make_classifier(base)  # random head, no LoRA
    load_adapter(fresh, path)
    x = tokens()
    assert torch.equal(fresh(x), model(x))
    assert sum(p.requires_grad for p in fresh.parameters()) == 0  # frozen by default, like PEFT


def test_file_holds_exactly_the_adapter_and_head(tmp_path):
    model = adapted(base_model(), rank=3)
    path = tmp_path / "a.safetensors"
    save_adapter(model, path, modules_to_save=["out_head"])
    tensors, meta = read_adapter(path)
    d, r = CFG.emb_dim, 3
    # By hand: per block W_query, W_value (d -> d) and ff.layers.0 (d -> 4d); head d -> 2 with bias.
    expected_numel = CFG.n_layers * (r * (d + d) * 2 + r * (d + 4 * d)) + (2 * d + 2)
    assert sum(t.numel() for t in tensors.values()) == expected_numel
    assert tensors["trf_blocks.1.ff.layers.0.lora.A"].shape == (d, r)
    assert tensors["trf_blocks.1.ff.layers.0.lora.B"].shape == (r, 4 * d)
    assert set(meta["layers"]) == {f"trf_blocks.{i}.{t}" for i in range(CFG.n_layers)
                                   for t in ("att.W_query", "att.W_value", "ff.layers.0")}
    # The file is the float32 bytes plus a header of a few kB: nothing of the frozen base inside.
    assert 4 * expected_numel < os.path.getsize(path) < 4 * expected_numel + 16_000
    for key, value in model.state_dict().items():
        if key in tensors:
            assert torch.equal(tensors[key], value)
    rows = inspect_adapter(path)
    assert {row["key"] for row in rows} == set(tensors)
    assert all(row["norm"] > 0 for row in rows)


def test_lora_state_dict_keys_independent_of_naming_tricks():
    # A model with its own submodule called "linear" must keep that name in the base state.
    model = nn.Sequential()
    model.add_module("linear", nn.Linear(4, 4))
    model.add_module("head", nn.Linear(4, 2))
    replace_linear_with_lora(model, 1, 1, target_modules=["head"])
    assert set(lora_state_dict(model)) == {"head.lora.A", "head.lora.B"}
    assert set(lora_state_dict(model, ["linear"])) == {"head.lora.A", "head.lora.B", "linear.weight", "linear.bias"}


def test_fingerprint_ignores_lora_and_head_but_sees_every_base_weight():
    base = base_model()
    plain = make_classifier(base)
    reference = base_fingerprint(plain, exclude=["out_head"])
    model = adapted(base, seed=5)  # LoRA added, B and head changed
    assert base_fingerprint(model, exclude=["out_head"]) == reference
    with torch.no_grad():
        model.trf_blocks[0].att.W_query.linear.weight[0, 0] += 1e-6  # a frozen weight
    assert base_fingerprint(model, exclude=["out_head"]) != reference
    # Independent check of the digest itself: SHA-256 over a one-tensor model, written out here.
    tiny = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        tiny.weight.copy_(torch.tensor([[1.0, -2.0]]))
    digest = hashlib.sha256(b"weight:(1, 2):torch.float32" + tiny.weight.detach().numpy().tobytes()).hexdigest()
    assert base_fingerprint(tiny) == digest


def test_scalar_buffers_are_saved_and_checked(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4))
    model.register_buffer("temperature", torch.tensor(2.0))  # 0-d tensor
    replace_linear_with_lora(model, 2, 2)
    save_adapter(model, tmp_path / "a.safetensors")
    other = nn.Sequential(nn.Linear(4, 4))
    other.load_state_dict({"0.weight": model[0].weight, "0.bias": model[0].bias})
    other.register_buffer("temperature", torch.tensor(3.0))
    with pytest.raises(AdapterError, match="different base weights"):
        load_adapter(other, tmp_path / "a.safetensors")


def test_swapping_adapters_keeps_the_base_exact(tmp_path):
    base = base_model()
    first, second = adapted(base, seed=1), adapted(base, seed=2)
    save_adapter(first, tmp_path / "1.safetensors", ["out_head"])
    save_adapter(second, tmp_path / "2.safetensors", ["out_head"])
    x = tokens()
    model = make_classifier(base)
    load_adapter(model, tmp_path / "1.safetensors")
    assert torch.equal(model(x), first(x))
    load_adapter(model, tmp_path / "2.safetensors")
    assert torch.equal(model(x), second(x))
    load_adapter(model, tmp_path / "1.safetensors")
    assert torch.equal(model(x), first(x))
    with lora_disabled(model):
        assert torch.equal(model.features(x), base.features(x))


def test_trainable_flag_restores_exactly_the_adapter_parameters(tmp_path):
    model = adapted(base_model(), rank=2)
    save_adapter(model, tmp_path / "a.safetensors", ["out_head"])
    fresh = make_classifier(base_model())
    load_adapter(fresh, tmp_path / "a.safetensors", trainable=True)
    d = CFG.emb_dim
    expected = CFG.n_layers * (2 * 2 * (d + d) + 2 * (d + 4 * d)) + 2 * d + 2
    assert sum(p.numel() for p in fresh.parameters() if p.requires_grad) == expected


def test_set_adapter_trainable_freezes_all_or_keeps_exactly_lora_and_head():
    # Shared by load_adapter and peft_bridge.import_peft_adapter. Reference: parameter names.
    model = adapted(base_model())
    set_adapter_trainable(model, False, ["out_head"])
    assert not any(p.requires_grad for p in model.parameters())
    set_adapter_trainable(model, True, ["out_head"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for n, _ in model.named_parameters() if n.endswith((".lora.A", ".lora.B")) or n.startswith("out_head.")}
    assert trainable == expected and len(expected) == 2 * len(TARGETS) * CFG.n_layers + 2


def test_different_base_weights_refused_and_model_untouched(tmp_path):
    save_adapter(adapted(base_model(seed=0)), tmp_path / "a.safetensors", ["out_head"])
    other = make_classifier(base_model(seed=1))  # same shapes, other values
    before = snapshot(other)
    with pytest.raises(AdapterError, match="different base weights"):
        load_adapter(other, tmp_path / "a.safetensors")
    assert_unchanged(other, before)
    load_adapter(other, tmp_path / "a.safetensors", check_base_weights=False)  # explicit opt-out works


def test_different_architecture_refused(tmp_path):
    save_adapter(adapted(base_model()), tmp_path / "a.safetensors", ["out_head"])
    wider = make_classifier(base_model(cfg=GPTConfig(vocab_size=40, context_length=8, emb_dim=32, n_heads=2, n_layers=2)))
    before = snapshot(wider)
    with pytest.raises(AdapterError, match="different architecture"):
        load_adapter(wider, tmp_path / "a.safetensors")
    assert_unchanged(wider, before)
    lm = base_model()  # the LM head has vocab_size outputs, the adapter's head 2
    with pytest.raises(AdapterError, match="modules_to_save"):
        load_adapter(lm, tmp_path / "a.safetensors")


def test_non_linear_target_refused_before_any_change(tmp_path):
    class NotLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(4, 4))
            self.bias = nn.Parameter(torch.zeros(4))

    source = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    replace_linear_with_lora(source, 1, 1)
    save_adapter(source, tmp_path / "a.safetensors")
    target = nn.Sequential(nn.Linear(4, 4), NotLinear())
    target.load_state_dict({"0.weight": source[0].weight, "0.bias": source[0].bias,
                            "1.weight": source[1].weight, "1.bias": source[1].bias})
    before = snapshot(target)
    with pytest.raises(AdapterError, match="not an nn.Linear"):
        load_adapter(target, tmp_path / "a.safetensors")
    assert_unchanged(target, before)
    assert isinstance(target[0], nn.Linear)


@pytest.mark.parametrize("damage", ["truncate", "flip_tensor_byte", "edit_alpha", "garbage"])
def test_damaged_files_refused_and_model_untouched(tmp_path, damage):
    base = base_model()
    path = tmp_path / "a.safetensors"
    save_adapter(adapted(base), path, ["out_head"])
    raw = bytearray(path.read_bytes())
    header_len = int.from_bytes(raw[:8], "little")
    if damage == "truncate":
        raw = raw[: len(raw) - 100]
    elif damage == "flip_tensor_byte":
        raw[8 + header_len + 10] ^= 0xFF
    elif damage == "edit_alpha":  # valid file, metadata changed by hand: alpha 4 -> 8
        header = raw[8:8 + header_len].decode()
        edited = header.replace('\\"alpha\\": 4', '\\"alpha\\": 8')
        assert edited != header and len(edited) == len(header)
        raw[8:8 + header_len] = edited.encode()
    else:
        raw = bytearray(b"this is not a safetensors file")
    path.write_bytes(bytes(raw))
    model = make_classifier(base)
    before = snapshot(model)
    with pytest.raises(AdapterError, match="corrupted|truncated"):
        load_adapter(model, path)
    assert_unchanged(model, before)


def test_plain_safetensors_file_is_not_an_adapter(tmp_path):
    save_file({"x": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(AdapterError, match="not a lora_course adapter"):
        read_adapter(tmp_path / "x.safetensors")
    with pytest.raises(FileNotFoundError):
        read_adapter(tmp_path / "missing.safetensors")


def test_rank_mismatch_with_existing_lora_refused(tmp_path):
    base = base_model()
    save_adapter(adapted(base, rank=2), tmp_path / "a.safetensors", ["out_head"])
    model = adapted(base, rank=4, seed=3)
    before = snapshot(model)
    with pytest.raises(AdapterError, match="other layers or ranks"):
        load_adapter(model, tmp_path / "a.safetensors")
    assert_unchanged(model, before)


def test_nothing_to_save_and_bad_requests_give_clear_errors(tmp_path):
    plain = make_classifier(base_model())
    with pytest.raises(AdapterError, match="no LoRA layers"):
        save_adapter(plain, tmp_path / "a.safetensors")
    model = adapted(base_model())
    with pytest.raises(AdapterError, match="no module named 'head'"):
        save_adapter(model, tmp_path / "a.safetensors", modules_to_save=["head"])
    merged = copy.deepcopy(model)
    merge_lora_(merged)
    with pytest.raises(AdapterError, match="merged"):
        save_adapter(merged, tmp_path / "a.safetensors")
    assert not (tmp_path / "a.safetensors").exists()


def test_metadata_records_what_is_needed(tmp_path):
    model = adapted(base_model(), rank=2, alpha=3, scaling="alpha/sqrt(rank)")
    meta = save_adapter(model, tmp_path / "a.safetensors", ["out_head"])
    _, read_back = read_adapter(tmp_path / "a.safetensors")
    assert read_back == json.loads(json.dumps(meta))
    spec = read_back["layers"]["trf_blocks.0.ff.layers.0"]
    assert spec == {"rank": 2, "alpha": 3, "scaling": "alpha/sqrt(rank)", "in_features": 16, "out_features": 64}
    assert read_back["base_parameter_shapes"]["out_head.weight"] == [2, 16]
