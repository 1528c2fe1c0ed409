"""The LoRA layer and the model surgery around it.

LoRA (Hu et al., 2021, arXiv:2106.09685) keeps a pretrained weight W frozen and learns a
low-rank update instead of a full one:

        h = x W^T + s * x A B            x: (..., in)   W: (out, in)   (nn.Linear's layout)
                                           A: (in, r)     B: (r, out)    s: a scalar

We use the row-vector form ``x @ A @ B`` of "Build a Large Language Model From Scratch"
(appendix E). The paper writes the same thing for column vectors as ``B A x``; the roles are
identical: A projects *down* to r dimensions and starts random, B projects back *up* and starts
at zero, so ΔW = s·A·B is zero and the model is unchanged at step 0 (paper §4.1).

    x ──► [ frozen W ] ──────────────┐
    │                                (+)──► h
    └──► [ A: in×r ] ─► [ B: r×out ] ─► × s

Written as an nn.Linear weight (out × in), the update is ΔW = s · (A·B)ᵀ.

Every function that changes a model checks everything first and then changes all layers or
none: a refused call leaves the model exactly as it was.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
from torch import nn

from .errors import (ArgumentTypeError, LoRAStateError, NonFiniteError, RankAboveMatrixRankWarning,
                     UnsupportedLayerError, check_bool, check_int, check_names, check_number)

# --------------------------------------------------------------------------------------------
# Scaling conventions
# --------------------------------------------------------------------------------------------
#: The three conventions for the scalar s in front of A·B, by name.
#: - "alpha/rank": the paper (§4.1), loralib, PEFT and appendix E today. Under Adam, the size of
#:   x·A·B grows like r, so dividing by r keeps the size of an update independent of the rank:
#:   you can change r without re-tuning the learning rate.
#: - "alpha": the raw alpha of the older appendix-E snippet; changing r changes the step size.
#: - "alpha/sqrt(rank)": rsLoRA (Kalajdzievski, 2023): keeps learning stable at large ranks.
SCALINGS = ("alpha/rank", "alpha", "alpha/sqrt(rank)")


def lora_scaling(rank: int, alpha: float, scaling: str = "alpha/rank") -> float:
    """Return the factor s that multiplies A·B under a named convention (see ``SCALINGS``)."""
    rank, alpha, scaling = _check_rank(rank), _check_alpha(alpha), _check_scaling(scaling)
    if scaling == "alpha/rank":
        return alpha / rank
    if scaling == "alpha":
        return float(alpha)
    return alpha / math.sqrt(rank)


def _check_rank(rank, in_dim: int | None = None, out_dim: int | None = None) -> int:
    """The rank as a Python int (NumPy integers accepted). ``in_dim`` and ``out_dim`` are
    accepted for older callers and ignored: a rank above min(in, out) is allowed and only warned
    about (see ``_warn_if_rank_above_matrix_rank``)."""
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
        raise ValueError(
            f"rank must be a positive integer (1, 2, 4, 8, ...), got {rank!r}. "
            "The rank r is the inner size of A (in×r) and B (r×out)."
        )
    return int(rank)


def _check_alpha(alpha):
    """alpha as a Python number (an int stays an int, so saved metadata reads ``16``, not ``16.0``)."""
    try:
        return check_number(alpha, "alpha", positive=True)
    except ValueError:  # ArgumentTypeError is a ValueError too
        raise ValueError(
            f"alpha must be a finite positive number, got {alpha!r}. "
            "A common choice is alpha = rank (scaling 1) or alpha = 2 * rank."
        ) from None


def _check_scaling(scaling) -> str:
    if not isinstance(scaling, str) or scaling not in SCALINGS:
        raise ValueError(f"unknown scaling {scaling!r}: choose one of {', '.join(map(repr, SCALINGS))}")
    return scaling


def _check_dropout(dropout) -> float:
    """Dropout probability p in [0, 1): p = 1 would zero every input of the adapter."""
    return float(check_number(dropout, "dropout", minimum=0, below=1,
                              hint="LoRA dropout is a probability in [0, 1), e.g. 0.05 or 0.1 (0 turns it off)"))


def _outside_package_stacklevel() -> int:
    """The ``stacklevel`` for ``warnings.warn`` that points at the first caller outside
    lora_course, so a warning names the learner's line, not ours."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(2), 2  # 1 = the function calling warn, 2 = its caller, ...
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level


