"""Run definitions: trainable sets, closed-form counts, frozen base weights, FLOP accounting,
seed statistics, the truncated-update bridge and the tuned learning rates."""
import json
import statistics

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lora_course.accounting import trainable_parameters
from lora_course.data import classification_splits
from lora_course.experiments import (LORA_ALPHA, METHODS, SWEEP_PATH, TARGETS, RunSpec, SeedRuns,
                                     base_weights_unchanged, build_model, closed_form_trainable, differs_beyond_noise,
                                     format_table, head_lora_rank, linear_matmul_flops, lr_sweep_results, run,
                                     run_seeds, truncated_update_model, tuned_learning_rates)
from lora_course.gpt import load_pretrained_gpt
from lora_course.lora import LinearWithLoRA, mark_only_lora_as_trainable, replace_linear_with_lora
from lora_course.training import make_classifier


@pytest.fixture(scope="module")
def base():
    return load_pretrained_gpt()


@pytest.fixture(scope="module")
def splits():
    return classification_splits("spam", n_train=64, n_val=32, n_test=8)


SPECS = [RunSpec(m, 1e-3, method=m) for m in ("full", "head only", "last block")] + [
    RunSpec(f"{t} r={r} {h}", 1e-2, rank=r, targets=t, head=h)
    for t in TARGETS for r in (1, 4) for h in ("train", "lora", "frozen")]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_trainable_count_equals_the_closed_form(base, spec):
    model = build_model(base, spec)
    assert trainable_parameters(model) == closed_form_trainable(base, spec)


def test_closed_form_by_hand(base):
    # 3 blocks of width 48; q,v are 48x48: r·(48+48) each; the 2-class head has 48·2 + 2 parameters.
    assert base.cfg.emb_dim == 48 and base.cfg.n_layers == 3
    assert closed_form_trainable(base, RunSpec("qv", 1e-2, rank=2, targets="q,v")) == 3 * 2 * 2 * 96 + 98
    # feed-forward: 48->192 and 192->48: r·240 each
    assert closed_form_trainable(base, RunSpec("ff", 1e-2, rank=1, targets="feed-forward", head="frozen")) == 3 * 2 * 240
    # full: every base parameter except the 48 x 330 vocabulary head, which the new head replaces
    assert closed_form_trainable(base, RunSpec("full", 1e-3, method="full")) == \
        sum(p.numel() for p in base.parameters()) - 48 * 330 + 98
    # the 6-class head of the main task: 48·6 + 6
    assert closed_form_trainable(base, RunSpec("probe", 1e-3, method="head only"), num_classes=6) == 294
    # chapter 6: the last block (q, k, v without bias, out_proj with one, the 48->192->48
    # feed-forward with biases, two LayerNorms of scale and shift) + the final LayerNorm + the head
    block = 4 * 48 * 48 + 48 + (48 * 192 + 192) + (192 * 48 + 48) + 2 * 2 * 48
    assert closed_form_trainable(base, RunSpec("last", 1e-3, method="last block")) == block + 2 * 48 + 98


@pytest.mark.parametrize("num_classes", [2, 6])
def test_trainable_count_of_every_method_for_the_main_task(base, num_classes):
    for spec in SPECS:
        model = build_model(base, spec, num_classes=num_classes)
        assert trainable_parameters(model) == closed_form_trainable(base, spec, num_classes=num_classes), spec.name


def test_head_lora_rank_is_capped_by_the_number_of_classes(base):
    head = nn.Linear(48, 6)
    assert [head_lora_rank(r, head) for r in (1, 4, 6, 16)] == [1, 4, 6, 6]
    model = build_model(base, RunSpec("r16 head lora", 1e-2, rank=16, targets="q,v", head="lora"), num_classes=6)
    assert model.out_head.lora.rank == 6
    assert model.out_head.lora.scaling == pytest.approx(LORA_ALPHA / 16)  # alpha scaled with the rank: s unchanged


def test_only_the_named_parts_train(base):
    names = lambda spec: {n for n, p in build_model(base, spec).named_parameters() if p.requires_grad}  # noqa: E731
    assert names(RunSpec("probe", 1e-3, method="head only")) == {"out_head.weight", "out_head.bias"}
    last = names(RunSpec("last", 1e-3, method="last block"))
    assert all(n.startswith(("trf_blocks.2.", "final_norm.", "out_head.")) for n in last)
    assert {"trf_blocks.2.att.W_query.weight", "final_norm.scale", "out_head.weight"} <= last


def test_which_layers_get_lora(base):
    model = build_model(base, RunSpec("qv", 1e-2, rank=2, targets="q,v", head="lora"))
    wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, LinearWithLoRA))
    assert wrapped == sorted([f"trf_blocks.{i}.att.{w}" for i in range(3) for w in ("W_query", "W_value")] + ["out_head"])
    assert not model.out_head.linear.weight.requires_grad and model.out_head.lora.B.requires_grad


def test_lora_model_starts_as_the_fresh_classifier(base):
    ids = torch.randint(3, 300, (4, 12))
    reference = make_classifier(base)(ids)
    for spec in SPECS[3:6]:
        torch.testing.assert_close(build_model(base, spec)(ids), reference, rtol=0, atol=0)


def test_training_lora_leaves_base_weights_bit_for_bit(base, splits):
    model, history = run(base, RunSpec("lora", 1e-2, rank=2), splits, steps=3, eval_every=3, progress=False)
    assert len(history.train_loss) == 3
    assert base_weights_unchanged(base, model)
    assert any(layer.lora.B.abs().sum() > 0 for layer in model.modules() if isinstance(layer, LinearWithLoRA))
    full, _ = run(base, RunSpec("full", 1e-3, method="full"), splits, steps=3, eval_every=3, progress=False)
    assert not base_weights_unchanged(base, full)


