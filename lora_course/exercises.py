"""Checkers for the course's exercises.

Each checker takes what the learner wrote (a class, a function or a number), runs it against the
reference implementation in this package, and returns a ``CheckResult``: ``correct``, ``not done``
(the placeholder still raises ``NotImplementedError`` or returns ``None``) or ``incorrect`` with a
hint about what to look at, not only "wrong".
"""
from __future__ import annotations

import itertools
import numbers
import re
from dataclasses import dataclass, field

import torch

NOT_DONE, CORRECT, INCORRECT = "not done", "correct", "incorrect"


@dataclass
class CheckResult:
    exercise: str
    status: str
    message: str
    hints: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.status == CORRECT

    def __repr__(self) -> str:
        mark = {CORRECT: "[correct]", NOT_DONE: "[not done yet]", INCORRECT: "[not yet right]"}[self.status]
        lines = [f"{mark} {self.exercise}: {self.message}"]
        lines += [f"  hint: {h}" for h in self.hints]
        return "\n".join(lines)


def _not_done(exercise: str) -> CheckResult:
    return CheckResult(exercise, NOT_DONE, "the placeholder is still there: replace `raise NotImplementedError` "
                       "(or `...`) with your code and run the cell again")


def check_lora_layer(cls) -> CheckResult:
    """Exercise: implement ``LoRALayer(in_dim, out_dim, rank, alpha)`` with scaling alpha/rank."""
    name = "implement LoRALayer"
    in_dim, out_dim, rank, alpha = 12, 10, 3, 6
    try:
        torch.manual_seed(0)
        layer = cls(in_dim, out_dim, rank, alpha)
    except NotImplementedError:
        return _not_done(name)
    except Exception as exc:  # the learner's code failed: say where
        return CheckResult(name, INCORRECT, f"creating cls({in_dim}, {out_dim}, rank={rank}, alpha={alpha}) "
                           f"raised {type(exc).__name__}: {exc}")
    A, B = getattr(layer, "A", None), getattr(layer, "B", None)
    if A is None or B is None:
        return CheckResult(name, INCORRECT, "the layer needs two attributes, A and B",
                           ["self.A = torch.nn.Parameter(...) and self.B = torch.nn.Parameter(...)"])
    if not isinstance(A, torch.nn.Parameter) or not isinstance(B, torch.nn.Parameter):
        return CheckResult(name, INCORRECT, "A and B must be torch.nn.Parameter, or the optimizer never sees them",
                           ["wrap the tensors: torch.nn.Parameter(torch.zeros(...))"])
    if not A.is_floating_point() or not B.is_floating_point():
        return CheckResult(name, INCORRECT, f"A and B must hold floating-point numbers, got A {A.dtype} and B {B.dtype}",
                           ["create them with torch.zeros(...) / torch.empty(...), which give float32"])
    if tuple(A.shape) != (in_dim, rank) or tuple(B.shape) != (rank, out_dim):
        return CheckResult(name, INCORRECT, f"A has shape {tuple(A.shape)} and B {tuple(B.shape)}; with x of shape "
                           f"(batch, in_dim) we need A: (in_dim, rank) = {(in_dim, rank)} and B: (rank, out_dim) = "
                           f"{(rank, out_dim)}", ["x @ A @ B goes (batch, in) -> (batch, r) -> (batch, out)"])
    if torch.count_nonzero(B.detach()) != 0:
        return CheckResult(name, INCORRECT, "B is not zero at initialisation",
                           ["B starts at zero so that ΔW = A·B = 0: the adapted model equals the base model at step 0"])
    if torch.count_nonzero(A.detach()) == 0:
        return CheckResult(name, INCORRECT, "A is all zeros at initialisation",
                           ["with A = 0 and B = 0 both gradients are zero and LoRA never learns; initialise A "
                            "randomly, e.g. torch.nn.init.kaiming_uniform_(self.A.T, a=math.sqrt(5)) (the (r × in) view, "
                            "so that fan_in = in_dim, as the package does)"])
    # Give B values, then compare the forward pass with the formula.
    with torch.no_grad():
        B.copy_(torch.randn(rank, out_dim, generator=torch.Generator().manual_seed(1)))
    x = torch.randn(5, in_dim, generator=torch.Generator().manual_seed(2)).to(A.dtype)  # float64 layers get float64 x
    try:
        out = layer(x)
    except NotImplementedError:
        return _not_done(name)
    except Exception as exc:
        return CheckResult(name, INCORRECT, f"forward(x) raised {type(exc).__name__}: {exc}")
    if out is None or out is Ellipsis:
        return _not_done(name)
    if not isinstance(out, torch.Tensor):
        return CheckResult(name, INCORRECT, f"forward(x) must return a tensor, got {type(out).__name__}")
    if tuple(out.shape) != (5, out_dim):
        return CheckResult(name, INCORRECT, f"forward(x) returned shape {tuple(out.shape)}, expected {(5, out_dim)}")
    if not out.is_floating_point():
        return CheckResult(name, INCORRECT, f"forward(x) returned {out.dtype} values; it should return floats like x")
    # Compare in float64, so a layer that works in another float dtype is judged on its math.
    product = (x.double() @ A.detach().double() @ B.detach().double())
    out = out.detach().double()
    for factor, hint in ((alpha / rank, None),
                         (alpha, "you multiplied by alpha; the course's convention is alpha / rank, so that "
                                 "changing the rank does not change the size of the update"),
                         (1.0, "you forgot the scaling factor alpha / rank"),
                         (rank / alpha, "the fraction is upside down: the scaling is alpha / rank")):
        if torch.allclose(out, factor * product, rtol=1e-4, atol=1e-6):
            if hint is None:
                return CheckResult(name, CORRECT, "shapes match the reference, B = 0 and A != 0 at the start (A's "
                                   "distribution is not checked), and forward(x) = (alpha / rank)·x·A·B")
            return CheckResult(name, INCORRECT, "the forward pass is x @ A @ B times the wrong factor", [hint])
    return CheckResult(name, INCORRECT, "forward(x) does not equal (alpha / rank) * (x @ A @ B)",
                       ["check the order of the products: x @ A first, then @ B"])


