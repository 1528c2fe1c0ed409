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
from .errors import ArgumentTypeError, LoRAStateError, check_bool, check_int, check_number, check_str


def seed_everything(seed: int = 0) -> None:
    """Seed Python, NumPy and PyTorch, so that runs repeat exactly on the same machine."""
    seed = check_int(seed, "seed", minimum=0, hint="NumPy takes seeds from 0 to 2**32 - 1")
    if seed >= 2 ** 32:
        raise ValueError(f"seed must be below 2**32 (NumPy's limit), got {seed}")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def default_device() -> torch.device:
    """The GPU when there is one, else the CPU. (The course never needs a GPU.)"""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_classifier(base: nn.Module, num_classes: int = 2, seed: int = 123) -> nn.Module:
    """A copy of ``base`` whose LM head is replaced by a fresh (seeded) ``num_classes`` head.
    The base model itself is left untouched, so each run starts from the same weights."""
    head = getattr(base, "out_head", None) if isinstance(base, nn.Module) else None
    if not isinstance(head, nn.Module) or not isinstance(getattr(head, "in_features", None), int):
        raise ArgumentTypeError(f"make_classifier needs a model with an out_head layer (like lora_course's GPTModel), "
                                f"got {type(base).__name__}")
    num_classes = check_int(num_classes, "num_classes", minimum=2,
                            hint="a classifier needs at least 2 classes (a 2-class head for spam / ham)")
    seed = check_int(seed, "seed")
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

    def __post_init__(self):
        _check_encoded(self.ids, self.lengths, self.labels)

    @classmethod
    def from_split(cls, split: Split) -> "EncodedSplit":
        texts, labels = _check_split(split)
        ids, lengths = encode_batch(texts)
        return cls(ids, lengths, labels)

    def __len__(self) -> int:
        return len(self.labels)


def _check_encoded(ids, lengths, labels) -> None:
    """ids (N, T) integer token ids, lengths (N,) in 1..T, labels (N,) integer class indices."""
    for name, t, ndim in (("ids", ids, 2), ("lengths", lengths, 1), ("labels", labels, 1)):
        if not isinstance(t, torch.Tensor):
            raise ArgumentTypeError(f"EncodedSplit.{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ArgumentTypeError(f"EncodedSplit.{name} must hold integers (token ids, lengths, class indices), "
                                    f"got {t.dtype}; convert with .long()")
        if t.ndim != ndim:
            shape = "(N, T): one row of token ids per text" if ndim == 2 else "(N,): one value per text"
            raise ValueError(f"EncodedSplit.{name} must have shape {shape}, got {tuple(t.shape)}")
    if not len(ids) == len(lengths) == len(labels):
        raise ValueError(f"EncodedSplit: ids, lengths and labels must have one row per text, got "
                         f"{len(ids)}, {len(lengths)} and {len(labels)}")
    if len(lengths) and (int(lengths.min()) < 1 or int(lengths.max()) > ids.shape[1]):
        raise ValueError(f"EncodedSplit.lengths must be between 1 and {ids.shape[1]} (the number of token "
                         f"columns), got values from {int(lengths.min())} to {int(lengths.max())}")
    if len(labels) and int(labels.min()) < 0:
        raise ValueError(f"labels must be class indices 0, 1, ..., got {int(labels.min())}")


def _check_split(split) -> tuple[list[str], torch.Tensor]:
    """(texts, labels) of a Split-like object, checked: a list of str and as many integer labels."""
    texts, labels = getattr(split, "texts", None), getattr(split, "labels", None)
    if texts is None or labels is None:
        raise ArgumentTypeError(f"expected a Split (with .texts and .labels) or an EncodedSplit, got "
                                f"{type(split).__name__}. classification_splits(task) returns Splits.")
    if isinstance(texts, str):
        raise ArgumentTypeError(f"split.texts must be a list of texts, got one str ({texts[:40]!r}...): "
                                "wrap a single text in a list, [text]")
    try:
        texts = list(texts)
    except TypeError:
        raise ArgumentTypeError(f"split.texts must be a list of str, got {type(texts).__name__}") from None
    bad = next((t for t in texts if not isinstance(t, str)), None)
    if bad is not None:
        raise ArgumentTypeError(f"split.texts must hold str, got {bad!r} ({type(bad).__name__})")
    if isinstance(labels, torch.Tensor):
        labels = labels.clone()
    else:
        try:
            labels = torch.as_tensor(labels)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ArgumentTypeError(f"split.labels must be integer class indices, got {type(labels).__name__}") from err
    if labels.is_floating_point() or labels.dtype == torch.bool or labels.ndim != 1:
        raise ArgumentTypeError(f"split.labels must be a 1-D tensor of integer class indices, got {labels.dtype} "
                                f"with shape {tuple(labels.shape)}")
    if len(texts) != len(labels):
        raise ValueError(f"the split has {len(texts)} texts but {len(labels)} labels: give one label per text")
    return texts, labels.long()


