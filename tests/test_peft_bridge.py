"""The bridge to PEFT, checked against the real ``peft`` package in both directions."""
import copy
import json

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict  # noqa: E402

from lora_course import (AdapterError, mark_only_lora_as_trainable, merge_and_unload,  # noqa: E402
                         replace_linear_with_lora, trainable_parameters)
from lora_course.gpt import GPTConfig, GPTModel  # noqa: E402
from lora_course.peft_bridge import (export_peft_adapter, import_peft_adapter, peft_alpha,  # noqa: E402
                                     peft_config_dict, peft_state_dict)
from lora_course.training import make_classifier  # noqa: E402

CFG = GPTConfig(vocab_size=40, context_length=8, emb_dim=16, n_heads=2, n_layers=2)
TARGETS = ["W_query", "W_value", "ff.layers.2"]


def classifier(seed=0):
    torch.manual_seed(seed)
    return make_classifier(GPTModel(CFG).eval()).eval()


def randomize(model, names=("lora.B", "out_head", "lora_B", "modules_to_save"), seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(n in name for n in names):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def tokens():
    return torch.randint(0, CFG.vocab_size, (4, CFG.context_length), generator=torch.Generator().manual_seed(3))


def course_model(base, rank=4, alpha=8, scaling="alpha/rank"):
    model = copy.deepcopy(base)
    replace_linear_with_lora(model, rank, alpha, scaling=scaling, target_modules=TARGETS)
    mark_only_lora_as_trainable(model, ["out_head"])
    return randomize(model).eval()


@pytest.mark.parametrize("scaling", ["alpha/rank", "alpha", "alpha/sqrt(rank)"])
def test_exported_adapter_loads_in_peft_and_matches(tmp_path, scaling):
    base = classifier()
    course = course_model(base, rank=4, alpha=6, scaling=scaling)
    export_peft_adapter(course, tmp_path, modules_to_save=["out_head"])
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    x = tokens()
    torch.testing.assert_close(peft_model(x), course(x), rtol=1e-5, atol=1e-5)
    lora_alpha, use_rslora = peft_alpha(4, 6, scaling)
    layer = peft_model.base_model.model.trf_blocks[0].att.W_query
    assert layer.scaling["default"] == pytest.approx(course.trf_blocks[0].att.W_query.lora.scaling)
    assert (layer.lora_alpha["default"], layer.use_rslora["default"]) == (lora_alpha, use_rslora)


def test_mixed_ranks_and_conventions_export(tmp_path):
    base = classifier()
    course = copy.deepcopy(base)
    replace_linear_with_lora(course, 4, 8, scaling="alpha", target_modules=["W_query"])
    replace_linear_with_lora(course, 2, 3, scaling="alpha/sqrt(rank)", target_modules=["ff.layers.0"])
    mark_only_lora_as_trainable(course, ["out_head"])
    randomize(course).eval()
    export_peft_adapter(course, tmp_path, ["out_head"])
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    x = tokens()
    torch.testing.assert_close(peft_model(x), course(x), rtol=1e-5, atol=1e-5)
    assert peft_model.base_model.model.trf_blocks[1].ff.layers[0].r["default"] == 2


def test_keys_shapes_and_config_match_what_peft_writes(tmp_path):
    base = classifier()
    course = course_model(base)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                                modules_to_save=["out_head"]))
    theirs = get_peft_model_state_dict(peft_model)
    ours = peft_state_dict(course, ["out_head"])
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    # Same trainable count as the course's own bookkeeping.
    assert trainable_parameters(peft_model) == trainable_parameters(course)
    # The config we write is one PEFT reads back with the values we meant.
    export_peft_adapter(course, tmp_path, ["out_head"])
    config = LoraConfig.from_pretrained(str(tmp_path))
    assert (config.r, config.lora_alpha, config.use_rslora) == (4, 8, False)
    assert set(config.target_modules) == {n for n, m in course.named_modules() if n.endswith(tuple(TARGETS)) and not n.endswith("linear")}
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == ["out_head"]


def test_copied_weights_give_same_outputs_and_same_merge(tmp_path):
    base = classifier()
    course = course_model(base)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                                modules_to_save=["out_head"]))
    result = set_peft_model_state_dict(peft_model, peft_state_dict(course, ["out_head"]))
    assert not [k for k in result.missing_keys if "lora_" in k] and not result.unexpected_keys
    peft_model.eval()
    x = tokens()
    torch.testing.assert_close(peft_model(x), course(x), rtol=1e-5, atol=1e-5)
    merged_peft = peft_model.merge_and_unload()
    merged_course = merge_and_unload(copy.deepcopy(course))
    torch.testing.assert_close(merged_peft.trf_blocks[1].ff.layers[2].weight,
                               merged_course.trf_blocks[1].ff.layers[2].weight, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_saved_adapter_imports_into_course_layers(tmp_path, use_rslora):
    base = classifier()
    config = LoraConfig(r=4, lora_alpha=6, target_modules=TARGETS, modules_to_save=["out_head"], use_rslora=use_rslora,
                        rank_pattern={"ff.layers.2": 2}, alpha_pattern={"ff.layers.2": 3})
    peft_model = randomize(get_peft_model(copy.deepcopy(base), config)).eval()
    peft_model.save_pretrained(tmp_path)
    course = copy.deepcopy(base)
    import_peft_adapter(course, tmp_path)
    x = tokens()
    torch.testing.assert_close(course(x), peft_model(x), rtol=1e-5, atol=1e-5)
    ff = course.trf_blocks[0].ff.layers[2]
    assert (ff.lora.rank, ff.lora.alpha) == (2, 3)
    assert trainable_parameters(course) == 0  # frozen by default, like PeftModel.from_pretrained
    fresh = copy.deepcopy(base)
    import_peft_adapter(fresh, tmp_path, trainable=True)
    assert trainable_parameters(fresh) == trainable_parameters(peft_model)


def test_round_trip_course_peft_course(tmp_path):
    base = classifier()
    course = course_model(base, scaling="alpha")
    export_peft_adapter(course, tmp_path, ["out_head"])
    back = copy.deepcopy(base)
    import_peft_adapter(back, tmp_path)
    x = tokens()
    torch.testing.assert_close(back(x), course(x), rtol=1e-6, atol=1e-6)


def test_unsupported_peft_options_refused_without_change(tmp_path):
    base = classifier()
    # a bias on the LoRA branch (lora_bias) is something the course's layer does not compute
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["W_query"], lora_bias=True))
    peft_model.save_pretrained(tmp_path)
    target = copy.deepcopy(base)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(AdapterError, match="lora_bias"):
        import_peft_adapter(target, tmp_path)
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in before.items())
    assert isinstance(target.trf_blocks[0].att.W_query, nn.Linear)


