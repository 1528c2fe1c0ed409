"""Checkers for the course's exercises.

Each checker takes what the learner wrote (a class, a function or a number), runs it against the
reference implementation in this package, and returns a ``CheckResult``: ``correct``, ``not done``
(the placeholder still raises ``NotImplementedError`` or returns ``None``) or ``incorrect`` with a
hint about what to look at, not only "wrong".
"""
from __future__ import annotations

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
                            "randomly, e.g. torch.nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))"])
    # Give B values, then compare the forward pass with the formula.
    with torch.no_grad():
        B.copy_(torch.randn(rank, out_dim, generator=torch.Generator().manual_seed(1)))
    x = torch.randn(5, in_dim, generator=torch.Generator().manual_seed(2))
    try:
        out = layer(x)
    except NotImplementedError:
        return _not_done(name)
    except Exception as exc:
        return CheckResult(name, INCORRECT, f"forward(x) raised {type(exc).__name__}: {exc}")
    if out is None:
        return _not_done(name)
    product = (x @ A @ B).detach()
    if tuple(out.shape) != (5, out_dim):
        return CheckResult(name, INCORRECT, f"forward(x) returned shape {tuple(out.shape)}, expected {(5, out_dim)}")
    for factor, hint in ((alpha / rank, None),
                         (alpha, "you multiplied by alpha; the course's convention is alpha / rank, so that "
                                 "changing the rank does not change the size of the update"),
                         (1.0, "you forgot the scaling factor alpha / rank"),
                         (rank / alpha, "the fraction is upside down: the scaling is alpha / rank")):
        if torch.allclose(out.detach(), factor * product, rtol=1e-4, atol=1e-6):
            if hint is None:
                return CheckResult(name, CORRECT, "shapes, initialisation and forward pass all match the reference")
            return CheckResult(name, INCORRECT, "the forward pass is x @ A @ B times the wrong factor", [hint])
    return CheckResult(name, INCORRECT, "forward(x) does not equal (alpha / rank) * (x @ A @ B)",
                       ["check the order of the products: x @ A first, then @ B"])