# Set while a caller that already warned (with the layer's name) builds the layers.
_RANK_WARNING_GIVEN = contextvars.ContextVar("rank_warning_given", default=False)


def _warn_if_rank_above_matrix_rank(rank: int, in_dim: int, out_dim: int, where: str,
                                    fix: str = "use a smaller rank") -> None:
    """The lesson of a rank above min(in, out), as a warning, not an error.

    A·B is (in × r)(r × out): its rank is at most min(in, out, r). With r > min(in, out) the
    product still cannot exceed min(in, out), so the extra r - min(in, out) columns of A and
    rows of B add r·(in + out) - min·(in + out) parameters and no capacity. Appendix E and PEFT
    allow it (rank 16 on a 768 -> 2 head), so the course allows it too, and counts it as PEFT
    does: r·(in + out)."""
    limit = min(in_dim, out_dim)
    if rank <= limit or _RANK_WARNING_GIVEN.get():
        return
    warnings.warn(
        f"LoRA rank {rank} on {where} ({in_dim} -> {out_dim}): A·B cannot have rank above "
        f"min(in_features, out_features) = {limit}, so the extra {rank - limit} column(s) of A (row(s) of B) "
        f"only add parameters: {rank * (in_dim + out_dim):,} instead of {limit * (in_dim + out_dim):,}. "
        f"Allowed (appendix E and PEFT do it); to avoid it, {fix}.",
        RankAboveMatrixRankWarning, stacklevel=_outside_package_stacklevel())


@contextlib.contextmanager
def _rank_warning_given():
    token = _RANK_WARNING_GIVEN.set(True)
    try:
        yield
    finally:
        _RANK_WARNING_GIVEN.reset(token)


def _check_layer_args(in_dim, out_dim, rank, alpha, scaling):
    """(in_dim, out_dim, rank, alpha) as Python numbers, checked; warns about a rank above
    min(in_dim, out_dim) (RankAboveMatrixRankWarning)."""
    in_dim, out_dim = check_int(in_dim, "in_dim", minimum=1), check_int(out_dim, "out_dim", minimum=1)
    rank, alpha, _ = _check_rank(rank), _check_alpha(alpha), _check_scaling(scaling)
    _warn_if_rank_above_matrix_rank(rank, in_dim, out_dim, "a LoRALayer")
    return in_dim, out_dim, rank, alpha


def _check_model(model, name: str = "model") -> nn.Module:
    if not isinstance(model, nn.Module):
        raise ArgumentTypeError(f"{name} must be a torch.nn.Module, got {type(model).__name__}")
    return model


def _all_finite(tensor: torch.Tensor) -> bool:
    return not tensor.is_floating_point() or bool(torch.isfinite(tensor).all())


