"""rsLoRA, LoRA+, DoRA, PiSSA and VeRA held against PEFT on the same weights (offline, CPU)."""
import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, VeraConfig, get_peft_model  # noqa: E402
from peft.optimizers import create_loraplus_optimizer as peft_create_loraplus_optimizer  # noqa: E402

from lora_course.gpt import GPTConfig, GPTModel  # noqa: E402
from lora_course.lora import (LinearWithLoRA, lora_layers, mark_only_lora_as_trainable, merge_and_unload,  # noqa: E402
                              merge_lora_, unmerge_lora_)
from lora_course.training import make_classifier  # noqa: E402
from lora_course.variants import (VARIANT_NOTES, LinearWithDoRA, LinearWithPiSSA, LinearWithVeRA,  # noqa: E402
                                  create_loraplus_optimizer, effective_weight, loraplus_param_groups,
                                  magnitude_direction_change, pissa_factors, pissa_to_lora,
                                  replace_linear_with_variant, scaling_by_rank, vera_projections)

CFG = GPTConfig(vocab_size=40, context_length=8, emb_dim=16, n_heads=2, n_layers=2)
GPT_TARGETS = ["W_query", "W_value", "ff.layers.2"]
STACK_TARGETS = ["0", "2"]


def stack(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 8)).eval()


def gpt(seed=0):
    torch.manual_seed(seed)
    return make_classifier(GPTModel(CFG).eval()).eval()


def stack_input():
    return torch.randn(6, 12, generator=torch.Generator().manual_seed(5))


def gpt_input():
    return torch.randint(0, CFG.vocab_size, (4, CFG.context_length), generator=torch.Generator().manual_seed(3))


def peft_layer(peft_model, name):
    return peft_model.base_model.model.get_submodule(name)