def test_adapter_for_other_architecture_refused(tmp_path):
    base = classifier()
    export_peft_adapter(course_model(base), tmp_path, ["out_head"])
    torch.manual_seed(0)
    wider = make_classifier(GPTModel(GPTConfig(vocab_size=40, context_length=8, emb_dim=32, n_heads=2, n_layers=2)))
    with pytest.raises(AdapterError, match="do not fit"):
        import_peft_adapter(wider, tmp_path)
    torch.manual_seed(0)
    deeper_cfg = GPTConfig(vocab_size=40, context_length=8, emb_dim=16, n_heads=2, n_layers=1)
    with pytest.raises(AdapterError, match="does not have"):
        import_peft_adapter(make_classifier(GPTModel(deeper_cfg)), tmp_path)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        import_peft_adapter(copy.deepcopy(base), tmp_path / "nowhere")


def test_export_errors():
    base = classifier()
    with pytest.raises(AdapterError, match="no LoRA layers"):
        export_peft_adapter(base, "/nonexistent")
    course = copy.deepcopy(base)
    replace_linear_with_lora(course, 2, 2, target_modules=["W_query"], dropout=0.1)
    replace_linear_with_lora(course, 2, 2, target_modules=["W_value"], dropout=0.2)
    with pytest.raises(AdapterError, match="one lora_dropout"):
        peft_config_dict(course)


def test_dropout_is_exported():
    course = copy.deepcopy(classifier())
    replace_linear_with_lora(course, 2, 2, target_modules=["W_query"], dropout=0.1)
    assert peft_config_dict(course)["lora_dropout"] == 0.1


def test_rank_above_min_in_out_is_accepted_and_counted_as_peft_does(tmp_path):
    # Appendix E puts rank 16 on the new 768 -> 2 head; PEFT accepts it and trains 16·(768 + 2).
    from lora_course.errors import RankAboveMatrixRankWarning

    torch.manual_seed(0)
    base = nn.Sequential()
    base.add_module("head", nn.Linear(768, 2))
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=16, lora_alpha=16, target_modules=["head"]))
    peft_trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert peft_trainable == 16 * (768 + 2) == 12_320
    course = copy.deepcopy(base)
    with pytest.warns(RankAboveMatrixRankWarning, match=r"layer 'head' \(768 -> 2\)"):
        replace_linear_with_lora(course, rank=16, alpha=16)
    assert mark_only_lora_as_trainable(course) == peft_trainable
    randomize(course, names=("lora.B",))
    export_peft_adapter(course, tmp_path / "r16")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "r16").eval()
    x = torch.randn(3, 768)
    torch.testing.assert_close(loaded(x), course(x), rtol=1e-5, atol=1e-5)


def _peft_dora(base, tmp_path):
    """A real PEFT DoRA adapter with B and the magnitudes moved away from their initial values."""
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS,
                                                                 use_dora=True, modules_to_save=["out_head"]))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_magnitude_vector" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    peft_model.save_pretrained(tmp_path)
    return peft_model.eval()


def test_peft_dora_adapter_imports_and_computes_the_same(tmp_path):
    from lora_course.variants import LinearWithDoRA
    base = classifier()
    reference = _peft_dora(base, tmp_path)
    course = copy.deepcopy(base)
    import_peft_adapter(course, tmp_path)
    assert isinstance(course.trf_blocks[0].att.W_query, LinearWithDoRA)
    x = tokens()
    torch.testing.assert_close(course.eval()(x), reference(x), rtol=1e-5, atol=1e-5)


def test_course_dora_exports_to_peft_and_back(tmp_path):
    base = classifier()
    _peft_dora(base, tmp_path / "peft")
    course = copy.deepcopy(base)
    import_peft_adapter(course, tmp_path / "peft")
    export_peft_adapter(course, tmp_path / "course", modules_to_save=["out_head"])
    config = json.loads((tmp_path / "course" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "course").eval()
    x = tokens()
    torch.testing.assert_close(reloaded(x), course.eval()(x), rtol=1e-5, atol=1e-5)
