"""Run definitions for the course's fine-tuning experiments (notebooks 04, 05 and 10).

A ``RunSpec`` says what trains in one run and at which learning rate:

- ``"full"``: full fine-tuning, every parameter trains;
- ``"lora"``: LoRA (or one of its variants, see ``variants.py``) of some rank on some layers,
  with the new classification head trained fully (``modules_to_save``), frozen with a LoRA branch
  (appendix E), or frozen;
- ``"head only"``: a linear probe, only the new head trains on the frozen body;
- ``"last block"``: chapter 6 of the book: the last transformer block, the final LayerNorm and
  the head train, everything below stays frozen.

``build_model`` turns a spec into a fresh classifier from the base model (so a notebook cell that
builds and trains can be re-run without wrapping any layer twice), ``run`` trains one, and
``run_seeds`` trains one spec with several seeds: every seed draws its own batch order, head and
A matrices, and seed s of every spec sees the same batches, so methods are compared on the same
data. ``SeedRuns`` summarises them as mean and spread.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .adapters import base_state
from .data import num_classes as task_classes
from .lora import LinearWithLoRA, LoRALayer, _matches, mark_only_lora_as_trainable, replace_linear_with_lora
from .training import History, evaluate, make_classifier, train_classifier

#: LoRA placements by name (PEFT-style target_modules: names match exactly or as a dotted suffix).
TARGETS = {
    "q,v": ["W_query", "W_value"],                          # the paper's default (§7.1)
    "attention": ["W_query", "W_key", "W_value", "out_proj"],
    "feed-forward": ["ff.layers.0", "ff.layers.2"],
    "all linear": r"trf_blocks\.\d+\..*",                    # every Linear inside the blocks
}
METHODS = ("full", "lora", "head only", "last block")
HEAD_MODES = ("train", "lora", "frozen")
#: The main experiment's training budget (notebooks 05-07 and the sweep that tunes their rates).
MAIN_STEPS, MAIN_EVAL_EVERY = 200, 50
SWEEP_PATH = Path(__file__).parent / "sweeps" / "lr_sweep.json"


def tuned_learning_rates(path=SWEEP_PATH) -> dict[str, float]:
    """The learning rate per method chosen by ``scripts/lr_sweep.py`` (best validation accuracy
    on its grid): keys "full", "lora", "head only", "last block"."""
    return {method: float(lr) for method, lr in json.loads(Path(path).read_text())["best"].items()}


def lr_sweep_results(path=SWEEP_PATH) -> dict:
    """Everything the sweep recorded (grid, seeds, steps, validation accuracy and loss per rate)."""
    return json.loads(Path(path).read_text())


#: The course's one alpha for every rank. With the alpha/rank scaling, s = alpha / r: the size of
#: an update no longer grows with r, so one learning rate serves every rank (pitfall #1).
LORA_ALPHA = 8


@dataclass(frozen=True)
class RunSpec:
    """One fine-tuning run.

    ``method`` is one of ``METHODS``. For "lora": ``rank``, ``alpha`` (default ``LORA_ALPHA``),
    ``scaling`` (default alpha/rank), ``targets`` (a key of ``TARGETS``), ``variant`` ("lora",
    or a variant of ``variants.VARIANTS`` such as "dora") and ``head``: "train" (fully trainable,
    ``modules_to_save=["out_head"]``), "lora" (frozen at its random init with a LoRA branch, as in
    appendix E where LoRA is added after the head is created) or "frozen" (neither).
    """

    name: str
    lr: float
    method: str = "lora"
    rank: int | None = None
    targets: str = "all linear"
    alpha: float | None = None
    head: str = "train"
    scaling: str = "alpha/rank"
    variant: str = "lora"
    loraplus_ratio: float | None = None   # LoRA+: B (and 1-D parameters) train at lr · ratio

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}: choose one of {METHODS}")
        if self.method == "lora":
            if self.rank is None:
                raise ValueError("a LoRA run needs a rank, e.g. RunSpec('LoRA r=4', lr, rank=4)")
            if self.targets not in TARGETS:
                raise ValueError(f"unknown targets {self.targets!r}: choose one of {list(TARGETS)}")
            if self.head not in HEAD_MODES:
                raise ValueError(f"unknown head mode {self.head!r}: choose one of {HEAD_MODES}")
        elif self.rank is not None or self.head != "train" or self.variant != "lora" or self.loraplus_ratio is not None:
            raise ValueError(f"rank, head, variant and loraplus_ratio apply to LoRA runs only, not to method {self.method!r}")
        if self.loraplus_ratio is not None and not (isinstance(self.loraplus_ratio, (int, float))
                                                    and self.loraplus_ratio > 0):
            raise ValueError(f"loraplus_ratio must be a positive number (the paper uses 16), got {self.loraplus_ratio!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"learning rate must be positive, got {self.lr!r}")

    @property
    def is_full(self) -> bool:
        return self.method == "full"

    @property
    def lora_alpha(self) -> float:
        return LORA_ALPHA if self.alpha is None else self.alpha


def build_model(base: nn.Module, spec: RunSpec, head_seed: int = 123, lora_seed: int = 0,
                num_classes: int = 2) -> nn.Module:
    """A fresh classifier from ``base`` with exactly the parameters of ``spec`` trainable.

    The new head is drawn with ``head_seed`` and the LoRA matrices A with ``lora_seed``, from
    their own seeded streams: the same spec gives the same model however many models were built
    before (a notebook cell can be re-run), and the global random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        model = make_classifier(base, num_classes=num_classes, seed=head_seed)
        if spec.method != "lora":
            for name, p in model.named_parameters():
                p.requires_grad_(_trains(spec.method, name, base.cfg.n_layers))
            return model
        if spec.variant == "lora":
            replace_linear_with_lora(model, spec.rank, spec.lora_alpha, scaling=spec.scaling,
                                     target_modules=TARGETS[spec.targets], seed=lora_seed)
        else:
            from .variants import replace_linear_with_variant
            replace_linear_with_variant(model, spec.variant, spec.rank,
                                        None if spec.variant == "vera" else spec.lora_alpha,
                                        scaling=spec.scaling, target_modules=TARGETS[spec.targets], seed=lora_seed)
        if spec.head == "lora":  # appendix E: the head, created before LoRA is added, gets a branch too
            head_rank = head_lora_rank(spec.rank, model.out_head)
            replace_linear_with_lora(model, head_rank, spec.lora_alpha * head_rank / spec.rank,
                                     scaling=spec.scaling, target_modules=["out_head"], seed=lora_seed + 1)
    mark_only_lora_as_trainable(model, modules_to_save=["out_head"] if spec.head == "train" else [])
    return model


