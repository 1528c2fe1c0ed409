"""Run definitions for the fine-tuning experiments of notebooks 04 and 05.

A ``RunSpec`` says what trains in one run (full fine-tuning, or LoRA of some rank on some layers,
with the new classification head trained fully or frozen with a LoRA branch) and at which
learning rate. ``build_model`` turns it into a fresh classifier from the base model, so a notebook
cell that builds and trains can be run twice without wrapping any layer twice.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from .adapters import base_state
from .lora import LoRALayer, _matches, mark_only_lora_as_trainable, replace_linear_with_lora
from .training import History, make_classifier, train_classifier

#: LoRA placements by name (PEFT-style target_modules: names match exactly or as a dotted suffix).
TARGETS = {
    "q,v": ["W_query", "W_value"],                          # the paper's default (§7.1)
    "attention": ["W_query", "W_key", "W_value", "out_proj"],
    "feed-forward": ["ff.layers.0", "ff.layers.2"],
    "all linear": r"trf_blocks\.\d+\..*",                    # every Linear inside the blocks
}
HEAD_MODES = ("train", "lora", "frozen")


@dataclass(frozen=True)
class RunSpec:
    """One fine-tuning run.

    rank None means full fine-tuning (every parameter trains). Otherwise LoRA with this rank and
    ``alpha`` (default: alpha = rank, so the scaling alpha/rank is 1) on ``targets`` (a key of
    ``TARGETS``). ``head`` says what happens to the new 2-class head: "train" (fully trainable,
    ``modules_to_save=["out_head"]``), "lora" (frozen at its random init with a LoRA branch, as
    in appendix E where LoRA is added after the head is created) or "frozen" (neither).
    """

    name: str
    lr: float
    rank: int | None = None
    targets: str = "all linear"
    alpha: float | None = None
    head: str = "train"

    def __post_init__(self):
        if self.rank is not None and self.targets not in TARGETS:
            raise ValueError(f"unknown targets {self.targets!r}: choose one of {list(TARGETS)}")
        if self.head not in HEAD_MODES:
            raise ValueError(f"unknown head mode {self.head!r}: choose one of {HEAD_MODES}")
        if self.rank is None and self.head != "train":
            raise ValueError("full fine-tuning trains the head too; head modes apply to LoRA runs only")
        if not self.lr > 0:
            raise ValueError(f"learning rate must be positive, got {self.lr!r}")

    @property
    def is_full(self) -> bool:
        return self.rank is None


def build_model(base: nn.Module, spec: RunSpec, head_seed: int = 123, lora_seed: int = 0) -> nn.Module:
    """A fresh classifier from ``base`` with exactly the parameters of ``spec`` trainable.

    The new head is drawn with ``head_seed`` and the LoRA matrices A with ``lora_seed``, from a
    forked random state: the same spec gives the same model however many models were built
    before (a notebook cell can be re-run), and the global random state is left as it was."""
    alpha = spec.alpha if spec.alpha is not None else spec.rank
    # make_classifier's nn.Linear draws (then overwrites) default weights from the global generator
    with torch.random.fork_rng(devices=[]):
        model = make_classifier(base, seed=head_seed)
        if spec.is_full:
            for p in model.parameters():
                p.requires_grad_(True)
            return model
        torch.manual_seed(lora_seed)
        replace_linear_with_lora(model, spec.rank, alpha, target_modules=TARGETS[spec.targets])
        if spec.head == "lora":  # appendix E: the head, created before LoRA is added, gets a branch too
            head_rank = head_lora_rank(spec.rank, model.out_head)
            replace_linear_with_lora(model, head_rank, alpha * head_rank / spec.rank, target_modules=["out_head"])
    mark_only_lora_as_trainable(model, modules_to_save=["out_head"] if spec.head == "train" else [])
    return model


def head_lora_rank(rank: int, head: nn.Linear) -> int:
    """The rank of the LoRA branch on the classification head: ``rank``, capped at
    min(in, out) = the number of classes. A·B of a 64 → 2 head can never have rank above 2, and
    ``LoRALayer`` refuses larger ranks (appendix E's rank-16 branch on its 2-class head has 14
    columns that add parameters but no capacity). alpha is scaled with it to keep alpha/rank."""
    return min(rank, head.in_features, head.out_features)


def run(base: nn.Module, spec: RunSpec, splits: dict, *, steps: int, eval_every: int, seed: int = 0,
        head_seed: int = 123, lora_seed: int = 0, batch_size: int = 32,
        progress: bool = True) -> tuple[nn.Module, History]:
    """Build the model of ``spec`` and train it on ``splits["train"]``; returns (model, history).
    ``seed`` orders the batches; ``head_seed`` and ``lora_seed`` draw the initial weights."""
    model = build_model(base, spec, head_seed=head_seed, lora_seed=lora_seed)
    history = train_classifier(model, splits["train"], splits["val"], steps=steps, lr=spec.lr,
                               batch_size=batch_size, eval_every=eval_every, seed=seed, name=spec.name,
                               progress=progress)
    return model, history


def closed_form_trainable(base: nn.Module, spec: RunSpec, num_classes: int = 2) -> int:
    """Trainable parameters of ``spec`` from the layer shapes of ``base`` alone: r·(in + out) for
    every adapted Linear, plus the new head's weight and bias when it trains fully. Independent
    of ``build_model``, so the two can check each other."""
    emb = base.out_head.in_features
    head = emb * num_classes + num_classes
    if spec.is_full:
        body = sum(p.numel() for name, p in base.named_parameters() if not name.startswith("out_head."))
        return body + head
    probe = make_classifier(base)  # only to list names; its weights are not used
    names = [n for n, m in probe.named_modules() if isinstance(m, nn.Linear) and n != "out_head"]
    pattern = TARGETS[spec.targets]
    count = sum(spec.rank * (probe.get_submodule(n).in_features + probe.get_submodule(n).out_features)
                for n in names if _matches(n, pattern))
    if spec.head == "train":
        count += head
    elif spec.head == "lora":
        count += min(spec.rank, emb, num_classes) * (emb + num_classes)
    return count


def base_weights_unchanged(base: nn.Module, model: nn.Module) -> bool:
    """True when every base weight inside ``model`` equals ``base`` bit for bit (the replaced
    classification head excepted). LoRA training must leave them untouched."""
    reference = {k: v for k, v in base.state_dict().items() if not k.startswith("out_head.")}
    current = {k: v for k, v in base_state(model).items() if not k.startswith("out_head.")}
    if reference.keys() != current.keys():
        raise ValueError("the model does not have the base model's parameters "
                         f"(differences: {sorted(reference.keys() ^ current.keys())[:3]})")
    return all(torch.equal(reference[k], current[k]) for k in reference)


def linear_matmul_flops(model: nn.Module, *inputs) -> dict[str, int]:
    """Multiply-add FLOPs (2 per multiply-add) of one training step in the model's Linear layers
    and LoRA branches, for the batch ``inputs`` (paper §4.2; attention score matmuls and
    element-wise ops are left out: they cost the same with or without LoRA).

    Runs one forward pass ``model(*inputs)`` with hooks that record, for every Linear and LoRA
    branch it calls, the number of tokens T and whether its input requires a gradient. Per weight
    W (in × out): forward 2·T·in·out; gradient for the layer's input another 2·T·in·out, only if
    that input requires one (block 0's query, key and value read the frozen embeddings through a
    frozen LayerNorm: backpropagation stops there); gradient for W another 2·T·in·out, only if W
    trains. A LoRA branch's two matmuls x·A (in × r) and (x·A)·B (r × out) are counted the same
    way, so a frozen W with a branch costs 4·T·in·out + 6·T·r·(in + out) where its input needs a
    gradient, against 6·T·in·out in full fine-tuning. This is what torch's ``FlopCounterMode``
    counts for the same layers (tests/test_experiments.py)."""
    calls: list[tuple[nn.Module, int, bool]] = []

    def record(module, args, _output):
        x = args[0]
        calls.append((module, x.numel() // x.shape[-1], x.requires_grad))

    handles = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, (nn.Linear, LoRALayer))]
    try:
        with torch.enable_grad(), torch.random.fork_rng(devices=[]):  # dropout draws leave no trace
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()

    forward = input_grad = weight_grad = 0

    def matmul(tokens, n_in, n_out, input_needs_grad, weight_trains):
        nonlocal forward, input_grad, weight_grad
        cost = 2 * tokens * n_in * n_out
        forward += cost
        input_grad += cost if input_needs_grad else 0
        weight_grad += cost if weight_trains else 0

    for module, tokens, needs_grad in calls:
        if isinstance(module, nn.Linear):
            matmul(tokens, module.in_features, module.out_features, needs_grad, module.weight.requires_grad)
        else:  # LoRA branch: x·A, then (x·A)·B, whose input needs a gradient if x or A does
            (n_in, r), n_out = module.A.shape, module.B.shape[1]
            matmul(tokens, n_in, r, needs_grad, module.A.requires_grad)
            matmul(tokens, r, n_out, needs_grad or module.A.requires_grad, module.B.requires_grad)
    return {"forward": forward, "input_grad": input_grad, "weight_grad": weight_grad,
            "total": forward + input_grad + weight_grad}


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """A fixed-width text table. ``columns`` are (key, header, format) like ("acc", "val acc", "{:.2f}")."""
    cells = [[header for _, header, _ in columns]]
    for row in rows:
        cells.append([fmt.format(row[key]) for key, _, fmt in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