def perturb(peft_model, keys=("lora_B", "lora_magnitude_vector", "vera_lambda"), seed=1):
    """Move the adapter away from its init (B = 0 would hide every difference)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if any(k in name for k in keys):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return peft_model


def copy_lora_from_peft(course, peft_model, names):
    """PEFT stores lora_A.weight = Aᵀ (r × in), lora_B.weight = Bᵀ (out × r)."""
    with torch.no_grad():
        for name in names:
            theirs, ours = peft_layer(peft_model, name), course.get_submodule(name)
            ours.lora.A.copy_(theirs.lora_A["default"].weight.T)
            ours.lora.B.copy_(theirs.lora_B["default"].weight.T)
            if isinstance(ours, LinearWithDoRA):
                ours.lora.magnitude.copy_(theirs.lora_magnitude_vector["default"].weight)


def adapted_names(model):
    return [name for name, _ in lora_layers(model)]


def adam_steps(model, x, steps=3, lr=0.05):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    for _ in range(steps):
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


# --------------------------------------------------------------------------------------------
# rsLoRA
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make,x_fn,targets", [(stack, stack_input, STACK_TARGETS), (gpt, gpt_input, GPT_TARGETS)])
def test_rslora_matches_peft_use_rslora(make, x_fn, targets):
    base = make()
    theirs = perturb(get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=6, target_modules=targets,
                                                                  use_rslora=True))).eval()
    ours = copy.deepcopy(base)
    replace_linear_with_variant(ours, "rslora", 4, 6, target_modules=targets)
    names = adapted_names(ours)
    copy_lora_from_peft(ours, theirs, names)
    for name in names:
        assert ours.get_submodule(name).lora.scaling == pytest.approx(peft_layer(theirs, name).scaling["default"])
        assert ours.get_submodule(name).lora.scaling == pytest.approx(6 / 2)  # α/√r = 6/√4
    x = x_fn()
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    merged_theirs, merged_ours = theirs.merge_and_unload(), merge_and_unload(ours)
    for name in names:
        torch.testing.assert_close(merged_ours.get_submodule(name).weight, merged_theirs.get_submodule(name).weight,
                                   rtol=1e-5, atol=1e-5)


def test_scaling_by_rank_grows_like_sqrt_rank():
    rows = scaling_by_rank([1, 4, 16, 64], alpha=16)
    for row in rows:
        assert row["alpha/sqrt(rank)"] / row["alpha/rank"] == pytest.approx(math.sqrt(row["rank"]))


# --------------------------------------------------------------------------------------------
# DoRA
# --------------------------------------------------------------------------------------------
def dora_pair(make, targets, rank=3, alpha=5, dropout=0.0):
    base = make()
    theirs = perturb(get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets,
                                                                  use_dora=True, lora_dropout=dropout)))
    ours = copy.deepcopy(base)
    replace_linear_with_variant(ours, "dora", rank, alpha, target_modules=targets, dropout=dropout)
    copy_lora_from_peft(ours, theirs, adapted_names(ours))
    return base, theirs.eval(), ours.eval()


@pytest.mark.parametrize("make,x_fn,targets", [(stack, stack_input, STACK_TARGETS), (gpt, gpt_input, GPT_TARGETS)])
def test_dora_outputs_and_merged_weights_match_peft(make, x_fn, targets):
    _, theirs, ours = dora_pair(make, targets)
    x = x_fn()
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    names = adapted_names(ours)
    for name in names:  # PEFT's magnitude starts at ‖W‖ per output row too (checked on a fresh model below)
        assert ours.get_submodule(name).lora.magnitude.shape == (ours.get_submodule(name).out_features,)
    merged_theirs, merged_ours = theirs.merge_and_unload(), merge_and_unload(copy.deepcopy(ours))
    for name in names:
        torch.testing.assert_close(merged_ours.get_submodule(name).weight, merged_theirs.get_submodule(name).weight,
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(effective_weight(ours.get_submodule(name)), merged_theirs.get_submodule(name).weight,
                                   rtol=1e-5, atol=1e-5)


def test_dora_init_equals_peft_and_leaves_the_model_unchanged():
    base = stack()
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=3, lora_alpha=5, target_modules=STACK_TARGETS,
                                                           use_dora=True))
    ours = copy.deepcopy(base)
    replace_linear_with_variant(ours, "dora", 3, 5, target_modules=STACK_TARGETS)
    for name in STACK_TARGETS:
        torch.testing.assert_close(ours.get_submodule(name).lora.magnitude,
                                   peft_layer(theirs, name).lora_magnitude_vector["default"].weight)
    x = stack_input()
    torch.testing.assert_close(ours(x), base(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("make,x_fn,targets", [(stack, stack_input, STACK_TARGETS), (gpt, gpt_input, GPT_TARGETS)])
def test_dora_gradients_and_training_steps_match_peft(make, x_fn, targets):
    """Equal gradients for A, B and m: this is what fails if the norm is not detached (§4.3)."""
    _, theirs, ours = dora_pair(make, targets)
    mark_only_lora_as_trainable(ours)
    x = x_fn()
    theirs(x).pow(2).mean().backward()
    ours(x).pow(2).mean().backward()
    for name in adapted_names(ours):
        t, o = peft_layer(theirs, name), ours.get_submodule(name)
        torch.testing.assert_close(o.lora.A.grad, t.lora_A["default"].weight.grad.T, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(o.lora.B.grad, t.lora_B["default"].weight.grad.T, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(o.lora.magnitude.grad, t.lora_magnitude_vector["default"].weight.grad,
                                   rtol=1e-4, atol=1e-6)
    theirs.zero_grad()
    ours.zero_grad()
    adam_steps(theirs, x)
    adam_steps(ours, x)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_dora_gradient_differs_when_the_norm_is_not_detached():
    """The check above can fail: with the norm inside the graph, A gets another gradient."""
    _, _, ours = dora_pair(stack, STACK_TARGETS)
    layer = ours.get_submodule("0")
    x = stack_input()
    layer(x).pow(2).sum().backward()
    detached = layer.lora.A.grad.clone()
    layer.zero_grad()
    w = layer.linear.weight + layer.lora.delta_weight()
    out = (layer.lora.magnitude / torch.linalg.norm(w, dim=1)) * (x @ w.T) + layer.linear.bias
    out.pow(2).sum().backward()
    assert (layer.lora.A.grad - detached).abs().max() > 1e-4


def test_dora_dropout_placement_matches_peft_in_training():
    _, theirs, ours = dora_pair(stack, STACK_TARGETS, dropout=0.4)
    theirs.train()
    ours.train()
    x = stack_input()
    torch.manual_seed(11)
    out_theirs = theirs(x)
    torch.manual_seed(11)
    out_ours = ours(x)
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-5, atol=1e-5)
    ours.eval()
    theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)  # off at eval


def test_dora_merge_then_unmerge_round_trips():
    _, _, ours = dora_pair(stack, STACK_TARGETS)
    x = stack_input()
    before, weights = ours(x), [ours.get_submodule(n).linear.weight.clone() for n in STACK_TARGETS]
    assert merge_lora_(ours) == 2
    torch.testing.assert_close(ours(x), before, rtol=1e-5, atol=1e-5)
    unmerge_lora_(ours)
    for name, w in zip(STACK_TARGETS, weights):
        torch.testing.assert_close(ours.get_submodule(name).linear.weight, w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours(x), before, rtol=1e-5, atol=1e-5)


def test_dora_refuses_a_zero_norm_row_and_changes_nothing():
    model = stack()
    with torch.no_grad():
        model[2].weight[3].zero_()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"layer '2'.*1 row\(s\) of norm 0 \(rows \[3\]\)"):
        replace_linear_with_variant(model, "dora", 2, 4)
    assert not adapted_names(model)  # layer "0" was checked fine but not wrapped either
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    with pytest.raises(ValueError, match="norm 0"):
        LinearWithDoRA(model[2], 2, 4)


# --------------------------------------------------------------------------------------------
# PiSSA
# --------------------------------------------------------------------------------------------
def pissa_delta_peft(layer):
    """s·B_w·A_w in PEFT's layout, (out × in)."""
    return layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight


