"""How much memory fine-tuning needs: accounted from the model, and measured on a real step.

Training with AdamW keeps four kinds of tensors alive:

- weights: every parameter, trainable or frozen (4 bytes each in float32);
- gradients: one per *trainable* parameter (frozen weights get none);
- optimizer states: AdamW's running means m and v, two per trainable parameter;
- activations: what the forward pass saves for the backward pass (layer inputs, attention
  probabilities, ...). They scale with batch × tokens, not with the number of trainable
  parameters, so LoRA does not shrink them (it even adds a few: x·A for every adapted layer).

``accounted_memory`` predicts the first three from parameter counts alone (the closed form of
``lora_course.accounting.training_memory_bytes``). ``measure_training_step`` runs real AdamW
steps on a copy of the model and adds up the storages of the tensors that are actually alive at
the moment memory peaks (the end of the forward pass, when the previous step's gradients and the
optimizer state still exist and every activation for the backward pass has been saved). Saved
activations are caught with ``torch.autograd.graph.saved_tensors_hooks``.

PyTorch has no peak-memory counter for the CPU like ``torch.cuda.max_memory_allocated`` (which
is GPU-only), which is why we count live tensors instead. What this misses: short-lived
temporaries inside a kernel and the allocator's own overhead, small next to the tensors above.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .accounting import total_parameters, trainable_parameters, training_memory_bytes
from .training import EncodedSplit, _encoded, classification_logits

MIB = 2 ** 20


@dataclass(frozen=True)
class TrainingMemory:
    """Bytes of each kind of tensor alive during training (activations 0 when not measured)."""

    weights: int
    gradients: int
    optimizer_states: int
    activations: int = 0

    @property
    def states(self) -> int:
        """Weights + gradients + optimizer states: what the parameter count alone decides."""
        return self.weights + self.gradients + self.optimizer_states

    @property
    def total(self) -> int:
        return self.states + self.activations

    def as_mib(self) -> dict[str, float]:
        return {k: v / MIB for k, v in [("weights", self.weights), ("gradients", self.gradients),
                                        ("optimizer_states", self.optimizer_states),
                                        ("activations", self.activations), ("total", self.total)]}


def _bytes_per_value(model: nn.Module) -> int:
    sizes = {p.element_size() for p in model.parameters()}
    if len(sizes) != 1:
        raise ValueError(f"the model mixes parameter dtypes of {sorted(sizes)} bytes; "
                         "accounted_memory assumes one dtype (cast the model with model.float())")
    return sizes.pop()


def accounted_memory(model: nn.Module) -> TrainingMemory:
    """Weights, gradients and AdamW states predicted from the parameter counts alone:
    every parameter's weight, plus one gradient and two moments (m, v) per trainable one."""
    parts = training_memory_bytes(trainable_parameters(model), total_parameters(model), _bytes_per_value(model))
    return TrainingMemory(parts["weights"], parts["gradients"], parts["optimizer_states"])


def _storage_key(t: torch.Tensor) -> tuple:
    """Identifies the memory block behind a tensor (views share it)."""
    storage = t.untyped_storage()
    return (t.device.type, storage.data_ptr(), storage.nbytes())


def _sum_unique(tensors, exclude: set | None = None) -> tuple[int, set]:
    seen = set()
    for t in tensors:
        key = _storage_key(t)
        if (exclude is None or key not in exclude) and key[2] > 0:
            seen.add(key)
    return sum(k[2] for k in seen), seen


def measure_training_step(model: nn.Module, train, *, batch_size: int = 32, lr: float = 1e-3,
                          seed: int = 0) -> TrainingMemory:
    """Measure the tensors alive when a classification training step peaks, on one seeded batch
    of ``train`` (see ``measure_step_memory``)."""
    data: EncodedSplit = _encoded(train)
    idx = torch.randint(len(data), (batch_size,), generator=torch.Generator().manual_seed(seed))
    ids, lengths, labels = data.ids[idx], data.lengths[idx], data.labels[idx]

    def loss_fn(work: nn.Module) -> torch.Tensor:
        device = next(work.parameters()).device
        logits = classification_logits(work, ids.to(device), lengths.to(device))
        return F.cross_entropy(logits, labels.to(device))

    return measure_step_memory(model, loss_fn, lr=lr)


def measure_step_memory(model: nn.Module, loss_fn, *, lr: float = 1e-3) -> TrainingMemory:
    """Measure the tensors alive when a training step of ``loss_fn(model)`` peaks.

    Works on a deep copy (``model`` is not changed). Runs one AdamW step so that gradients and
    optimizer states exist, as they do in every later step, then runs the forward pass of a
    second step while recording every tensor autograd saves for backward. Returns the bytes of
    the unique storages of parameters, gradients, AdamW moments (``exp_avg``, ``exp_avg_sq``;
    the one-number ``step`` counters are left out) and saved activations that are not already
    counted as a parameter (a Linear saves its weight for backward: that is no new memory).
    """
    work = copy.deepcopy(model)
    params = [p for p in work.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: nothing to measure a training step of")
    optimizer = torch.optim.AdamW(params, lr=lr)
    work.train()

    # Step 1: creates the gradients and AdamW's m and v, which then live for the whole run.
    loss_fn(work).backward()
    optimizer.step()

    # Step 2, forward pass only: memory peaks here, with last step's gradients still alive.
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(work)

    weights, weight_keys = _sum_unique(work.parameters())
    gradients, grad_keys = _sum_unique(p.grad for p in params if p.grad is not None)
    moments = [v for state in optimizer.state.values() for k, v in state.items()
               if torch.is_tensor(v) and k != "step"]
    optimizer_states, state_keys = _sum_unique(moments)
    activations, _ = _sum_unique(saved, exclude=weight_keys | grad_keys | state_keys)
    del loss, saved
    return TrainingMemory(weights, gradients, optimizer_states, activations)
