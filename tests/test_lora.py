"""LoRA layers and model surgery, checked against dense references computed with plain PyTorch."""
import math
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lora_course.errors import RankAboveMatrixRankWarning
from lora_course import (LinearWithLoRA, LoRALayer, expected_lora_parameters, lora_disabled, lora_layers,
                         lora_parameter_count, lora_scaling, mark_only_lora_as_trainable, merge_and_unload,
                         merge_lora_, remove_lora, replace_linear_with_lora, total_parameters,
                         trainable_parameters, trainable_parameters_summary, unmerge_lora_)


def randomized(layer: LinearWithLoRA, seed: int = 0) -> LinearWithLoRA:
    """Give B non-zero values, so that the LoRA branch actually contributes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora.B.copy_(torch.randn(layer.lora.B.shape, generator=g))
    return layer


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Sequential(nn.Linear(16, 16), nn.GELU()), nn.Linear(16, 4))


@pytest.mark.parametrize("scaling", ["alpha/rank", "alpha", "alpha/sqrt(rank)"])
def test_equals_dense_linear_with_merged_weight(scaling):
    torch.manual_seed(0)
    base = nn.Linear(12, 7)
    layer = randomized(LinearWithLoRA(base, rank=3, alpha=5, scaling=scaling))
    s = {"alpha/rank": 5 / 3, "alpha": 5.0, "alpha/sqrt(rank)": 5 / math.sqrt(3)}[scaling]
    x = torch.randn(4, 5, 12)
    # Reference: a plain nn.Linear whose weight is W + s·(A·B)ᵀ, built by hand.
    reference = F.linear(x, base.weight + s * (layer.lora.A @ layer.lora.B).T, base.bias)
    torch.testing.assert_close(layer(x), reference, rtol=1e-5, atol=1e-6)
    assert layer.lora.scaling == pytest.approx(s)


def test_gradients_match_autograd_on_dense_formula():
    torch.manual_seed(1)
    base = nn.Linear(6, 5)
    layer = randomized(LinearWithLoRA(base, rank=2, alpha=4))
    x = torch.randn(10, 6)
    target = torch.randn(10, 5)
    F.mse_loss(layer(x), target).backward()
    # Same computation written densely with fresh leaf tensors.
    A = layer.lora.A.detach().clone().requires_grad_()
    B = layer.lora.B.detach().clone().requires_grad_()
    F.mse_loss(x @ (base.weight.detach() + 2.0 * (A @ B).T).T + base.bias.detach(), target).backward()
    torch.testing.assert_close(layer.lora.A.grad, A.grad)
    torch.testing.assert_close(layer.lora.B.grad, B.grad)


def test_step_zero_is_identity_and_only_b_gets_gradient():
    torch.manual_seed(2)
    base = nn.Linear(6, 5)
    x = torch.randn(3, 6)
    expected = base(x).detach()
    layer = LinearWithLoRA(base, rank=2, alpha=2)
    out = layer(x)
    assert torch.equal(out, expected)  # B = 0: bit-for-bit the base layer
    out.sum().backward()
    assert torch.count_nonzero(layer.lora.A.grad) == 0  # dL/dA ∝ Bᵀ = 0
    assert torch.count_nonzero(layer.lora.B.grad) > 0


def test_a_init_matches_nn_linear_default_range():
    torch.manual_seed(3)
    layer = LoRALayer(400, 300, rank=8, alpha=8)
    bound = 1 / math.sqrt(400)
    assert layer.A.abs().max() <= bound
    assert layer.A.abs().max() > 0.9 * bound
    assert torch.count_nonzero(layer.B) == 0


def test_scaling_alpha_over_rank_is_default():
    assert lora_scaling(8, 16) == 2.0
    assert lora_scaling(8, 16, "alpha") == 16.0
    assert lora_scaling(16, 8, "alpha/sqrt(rank)") == 2.0


@pytest.mark.parametrize("rank", [0, -1, 2.0, "4", True, None])
def test_bad_rank(rank):
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        LinearWithLoRA(nn.Linear(4, 4), rank, 1)


def test_rank_larger_than_layer_warns_and_counts_like_peft():
    # A·B of an 8 -> 4 layer cannot have rank above 4: rank 5 is allowed (appendix E, PEFT) but warned about.
    with pytest.warns(RankAboveMatrixRankWarning, match=r"rank 5 .*\(8 -> 4\).*cannot have rank above min\(in_features, "
                                                        r"out_features\) = 4.*only add parameters: 60 instead of 48"):
        layer = LinearWithLoRA(nn.Linear(8, 4), 5, 1)
    assert layer.lora.A.shape == (8, 5) and layer.lora.B.shape == (5, 4)
    assert sum(p.numel() for p in layer.lora.parameters()) == lora_parameter_count(8, 4, 5) == 5 * (8 + 4)
    product = torch.randn(8, 5) @ torch.randn(5, 4)
    assert torch.linalg.matrix_rank(product) == 4  # the lesson: the extra column adds no rank
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rank <= min(in, out): no warning at all
        LinearWithLoRA(nn.Linear(8, 4), 4, 1)


@pytest.mark.parametrize("alpha", [0, -1, float("nan"), float("inf"), "8", None])
def test_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha must be a finite positive number"):
        LinearWithLoRA(nn.Linear(4, 4), 2, alpha)


def test_bad_scaling_name():
    with pytest.raises(ValueError, match="unknown scaling"):
        LinearWithLoRA(nn.Linear(4, 4), 2, 2, scaling="alpha*rank")


def test_non_linear_is_refused():
    with pytest.raises(TypeError, match="wraps torch.nn.Linear layers only, got Conv1d"):
        LinearWithLoRA(nn.Conv1d(4, 4, 3), 2, 2)
    with pytest.raises(ValueError, match="already has a LoRA branch"):
        LinearWithLoRA(LinearWithLoRA(nn.Linear(4, 4), 2, 2), 2, 2)


def test_replace_wraps_every_linear_once_and_is_rerunnable():
    model = mlp()
    first = replace_linear_with_lora(model, rank=2, alpha=4)
    assert first.wrapped == ["0", "2.0", "3"]
    second = replace_linear_with_lora(model, rank=2, alpha=4)  # re-running a notebook cell
    assert second.wrapped == [] and second.already_wrapped == ["0", "2.0", "3"]
    assert sum(1 for _ in lora_layers(model)) == 3
    assert not any(isinstance(m.linear, LinearWithLoRA) for _, m in lora_layers(model))


def test_replace_targets_and_excludes_by_name():
    model = mlp()
    report = replace_linear_with_lora(model, 2, 2, target_modules=["2.0", "3"], exclude_modules=["3"])
    assert report.wrapped == ["2.0"] and report.excluded == ["3"]
    model = mlp()  # a suffix matches at any depth, as in PEFT: "0" is both "0" and "2.0"
    assert replace_linear_with_lora(model, 2, 2, target_modules=["0"]).wrapped == ["0", "2.0"]
    model = mlp()
    assert replace_linear_with_lora(model, 2, 2, target_modules=r"2\..*").wrapped == ["2.0"]


def test_replace_unknown_target_lists_available_names():
    with pytest.raises(ValueError, match=r"matched no nn.Linear layer.*Its Linear layers are: 0, 2.0, 3"):
        replace_linear_with_lora(mlp(), 2, 2, target_modules=["W_query"])


def test_freezing_and_counts_match_closed_form():
    model = mlp()
    total_before = total_parameters(model)
    replace_linear_with_lora(model, rank=2, alpha=2)
    trainable = mark_only_lora_as_trainable(model)
    closed_form = lora_parameter_count(8, 16, 2) + lora_parameter_count(16, 16, 2) + lora_parameter_count(16, 4, 2)
    assert trainable == trainable_parameters(model) == expected_lora_parameters(model) == closed_form == 152
    assert total_parameters(model) == total_before + closed_form
    assert trainable_parameters_summary(model).startswith("trainable params: 152 || all params: ")
    # A new head can stay fully trainable.
    trainable = mark_only_lora_as_trainable(model, modules_to_save=["3"])
    assert trainable == 152 + 16 * 4 + 4  # + the head's weight and bias (its LoRA is already counted)
    with pytest.raises(ValueError, match="no module named 'head'"):
        mark_only_lora_as_trainable(model, modules_to_save=["head"])


def test_merge_unmerge_and_merge_twice():
    model = mlp()
    replace_linear_with_lora(model, 2, 2)
    for i, (_, layer) in enumerate(lora_layers(model)):
        randomized(layer, seed=i)
    x = torch.randn(32, 8)
    unmerged = model(x)
    assert merge_lora_(model) == 3
    merge_lora_(model)  # harmless: already merged layers are left alone
    torch.testing.assert_close(model(x), unmerged, rtol=0, atol=1e-5)
    unmerge_lora_(model)
    torch.testing.assert_close(model(x), unmerged, rtol=0, atol=1e-5)
    plain = merge_and_unload(model)
    assert not list(lora_layers(plain))
    torch.testing.assert_close(plain(x), unmerged, rtol=0, atol=1e-5)


def test_disable_and_remove_recover_base_exactly():
    model = mlp()
    x = torch.randn(5, 8)
    base_out = model(x).detach()
    replace_linear_with_lora(model, 2, 2)
    for _, layer in lora_layers(model):
        randomized(layer)
    assert not torch.equal(model(x), base_out)
    with lora_disabled(model):
        assert torch.equal(model(x), base_out)
    assert not torch.equal(model(x), base_out)
    assert torch.equal(remove_lora(model)(x), base_out)


def test_nothing_to_merge():
    with pytest.raises(ValueError, match="cannot merge: the model has no LoRA layers"):
        merge_lora_(mlp())


def test_training_leaves_base_weights_bit_for_bit():
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    replace_linear_with_lora(model, 2, 2)
    mark_only_lora_as_trainable(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        opt.zero_grad()
        model(torch.randn(16, 8)).pow(2).mean().backward()
        opt.step()
    after = remove_lora(model).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_rank_too_large_for_one_layer_warns_once_naming_it():
    model = mlp()  # its last layer is 16 -> 4
    with pytest.warns(RankAboveMatrixRankWarning) as record:
        report = replace_linear_with_lora(model, rank=8, alpha=8)
    assert len(record) == 1 and "layer '3' (16 -> 4)" in str(record[0].message)
    assert "exclude_modules=['3']" in str(record[0].message)
    assert record[0].filename == __file__  # the warning points at the caller's line, not the package
    assert report.wrapped == ["0", "2.0", "3"]
    assert expected_lora_parameters(model) == 8 * (8 + 16) + 8 * (16 + 16) + 8 * (16 + 4)


def test_rewrapping_with_other_settings_is_refused_same_settings_is_a_no_op():
    model = mlp()
    replace_linear_with_lora(model, rank=2, alpha=4, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    again = replace_linear_with_lora(model, rank=2, alpha=4.0, seed=1)  # same settings (4 == 4.0): nothing happens
    assert again.wrapped == [] and again.already_wrapped == ["0", "2.0", "3"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for kwargs in ({"rank": 8, "alpha": 4}, {"rank": 2, "alpha": 8}, {"rank": 2, "alpha": 4, "scaling": "alpha"},
                   {"rank": 2, "alpha": 4, "dropout": 0.1}):
        with pytest.raises(ValueError, match=r"layer '0' already has LoRA of rank 2 .*remove_lora\(model\) first"):
            replace_linear_with_lora(model, **kwargs)
    assert all(layer.lora.rank == 2 for _, layer in lora_layers(model))
    remove_lora(model)
    assert replace_linear_with_lora(model, rank=8, alpha=4, exclude_modules=["3"]).wrapped == ["0", "2.0"]


def test_seeded_wrapping_is_reproducible_and_leaves_global_rng_alone():
    first, second = mlp(), mlp()
    state = torch.get_rng_state()
    replace_linear_with_lora(first, 2, 2, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    torch.rand(5)  # moving the global stream must not change a seeded wrap
    replace_linear_with_lora(second, 2, 2, seed=7)
    for (_, a), (_, b) in zip(lora_layers(first), lora_layers(second)):
        assert torch.equal(a.lora.A, b.lora.A)
    third = mlp()
    replace_linear_with_lora(third, 2, 2, seed=8)
    assert not torch.equal(next(lora_layers(third))[1].lora.A, next(lora_layers(first))[1].lora.A)


def test_appendix_e_counts_on_gpt2_small_shapes():
    # Appendix E: GPT-2 124M, a new 768 -> 2 head, then LoRA rank 16 on every Linear (the head
    # included, above its matrix rank of 2): 2,666,528 trainable of 127,107,874. Built on the meta
    # device (shapes only, no memory, no download).
    from lora_course.errors import RankAboveMatrixRankWarning
    from lora_course.gpt import GPTConfig, GPTModel
    from lora_course.training import make_classifier

    cfg = GPTConfig(vocab_size=50257, context_length=1024, emb_dim=768, n_heads=12, n_layers=12, qkv_bias=True)
    with torch.device("meta"):
        model = make_classifier(GPTModel(cfg))
    assert total_parameters(model) == 124_441_346
    with pytest.warns(RankAboveMatrixRankWarning, match="layer 'out_head'"):
        replace_linear_with_lora(model, rank=16, alpha=16)
    assert mark_only_lora_as_trainable(model) == 2_666_528 == expected_lora_parameters(model)
    assert total_parameters(model) == 127_107_874