# --------------------------------------------------------------------------------------------
# The layers
# --------------------------------------------------------------------------------------------
class LoRALayer(nn.Module):
    """The trainable low-rank branch: ``x ↦ s · (x @ A @ B)``.

    Args:
        in_dim, out_dim: the sizes of the layer it adapts (``in_features``, ``out_features``).
        rank: r, the inner dimension of A (in_dim × r) and B (r × out_dim).
        alpha: the numerator of the scaling factor.
        scaling: which convention turns (alpha, rank) into s; one of ``SCALINGS``.

    A rank above min(in_dim, out_dim) is allowed but warned about
    (``RankAboveMatrixRankWarning``): A·B cannot have rank above min(in_dim, out_dim), so the
    extra columns only add parameters. It still trains r·(in_dim + out_dim) numbers, as in PEFT.
    """

    def __init__(self, in_dim: int, out_dim: int, rank: int, alpha: float, scaling: str = "alpha/rank"):
        super().__init__()
        in_dim, out_dim, rank, alpha = _check_layer_args(in_dim, out_dim, rank, alpha, scaling)  # warns if r > min
        self.rank, self.alpha, self.scaling_name = rank, alpha, scaling
        self.scaling = lora_scaling(rank, alpha, scaling)
        self.A = nn.Parameter(torch.empty(in_dim, rank))  # (in, r): projects down, random
        self.B = nn.Parameter(torch.zeros(rank, out_dim))  # (r, out): projects up, zero at start
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # A gets nn.Linear's default init, U(-1/sqrt(in), 1/sqrt(in)), as in loralib and PEFT.
        # We initialise the (r, in) view A.T: kaiming_uniform_ takes fan_in from dim 1, which is
        # `in` there. (Calling it on A itself, as the book's snippet does, uses fan_in = r and
        # draws larger values; only the scale of A differs, see notebook 03.)
        nn.init.kaiming_uniform_(self.A.T, a=math.sqrt(5))
        # B = 0, so ΔW = s·A·B = 0 and the adapted model equals the base model at step 0.
        nn.init.zeros_(self.B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (..., in) @ (in, r) -> (..., r) @ (r, out) -> (..., out). Never forms the in×out ΔW.
        return self.scaling * (x @ self.A @ self.B)

    def delta_weight(self) -> torch.Tensor:
        """ΔW in nn.Linear's layout (out × in): s · (A·B)ᵀ."""
        return self.scaling * (self.A @ self.B).T

    def extra_repr(self) -> str:
        return (f"in_dim={self.A.shape[0]}, out_dim={self.B.shape[1]}, rank={self.rank}, "
                f"alpha={self.alpha}, scaling={self.scaling_name!r} (s={self.scaling:g})")


def _attention_linear_reason(module: nn.Module) -> str | None:
    """Why LoRA cannot adapt this Linear, if it is nn.MultiheadAttention's ``out_proj``."""
    from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

    if isinstance(module, NonDynamicallyQuantizableLinear):
        return ("it is the out_proj of a torch.nn.MultiheadAttention, which reads out_proj.weight directly "
                "(F.multi_head_attention_forward) and never calls out_proj(x), so a LoRA branch there would "
                "never act")
    return None


class LinearWithLoRA(nn.Module):
    """An ``nn.Linear`` with a LoRA branch beside it: ``h = linear(x) + lora(dropout(x))``.

    The wrapped ``linear`` is kept as it is (its weight is frozen by
    ``mark_only_lora_as_trainable``); only ``lora.A`` and ``lora.B`` are meant to train.
    Dropout (a probability in [0, 1)), when used, acts on the adapter's input only, as in
    loralib and PEFT. A rank above min(in, out) is warned about, not refused (see ``LoRALayer``).
    """

    def __init__(self, linear: nn.Linear, rank: int, alpha: float, scaling: str = "alpha/rank",
                 dropout: float = 0.0):
        super().__init__()
        if isinstance(linear, LinearWithLoRA):
            raise ValueError("this layer already has a LoRA branch (it is a LinearWithLoRA); "
                             "wrap the original nn.Linear, or reuse the existing wrapper")
        if not isinstance(linear, nn.Linear):
            raise TypeError(
                f"LinearWithLoRA wraps torch.nn.Linear layers only, got {type(linear).__name__}. "
                "LoRA here adapts a weight matrix W (out × in); pick a Linear submodule "
                "(print(model) or model.named_modules() lists them)."
            )
        reason = _attention_linear_reason(linear)
        if reason:
            raise UnsupportedLayerError(f"cannot add LoRA to this layer: {reason}. Adapt a model whose attention "
                                        "uses separate nn.Linear projections (like lora_course.gpt.MultiHeadAttention).")
        if not linear.weight.is_floating_point():
            raise ArgumentTypeError(f"LinearWithLoRA needs a floating-point weight, got {linear.weight.dtype}")
        rank, alpha, scaling = _check_rank(rank), _check_alpha(alpha), _check_scaling(scaling)
        dropout = _check_dropout(dropout)
        _warn_if_rank_above_matrix_rank(rank, linear.in_features, linear.out_features,
                                        "an nn.Linear")
        self.linear = linear
        with _rank_warning_given():
            self.lora = LoRALayer(linear.in_features, linear.out_features, rank, alpha, scaling)
        self.lora.to(device=linear.weight.device, dtype=linear.weight.dtype)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False  # True while s·A·B is folded into linear.weight
        self.enabled = True  # False: behave exactly like the base layer

    # nn.Linear's attributes, so code that reads them keeps working after wrapping.
    in_features = property(lambda self: self.linear.in_features)
    out_features = property(lambda self: self.linear.out_features)
    weight = property(lambda self: self.linear.weight)
    bias = property(lambda self: self.linear.bias)

    @property
    def dropout_p(self) -> float:
        """The adapter's dropout probability (0.0 when it has none)."""
        return self.dropout.p if isinstance(self.dropout, nn.Dropout) else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self.enabled:  # merged: W already holds W + ΔW
            return self.linear(x)
        return self.linear(x) + self.lora(self.dropout(x))

    def _check_mergeable(self, where: str = "this layer") -> None:
        """Refuse a merge that would fold in a disabled adapter or write NaN/inf into W
        (like PEFT's ``safe_merge=True``). Changes nothing."""
        if not self.enabled:
            raise LoRAStateError(f"cannot merge {where}: its LoRA branch is disabled, and merging would fold in "
                                 "an adapter that is switched off. Enable it first (set_lora_enabled(model, True)), "
                                 "or drop it with remove_lora(model).")
        with torch.no_grad():
            merged = self.linear.weight + self.lora.delta_weight().to(self.linear.weight.dtype)
        if not _all_finite(merged):
            raise NonFiniteError(f"cannot merge {where}: W + ΔW would hold NaN or inf values (the adapter's A or B, "
                                 "or the base weight, is not finite: did training diverge?). Nothing was merged.")

    @torch.no_grad()
    def merge_(self) -> None:
        """Fold ΔW into the frozen weight: W ← W + s·(A·B)ᵀ. Merging twice is a no-op. A
        disabled branch, or one whose merged weight would not be finite, is refused."""
        if self.merged:
            return
        self._check_mergeable()
        self.linear.weight += self.lora.delta_weight().to(self.linear.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge_(self) -> None:
        """Take ΔW back out: W ← W - s·(A·B)ᵀ (equal to the old W up to float rounding)."""
        if not self.merged:
            return
        self.linear.weight -= self.lora.delta_weight().to(self.linear.weight.dtype)
        self.merged = False

    def merged_linear(self) -> nn.Linear:
        """A new, plain nn.Linear whose weight is W + ΔW (this layer is left as it is). Refused,
        like ``merge_``, for a disabled branch or a non-finite result."""
        if not self.merged:
            self._check_mergeable()
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            delta = 0 if self.merged else self.lora.delta_weight()
            out.weight.copy_(self.linear.weight + delta)
            if self.bias is not None:
                out.bias.copy_(self.linear.bias)
        return out


# --------------------------------------------------------------------------------------------
# Model surgery
# --------------------------------------------------------------------------------------------
@dataclass
class LoRAReport:
    """What ``replace_linear_with_lora`` did: the names it wrapped and the ones it left alone."""

    wrapped: list[str] = field(default_factory=list)
    already_wrapped: list[str] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        lines = [f"LoRA added to {len(self.wrapped)} layer(s)" + (": " + ", ".join(self.wrapped) if self.wrapped else "")]
        if self.already_wrapped:
            lines.append(f"already had LoRA, left unchanged: {len(self.already_wrapped)} layer(s)")
        if self.excluded:
            lines.append(f"excluded: {', '.join(self.excluded)}")
        return "\n".join(lines)


def _matches(name: str, patterns) -> bool:
    """PEFT's rule: a string is a regex that must match the whole name; a list matches a name
    exactly or as a dotted suffix ("W_query" matches "trf_blocks.0.att.W_query")."""
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _check_patterns(patterns, what: str):
    """``target_modules`` / ``exclude_modules``: None, one regex (a str), or a list of names."""
    if patterns is None:
        return None
    if isinstance(patterns, str):
        try:
            re.compile(patterns)
        except re.error as err:
            raise ValueError(f"{what}={patterns!r} is not a valid regular expression ({err}). A single string is a "
                             f"regex for the full name; pass a list, e.g. [{patterns!r}], to match names.") from err
        return patterns
    names = check_names(patterns, what)
    if not names:
        raise ValueError(f"{what} is an empty list: name at least one layer (e.g. ['W_query', 'W_value']), "
                         "or pass None")
    return names


def _linear_names(model: nn.Module) -> list[str]:
    """Names of the Linear layers a user can target: plain nn.Linear and LinearWithLoRA, but not
    the nn.Linear that sits inside a LinearWithLoRA (that one is already adapted). A module that
    sits under two names is listed under both."""
    names, wrappers = [], []
    for name, module in model.named_modules(remove_duplicate=False):
        if any(name.startswith(w + ".") for w in wrappers):
            continue
        if isinstance(module, LinearWithLoRA):
            names.append(name)
            wrappers.append(name)
        elif isinstance(module, nn.Linear):
            names.append(name)
    return names


def _aliases(model: nn.Module) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """Every name of every module and of every parameter (by object id), duplicates included:
    a shared module, or a tied weight, has more than one."""
    modules: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        modules.setdefault(id(module), []).append(name)
    params: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        params.setdefault(id(p), []).append(name)
    return modules, params


def _unsupported_reason(model: nn.Module, name: str, module: nn.Module, aliases) -> str | None:
    """Why LoRA on the Linear ``name`` would not do what it says, or None if it is fine.

    - nn.MultiheadAttention's out_proj: its weight is read outside forward, so LoRA never acts.
    - a module under two names: wrapping one name would leave the other use unadapted.
    - a tied weight (the same Parameter as another module's, e.g. an LM head tied to the token
      embedding): merging ΔW into it would change the other module too."""
    modules, params = aliases
    parent_name = name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    reason = _attention_linear_reason(module)
    if isinstance(parent, nn.MultiheadAttention) and not reason:
        reason = "it belongs to a torch.nn.MultiheadAttention, which reads its weights directly"
    if reason:
        return (f"cannot add LoRA to {name!r}: {reason}. "
                f"Leave it out with exclude_modules=[{name!r}], or use an attention module with separate nn.Linear "
                "projections (like lora_course.gpt.MultiHeadAttention).")
    names = [n for n in modules.get(id(module), []) if n != name]
    if names:
        return (f"cannot add LoRA to {name!r}: the same nn.Linear object is also used as {names[0]!r} (a shared "
                f"module), and wrapping one name would adapt only one of its uses. Leave it out with "
                f"exclude_modules=[{name!r}, {names[0]!r}], or give each use its own layer (copy.deepcopy) first.")
    own = {f"{n}.{p}" for n in modules.get(id(module), [name]) for p in ("weight", "bias")}
    for pname in ("weight", "bias"):
        p = getattr(module, pname, None)
        if p is None:
            continue
        others = [n for n in params.get(id(p), []) if n not in own]
        if others:
            where = (f"model.{name}" if all(part.isidentifier() for part in name.split("."))
                     else f"model.get_submodule({name!r})")
            return (f"cannot add LoRA to {name!r}: its {pname} is the same Parameter as {others[0]!r} (tied weights, "
                    f"as in an LM head tied to the token embedding), so merging ΔW into it would change {others[0]!r} "
                    f"too. Leave it out with exclude_modules=[{name!r}], or untie it first: "
                    f"{where}.{pname} = nn.Parameter({where}.{pname}.detach().clone()).")
    return None


def _check_same_settings(name: str, layer: LinearWithLoRA, rank: int, alpha, scaling: str, dropout: float) -> None:
    """Re-running replace_linear_with_lora with the same settings is a silent no-op (notebook
    cells can be re-run); asking for other settings on an adapted layer is an error, never a
    silent keep-the-old-one."""
    old = layer.lora
    have = (old.rank, old.alpha, old.scaling_name, layer.dropout_p)
    want = (rank, alpha, scaling, dropout)
    if have != want:
        raise ValueError(
            f"layer {name!r} already has LoRA of rank {old.rank} (alpha {old.alpha}, scaling {old.scaling_name!r}, "
            f"dropout {layer.dropout_p:g}), and you asked for rank {rank} (alpha {alpha}, scaling {scaling!r}, "
            f"dropout {dropout:g}). A layer keeps its first LoRA branch: to change it, call remove_lora(model) "
            "first (or merge_and_unload(model) to keep what it learned), then wrap again. Re-running with the same "
            "settings is fine (nothing happens).")


def replace_linear_with_lora(model: nn.Module, rank: int, alpha: float, *, scaling: str = "alpha/rank",
                             target_modules=None, exclude_modules=None, dropout: float = 0.0,
                             seed: int | None = None) -> LoRAReport:
    """Wrap ``nn.Linear`` layers of ``model`` in ``LinearWithLoRA``, in place.

    With no ``target_modules`` every Linear is wrapped (appendix E). ``target_modules`` and
    ``exclude_modules`` follow PEFT: a list of names or name suffixes, or one regex for the full
    name. Layers that already have LoRA with the same settings are left alone, so re-running a
    notebook cell is safe; asking for other settings (rank, alpha, scaling, dropout) on such a
    layer is an error that says to call ``remove_lora`` first. ``seed`` draws the random A
    matrices from their own seeded stream (leaving the global random state alone), so a run does
    not depend on how many models were built before it. Returns a ``LoRAReport``.

    A rank above min(in_features, out_features) of a layer (rank 16 on a 768 -> 2 head, as in
    appendix E) is allowed but warned about (``RankAboveMatrixRankWarning``): A·B cannot have a
    rank above min(in, out), so the extra columns only add parameters. Refused, with the reason:
    the out_proj of ``nn.MultiheadAttention`` (its weight is read outside ``forward``), a Linear
    used under two names, and a Linear whose weight is tied to another module's. Every layer is
    checked before any is wrapped: an error leaves the model as it was.
    """
    _check_model(model)
    rank, alpha, scaling = _check_rank(rank), _check_alpha(alpha), _check_scaling(scaling)
    dropout = _check_dropout(dropout)
    if seed is not None:
        seed = check_int(seed, "seed", hint="use an integer such as 0, or None for the global random stream")
    target = _check_patterns(target_modules, "target_modules")
    exclude = _check_patterns(exclude_modules, "exclude_modules")
    candidates = _linear_names(model)
    if "" in candidates:
        raise TypeError("the model itself is a single nn.Linear: wrap it directly with LinearWithLoRA(model, rank, alpha)")
    aliases = _aliases(model)
    report, to_wrap = LoRAReport(), []
    for name in candidates:
        module = model.get_submodule(name)
        if target is not None and not _matches(name, target):
            continue
        if _matches(name, exclude):
            report.excluded.append(name)
        elif isinstance(module, LinearWithLoRA):
            _check_same_settings(name, module, rank, alpha, scaling, dropout)
            report.already_wrapped.append(name)
        else:
            reason = _unsupported_reason(model, name, module, aliases)
            if reason:
                raise UnsupportedLayerError(reason)
            to_wrap.append((name, module))
    if target is not None and not to_wrap and not report.already_wrapped:
        excluded = (f" (it matched {', '.join(report.excluded)}, all of them excluded by exclude_modules)"
                    if report.excluded else "")
        raise ValueError(
            f"target_modules={target_modules!r} matched no nn.Linear layer of this model{excluded}. "
            f"Its Linear layers are: {', '.join(candidates) or '(none)'}. Names match exactly or as "
            "a dotted suffix (e.g. 'W_query'); a single string is a regex for the full name."
        )
    # All checks passed: warn about ranks above a layer's matrix rank, build every wrapper, then
    # put them in place (nothing below can fail on a valid model).
    for name, module in to_wrap:
        short = name.rsplit(".", 1)[-1]
        _warn_if_rank_above_matrix_rank(
            rank, module.in_features, module.out_features, f"layer {name!r}",
            f"use rank <= {min(module.in_features, module.out_features)}, or leave the layer out with "
            f"exclude_modules=[{short!r}] and train it fully with mark_only_lora_as_trainable(model, "
            f"modules_to_save=[{short!r}])")
    wrappers = []
    with torch.random.fork_rng(devices=[], enabled=seed is not None), _rank_warning_given():
        if seed is not None:
            torch.manual_seed(seed)
        for name, module in to_wrap:
            wrappers.append((name, LinearWithLoRA(module, rank, alpha, scaling=scaling, dropout=dropout)))
    for name, wrapper in wrappers:
        _set_submodule(model, name, wrapper)
        report.wrapped.append(name)
    return report


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LinearWithLoRA]]:
    """(name, layer) for every LinearWithLoRA in the model."""
    _check_model(model)
    return ((name, module) for name, module in model.named_modules() if isinstance(module, LinearWithLoRA))


