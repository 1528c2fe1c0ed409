"""Training-memory accounting against the tensors of real AdamW steps, and the allocator-measured peak."""
import pytest
import torch
from torch import nn

from lora_course.data import TOKENIZER, classification_splits
from lora_course.gpt import GPTConfig, GPTModel
from lora_course.lora import mark_only_lora_as_trainable, replace_linear_with_lora
from lora_course.memory import (TrainingMemory, accounted_memory, classification_loss_fn, live_tensor_breakdown,
                                measure_peak_memory, step_breakdown)
from lora_course.training import make_classifier


@pytest.fixture(scope="module")
def train_split():
    return classification_splits("spam", n_train=64, n_val=8, n_test=8)["train"]


def small_classifier(dtype=torch.float32):
    torch.manual_seed(0)
    base = GPTModel(GPTConfig(vocab_size=len(TOKENIZER), context_length=48, emb_dim=16, n_heads=2, n_layers=1))
    return make_classifier(base).to(dtype)


def test_accounting_of_a_plain_linear_layer():
    layer = nn.Linear(10, 5)  # 55 parameters, all trainable, float32
    assert accounted_memory(layer) == TrainingMemory(weights=55 * 4, gradients=55 * 4, optimizer_states=110 * 4)
    layer.bias.requires_grad_(False)  # 50 trainable
    assert accounted_memory(layer) == TrainingMemory(weights=55 * 4, gradients=50 * 4, optimizer_states=100 * 4)
    assert accounted_memory(layer.double()).weights == 55 * 8


def test_accounting_rejects_mixed_dtypes():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2).double())
    with pytest.raises(ValueError, match="mixes parameter dtypes"):
        accounted_memory(model)


@pytest.mark.parametrize("lora", [False, True])
def test_measured_states_equal_the_tensors_torch_allocates(train_split, lora):
    model = small_classifier()
    if lora:
        replace_linear_with_lora(model, 2, 2, exclude_modules=["out_head"])
        mark_only_lora_as_trainable(model, modules_to_save=["out_head"])
    measured = step_breakdown(model, train_split, batch_size=8)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # Independent reference: sizes read off the parameters, and AdamW's own state after a step.
    assert measured.weights == sum(p.numel() * p.element_size() for p in model.parameters())
    assert measured.gradients == sum(p.numel() * 4 for p in trainable)
    optimizer = torch.optim.AdamW(trainable)
    for p in trainable:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    adam_bytes = sum(v.numel() * v.element_size() for s in optimizer.state.values()
                     for k, v in s.items() if k != "step")
    assert measured.optimizer_states == adam_bytes
    # the closed form agrees with the measurement
    assert accounted_memory(model).states == measured.states


def test_measurement_leaves_the_model_unchanged(train_split):
    model = small_classifier()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step_breakdown(model, train_split, batch_size=8)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_activations_grow_with_the_batch_and_states_do_not(train_split):
    model = small_classifier()
    small = step_breakdown(model, train_split, batch_size=8)
    large = step_breakdown(model, train_split, batch_size=32)
    assert small.activations > 0
    # 4x the rows, and a batch is cut to its longest message, which is longer among 32 than among
    # 8; attention scores grow with the square of that length: more than 4x, but not wildly more.
    assert 4.0 < large.activations / small.activations < 10
    assert large.states == small.states


def test_lora_saves_gradient_and_optimizer_memory(train_split):
    full = step_breakdown(small_classifier(), train_split, batch_size=8)
    model = small_classifier()
    replace_linear_with_lora(model, 1, 1, exclude_modules=["out_head"])
    mark_only_lora_as_trainable(model, modules_to_save=["out_head"])
    lora = step_breakdown(model, train_split, batch_size=8)
    assert lora.gradients < full.gradients / 5 and lora.optimizer_states < full.optimizer_states / 5
    assert lora.weights > full.weights  # A and B are extra weights


def test_float64_model_is_measured_in_eight_byte_values(train_split):
    model = small_classifier(torch.float64)
    measured = step_breakdown(model, train_split, batch_size=4)
    assert measured.weights == 8 * sum(p.numel() for p in model.parameters())
    assert accounted_memory(model).states == measured.states


