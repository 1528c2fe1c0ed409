"""Run definitions: trainable sets, closed-form counts, frozen base weights, FLOP accounting."""
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lora_course.accounting import trainable_parameters
from lora_course.data import classification_splits
from lora_course.experiments import (TARGETS, RunSpec, base_weights_unchanged, build_model, closed_form_trainable,
                                     format_table, linear_matmul_flops, run)
from lora_course.gpt import load_pretrained_gpt
from lora_course.lora import LinearWithLoRA, mark_only_lora_as_trainable, replace_linear_with_lora
from lora_course.training import make_classifier


@pytest.fixture(scope="module")
def base():
    return load_pretrained_gpt()


@pytest.fixture(scope="module")
def splits():
    return classification_splits("spam", n_train=64, n_val=32, n_test=8)


SPECS = [RunSpec("full", 1e-3)] + [RunSpec(f"{t} r={r} {h}", 1e-2, rank=r, targets=t, head=h)
                                   for t in TARGETS for r in (1, 4) for h in ("train", "lora", "frozen")]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_trainable_count_equals_the_closed_form(base, spec):
    model = build_model(base, spec)
    assert trainable_parameters(model) == closed_form_trainable(base, spec)


def test_closed_form_by_hand(base):
    # 4 blocks; q,v are 64x64: r·(64+64) each; the 2-class head has 64·2 + 2 parameters.
    assert closed_form_trainable(base, RunSpec("qv", 1e-2, rank=2, targets="q,v")) == 4 * 2 * 2 * 128 + 130
    # feed-forward: 64->256 and 256->64: r·320 each
    assert closed_form_trainable(base, RunSpec("ff", 1e-2, rank=1, targets="feed-forward", head="frozen")) == 4 * 2 * 320
    assert closed_form_trainable(base, RunSpec("full", 1e-3)) == sum(p.numel() for p in base.parameters()) - 64 * 475 + 130


def test_which_layers_get_lora(base):
    model = build_model(base, RunSpec("qv", 1e-2, rank=2, targets="q,v", head="lora"))
    wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, LinearWithLoRA))
    assert wrapped == sorted([f"trf_blocks.{i}.att.{w}" for i in range(4) for w in ("W_query", "W_value")] + ["out_head"])
    assert not model.out_head.linear.weight.requires_grad and model.out_head.lora.B.requires_grad


def test_lora_model_starts_as_the_fresh_classifier(base):
    ids = torch.randint(3, 400, (4, 12))
    reference = make_classifier(base)(ids)
    for spec in SPECS[1:4]:
        torch.testing.assert_close(build_model(base, spec)(ids), reference, rtol=0, atol=0)


def test_training_lora_leaves_base_weights_bit_for_bit(base, splits):
    model, history = run(base, RunSpec("lora", 1e-2, rank=2), splits, steps=3, eval_every=3, progress=False)
    assert len(history.train_loss) == 3
    assert base_weights_unchanged(base, model)
    assert any(layer.lora.B.abs().sum() > 0 for layer in model.modules() if isinstance(layer, LinearWithLoRA))
    full, _ = run(base, RunSpec("full", 1e-3), splits, steps=3, eval_every=3, progress=False)
    assert not base_weights_unchanged(base, full)