def check_embedding_lora(cls) -> CheckResult:
    """Exercise: ``cls(base: nn.Embedding, rank, alpha)``, LoRA on an embedding: the frozen table
    E (num_embeddings × dim) plus s·A·B with A (num_embeddings × rank) and B (rank × dim), one of them
    zero at the start. ``forward(ids)`` returns E[ids] + s·(A·B)[ids], computed as A[ids] @ B."""
    name = "LoRA for an embedding"
    vocab, dim, rank, alpha = 11, 6, 2, 4
    torch.manual_seed(0)
    base = torch.nn.Embedding(vocab, dim)
    original = base.weight.detach().clone()
    try:
        layer = cls(base, rank, alpha)
    except NotImplementedError:
        return _not_done(name)
    except Exception as exc:
        return CheckResult(name, INCORRECT, f"creating cls(nn.Embedding({vocab}, {dim}), rank={rank}, alpha={alpha}) "
                           f"raised {type(exc).__name__}: {exc}")
    if base.weight.requires_grad:
        return CheckResult(name, INCORRECT, "the embedding table still trains",
                           ["freeze the base: base.weight.requires_grad_(False), as LoRA freezes W"])
    A, B = getattr(layer, "A", None), getattr(layer, "B", None)
    if not isinstance(A, torch.nn.Parameter) or not isinstance(B, torch.nn.Parameter):
        return CheckResult(name, INCORRECT, "the layer needs two torch.nn.Parameter attributes, A and B",
                           ["self.A = torch.nn.Parameter(...) and self.B = torch.nn.Parameter(...)"])
    if not A.is_floating_point() or not B.is_floating_point():
        return CheckResult(name, INCORRECT, f"A and B must hold floating-point numbers, got {A.dtype} and {B.dtype}")
    if tuple(A.shape) != (vocab, rank) or tuple(B.shape) != (rank, dim):
        return CheckResult(name, INCORRECT, f"A has shape {tuple(A.shape)} and B {tuple(B.shape)}; the update A·B must "
                           f"have the table's shape (num_embeddings, dim) = {(vocab, dim)}, so A: {(vocab, rank)} and "
                           f"B: {(rank, dim)}", ["an embedding is a linear layer on one-hot inputs: in = num_embeddings"])
    zero_a, zero_b = torch.count_nonzero(A.detach()) == 0, torch.count_nonzero(B.detach()) == 0
    if zero_a and zero_b:
        return CheckResult(name, INCORRECT, "A and B are both zero: both gradients are zero and LoRA never learns",
                           ["start one factor at zero (so that ΔE = 0) and the other at random"])
    if not (zero_a or zero_b):
        return CheckResult(name, INCORRECT, "neither A nor B is zero at the start, so the model is not the base model "
                           "at step 0", ["start one factor at zero: then A·B = 0 and the lookup returns E[ids] exactly"])
    ids = torch.randint(0, vocab, (3, 5), generator=torch.Generator().manual_seed(2))
    try:
        first = layer(ids)
    except NotImplementedError:
        return _not_done(name)
    except Exception as exc:
        return CheckResult(name, INCORRECT, f"forward(ids) with ids of shape {tuple(ids.shape)} raised "
                           f"{type(exc).__name__}: {exc}", ["index the rows: A[ids] has shape (batch, seq, rank)"])
    if first is None or first is Ellipsis:
        return _not_done(name)
    if not isinstance(first, torch.Tensor) or tuple(first.shape) != (3, 5, dim):
        shape = tuple(first.shape) if isinstance(first, torch.Tensor) else type(first).__name__
        return CheckResult(name, INCORRECT, f"forward(ids) returned {shape}, expected a tensor of shape {(3, 5, dim)}")
    if not torch.allclose(first.detach().double(), original[ids].double(), atol=1e-6):
        return CheckResult(name, INCORRECT, "at step 0 forward(ids) differs from the base lookup E[ids]",
                           ["add the base embedding: base(ids) + s · (A[ids] @ B)"])
    with torch.no_grad():  # give both factors values, then compare with the dense formula
        A.copy_(torch.randn(vocab, rank, generator=torch.Generator().manual_seed(3)))
        B.copy_(torch.randn(rank, dim, generator=torch.Generator().manual_seed(4)))
    out = layer(ids).detach().double()
    delta = A.detach().double() @ B.detach().double()                      # (vocab, dim), like E
    for factor, hint in ((alpha / rank, None), (alpha, "you multiplied by alpha; the scaling is alpha / rank"),
                         (1.0, "you forgot the scaling factor alpha / rank")):
        if torch.allclose(out, original.double()[ids] + factor * delta[ids], rtol=1e-4, atol=1e-6):
            if hint:
                return CheckResult(name, INCORRECT, "the update is added with the wrong factor", [hint])
            if not torch.equal(base.weight.detach(), original):
                return CheckResult(name, INCORRECT, "the forward pass is right but the embedding table changed",
                                   ["never write into base.weight: LoRA adds its update beside the frozen table"])
            start = "A starts at zero (as PEFT does for embeddings)" if zero_a else "B starts at zero"
            return CheckResult(name, CORRECT, f"{start}, so the lookup equals E[ids] at step 0, and forward(ids) = "
                               "E[ids] + (alpha / rank)·A[ids]·B: the rows of A·B, without building it")
    return CheckResult(name, INCORRECT, "forward(ids) does not equal E[ids] + (alpha / rank)·(A·B)[ids]",
                       ["onehot(ids) @ A is A[ids]: look up rows of A, then multiply by B"])