def _require_lora(model: nn.Module, action: str) -> list[tuple[str, LinearWithLoRA]]:
    _check_model(model)
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError(f"cannot {action}: the model has no LoRA layers. "
                         "Add them first with replace_linear_with_lora(model, rank, alpha).")
    return layers


def _check_modules_exist(model: nn.Module, modules_to_save, error=ValueError) -> list[str]:
    """``modules_to_save`` as a list of names (a str is one name), each naming a module of the
    model exactly or as a dotted suffix."""
    names = check_names(modules_to_save, "modules_to_save")
    present = [n for n, _ in model.named_modules() if n]
    for name in names:
        if not any(_matches(n, [name]) for n in present):
            top = ", ".join(n for n in present if "." not in n)
            raise error(f"modules_to_save: no module named {name!r} in this model (top-level modules: {top})")
    return names


def mark_only_lora_as_trainable(model: nn.Module, modules_to_save: Iterable[str] = ()) -> int:
    """Freeze every parameter except LoRA's A and B (and the modules named in ``modules_to_save``,
    e.g. a new classification head, which stay fully trainable). Returns the trainable count.

    Names in ``modules_to_save`` match exactly or as a dotted suffix, like ``target_modules``; a
    single string is one name (``"out_head"`` means ``["out_head"]``).
    """
    _require_lora(model, "mark only LoRA as trainable")
    modules_to_save = _check_modules_exist(model, modules_to_save)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in model.named_modules():
        if isinstance(module, LoRALayer) or (name and _matches(name, modules_to_save)):
            for p in module.parameters():
                p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _check_no_tied_weight(model: nn.Module, name: str, layer: LinearWithLoRA, aliases) -> None:
    _, params = aliases
    others = [n for n in params.get(id(layer.linear.weight), []) if not n.startswith(f"{name}.")]
    if others:
        raise UnsupportedLayerError(
            f"cannot merge {name!r} in place: its weight is the same Parameter as {others[0]!r} (tied weights), so "
            f"W += ΔW would change {others[0]!r} too. merge_and_unload(model) gives the layer its own merged weight "
            "instead; or untie the weights before adding LoRA.")