def _encoded(split, what: str = "split") -> EncodedSplit:
    data = split if isinstance(split, EncodedSplit) else EncodedSplit.from_split(split)
    if len(data) == 0:
        raise ValueError(f"the {what} split is empty: it needs at least one text")
    return data


def _first_parameter(model) -> nn.Parameter:
    if not isinstance(model, nn.Module):
        raise ArgumentTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    try:
        return next(model.parameters())
    except StopIteration:
        raise ValueError("the model has no parameters") from None


def _check_classifier_data(model: nn.Module, data: EncodedSplit, what: str) -> None:
    """Token ids the model's embedding holds, and labels its head can predict: checked here, so
    that neither an IndexError from the embedding nor one from cross_entropy reaches the user."""
    emb = getattr(model, "tok_emb", None)
    if isinstance(emb, nn.Embedding) and int(data.ids.max()) >= emb.num_embeddings:
        raise ValueError(f"the {what} split has token id {int(data.ids.max())}, but the model's vocabulary has "
                         f"{emb.num_embeddings} tokens (ids 0..{emb.num_embeddings - 1}): encode the texts with the "
                         "tokenizer the model was trained with")
    context = getattr(getattr(model, "cfg", None), "context_length", None)
    if isinstance(context, int) and data.ids.shape[1] > context:
        raise ValueError(f"the {what} split has {data.ids.shape[1]} token columns, more than the model's "
                         f"context_length={context}")
    head = getattr(model, "out_head", None)
    classes = getattr(head, "out_features", None)
    if isinstance(classes, int) and int(data.labels.max()) >= classes:
        raise ValueError(f"the {what} split has label {int(data.labels.max())}, but the model's head has "
                         f"{classes} outputs (labels 0..{classes - 1}). Build the classifier with "
                         "make_classifier(base, num_classes=...) for this many classes.")


def classification_logits(model: nn.Module, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, T) ids -> (B, classes) logits read at each message's last real token."""
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.is_floating_point() or ids.dtype == torch.bool:
        raise ArgumentTypeError("ids must be a (B, T) tensor of integer token ids, got "
                                + (f"{ids.dtype} with shape {tuple(ids.shape)}" if isinstance(ids, torch.Tensor)
                                   else type(ids).__name__))
    if not isinstance(lengths, torch.Tensor) or lengths.shape != ids.shape[:1] or lengths.is_floating_point():
        raise ArgumentTypeError(f"lengths must be a ({len(ids)},) integer tensor: the number of real tokens per row")
    if len(lengths) and (int(lengths.min()) < 1 or int(lengths.max()) > ids.shape[1]):
        raise ValueError(f"lengths must be between 1 and {ids.shape[1]} (the number of token columns)")
    logits = model(ids)  # (B, T, classes)
    return logits[torch.arange(len(ids), device=ids.device), lengths - 1]