@pytest.mark.parametrize("make,x_fn,targets", [(stack, stack_input, STACK_TARGETS), (gpt, gpt_input, GPT_TARGETS)])
def test_pissa_init_matches_peft(make, x_fn, targets):
    base = make()
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=3, lora_alpha=5, target_modules=targets,
                                                           init_lora_weights="pissa")).eval()
    ours = copy.deepcopy(base)
    replace_linear_with_variant(ours, "pissa", 3, 5, target_modules=targets)
    for name in adapted_names(ours):
        t, o = peft_layer(theirs, name), ours.get_submodule(name)
        torch.testing.assert_close(o.lora.delta_weight(), pissa_delta_peft(t), rtol=1e-5, atol=1e-6)  # ΔW₀
        torch.testing.assert_close(o.linear.weight, t.base_layer.weight, rtol=1e-5, atol=1e-6)  # residual
        # ΔW₀ is W's best rank-3 part (Eckart–Young), independent of the sign convention of the SVD.
        u, s, vh = np.linalg.svd(base.get_submodule(name).weight.detach().double().numpy(), full_matrices=False)
        np.testing.assert_allclose(o.lora.delta_weight().detach().numpy(), (u[:, :3] * s[:3]) @ vh[:3], atol=1e-5)
    x = x_fn()
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours(x), base(x), rtol=1e-5, atol=1e-5)  # unchanged at step 0


def test_pissa_training_matches_peft():
    base = stack()
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=3, lora_alpha=5, target_modules=STACK_TARGETS,
                                                           init_lora_weights="pissa"))
    ours = copy.deepcopy(base)
    replace_linear_with_variant(ours, "pissa", 3, 5, target_modules=STACK_TARGETS)
    mark_only_lora_as_trainable(ours)
    copy_lora_from_peft(ours, theirs, STACK_TARGETS)  # identical factors, signs included
    x = stack_input()
    adam_steps(theirs.train(), x)
    adam_steps(ours.train(), x)
    torch.testing.assert_close(ours.eval()(x), theirs.eval()(x), rtol=1e-5, atol=1e-5)