def _trains(method: str, name: str, n_layers: int) -> bool:
    if method == "full":
        return True
    if method == "head only":
        return name.startswith("out_head.")
    # "last block": the book's chapter 6 recipe
    return name.startswith(("out_head.", "final_norm.", f"trf_blocks.{n_layers - 1}."))


def head_lora_rank(rank: int, head: nn.Linear) -> int:
    """The rank of the LoRA branch on the classification head: ``rank``, capped at
    min(in, out) = the number of classes. A·B of a 48 → 6 head cannot have rank above 6;
    appendix E's rank-16 branch on its 2-class head has 14 columns that add parameters but no
    capacity (the course allows it with a warning). alpha is scaled with it to keep alpha/rank."""
    return min(rank, head.in_features, head.out_features)


def run(base: nn.Module, spec: RunSpec, splits: dict, *, steps: int, eval_every: int, seed: int = 0,
        head_seed: int | None = None, lora_seed: int | None = None, batch_size: int = 32,
        num_classes: int | None = None, progress: bool = True, param_groups=None) -> tuple[nn.Module, History]:
    """Build the model of ``spec`` and train it on ``splits["train"]``; returns (model, history).
    ``seed`` orders the batches and, unless given, also draws the head (``head_seed`` = 123 +
    seed) and the A matrices (``lora_seed`` = seed). ``param_groups``: a function of the model
    that returns AdamW groups; by default a spec with ``loraplus_ratio`` gets LoRA+'s groups
    (``variants.loraplus_param_groups``)."""
    classes = num_classes if num_classes is not None else int(splits["train"].labels.max()) + 1
    model = build_model(base, spec, head_seed=123 + seed if head_seed is None else head_seed,
                        lora_seed=seed if lora_seed is None else lora_seed, num_classes=classes)
    if param_groups is None and spec.loraplus_ratio is not None:
        from .variants import loraplus_param_groups
        param_groups = lambda m: loraplus_param_groups(m, spec.lr, spec.loraplus_ratio)  # noqa: E731
    history = train_classifier(model, splits["train"], splits["val"], steps=steps, lr=spec.lr,
                               batch_size=batch_size, eval_every=eval_every, seed=seed,
                               name=f"{spec.name} (seed {seed})", progress=progress,
                               param_groups=param_groups(model) if param_groups else None)
    history.name = spec.name
    return model, history