def _call(name: str, fn, *args):
    """Run the learner's function. Returns (value, None) or (None, CheckResult) for placeholders
    (NotImplementedError, ``...``, ``None``) and for code that raised."""
    if fn is None or fn is Ellipsis:
        return None, _not_done(name)
    try:
        value = fn(*args)
    except NotImplementedError:
        return None, _not_done(name)
    except Exception as exc:  # the learner's code failed: say what with
        shown = ", ".join(f"shape {tuple(a.shape)}" if isinstance(a, torch.Tensor) else repr(a) for a in args)
        return None, CheckResult(name, INCORRECT, f"calling it with ({shown}) raised {type(exc).__name__}: {exc}")
    if value is None or value is Ellipsis:
        return None, _not_done(name)
    return value, None


# ------------------------------------------------------------------------------------------------
# Exercise: count LoRA's parameters by hand
# ------------------------------------------------------------------------------------------------
def check_lora_parameter_count(fn) -> CheckResult:
    """Exercise: ``fn(in_features, out_features, rank)`` returns how many numbers LoRA trains for
    one adapted nn.Linear of that size (A: in × r, B: r × out, no bias)."""
    name = "count LoRA's parameters"
    # The course GPT's shapes (48 → 192 and 192 → 48 feed-forward layers, 48 × 48 attention) and
    # GPT-2 small's first feed-forward layer (768 → 3072). Non-square first: each slip below gives a
    # distinct number there (48·192 = 9,216, A only 4·48 = 192, B only 4·192 = 768, right 4·240 = 960).
    cases = [(48, 192, 4), (192, 48, 2), (48, 48, 8), (768, 3072, 16)]
    for in_f, out_f, r in cases:
        got, problem = _call(name, fn, in_f, out_f, r)
        if problem is not None:
            return problem
        right = r * (in_f + out_f)
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            got = got.item()
        if isinstance(got, bool) or not isinstance(got, numbers.Real):
            return CheckResult(name, INCORRECT, f"for in_features={in_f}, out_features={out_f}, rank={r} you returned "
                               f"{got!r} ({type(got).__name__}); return an int, the total count",
                               ["add the sizes of A and B into one number"])
        if got == right:
            continue
        where = f"for in_features={in_f}, out_features={out_f}, rank={r} you returned {got!r}, expected {right:,}"
        wrong = {in_f * out_f: "that is the size of the full weight W (out × in), which LoRA freezes; count A and B",
                 r * in_f: "that is only A (in × r); B (r × out) trains too",
                 r * out_f: "that is only B (r × out); A (in × r) trains too",
                 in_f * out_f + r * (in_f + out_f): "you added the frozen W; only A and B are trained",
                 r * (in_f + out_f) + out_f: "LoRA's A and B have no bias here: count only A and B",
                 r * r: "A is in × r and B is r × out; r × r is neither",
                 r * in_f * out_f: "A·B has in × out entries but LoRA stores A and B, not their product: add their sizes",
                 2 * r * in_f: "A and B have different shapes when in != out: A is in × r, B is r × out"}
        return CheckResult(name, INCORRECT, where, [wrong.get(got, "A is (in_features × rank), B is (rank × out_features): "
                                                              "add their sizes")])
    from .gpt import load_pretrained_gpt

    query = load_pretrained_gpt().trf_blocks[0].att.W_query   # the example is read off the course GPT
    i, o, r = query.in_features, query.out_features, 8
    return CheckResult(name, CORRECT, f"r·(in + out) for every case, e.g. {r}·({i} + {o}) = {r * (i + o):,} for the "
                       f"course GPT's {o}×{i} W_query at rank {r}, against {i * o:,} for the full matrix")