def test_measuring_a_frozen_model_is_refused(train_split):
    model = small_classifier()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        step_breakdown(model, train_split)


def test_training_memory_totals():
    m = TrainingMemory(weights=1, gradients=2, optimizer_states=4, activations=8)
    assert (m.states, m.total) == (7, 15)
    assert m.as_mib()["total"] == pytest.approx(15 / 2 ** 20)


def test_live_tensor_breakdown_takes_any_loss_and_matches_the_adamw_formula():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    model[0].weight.requires_grad_(False)  # one frozen tensor: no gradient, no m and v for it
    x = torch.randn(5, 8)
    measured = live_tensor_breakdown(model, lambda m: m(x).pow(2).mean())
    n_total = sum(p.numel() for p in model.parameters())
    n_trainable = n_total - 8 * 16
    assert (measured.weights, measured.gradients, measured.optimizer_states) == (4 * n_total, 4 * n_trainable, 8 * n_trainable)
    assert measured.activations > 0  # the ReLU output and the inputs saved for backward
    assert model[0].weight.grad is None  # measured on a copy


# --------------------------------------------------------------------------------------------
# The allocator-measured peak: checked against allocations whose size we know independently
# --------------------------------------------------------------------------------------------
def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64))


def test_peak_sees_a_temporary_of_known_size():
    """A loss that allocates (and frees) one extra 8 MiB float32 tensor raises the measured peak
    by 8 MiB: the profiler sees allocations that no tensor bookkeeping would list."""
    model, x = _mlp(), torch.randn(16, 64)
    plain = measure_peak_memory(model, lambda m: m(x).pow(2).mean())
    extra = 2 * 2 ** 20  # float32 values: 8 MiB

    def with_temporary(m):
        scratch = torch.ones(extra)  # allocated, used, freed inside the step
        return m(x).pow(2).mean() + 0 * scratch[0]

    bumped = measure_peak_memory(model, with_temporary)
    # The scratch tensor is live at once with part of the step's memory, so the new peak is at
    # least its size and at most the old peak plus its size.
    assert 4 * extra < bumped <= plain + 4 * extra + 4096, (plain, bumped)
    assert bumped - plain > 0.95 * 4 * extra  # and it is far larger than anything else in this step


def test_peak_is_at_least_what_stays_alive():
    """The peak can never be below the weights, gradients and AdamW moments the step holds at its end."""
    model, x = _mlp(), torch.randn(16, 64)
    n = sum(p.numel() for p in model.parameters())
    peak = measure_peak_memory(model, lambda m: m(x).pow(2).mean())
    assert peak >= 4 * n * 4  # weights + gradients + m + v, 4 bytes each
    assert peak < 4 * n * 4 + 2 * 2 ** 20  # and not wildly above: activations of 16 rows are small


def test_peak_grows_with_the_batch_and_lora_lowers_it(train_split):
    model = small_classifier()
    small = measure_peak_memory(model, classification_loss_fn(train_split, batch_size=8))
    large = measure_peak_memory(model, classification_loss_fn(train_split, batch_size=32))
    assert large > small
    wide = _mlp()
    x = torch.randn(8, 64)
    full = measure_peak_memory(wide, lambda m: m(x).pow(2).mean())
    replace_linear_with_lora(wide, 2, 2)
    mark_only_lora_as_trainable(wide)
    lora = measure_peak_memory(wide, lambda m: m(x).pow(2).mean())
    n = 64 * 256 + 256 + 256 * 64 + 64
    assert full - lora > 2 * n * 4  # at least the gradients and AdamW moments of the frozen weights are gone


def test_peak_measurement_leaves_the_model_unchanged_and_refuses_a_frozen_model(train_split):
    model = small_classifier()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    measure_peak_memory(model, classification_loss_fn(train_split, batch_size=4))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        measure_peak_memory(model, classification_loss_fn(train_split, batch_size=4))
    with pytest.raises(ValueError, match="batch_size"):
        classification_loss_fn(train_split, batch_size=0)
