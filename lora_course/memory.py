"""How much memory fine-tuning needs: accounted from the model, broken down, and measured.

Training with AdamW keeps four kinds of tensors alive:

- weights: every parameter, trainable or frozen (4 bytes each in float32);
- gradients: one per *trainable* parameter (frozen weights get none);
- optimizer states: AdamW's running means m and v, two per trainable parameter;
- activations: what the forward pass saves for the backward pass (layer inputs, attention
  probabilities, ...). They scale with batch × tokens, not with the number of trainable
  parameters, so LoRA does not shrink them (it even adds a few: x·A for every adapted layer).

Three tools, from prediction to measurement:

- ``accounted_memory`` predicts the first three from parameter counts alone (the closed form of
  ``lora_course.accounting.training_memory_bytes``).
- ``step_breakdown`` / ``live_tensor_breakdown`` run real AdamW steps on a copy of the model
  and list the storages of the tensors alive at the end of the forward pass, by kind: the
  optimizer's real ``exp_avg``/``exp_avg_sq``, the real gradients, and the tensors autograd saves
  for backward (caught with ``torch.autograd.graph.saved_tensors_hooks``). This tells *what*
  occupies memory; its weight, gradient and state rows equal the accounting by construction,
  so it is not a measurement of the peak.
- ``measure_peak_memory`` asks the allocator. It runs a whole training step (copy of the model,
  forward, backward, AdamW update) inside ``torch.profiler.profile(profile_memory=True)``, which
  records every allocation and free the CPU allocator makes, and returns the highest number of
  bytes that were allocated at once. On a GPU it reads CUDA's own counter
  (``torch.cuda.max_memory_allocated``). It includes what the breakdown cannot see: temporaries
  inside operations, such as the gradient buffers backward creates before adding them up.
"""
from __future__ import annotations

import contextlib
import copy
import os
import sys
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


def classification_loss_fn(train, *, batch_size: int = 32, seed: int = 0):
    """``loss_fn(model)`` for one seeded batch of a classification split (cut to its longest
    message, as training does), for ``step_breakdown`` and ``measure_peak_memory``."""
    data: EncodedSplit = _encoded(train)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    idx = torch.randint(len(data), (batch_size,), generator=torch.Generator().manual_seed(seed))
    width = int(data.lengths[idx].max())
    ids, lengths, labels = data.ids[idx, :width], data.lengths[idx], data.labels[idx]

    def loss_fn(work: nn.Module) -> torch.Tensor:
        device = next(work.parameters()).device
        logits = classification_logits(work, ids.to(device), lengths.to(device))
        return F.cross_entropy(logits, labels.to(device))

    return loss_fn


def step_breakdown(model: nn.Module, train, *, batch_size: int = 32, lr: float = 1e-3,
                   seed: int = 0) -> TrainingMemory:
    """The tensors alive at the end of a classification step's forward pass, by kind, on one
    seeded batch of ``train`` (see ``live_tensor_breakdown``)."""
    return live_tensor_breakdown(model, classification_loss_fn(train, batch_size=batch_size, seed=seed), lr=lr)


@contextlib.contextmanager
def _native_stderr_silenced():
    """The profiler's C++ side (kineto) writes timestamped lines such as "profiler_start" straight
    to file descriptor 2, which Jupyter shows as a red stderr output that differs on every run.
    Point descriptor 2 at /dev/null while the profiler starts and stops; Python exceptions are
    unaffected (they are raised, not printed, inside the block)."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no descriptor 2 (some embedded interpreters): nothing to silence
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def measure_peak_memory(model: nn.Module, loss_fn, *, lr: float = 1e-3) -> int:
    """Peak bytes allocated during one AdamW training step of ``loss_fn(model)``, measured by the
    allocator.

    Everything the step needs is created inside the measurement: a copy of the model (its
    weights), one warm-up step (the gradients and AdamW's m and v that every later step keeps),
    and a second, measured step (forward, backward, update). CPU: the profiler's memory events
    (one per allocation and free) summed in time order; the peak is the largest running sum.
    GPU: ``torch.cuda.max_memory_allocated`` minus what was allocated before. ``model`` is not
    changed."""
    device = next(model.parameters()).device

    def train_two_steps():
        work = copy.deepcopy(model)
        params = [p for p in work.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters: nothing to measure a training step of")
        optimizer = torch.optim.AdamW(params, lr=lr)
        work.train()
        for _ in range(2):
            loss_fn(work).backward()
            optimizer.step()
        del work, optimizer, params

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        train_two_steps()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile
    with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train_two_steps()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def live_tensor_breakdown(model: nn.Module, loss_fn, *, lr: float = 1e-3) -> TrainingMemory:
    """The tensors alive at the end of the forward pass of a training step of ``loss_fn(model)``.

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