# ------------------------------------------------------------------------------------------------
# Exercise: count the trainable parameters of a whole LoRA classifier
# ------------------------------------------------------------------------------------------------
#: The main experiment's LoRA classifier (notebook 04): the course GPT with a new head for the main
#: task, LoRA at this rank on these targets (a key of ``experiments.TARGETS``), the head trained fully.
CLASSIFIER_COUNT_EXERCISE = {"rank": 4, "targets": "q,v"}


def _whole_number(name: str, value):
    """(int, None), or (None, CheckResult) for a placeholder or anything but a whole number."""
    if value is None or value is Ellipsis:
        return None, _not_done(name)
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point() \
            and value.dtype != torch.bool:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return None, CheckResult(name, INCORRECT, f"a count is a whole number, got {value!r} ({type(value).__name__})",
                                 ["give an int, e.g. int(count)"] if isinstance(value, numbers.Real) else [])
    return int(value), None


def _classifier_counts(rank: int, targets: str, task: str | None) -> tuple[int, int, dict[int, list[str]]]:
    """(trainable parameters of the LoRA classifier, counted on the model ``build_model``
    returns; what full fine-tuning of the same classifier trains; {wrong count: hints} for the
    usual slips), each slip computed from the same model's layer shapes, never from constants.
    Two slips can give the same number (on square matrices "A only" equals "one of q, v"); that
    number then carries both hints."""
    from . import data
    from .experiments import RunSpec, build_model
    from .gpt import load_pretrained_gpt
    from .lora import lora_layers

    task = data.MAIN_TASK if task is None else task
    base = load_pretrained_gpt()
    classes = data.num_classes(task)
    model = build_model(base, RunSpec("exercise", 1e-3, rank=rank, targets=targets), num_classes=classes)
    right = sum(p.numel() for p in model.parameters() if p.requires_grad)
    named = [(re.sub(r"^trf_blocks\.\d+\.", "", n), layer) for n, layer in lora_layers(model)]
    layers = [layer for _, layer in named]
    n_blocks = len(model.trf_blocks)
    kind_names = list(dict.fromkeys(kind for kind, _ in named))          # "att.W_query", ..., in model order
    kinds = [_short_name(k, kind_names) for k in kind_names]             # "W_query", ..., "ff.layers.0"
    emb, head_weight = model.out_head.in_features, model.out_head.weight.numel()
    head = sum(p.numel() for p in model.out_head.parameters())                      # weight and bias: emb·k + k
    lora = sum(rank * (m.in_features + m.out_features) for m in layers)            # r·(in + out) per matrix
    a_only = sum(rank * m.in_features for m in layers)
    b_only = sum(rank * m.out_features for m in layers)
    full_w = sum(m.in_features * m.out_features for m in layers)
    everything = sum(p.numel() for p in model.parameters())                       # frozen + A, B + head
    full = sum(p.numel() for n, p in base.named_parameters() if not n.startswith("out_head.")) + head  # body + head
    pretrain_head = sum(p.numel() for p in base.out_head.parameters())            # the LM head, emb → vocabulary
    slips: dict[int, list[str]] = {}

    def slip(value: int, hint: str) -> None:
        if value != right:
            slips.setdefault(value, []).append(hint)

    slip(lora, f"you forgot the new head: it trains fully (modules_to_save), {emb}·{classes} weights + "
               f"{classes} biases = {head}")
    slip(a_only + head, "you counted only A (in × r) in each adapted matrix; B (r × out) trains too")
    slip(b_only + head, "you counted only B (r × out) in each adapted matrix; A (in × r) trains too")
    slip(sum(rank * m.in_features * m.out_features for m in layers) + head,
         "r·in·out is the size of r full matrices; LoRA stores A (in × r) and B (r × out): r·(in + out) each")
    slip(full_w + head, "that counts the full weights W of the adapted layers, which LoRA freezes; count A and B")
    slip(full_w + lora + head, "you added the frozen W of the adapted layers; only A, B and the head train")
    slip(lora // n_blocks + head, f"that is one block: the course GPT has {n_blocks}, each with its own "
                                  f"{', '.join(kinds)}")
    if len(kinds) > 1:   # only one kind of matrix counted (kinds of equal size give the same number)
        by_total: dict[int, list[str]] = {}
        for kind_name, short in zip(kind_names, kinds):
            total = sum(rank * (m.in_features + m.out_features) for k, m in named if k == kind_name) + head
            by_total.setdefault(total, []).append(short)
        for total, group in by_total.items():
            slip(total, f"that counts only {' or only '.join(group)}; {targets!r} adapts {', '.join(kinds)} "
                        "in every block")
    slip(lora + head_weight, f"the head has a bias too: {classes} more numbers")
    slip(lora + pretrain_head, f"that is the pretraining head ({emb} → {base.out_head.out_features} words); the "
                               f"classifier replaces it with a new {emb} → {classes} head")
    # a 2-class head (spam's, or appendix E's): emb·2 weights + 2 biases
    slip(lora + emb * 2 + 2, f"that is a 2-class head; the {task!r} task has {classes} classes")
    slip(everything, "that is every parameter of the model; under LoRA only A, B and the new head train")
    slip(full, "that is what full fine-tuning trains (the whole body and the head); LoRA freezes the body and "
               "trains only A, B and the head")
    return right, full, slips