def merge_lora_(model: nn.Module) -> int:
    """Fold every LoRA branch into its frozen weight (in place). Returns how many layers the
    model has (already merged ones are left alone). Merged layers cost exactly what the base
    layers cost at inference.

    All or nothing: a disabled branch, a weight tied to another module, or a merged weight that
    would hold NaN or inf (PEFT's ``safe_merge``) is refused before any layer is merged."""
    layers = _require_lora(model, "merge")
    todo = [(name, layer) for name, layer in layers if not layer.merged]
    aliases = _aliases(model)
    for name, layer in todo:
        layer._check_mergeable(f"{name!r}")
        _check_no_tied_weight(model, name, layer, aliases)
    for _, layer in todo:
        layer.merge_()
    return len(layers)


def unmerge_lora_(model: nn.Module) -> int:
    """Undo ``merge_lora_`` (in place), so that training can continue. Returns the count."""
    layers = _require_lora(model, "unmerge")
    for _, layer in layers:
        layer.unmerge_()
    return len(layers)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every LinearWithLoRA by a plain nn.Linear holding W + ΔW (like PEFT's
    ``merge_and_unload``). Modifies ``model`` in place and returns it; a model without LoRA
    layers is returned as it is.

    Consistent with ``merge_lora_``: a *disabled* branch is refused (merging would fold in an
    adapter that is switched off; enable it, or ``remove_lora`` to drop it), and so is a merged
    weight that would hold NaN or inf. Every layer is checked and its replacement built before
    any is put in place. A tied weight is not rewritten: the merged layer gets its own weight."""
    layers = list(lora_layers(model))
    for name, layer in layers:
        if not layer.merged:
            layer._check_mergeable(f"{name!r}")
    replacements = [(name, layer.merged_linear()) for name, layer in layers]
    for name, plain in replacements:
        _set_submodule(model, name, plain)
    return model


def remove_lora(model: nn.Module) -> nn.Module:
    """Drop every LoRA branch without merging: the model is the base model again (in place).
    A model without LoRA layers is returned as it is."""
    _check_model(model)
    for name, layer in list(lora_layers(model)):
        layer.unmerge_()
        _set_submodule(model, name, layer.linear)
    return model


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def set_lora_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every LoRA branch on or off. Off, the model computes exactly the base model.
    Refused (before any layer changes) while a layer is merged."""
    enabled = check_bool(enabled, "enabled")
    layers = _require_lora(model, "enable or disable LoRA")
    merged = [name for name, layer in layers if layer.merged]
    if merged:
        raise LoRAStateError(f"LoRA is merged into the weights of {merged[0]!r} ({len(merged)} merged layer(s)); "
                             "unmerge_lora_(model) before disabling or enabling it")
    for _, layer in layers:
        layer.enabled = enabled


@contextlib.contextmanager
def lora_disabled(model: nn.Module):
    """``with lora_disabled(model):`` runs the base model, then gives every LoRA branch back
    the state it had before (on or off)."""
    layers = _require_lora(model, "disable LoRA")
    before = [(layer, layer.enabled) for _, layer in layers]
    set_lora_enabled(model, False)
    try:
        yield model
    finally:
        for layer, enabled in before:
            layer.enabled = enabled
