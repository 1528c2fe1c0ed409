"""Training and evaluation loops: classification fine-tuning and language-model loss.

A run returns a ``History`` (losses, accuracies, step times) that the plotting helpers take.
Classification follows appendix E: a new 2-class ``out_head`` and the logits of the last real
token of each (right-padded) message, which under causal attention has seen the whole message.
"""
from __future__ import annotations

import copy
import os
import random
import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .accounting import trainable_parameters
from .data import Split, encode_batch, lm_batch


def seed_everything(seed: int = 0) -> None:
    """Seed Python, NumPy and PyTorch, so that runs repeat exactly on the same machine."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def default_device() -> torch.device:
    """The GPU when there is one, else the CPU. (The course never needs a GPU.)"""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_classifier(base: nn.Module, num_classes: int = 2, seed: int = 123) -> nn.Module:
    """A copy of ``base`` whose LM head is replaced by a fresh (seeded) ``num_classes`` head.
    The base model itself is left untouched, so each run starts from the same weights."""
    model = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # leave the global random state as it was
        head = nn.Linear(model.out_head.in_features, num_classes)
    with torch.no_grad():  # nn.Linear's default init, drawn from our own generator
        bound = 1 / head.in_features ** 0.5
        head.weight.uniform_(-bound, bound, generator=generator)
        head.bias.uniform_(-bound, bound, generator=generator)
    model.out_head = head.to(next(model.parameters()).device)
    return model


@dataclass
class EncodedSplit:
    """A split as tensors: ids (N, T), lengths (N,), labels (N,)."""

    ids: torch.Tensor
    lengths: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def from_split(cls, split: Split) -> "EncodedSplit":
        ids, lengths = encode_batch(split.texts)
        return cls(ids, lengths, split.labels.clone())

    def __len__(self) -> int:
        return len(self.labels)


def _encoded(split) -> EncodedSplit:
    return split if isinstance(split, EncodedSplit) else EncodedSplit.from_split(split)


def classification_logits(model: nn.Module, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, T) ids -> (B, classes) logits read at each message's last real token."""
    logits = model(ids)  # (B, T, classes)
    return logits[torch.arange(len(ids), device=ids.device), lengths - 1]


@torch.no_grad()
def evaluate(model: nn.Module, split, batch_size: int = 250) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy) of a classifier on a split, in eval mode."""
    data, device = _encoded(split), next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, len(data), batch_size):
        sl = slice(start, start + batch_size)
        ids, lengths, labels = data.ids[sl].to(device), data.lengths[sl].to(device), data.labels[sl].to(device)
        logits = classification_logits(model, ids, lengths)
        total_loss += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(-1) == labels).sum().item()
    model.train(was_training)
    return total_loss / len(data), correct / len(data)


@dataclass
class History:
    """What a training run recorded. ``eval_steps`` index ``val_loss``/``val_accuracy``."""

    name: str
    lr: float
    trainable_parameters: int
    train_steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)

    @property
    def final_val_accuracy(self) -> float:
        return self.val_accuracy[-1]

    @property
    def final_val_loss(self) -> float:
        return self.val_loss[-1]

    @property
    def seconds_per_step(self) -> float:
        """Median wall time of one optimisation step (forward, backward, AdamW update)."""
        return statistics.median(self.step_seconds)


def _progress(total: int, desc: str, enabled: bool):
    """A tqdm bar that renders as a widget in JupyterLab and as text elsewhere (TQDM_DISABLE=1
    or progress=False turn it off)."""
    if not enabled or os.environ.get("TQDM_DISABLE"):
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, leave=False)


def train_classifier(model: nn.Module, train, val, *, steps: int = 150, lr: float = 1e-3, batch_size: int = 32,
                     weight_decay: float = 0.0, eval_every: int = 25, seed: int = 0, name: str = "run",
                     progress: bool = True) -> History:
    """Train the model's trainable parameters with AdamW on a classification split.

    Batches are drawn with a seeded generator, so two runs with the same seed see the same data in
    the same order. Validation loss and accuracy are measured every ``eval_every`` steps and at
    the end. Returns a ``History``.
    """
    train, val = _encoded(train), _encoded(val)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: did you freeze everything? "
                         "mark_only_lora_as_trainable(model) keeps the LoRA matrices trainable")
    device = params[0].device
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    history = History(name=name, lr=lr, trainable_parameters=trainable_parameters(model))
    generator = torch.Generator().manual_seed(seed)
    bar = _progress(steps, name, progress)
    model.train()
    for step in range(1, steps + 1):
        idx = torch.randint(len(train), (batch_size,), generator=generator)
        ids, lengths, labels = train.ids[idx].to(device), train.lengths[idx].to(device), train.labels[idx].to(device)
        start = time.perf_counter()
        loss = F.cross_entropy(classification_logits(model, ids, lengths), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.step_seconds.append(time.perf_counter() - start)
        history.train_steps.append(step)
        history.train_loss.append(loss.item())
        if step % eval_every == 0 or step == steps:
            val_loss, val_acc = evaluate(model, val)
            history.eval_steps.append(step)
            history.val_loss.append(val_loss)
            history.val_accuracy.append(val_acc)
            if bar is not None:
                bar.set_postfix(val_acc=f"{val_acc:.3f}")
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    model.eval()
    return history


@torch.no_grad()
def language_model_loss(model: nn.Module, texts: list[str], lm_head: nn.Module | None = None,
                        batch_size: int = 500) -> float:
    """Mean next-token cross-entropy on ``texts``. With ``lm_head``, the model's hidden states
    (``model.features``) are read out by that head instead of ``model.out_head``: this measures
    how much a fine-tuned classifier's body still knows the language (forgetting)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(texts), batch_size):
        inputs, targets = lm_batch(texts[start:start + batch_size])
        inputs, targets = inputs.to(device), targets.to(device)
        logits = lm_head(model.features(inputs)) if lm_head is not None else model(inputs)
        total += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum").item()
        count += (targets != -100).sum().item()
    model.train(was_training)
    return total / count