def check_classifier_trainable_count(count, rank: int = CLASSIFIER_COUNT_EXERCISE["rank"],
                                     targets: str = CLASSIFIER_COUNT_EXERCISE["targets"],
                                     task: str | None = None) -> CheckResult:
    """Exercise: how many parameters the main experiment's LoRA classifier trains (LoRA at
    ``rank`` on ``targets`` of the course GPT, a new head for ``task`` trained fully). The right
    count is read off the model that ``experiments.build_model`` returns."""
    name = "count a LoRA classifier's parameters"
    got, problem = _whole_number(name, count)
    if problem is not None:
        return problem
    right, full, slips = _classifier_counts(rank, targets, task)
    if got == right:
        return CheckResult(name, CORRECT, f"{right:,} trainable parameters (A and B of every adapted matrix plus the "
                           f"new head), {100 * right / full:.1f} % of the {full:,} that full fine-tuning trains")
    hints = slips.get(got, [f"per adapted matrix r·(in + out) with r = {rank}; print(model) gives in and out; "
                            "then add the new head's weight and bias"])
    return CheckResult(name, INCORRECT, f"you have {got:,}, which is not the count", hints)


# ------------------------------------------------------------------------------------------------
# Exercise: implement merging
# ------------------------------------------------------------------------------------------------
def check_merge(fn) -> CheckResult:
    """Exercise: ``fn(W, A, B, scaling)`` returns the merged weight W + scaling·(A·B)ᵀ in
    nn.Linear's (out × in) layout, where A is (in × r) and B is (r × out)."""
    name = "implement merging"
    in_dim, out_dim, rank, s = 6, 5, 2, 1.5  # in != out, so a missing transpose shows up as a shape error
    g = torch.Generator().manual_seed(0)
    W = torch.randn(out_dim, in_dim, generator=g)
    A, B = torch.randn(in_dim, rank, generator=g), torch.randn(rank, out_dim, generator=g)
    W_before = W.clone()
    got, problem = _call(name, fn, W, A, B, s)
    if problem is not None:
        if "cannot be multiplied" in problem.message:
            problem.hints.append("the product is A @ B: (in × r) @ (r × out) = (in × out); B @ A does not fit")
        elif "raised" in problem.message:
            problem.hints.append("A·B is (in × r)(r × out) = (in × out); W is (out × in), so transpose the product")
        return problem
    if not isinstance(got, torch.Tensor):
        return CheckResult(name, INCORRECT, f"return a tensor, got {type(got).__name__}")
    right = W_before + s * (A @ B).T
    if tuple(got.shape) != tuple(right.shape):
        return CheckResult(name, INCORRECT, f"the result has shape {tuple(got.shape)}, but W is (out × in) = "
                           f"{tuple(right.shape)}", ["A·B is (in × out): transpose it, (A @ B).T, before adding it to W"])
    if not got.is_floating_point():
        return CheckResult(name, INCORRECT, f"the result holds {got.dtype} values, but W, A and B are float32: "
                           "the merged weight must keep the fractions", ["do not round or cast to an integer type"])
    if got.dtype != W.dtype:
        dtype_note = f" (your result is {got.dtype}; W is {W.dtype}, and merge_ writes the result back into W's dtype)"
        got = got.to(W.dtype)
    else:
        dtype_note = ""
    got = got.detach()
    if torch.allclose(got, right, atol=1e-5):
        note = " (it also changed W in place, which is fine for merge_)" if not torch.equal(W, W_before) else ""
        return CheckResult(name, CORRECT, "W + scaling·(A·B)ᵀ matches the reference" + note + dtype_note)
    candidates = [(W_before + (A @ B).T, "you forgot the scaling factor: the update is scaling · (A·B)ᵀ"),
                  (W_before + s * s * (A @ B).T, "the scaling is applied twice"),
                  (W_before - s * (A @ B).T, "merging adds the update; subtracting it is unmerging"),
                  (s * (A @ B).T, "that is ΔW alone: the merged weight is W + ΔW"),
                  (W_before + (A @ B).T / s, "you divided by the scaling; multiply by it")]
    for wrong, hint in candidates:
        if torch.allclose(got, wrong, atol=1e-5):
            return CheckResult(name, INCORRECT, "the shape is right but the values are not", [hint])
    return CheckResult(name, INCORRECT, "the values differ from W + scaling·(A·B)ᵀ",
                       ["compare your result with W + scaling * (A @ B).T for small random tensors"])