@dataclass
class SeedRuns:
    """One spec trained with several seeds: the histories, final test accuracies and models."""

    spec: RunSpec
    seeds: list[int]
    histories: list[History]
    test_accuracy: list[float]
    models: list[nn.Module] = field(default_factory=list, repr=False)

    @property
    def trainable_parameters(self) -> int:
        return self.histories[0].trainable_parameters

    @property
    def mean(self) -> float:
        return statistics.mean(self.test_accuracy)

    @property
    def std(self) -> float:
        """Sample standard deviation across seeds (0 for a single seed)."""
        return statistics.stdev(self.test_accuracy) if len(self.test_accuracy) > 1 else 0.0

    @property
    def val_accuracy(self) -> list[float]:
        return [h.final_val_accuracy for h in self.histories]

    def curve(self, key: str = "val_accuracy") -> tuple[list[int], list[float], list[float]]:
        """(steps, mean, std) over seeds of a recorded curve ("val_accuracy", "val_loss")."""
        steps = self.histories[0].eval_steps
        values = list(zip(*(getattr(h, key) for h in self.histories)))
        return steps, [statistics.mean(v) for v in values], [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]

    def summary(self) -> str:
        return f"{self.spec.name}: test accuracy {self.mean:.3f} ± {self.std:.3f} over {len(self.seeds)} seeds"


def run_seeds(base: nn.Module, spec: RunSpec, splits: dict, *, seeds: Sequence[int] = (0, 1, 2), steps: int,
              eval_every: int, batch_size: int = 32, keep_models: bool = False, progress: bool = True,
              param_groups=None) -> SeedRuns:
    """Train ``spec`` once per seed and measure each run on ``splits["test"]``."""
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"give distinct seeds, e.g. (0, 1, 2); got {seeds!r}")
    classes = int(max(int(s.labels.max()) for s in splits.values())) + 1
    histories, accuracies, models = [], [], []
    for seed in seeds:
        model, history = run(base, spec, splits, steps=steps, eval_every=eval_every, seed=seed,
                             batch_size=batch_size, num_classes=classes, progress=progress,
                             param_groups=param_groups)
        histories.append(history)
        accuracies.append(evaluate(model, splits["test"])[1])
        if keep_models:
            models.append(model)
    return SeedRuns(spec, seeds, histories, accuracies, models)


def means_differ_beyond_noise(mean_a: float, std_a: float, mean_b: float, std_b: float) -> bool:
    """The course's (deliberately cautious) rule for saying "A is better than B" in prose: the
    means differ by more than the sum of their standard deviations across seeds. Inside that
    band the difference is called noise."""
    return abs(mean_a - mean_b) > std_a + std_b


def differs_beyond_noise(a: SeedRuns, b: SeedRuns) -> bool:
    """``means_differ_beyond_noise`` on two methods' mean test accuracies."""
    return means_differ_beyond_noise(a.mean, a.std, b.mean, b.std)


@torch.no_grad()
def truncated_update_model(base_classifier: nn.Module, finetuned: nn.Module, rank: int) -> nn.Module:
    """The bridge from spectrum to accuracy: W0 + (ΔW truncated to rank r) in every Linear layer
    of the transformer blocks, where ΔW = W_finetuned - W0 is the full fine-tuning update.

    ``base_classifier`` is the classifier before fine-tuning (same head shape), ``finetuned`` the
    fully fine-tuned one. The returned copy has the fine-tuned head (LoRA trains the head fully
    too) and, everywhere else (embeddings, LayerNorms), the base weights: like a LoRA run, only
    the Linear layers of the blocks move, each by a rank-r matrix, the best one in Frobenius
    norm (Eckart-Young). rank >= min(out, in) keeps ΔW whole."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    model = make_classifier(base_classifier, num_classes=base_classifier.out_head.out_features)
    model.load_state_dict(base_classifier.state_dict())
    model.out_head.load_state_dict(finetuned.out_head.state_dict())
    tuned = dict(finetuned.named_modules())
    for name, layer in model.named_modules():
        if isinstance(layer, nn.Linear) and name.startswith("trf_blocks."):
            delta = tuned[name].weight - layer.weight                     # (out, in)
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)       # delta = U diag(s) Vᵀ
            k = min(rank, len(s))
            layer.weight += (u[:, :k] * s[:k]) @ vh[:k]
            if layer.bias is not None:
                layer.bias.copy_(tuned[name].bias)                        # biases are vectors: kept whole
    return model.eval()


def closed_form_trainable(base: nn.Module, spec: RunSpec, num_classes: int = 2) -> int:
    """Trainable parameters of ``spec`` from the layer shapes of ``base`` alone: r·(in + out) for
    every adapted Linear, plus the new head's weight and bias when it trains fully. Independent
    of ``build_model``, so the two can check each other."""
    emb = base.out_head.in_features
    head = emb * num_classes + num_classes
    if spec.is_full:
        body = sum(p.numel() for name, p in base.named_parameters() if not name.startswith("out_head."))
        return body + head
    if spec.method == "head only":
        return head
    if spec.method == "last block":
        last = f"trf_blocks.{base.cfg.n_layers - 1}."
        return head + sum(p.numel() for name, p in base.named_parameters() if name.startswith((last, "final_norm.")))
    if spec.variant != "lora":
        raise ValueError("closed_form_trainable counts plain LoRA; variants add their own parameters")
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