def test_base_weights_unchanged_refuses_another_architecture(base):
    with pytest.raises(ValueError, match="base model's parameters"):
        base_weights_unchanged(base, nn.Linear(2, 2))


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="x", lr=1e-3, rank=2, targets="everything"), "unknown targets"),
    (dict(name="x", lr=1e-3, rank=2, head="random"), "unknown head mode"),
    (dict(name="x", lr=1e-3, head="lora"), "full fine-tuning"),
    (dict(name="x", lr=0.0, rank=2), "learning rate"),
])
def test_runspec_rejects_bad_definitions(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RunSpec(**kwargs)


def _torch_counted_flops(model, *inputs):
    """Independent reference: the matmul FLOPs torch's FlopCounterMode sees in a forward and
    backward pass (mm and addmm are the Linear layers and LoRA branches; nothing else here)."""
    with FlopCounterMode(display=False) as counter:
        model(*inputs).sum().backward()
    counts = counter.get_flop_counts()["Global"]
    return sum(v for op, v in counts.items() if str(op) in ("aten.mm", "aten.addmm"))


def _randomise_b(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LinearWithLoRA):
                m.lora.B.normal_()


def test_flop_accounting_matches_torch_flop_counter():
    torch.manual_seed(0)
    x = torch.randn(5, 7, 16, requires_grad=True)  # 35 tokens; input grad needed, as inside a network
    mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    assert linear_matmul_flops(mlp, x)["total"] == _torch_counted_flops(mlp, x)
    replace_linear_with_lora(mlp, 2, 2)
    mark_only_lora_as_trainable(mlp)
    _randomise_b(mlp)
    # FlopCounterMode counts x@A@B as two matmuls; ours counts them the same way
    assert linear_matmul_flops(mlp, x)["total"] == _torch_counted_flops(mlp, x)
    flops = linear_matmul_flops(mlp, x)
    dense = 2 * 35 * (16 * 32 + 32 * 8)
    assert flops["weight_grad"] == 2 * 35 * 2 * (16 + 32 + 32 + 8)  # only A and B get weight gradients
    assert flops["forward"] == dense + 2 * 35 * 2 * (16 + 32 + 32 + 8)


def test_flop_accounting_skips_input_gradients_behind_frozen_layers():
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (4, 6))  # 24 tokens; integer ids never need a gradient
    model = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    replace_linear_with_lora(model, 2, 2)
    mark_only_lora_as_trainable(model)  # the embedding is frozen: the first Linear's input needs no gradient
    _randomise_b(model)
    flops = linear_matmul_flops(model, ids)
    assert flops["total"] == _torch_counted_flops(model, ids)
    # by hand: input gradients only for the second layer (32 x 8) and the B matmuls (r x out)
    assert flops["input_grad"] == 2 * 24 * (32 * 8 + 32 * 2) + 2 * 24 * 2 * (32 + 8)
    # with a trainable embedding the first layer's input needs a gradient again
    model[0].weight.requires_grad_(True)
    assert linear_matmul_flops(model, ids)["input_grad"] == flops["input_grad"] + 2 * 24 * 16 * (32 + 2)
    assert linear_matmul_flops(model, ids)["total"] == _torch_counted_flops(model, ids)


@pytest.mark.parametrize("spec", [RunSpec("full", 1e-3), RunSpec("r1", 1e-2, rank=1),
                                  RunSpec("qv r4 head lora", 1e-2, rank=4, targets="q,v", head="lora")],
                         ids=lambda s: s.name)
def test_flop_accounting_of_the_course_classifier(base, spec):
    model = build_model(base, spec)
    _randomise_b(model)
    ids = torch.randint(3, 400, (4, 12))
    assert linear_matmul_flops(model, ids)["total"] == _torch_counted_flops(model, ids)


def test_flop_accounting_leaves_no_hooks(base):
    model = build_model(base, RunSpec("r1", 1e-2, rank=1))
    linear_matmul_flops(model, torch.zeros(2, 5, dtype=torch.long))
    assert not any(m._forward_hooks for m in model.modules())


def test_format_table():
    text = format_table([{"n": "full", "a": 0.91234}, {"n": "lora r=1", "a": 0.5}],
                        [("n", "run", "{}"), ("a", "acc", "{:.2f}")])
    assert text.splitlines() == ["run        acc", "--------  ----", "full      0.91", "lora r=1  0.50"]


def test_build_model_is_repeatable_and_leaves_the_global_random_state_alone(base):
    spec = RunSpec("lora", 1e-2, rank=2, targets="q,v")
    state = torch.random.get_rng_state()
    a, b = build_model(base, spec), build_model(base, spec)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.trf_blocks[0].att.W_query.lora.A, b.trf_blocks[0].att.W_query.lora.A)
    c = build_model(base, spec, lora_seed=1)
    assert not torch.equal(a.trf_blocks[0].att.W_query.lora.A, c.trf_blocks[0].att.W_query.lora.A)