# ------------------------------------------------------------------------------------------------
# Exercise: pick a rank for a target error (Eckart–Young)
# ------------------------------------------------------------------------------------------------
RANK_EXERCISE_SINGULAR_VALUES = (6.0, 4.0, 3.0, 2.0, 1.0, 0.5)
RANK_EXERCISE_TARGET = 4.0


def _best_error(singular_values, rank: int) -> float:
    """Eckart–Young: sqrt(σ²_{r+1} + σ²_{r+2} + ...), for σ sorted in descending order.

    Deliberately an independent closed form on plain floats (not ``lowrank.eckart_young_error``):
    the checker should not judge the learner with the code the course teaches, and the slips
    below reuse it with other error formulas."""
    return float(sum(s * s for s in singular_values[rank:]) ** 0.5)


def _check_exercise_spectrum(singular_values, target_error) -> list[float]:
    """The exercise's own settings, checked: non-negative finite singular values and target."""
    from .errors import check_number

    if isinstance(singular_values, (str, bytes)) or not hasattr(singular_values, "__iter__"):
        raise TypeError(f"singular_values must be a list of numbers, got {singular_values!r}")
    values = [float(check_number(s, "each singular value", minimum=0)) for s in singular_values]
    if not values:
        raise ValueError("singular_values is empty")
    check_number(target_error, "target_error", minimum=0)
    return sorted(values, reverse=True)


def _smallest_rank(singular_values, target: float, error) -> int:
    return next(r for r in range(len(singular_values) + 1) if error(singular_values, r) <= target)


def check_rank_choice(rank, singular_values=RANK_EXERCISE_SINGULAR_VALUES,
                      target_error: float = RANK_EXERCISE_TARGET) -> CheckResult:
    """Exercise: the smallest LoRA rank whose best possible Frobenius error ‖ΔW − ΔW*‖_F
    (Eckart–Young: sqrt of the sum of the discarded σ²) is at most ``target_error``."""
    name = "pick a rank for a target error"
    if rank is None or rank is Ellipsis:
        return _not_done(name)
    if isinstance(rank, torch.Tensor) and rank.numel() == 1 and not rank.is_floating_point() \
            and rank.dtype != torch.bool:
        rank = rank.item()  # a 0-d integer tensor, e.g. from torch.searchsorted
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 0:
        kind = f" ({type(rank).__name__})" if not isinstance(rank, numbers.Integral) else ""
        return CheckResult(name, INCORRECT, f"the rank is a whole number >= 0, got {rank!r}{kind}",
                           ["give an int, e.g. int(r)"] if isinstance(rank, numbers.Real) else [])
    rank = int(rank)  # NumPy integers (np.int64(2)) are whole numbers too
    sv = _check_exercise_spectrum(singular_values, target_error)
    right = _smallest_rank(sv, target_error, _best_error)
    if rank == right:
        message = f"rank {rank} leaves at best {_best_error(sv, rank):.3f} <= {target_error:g}"
        if rank > 0:
            message += f", and rank {rank - 1} would leave {_best_error(sv, rank - 1):.3f}"
        return CheckResult(name, CORRECT, message)
    # The typical slips, each giving a different rank for the course's spectrum:
    slips = {
        _smallest_rank(sv, target_error, lambda s, r: s[r] if r < len(s) else 0.0):
            "you compared only the largest discarded σ with the target (that is the spectral-norm error); "
            "the Frobenius error adds up all discarded σ²",
        _smallest_rank(sv, target_error, lambda s, r: _best_error(s, r) ** 2):
            "you compared the squared error (the sum of σ²) with the target; take its square root first",
        _smallest_rank(sv, target_error, lambda s, r: sum(s[r:])):
            "you added the discarded σ themselves; the error is sqrt(sum of σ²), which is smaller",
    }
    hints = [slips[rank]] if rank in slips and rank != right else []
    if rank > len(sv):
        return CheckResult(name, INCORRECT, f"this ΔW* has rank {len(sv)}: no LoRA rank above that is needed",
                           hints or [f"at rank {len(sv)} the error is already 0"])
    if rank < right:
        hints.append(f"at rank {rank} the best possible error is sqrt({' + '.join(f'{s:g}²' for s in sv[rank:])}) = "
                     f"{_best_error(sv, rank):.3f}, above the target {target_error:g}")
        return CheckResult(name, INCORRECT, f"rank {rank} is too small", hints)
    hints.append(f"rank {rank} works, but rank {rank - 1} already reaches {_best_error(sv, rank - 1):.3f} <= {target_error:g}")
    return CheckResult(name, INCORRECT, f"rank {rank} is more than needed: it trains extra parameters", hints)