def test_pissa_to_lora_matches_peft_conversion_on_the_original_base(tmp_path):
    """PEFT's path_initial_model_for_weight_conversion and ours give the same plain LoRA."""
    base = stack()
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=3, lora_alpha=5, target_modules=STACK_TARGETS,
                                                           init_lora_weights="pissa"))
    theirs.peft_config["default"].init_lora_weights = True  # PEFT's recipe: save the initial adapter as plain
    theirs.save_pretrained(tmp_path / "init")
    ours = copy.deepcopy(base)
    replace_linear_with_variant(ours, "pissa", 3, 5, target_modules=STACK_TARGETS)
    mark_only_lora_as_trainable(ours)
    copy_lora_from_peft(ours, theirs, STACK_TARGETS)
    x = stack_input()
    adam_steps(theirs.train(), x)
    adam_steps(ours.train(), x)
    theirs.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    peft_plain = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora").eval()

    original = copy.deepcopy(base)
    original_state = copy.deepcopy(original.state_dict())
    converted = pissa_to_lora(ours.eval(), base_model=original)
    assert converted is original
    for name in STACK_TARGETS:
        layer = original.get_submodule(name)
        assert type(layer) is LinearWithLoRA and layer.lora.rank == 6
        assert torch.equal(layer.linear.weight, original_state[f"{name}.weight"])  # the original W, untouched
        assert layer.lora.scaling == pytest.approx(ours.get_submodule(name).lora.scaling)
    torch.testing.assert_close(original(x), ours(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(original(x), peft_plain(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(peft_plain(x), theirs.eval()(x), rtol=1e-5, atol=1e-5)


def test_pissa_to_lora_in_place_rebuilds_the_original_weights():
    base = stack()
    model = copy.deepcopy(base)
    replace_linear_with_variant(model, "pissa", 2, 2, scaling="alpha/sqrt(rank)")
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora.B.add_(0.1)
    x = stack_input()
    expected = model(x)
    pissa_to_lora(model)
    for name in STACK_TARGETS:
        layer = model.get_submodule(name)
        assert type(layer) is LinearWithLoRA and layer.lora.rank == 4
        torch.testing.assert_close(layer.linear.weight, base.get_submodule(name).weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_pissa_refuses_a_rank_above_the_matrix_rank_and_changes_nothing():
    model = stack()
    with torch.no_grad():  # layer 2 has rank 2 (8 × 10 = (8 × 2)(2 × 10))
        model[2].weight.copy_(torch.randn(8, 2) @ torch.randn(2, 10))
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"layer '2'.*rank 3 is above the rank of this weight \(2 nonzero"):
        replace_linear_with_variant(model, "pissa", 3, 3)
    assert not adapted_names(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    with pytest.raises(ValueError, match="above the rank"):
        pissa_factors(model[2].weight, 3, 1.0)


def test_pissa_to_lora_errors_change_nothing():
    model = stack()
    replace_linear_with_variant(model, "pissa", 3, 3)
    with pytest.raises(ValueError, match="no PiSSA layers"):
        pissa_to_lora(stack())
    wrong_base = stack(seed=9)
    wrong_state = copy.deepcopy(wrong_base.state_dict())
    with pytest.raises(ValueError, match="does not hold the weight PiSSA started from"):
        pissa_to_lora(model, base_model=wrong_base)
    assert all(torch.equal(v, wrong_base.state_dict()[k]) for k, v in wrong_state.items())
    assert not adapted_names(wrong_base)
    wide = nn.Sequential(nn.Linear(12, 10))
    replace_linear_with_variant(wide, "pissa", 6, 6)  # 2·6 = 12 > min(12, 10)
    with pytest.raises(ValueError, match="rank 2·6 = 12, above min"):
        pissa_to_lora(wide)
    assert isinstance(wide[0], LinearWithPiSSA)


# --------------------------------------------------------------------------------------------
# VeRA
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make,x_fn,targets", [(stack, stack_input, STACK_TARGETS), (gpt, gpt_input, GPT_TARGETS)])
def test_vera_matches_peft(make, x_fn, targets):
    base = make()
    theirs = get_peft_model(copy.deepcopy(base), VeraConfig(r=6, target_modules=targets, projection_prng_key=7))
    ours = copy.deepcopy(base)
    replace_linear_with_variant(ours, "vera", 6, target_modules=targets, seed=7)
    names = adapted_names(ours)
    first = ours.get_submodule(names[0]).lora
    assert torch.equal(first.A, theirs.base_model.vera_A["default"].T)  # the shared projections, bit for bit
    assert torch.equal(first.B, theirs.base_model.vera_B["default"].T)
    x = x_fn()
    torch.testing.assert_close(ours(x), base(x))  # λ_b = 0 at step 0
    perturb(theirs)
    with torch.no_grad():
        for name in names:
            t, o = peft_layer(theirs, name), ours.get_submodule(name)
            assert o.lora.A is first.A  # shared, not copied
            o.lora.lambda_d.copy_(t.vera_lambda_d["default"])
            o.lora.lambda_b.copy_(t.vera_lambda_b["default"])
    torch.testing.assert_close(ours(x), theirs.eval()(x), rtol=1e-5, atol=1e-5)
    mark_only_lora_as_trainable(ours)
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == theirs.get_nb_trainable_parameters()[0]
    merged_theirs, merged_ours = theirs.merge_and_unload(), merge_and_unload(ours)
    for name in names:
        torch.testing.assert_close(merged_ours.get_submodule(name).weight, merged_theirs.get_submodule(name).weight,
                                   rtol=1e-5, atol=1e-6)


def test_vera_init_values_and_first_gradient():
    a, b = vera_projections(12, 10, 4, seed=0)
    assert a.shape == (12, 4) and b.shape == (4, 10)
    model = stack()
    replace_linear_with_variant(model, "vera", 4)
    layer = model[0]
    assert torch.equal(layer.lora.A, a[:12]) and torch.equal(layer.lora.lambda_d, torch.full((4,), 0.1))
    assert torch.equal(layer.lora.lambda_b, torch.zeros(10))
    mark_only_lora_as_trainable(model)
    model(stack_input()).sum().backward()
    assert layer.lora.lambda_b.grad.abs().sum() > 0 and layer.lora.lambda_d.grad.abs().sum() == 0  # like B = 0
    assert "lora.A" not in model.state_dict() and not any(k.endswith("lora.A") for k in model.state_dict())


# --------------------------------------------------------------------------------------------
# LoRA+
# --------------------------------------------------------------------------------------------
def norm_model():
    torch.manual_seed(0)  # an nn.LayerNorm (no weight decay in PEFT's rule) and a trained head with a bias
    return nn.Sequential(nn.Linear(12, 10), nn.LayerNorm(10), nn.Linear(10, 8), nn.Linear(8, 3))


def peft_name(course_name):
    """A course parameter name as PEFT writes it for the same layer."""
    for ours, theirs in ((".lora.A", ".lora_A.default.weight"), (".lora.B", ".lora_B.default.weight"),
                         (".lora.magnitude", ".lora_magnitude_vector.default.weight")):
        if course_name.endswith(ours):
            return "base_model.model." + course_name[: -len(ours)] + theirs
    module, _, param = course_name.rpartition(".")
    return f"base_model.model.{module}.modules_to_save.default.{param}"


@pytest.mark.parametrize("use_dora", [False, True])
def test_loraplus_groups_equal_peft_on_the_same_peft_model(use_dora):
    theirs_model = get_peft_model(norm_model(), LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"],
                                                           use_dora=use_dora, modules_to_save=["1", "3"]))
    theirs = peft_create_loraplus_optimizer(theirs_model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16,
                                            loraplus_weight_decay=0.01)
    ours = create_loraplus_optimizer(theirs_model, torch.optim.AdamW, lr=1e-3, ratio=16, weight_decay=0.01)
    assert len(ours.param_groups) == len(theirs.param_groups) == 4
    for g_ours, g_theirs in zip(ours.param_groups, theirs.param_groups):
        assert [id(p) for p in g_ours["params"]] == [id(p) for p in g_theirs["params"]]
        assert (g_ours["lr"], g_ours["weight_decay"]) == pytest.approx((g_theirs["lr"], g_theirs["weight_decay"]))
    assert theirs.param_groups[2]["lr"] == pytest.approx(16e-3) and theirs.param_groups[3]["params"]  # not vacuous


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_loraplus_groups_on_the_course_model_match_peft_by_name(variant):
    theirs_model = get_peft_model(norm_model(), LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"],
                                                           use_dora=variant == "dora", modules_to_save=["1", "3"]))
    theirs = peft_create_loraplus_optimizer(theirs_model, torch.optim.AdamW, lr=2e-4, loraplus_lr_ratio=16)
    course = norm_model()
    replace_linear_with_variant(course, variant, 2, 4, target_modules=["0", "2"])
    mark_only_lora_as_trainable(course, modules_to_save=["1", "3"])
    ours = loraplus_param_groups(course, lr=2e-4, ratio=16)
    names_of = {id(p): n for n, p in course.named_parameters()}
    peft_names_of = {id(p): n for n, p in theirs_model.named_parameters()}
    for g_ours, g_theirs in zip(ours, theirs.param_groups):
        assert [peft_name(names_of[id(p)]) for p in g_ours["params"]] == [peft_names_of[id(p)] for p in g_theirs["params"]]
        assert g_ours["lr"] == pytest.approx(g_theirs["lr"])


def test_loraplus_refuses_bad_input():
    with pytest.raises(ValueError, match="no trainable parameters"):
        loraplus_param_groups(nn.Linear(3, 3).requires_grad_(False), lr=1e-3)
    with pytest.raises(ValueError, match="ratio must be a positive number"):
        loraplus_param_groups(nn.Linear(3, 3), lr=1e-3, ratio=0)


# --------------------------------------------------------------------------------------------
# Surgery: all variants on the course GPT, freezing, merging, bad input
# --------------------------------------------------------------------------------------------
VARIANT_ARGS = {"lora": (4, 8), "rslora": (4, 8), "dora": (4, 8), "pissa": (4, 8), "vera": (8, None),
                "qlora": (4, 8)}
TRAINABLE = {"lora": {"A", "B"}, "rslora": {"A", "B"}, "dora": {"A", "B", "magnitude"}, "pissa": {"A", "B"},
             "vera": {"lambda_d", "lambda_b"}, "qlora": {"A", "B"}}


@pytest.mark.parametrize("variant", list(VARIANT_ARGS))
def test_every_variant_on_the_gpt_freezes_trains_and_merges(variant):
    model = gpt()
    rank, alpha = VARIANT_ARGS[variant]
    report = replace_linear_with_variant(model, variant, rank, alpha, target_modules=GPT_TARGETS, seed=0)
    assert len(report.wrapped) == 6
    again = replace_linear_with_variant(model, variant, rank, alpha, target_modules=GPT_TARGETS)
    assert again.wrapped == [] and len(again.already_wrapped) == 6  # never wrapped twice
    mark_only_lora_as_trainable(model, modules_to_save=["out_head"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"{name}.lora.{p}" for name in report.wrapped for p in TRAINABLE[variant]}
    assert trainable == expected | {"out_head.weight", "out_head.bias"}
    x = gpt_input()
    adam_steps(model.train(), x, steps=2, lr=0.01)
    model.eval()
    before = model(x)
    merged = merge_and_unload(copy.deepcopy(model))
    assert not list(lora_layers(merged))
    torch.testing.assert_close(merged(x), before, rtol=1e-4, atol=1e-4)


def test_lora_variant_equals_replace_linear_with_lora_and_dora_shares_its_a():
    from lora_course.lora import replace_linear_with_lora
    plain, ours, dora = gpt(), gpt(), gpt()
    replace_linear_with_lora(plain, 4, 8, target_modules=GPT_TARGETS, seed=3)
    replace_linear_with_variant(ours, "lora", 4, 8, target_modules=GPT_TARGETS, seed=3)
    replace_linear_with_variant(dora, "dora", 4, 8, target_modules=GPT_TARGETS, seed=3)
    for name in GPT_TARGETS:
        for n, layer in lora_layers(plain):
            if n.endswith(name):
                assert torch.equal(layer.lora.A, ours.get_submodule(n).lora.A)
                assert torch.equal(layer.lora.A, dora.get_submodule(n).lora.A)


@pytest.mark.parametrize("kwargs,error,fragment", [
    (dict(variant="lora", rank=0, alpha=4), ValueError, "rank must be a positive integer"),
    (dict(variant="fancy", rank=2, alpha=4), ValueError, "unknown variant 'fancy'"),
    (dict(variant="dora", rank=2, alpha=None), ValueError, "needs alpha"),
    (dict(variant="vera", rank=2, alpha=4), ValueError, "VeRA has no alpha"),
    (dict(variant="rslora", rank=2, alpha=4, scaling="alpha/rank"), ValueError, "rsLoRA is the scaling"),
    (dict(variant="pissa", rank=20, alpha=4), ValueError, "rank 20 is above the rank of this weight"),
    (dict(variant="qlora", rank=2, alpha=4, blocksize=48), ValueError, "blocksize must be one of"),
    (dict(variant="qlora", rank=2, alpha=4, blocksize=128), ValueError, "does not divide"),
    (dict(variant="dora", rank=2, alpha=4, target_modules=["norm1"]), TypeError, "LayerNorm"),
    (dict(variant="pissa", rank=2, alpha=4, target_modules=["nothing_here"]), ValueError, "matched no nn.Linear"),
    (dict(variant="lora", rank=2, alpha=4, dropout=1.5), ValueError, r"dropout must be < 1, got 1.5. LoRA dropout is a probability"),
])
def test_bad_input_is_refused_before_anything_changes(kwargs, error, fragment):
    model = gpt()
    state = copy.deepcopy(model.state_dict())
    kwargs = dict(kwargs)
    with pytest.raises(error, match=fragment):
        replace_linear_with_variant(model, kwargs.pop("variant"), kwargs.pop("rank"), kwargs.pop("alpha"), **kwargs)
    assert not adapted_names(model)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize("variant", ["lora", "dora", "qlora"])
def test_a_rank_above_a_layers_width_is_warned_about_as_in_lora_py(variant):
    from lora_course.errors import RankAboveMatrixRankWarning
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))  # 256 and 64 numbers: blocks of 64 fit
    with pytest.warns(RankAboveMatrixRankWarning, match="layer '2'") as caught:
        replace_linear_with_variant(model, variant, 9, 9)
    assert len([w for w in caught if w.category is RankAboveMatrixRankWarning]) == 1  # once, with the layer name
    assert adapted_names(model) == ["0", "2"]


def test_rewrapping_with_another_variant_or_settings_is_an_error():
    model = stack()
    replace_linear_with_variant(model, "dora", 2, 4)
    assert replace_linear_with_variant(model, "dora", 2, 4).already_wrapped == ["0", "2"]  # same: a no-op
    layers = [model[0], model[2]]
    with pytest.raises(ValueError, match="already has a dora branch.*you asked for pissa"):
        replace_linear_with_variant(model, "pissa", 2, 4)
    with pytest.raises(ValueError, match="already has LoRA of rank 2"):
        replace_linear_with_variant(model, "dora", 3, 4)
    assert [model[0], model[2]] == layers


def test_a_shared_linear_is_refused():
    from lora_course.errors import UnsupportedLayerError
    shared = nn.Linear(8, 8)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    with pytest.raises(UnsupportedLayerError, match="same nn.Linear object is also used"):
        replace_linear_with_variant(model, "dora", 2, 4)
    assert model[0] is shared and model[2] is shared


def test_merging_dora_checks_every_layer_before_merging_any():
    from lora_course.errors import LoRAStateError, NonFiniteError
    _, _, ours = dora_pair(stack, STACK_TARGETS)
    weights = [ours.get_submodule(n).linear.weight.clone() for n in STACK_TARGETS]
    with torch.no_grad():
        ours[2].lora.magnitude[0] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN or inf"):
        merge_lora_(ours)
    with pytest.raises(NonFiniteError):
        merge_and_unload(ours)
    assert not ours[0].merged and all(torch.equal(ours.get_submodule(n).linear.weight, w)
                                      for n, w in zip(STACK_TARGETS, weights))
    ours[0].enabled = False
    with pytest.raises(LoRAStateError, match="disabled"):
        ours[0].merge_()


def test_variant_layers_refuse_non_linear_modules():
    for make in (lambda m: LinearWithDoRA(m, 2, 4), lambda m: LinearWithPiSSA(m, 2, 4),
                 lambda m: LinearWithVeRA(m, *vera_projections(8, 8, 2))):
        with pytest.raises(TypeError, match="wrap torch.nn.Linear layers only, got Embedding"):
            make(nn.Embedding(8, 8))
        wrapped = LinearWithLoRA(nn.Linear(8, 8), 2, 4)
        with pytest.raises(ValueError, match="already has a LoRA branch"):
            make(wrapped)


# --------------------------------------------------------------------------------------------
# Analysis helpers, against an independent NumPy computation
# --------------------------------------------------------------------------------------------
def test_magnitude_direction_change_matches_numpy():
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(6, 5, generator=g)
    history = [w0 + 0.1 * k * torch.randn(6, 5, generator=g) for k in range(1, 4)]
    delta_m, delta_d = magnitude_direction_change(w0, history)
    a0 = w0.double().numpy()
    for dm, dd, w in zip(delta_m, delta_d, history):
        a = w.double().numpy()
        m0, m = np.linalg.norm(a0, axis=1), np.linalg.norm(a, axis=1)
        cos = (a * a0).sum(axis=1) / (m * m0)
        assert dm == pytest.approx(np.abs(m - m0).mean(), rel=1e-5)
        assert dd == pytest.approx((1 - cos).mean(), rel=1e-4, abs=1e-7)
    assert magnitude_direction_change(w0, [w0]) == ([0.0], [pytest.approx(0.0, abs=1e-7)])
    with pytest.raises(ValueError, match="norm 0"):
        magnitude_direction_change(torch.zeros(2, 3), [w0])


def test_variant_notes_name_peft_for_each_family_member():
    names = {note["name"] for note in VARIANT_NOTES}
    assert names == {"VeRA", "AdaLoRA", "LoftQ", "OLoRA", "LoRA-FA", "LoRA-GA"}
    assert all(note["peft"] and note["paper"] and len(note["idea"]) > 100 for note in VARIANT_NOTES)