@torch.no_grad()
def evaluate(model: nn.Module, split, batch_size: int = 250) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy) of a classifier on a split, in eval mode (the model's
    training mode is restored afterwards, also when it fails)."""
    device = _first_parameter(model).device
    batch_size = check_int(batch_size, "batch_size", minimum=1)
    data = _encoded(split)
    _check_classifier_data(model, data, "evaluated")
    was_training = model.training
    model.eval()
    try:
        total_loss, correct = 0.0, 0
        for start in range(0, len(data), batch_size):
            sl = slice(start, start + batch_size)
            width = int(data.lengths[sl].max())  # cut the padding every row of the batch has
            ids, lengths, labels = data.ids[sl, :width].to(device), data.lengths[sl].to(device), data.labels[sl].to(device)
            logits = classification_logits(model, ids, lengths)
            total_loss += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += (logits.argmax(-1) == labels).sum().item()
    finally:
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


class Progress:
    """A one-line text progress report, "name: 120/200 steps", rewritten in place (with "\\r")
    ten times per run and left at its final state, "name: 200/200 steps". Plain text rather than
    a widget: a saved notebook and the course's website show that the run finished, nbval
    compares the final line (it applies "\\r" as a terminal does), and a busy machine is not
    flooded with widget messages. LORA_COURSE_PROGRESS=0 or progress=False turn it off."""

    def __init__(self, total: int, name: str, enabled: bool = True, unit: str = "steps"):
        self.total, self.name, self.unit = total, name, unit
        self.enabled = enabled and os.environ.get("LORA_COURSE_PROGRESS", "1") != "0"
        self.every = max(1, total // 10)

    def update(self, step: int) -> None:
        if self.enabled and (step % self.every == 0 or step == self.total):
            end = "\n" if step == self.total else ""
            print(f"\r{self.name}: {step}/{self.total} {self.unit}", end=end, flush=True)


def train_classifier(model: nn.Module, train, val, *, steps: int = 150, lr: float = 1e-3, batch_size: int = 32,
                     weight_decay: float = 0.0, eval_every: int = 25, seed: int = 0, name: str = "run",
                     progress: bool = True, param_groups: list[dict] | None = None) -> History:
    """Train the model's trainable parameters with AdamW on a classification split.

    Batches are drawn with a seeded generator, so two runs with the same seed see the same data in
    the same order; each batch is cut to its longest message (padding costs time, not accuracy).
    Validation loss and accuracy are measured every ``eval_every`` steps and at the end. Returns
    a ``History``. ``param_groups`` (AdamW parameter groups, e.g. LoRA+'s B at a larger learning
    rate, ``variants.loraplus_param_groups``) replaces the single group of every trainable
    parameter at ``lr``.

    Every argument is checked before the first step: positive ``steps``, ``batch_size`` and
    ``eval_every``, a finite positive ``lr``, non-empty splits with one integer label per text
    that the model's head can predict, and no merged LoRA layer (training a merged model would
    train only what is not merged; call ``unmerge_lora_(model)`` first).
    """
    from .lora import lora_layers

    _first_parameter(model)
    steps = check_int(steps, "steps", minimum=1, hint="train for at least one step, e.g. steps=150")
    lr = float(check_number(lr, "lr", positive=True, hint="a learning rate such as 1e-3 or 3e-4"))
    batch_size = check_int(batch_size, "batch_size", minimum=1, hint="e.g. batch_size=32")
    weight_decay = float(check_number(weight_decay, "weight_decay", minimum=0))
    eval_every = check_int(eval_every, "eval_every", minimum=1,
                           hint="validate every so many steps (the last step is always validated)")
    seed = check_int(seed, "seed")
    name = check_str(name, "name")
    progress = check_bool(progress, "progress")
    train, val = _encoded(train, "training"), _encoded(val, "validation")
    _check_classifier_data(model, train, "training")
    _check_classifier_data(model, val, "validation")
    merged = [n for n, layer in lora_layers(model) if layer.merged]
    if merged:
        raise LoRAStateError(f"the model's LoRA is merged into its weights ({merged[0]!r}, {len(merged)} layer(s)): "
                             "training it now would update only what is not merged (the head), and A and B would "
                             "no longer match the weights. Call unmerge_lora_(model) before training.")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: did you freeze everything? "
                         "mark_only_lora_as_trainable(model) keeps the LoRA matrices trainable")
    device = params[0].device
    if param_groups is not None:
        grouped = [p for group in param_groups for p in group["params"]]
        if {id(p) for p in grouped} != {id(p) for p in params} or len(grouped) != len(params):
            raise ValueError("param_groups must hold every trainable parameter exactly once (and nothing frozen)")
    optimizer = torch.optim.AdamW(param_groups if param_groups is not None else params, lr=lr,
                                  weight_decay=weight_decay)
    history = History(name=name, lr=lr, trainable_parameters=trainable_parameters(model))
    generator = torch.Generator().manual_seed(seed)
    bar = Progress(steps, name, progress)
    model.train()
    for step in range(1, steps + 1):
        idx = torch.randint(len(train), (batch_size,), generator=generator)
        width = int(train.lengths[idx].max())
        ids, lengths, labels = train.ids[idx, :width].to(device), train.lengths[idx].to(device), train.labels[idx].to(device)
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
        bar.update(step)
    model.eval()
    return history


@torch.no_grad()
def language_model_loss(model: nn.Module, texts: list[str], lm_head: nn.Module | None = None,
                        batch_size: int = 500) -> float:
    """Mean next-token cross-entropy on ``texts``. With ``lm_head``, the model's hidden states
    (``model.features``) are read out by that head instead of ``model.out_head``: this measures
    how much a fine-tuned classifier's body still knows the language (forgetting)."""
    device = _first_parameter(model).device
    if isinstance(texts, str):
        raise ArgumentTypeError(f"texts must be a list of texts, got one str ({texts[:40]!r}...): wrap it in a list")
    texts = list(texts) if isinstance(texts, (list, tuple)) else texts
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise ArgumentTypeError("texts must be a list of str")
    if not texts:
        raise ValueError("texts is empty: give at least one text")
    batch_size = check_int(batch_size, "batch_size", minimum=1)
    if lm_head is not None and not isinstance(lm_head, nn.Module):
        raise ArgumentTypeError(f"lm_head must be a torch.nn.Module (e.g. base.out_head) or None, got "
                                f"{type(lm_head).__name__}")
    if lm_head is not None and not hasattr(model, "features"):
        raise ArgumentTypeError(f"lm_head needs a model with a features() method (like GPTModel), got "
                                f"{type(model).__name__}")
    was_training = model.training
    model.eval()
    try:
        total, count = 0.0, 0
        for start in range(0, len(texts), batch_size):
            inputs, targets = lm_batch(texts[start:start + batch_size])
            width = int((targets != -100).sum(1).max())  # cut the padding every row has
            inputs, targets = inputs[:, :width].to(device), targets[:, :width].to(device)
            logits = lm_head(model.features(inputs)) if lm_head is not None else model(inputs)
            total += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum").item()
            count += (targets != -100).sum().item()
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("the texts hold no tokens to predict (all empty)")
    return total / count