# ------------------------------------------------------------------------------------------------
# Exercise: carry alpha to a new rank (the rule measured in notebook 06)
# ------------------------------------------------------------------------------------------------
#: A run tuned at ``rank`` learns from ``alpha`` on; which alpha starts learning at ``new_rank``?
#: Notebook 06 measured the rule: under Adam the first update of x·A·B grows like s·r, so the
#: onset keeps s·r fixed (raw alpha: 16, 4, 1 at ranks 1, 4, 16; alpha/rank: the same alpha).
#: The ranks here (8 -> 32) and alpha (24) are not on 06's grid: the answer must come from the rule.
ALPHA_TRANSFER_EXERCISE = {"rank": 8, "alpha": 24, "new_rank": 32}


def alpha_for_new_rank(alpha: float, rank: int, new_rank: int, scaling: str) -> float:
    """The alpha that keeps s·r (the size of LoRA's first updates under Adam) when the rank changes."""
    from .lora import lora_scaling

    step = lora_scaling(rank, alpha, scaling) * rank
    return step / (lora_scaling(new_rank, 1.0, scaling) * new_rank)  # s is linear in alpha


_ALPHA_TRANSFER_HINTS = {
    "alpha": "under raw `alpha`, s = α at every rank, so the same α takes steps r times larger at the larger "
             "rank; to keep s·r, α must shrink by the same factor as r grows",
    "alpha/rank": "`alpha/rank` divides by r, which cancels the growth: the onset stays at the same α "
                  "(notebook 06, §2: 16, 16, 16 at ranks 1, 4, 16)",
    "alpha/sqrt(rank)": "α/√r cancels only √r of the r-fold growth, so α shrinks by √(new rank / rank)",
}


def check_alpha_for_new_rank(answer, exercise: dict | None = None) -> CheckResult:
    """Exercise: ``answer`` maps each scaling convention ("alpha", "alpha/rank", "alpha/sqrt(rank)")
    to the alpha that starts learning at ``new_rank``, given that ``alpha`` did at ``rank``."""
    from .lora import SCALINGS

    name = "carry alpha to a new rank"
    exercise = dict(ALPHA_TRANSFER_EXERCISE if exercise is None else exercise)
    if answer is None or answer is Ellipsis:
        return _not_done(name)
    if not isinstance(answer, dict):
        return CheckResult(name, INCORRECT, f"answer with a dict {{convention: alpha}}, got {type(answer).__name__}",
                           [f"for example {{'alpha': ..., 'alpha/rank': ..., 'alpha/sqrt(rank)': ...}}"])
    missing = [sc for sc in SCALINGS if sc not in answer]
    if missing:
        return CheckResult(name, INCORRECT, f"the dict has no alpha for {', '.join(map(repr, missing))}",
                           [f"give one alpha for each of {', '.join(map(repr, SCALINGS))}"])
    wrong, right = [], []
    for sc in SCALINGS:
        value = answer[sc]
        if value is None or value is Ellipsis:
            return _not_done(name)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
            return CheckResult(name, INCORRECT, f"alpha for {sc!r} must be a positive number, got {value!r}")
        expected = alpha_for_new_rank(exercise["alpha"], exercise["rank"], exercise["new_rank"], sc)
        if abs(float(value) - expected) <= 0.01 * expected:
            right.append(f"{sc}: {expected:g}")
        else:
            hint = _ALPHA_TRANSFER_HINTS[sc]
            if float(value) > exercise["alpha"] and sc != "alpha/rank":
                hint = "the wrong direction: a larger rank already makes the step larger, so α must go down; " + hint
            wrong.append((sc, value, hint))
    if wrong:
        return CheckResult(name, INCORRECT, f"{len(right)} of {len(SCALINGS)} right; not yet "
                           + ", ".join(f"{sc!r} (you gave {v!r})" for sc, v, _ in wrong),
                           [hint for _, _, hint in wrong])
    return CheckResult(name, CORRECT, f"{', '.join(right)}: each keeps s·r, the size of the first updates, "
                       f"so learning starts at the same point; only alpha/rank needs no change")


# ------------------------------------------------------------------------------------------------
# Exercise: choose target_modules for a parameter budget
# ------------------------------------------------------------------------------------------------
#: At rank 8 on the course GPT (3 blocks, width 48) each attention kind costs 3·8·(48 + 48) = 2,304 and
#: each feed-forward kind 3·8·(48 + 192) = 5,760 over all blocks. A budget of 20,000 sits just under
#: every linear layer (4·2,304 + 2·5,760 = 20,736), so the best choice drops one attention kind
#: (18,432), which four sets of kinds reach; the checker finds this by search, not from these numbers.
BUDGET_EXERCISE = {"rank": 8, "budget": 20_000}