def test_base_weights_unchanged_refuses_another_architecture(base):
    with pytest.raises(ValueError, match="base model's parameters"):
        base_weights_unchanged(base, nn.Linear(2, 2))


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="x", lr=1e-3, rank=2, targets="everything"), "unknown targets"),
    (dict(name="x", lr=1e-3, rank=2, head="random"), "unknown head mode"),
    (dict(name="x", lr=1e-3), "needs a rank"),
    (dict(name="x", lr=1e-3, method="full", head="lora"), "LoRA runs only"),
    (dict(name="x", lr=1e-3, method="head only", rank=4), "LoRA runs only"),
    (dict(name="x", lr=1e-3, method="last block", loraplus_ratio=16), "LoRA runs only"),
    (dict(name="x", lr=1e-3, rank=2, loraplus_ratio=0), "loraplus_ratio"),
    (dict(name="x", lr=1e-3, method="everything"), "unknown method"),
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


@pytest.mark.parametrize("spec", [RunSpec("full", 1e-3, method="full"), RunSpec("r1", 1e-2, rank=1),
                                  RunSpec("qv r4 head lora", 1e-2, rank=4, targets="q,v", head="lora")],
                         ids=lambda s: s.name)
def test_flop_accounting_of_the_course_classifier(base, spec):
    model = build_model(base, spec)
    _randomise_b(model)
    ids = torch.randint(3, 300, (4, 12))
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


def _seed_runs(accuracies):
    spec = RunSpec("x", 1e-3, method="full")
    return SeedRuns(spec, list(range(len(accuracies))), [None] * len(accuracies), list(accuracies))


def test_seed_statistics_and_the_noise_rule():
    a, b = _seed_runs([0.70, 0.72, 0.74]), _seed_runs([0.60, 0.61, 0.65])
    assert a.mean == pytest.approx(statistics.mean([0.70, 0.72, 0.74]))
    assert a.std == pytest.approx(0.02)       # sample standard deviation (n - 1)
    assert differs_beyond_noise(a, b)          # 0.72 vs 0.62: gap 0.10 > 0.02 + 0.026
    c = _seed_runs([0.66, 0.70, 0.74])         # gap to a is 0.02, inside the spread
    assert not differs_beyond_noise(a, c) and not differs_beyond_noise(c, a)
    assert _seed_runs([0.5]).std == 0.0


def test_run_seeds_gives_each_seed_its_own_run_and_repeats(base, splits):
    spec = RunSpec("lora", 1e-2, rank=1, targets="q,v")
    first = run_seeds(base, spec, splits, seeds=(0, 1), steps=2, eval_every=2, progress=False)
    again = run_seeds(base, spec, splits, seeds=(0, 1), steps=2, eval_every=2, progress=False)
    assert first.test_accuracy == again.test_accuracy
    assert [h.train_loss for h in first.histories] == [h.train_loss for h in again.histories]
    assert first.histories[0].train_loss != first.histories[1].train_loss   # another seed, other batches
    with pytest.raises(ValueError, match="distinct seeds"):
        run_seeds(base, spec, splits, seeds=(0, 0), steps=1, eval_every=1, progress=False)


def test_truncated_update_has_the_rank_asked_for_and_full_rank_is_the_finetuned_model(base, splits):
    start = build_model(base, RunSpec("full", 1e-2, method="full"))
    tuned, _ = run(base, RunSpec("full", 1e-2, method="full"), splits, steps=3, eval_every=3, progress=False)
    ids = torch.randint(3, 300, (3, 10))
    start_layers, tuned_layers = dict(start.named_modules()), dict(tuned.named_modules())
    for r in (1, 3):
        model = truncated_update_model(start, tuned, r)
        for name, layer in model.named_modules():
            if isinstance(layer, nn.Linear) and name.startswith("trf_blocks."):
                delta = (layer.weight - start_layers[name].weight).double()
                assert torch.linalg.matrix_rank(delta, rtol=1e-4).item() <= r, name
        assert torch.equal(model.tok_emb.weight, start.tok_emb.weight)     # only the block Linears move
        assert torch.equal(model.out_head.weight, tuned.out_head.weight)   # the head is the fine-tuned one
    whole = truncated_update_model(start, tuned, 192)                      # min(out, in) or more: ΔW kept whole
    for name, layer in whole.named_modules():
        if isinstance(layer, nn.Linear) and name.startswith("trf_blocks."):
            torch.testing.assert_close(layer.weight, tuned_layers[name].weight, atol=1e-5, rtol=0)
    with torch.no_grad():
        assert torch.equal(whole.tok_emb(ids), start.tok_emb(ids))
    with pytest.raises(ValueError, match="positive integer"):
        truncated_update_model(start, tuned, 0)


def test_tuned_rates_are_the_best_validation_accuracy_of_the_stored_sweep():
    sweep = lr_sweep_results()
    assert set(tuned_learning_rates()) == set(METHODS) == set(sweep["best"])
    assert len(sweep["seeds"]) >= 3
    for method, by_rate in sweep["results"].items():
        best = max(by_rate, key=lambda lr: (by_rate[lr]["val_accuracy"], -by_rate[lr]["val_loss"]))
        assert float(best) == tuned_learning_rates()[method], method
    assert json.loads(SWEEP_PATH.read_text())["task"] == "aspect"