def _layer_kinds(model, rank: int) -> tuple[int, dict[str, int]]:
    """(number of blocks, {kind: LoRA parameters of that kind summed over all blocks}) for the
    Linear layers inside ``model.trf_blocks``; a kind is the name inside a block ("att.W_query")."""
    from .accounting import lora_parameter_count

    n_blocks, kinds = len(model.trf_blocks), {}
    for name, module in model.trf_blocks.named_modules():
        if isinstance(module, torch.nn.Linear) and "." in name:
            kind = name.split(".", 1)[1]
            kinds[kind] = kinds.get(kind, 0) + lora_parameter_count(module.in_features, module.out_features, rank)
    return n_blocks, kinds


def _short_name(kind: str, kinds) -> str:
    """How the course names a kind: its last part when that is unique ("W_query"), else the whole
    kind ("ff.layers.0"). Both match as dotted suffixes."""
    last = kind.rsplit(".", 1)[-1]
    if not last.isdigit() and sum(k.rsplit(".", 1)[-1] == last for k in kinds) == 1:
        return last
    return kind


def best_budget_choices(model, rank: int, budget: int) -> tuple[int, list[tuple[str, ...]]]:
    """The most LoRA parameters any set of whole layer kinds (each in every block) adds without
    going over ``budget``, and every set of kinds that reaches it (by exhaustive search)."""
    from .errors import check_int

    rank, budget = check_int(rank, "rank", minimum=1), check_int(budget, "budget", minimum=1)
    if not isinstance(getattr(model, "trf_blocks", None), torch.nn.Module):
        raise TypeError(f"model must be the course GPT (with trf_blocks), got {type(model).__name__}")
    _, kinds = _layer_kinds(model, rank)
    best, choices = 0, []
    for k in range(1, len(kinds) + 1):
        for combo in itertools.combinations(kinds, k):
            total = sum(kinds[c] for c in combo)
            if total > budget:
                continue
            if total > best:
                best, choices = total, []
            if total == best:
                choices.append(tuple(_short_name(c, kinds) for c in combo))
    return best, choices


def check_target_modules_for_budget(target_modules, model_factory=None, rank: int = BUDGET_EXERCISE["rank"],
                                    budget: int = BUDGET_EXERCISE["budget"]) -> CheckResult:
    """Exercise: choose ``target_modules`` for the course GPT, as whole kinds of layer (each name
    adapts that layer in every block), so that LoRA at ``rank`` adds as many trainable parameters
    as any such choice can without going over ``budget``. The best count is found by exhaustive
    search over the model's layer kinds; names that adapt a kind in only some blocks are rejected."""
    from .accounting import expected_lora_parameters
    from .gpt import load_pretrained_gpt
    from .lora import lora_layers, replace_linear_with_lora

    name = "target_modules for a parameter budget"
    if target_modules is None or target_modules is Ellipsis:
        return _not_done(name)
    from .errors import check_int

    rank, budget = check_int(rank, "rank", minimum=1), check_int(budget, "budget", minimum=1)
    model_factory = model_factory or load_pretrained_gpt
    if not callable(model_factory):
        raise TypeError(f"model_factory must be a function that builds the model, got {type(model_factory).__name__}")
    n_blocks, kinds = _layer_kinds(model_factory(), rank)
    best, best_choices = best_budget_choices(model_factory(), rank, budget)
    model = model_factory()
    try:
        replace_linear_with_lora(model, rank, rank, target_modules=target_modules, exclude_modules=["out_head"])
    except (ValueError, TypeError) as exc:  # a name that matches nothing, a list holding a non-str, ...
        return CheckResult(name, INCORRECT, str(exc), ["print(model) lists the Linear layers' names"])
    blocks_of = {}
    for layer_name, _ in lora_layers(model):
        match = re.fullmatch(r"trf_blocks\.(\d+)\.(.+)", layer_name)
        if match:
            blocks_of.setdefault(match.group(2), set()).add(int(match.group(1)))
    partial = {kind: sorted(blocks) for kind, blocks in blocks_of.items() if len(blocks) < n_blocks}
    if partial:
        kind, blocks = next(iter(partial.items()))
        return CheckResult(name, INCORRECT, f"{kind} is adapted in block(s) {', '.join(map(str, blocks))} only; this "
                           f"exercise takes whole kinds of layer, each in all {n_blocks} blocks",
                           [f"use the suffix {_short_name(kind, kinds)!r}: it matches that layer in every block"])
    count = expected_lora_parameters(model)
    per_kind = ", ".join(f"{_short_name(k, kinds)} {v:,}" for k, v in kinds.items())
    if count > budget:
        return CheckResult(name, INCORRECT, f"that adds {count:,} trainable parameters, over the budget of {budget:,}",
                           [f"each kind costs r·(in + out) in each of the {n_blocks} blocks; over all blocks: {per_kind}"])
    if count < best:
        return CheckResult(name, INCORRECT, f"that adds {count:,} parameters: within budget, but {best:,} is reachable",
                           ["spend more of the budget: swap or add kinds of layer (costs over all blocks: "
                            f"{per_kind})"])
    return CheckResult(name, CORRECT, f"{count:,} trainable LoRA parameters, within the budget of {budget:,}: the most "
                       f"any choice of whole layer kinds reaches ({len(best_choices)} choices reach it)")
