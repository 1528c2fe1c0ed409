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
"""
from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
from torch import nn

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
    _check_rank(rank)
    _check_alpha(alpha)
    if scaling == "alpha/rank":
        return alpha / rank
    if scaling == "alpha":
        return float(alpha)
    if scaling == "alpha/sqrt(rank)":
        return alpha / math.sqrt(rank)
    raise ValueError(f"unknown scaling {scaling!r}: choose one of {', '.join(map(repr, SCALINGS))}")


def _check_rank(rank, in_dim: int | None = None, out_dim: int | None = None) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(
            f"rank must be a positive integer (1, 2, 4, 8, ...), got {rank!r}. "
            "The rank r is the inner size of A (in×r) and B (r×out)."
        )
    if in_dim is not None and out_dim is not None and rank > min(in_dim, out_dim):
        raise ValueError(
            f"rank {rank} is larger than min(in_features, out_features) = min({in_dim}, {out_dim}) "
            f"= {min(in_dim, out_dim)}. A·B cannot have rank above that, so the extra columns only "
            f"add parameters; use rank <= {min(in_dim, out_dim)} (LoRA ranks are usually 1-64)."
        )


def _check_alpha(alpha) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(
            f"alpha must be a finite positive number, got {alpha!r}. "
            "A common choice is alpha = rank (scaling 1) or alpha = 2 * rank."
        )


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
    """

    def __init__(self, in_dim: int, out_dim: int, rank: int, alpha: float, scaling: str = "alpha/rank"):
        super().__init__()
        _check_rank(rank, in_dim, out_dim)
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


class LinearWithLoRA(nn.Module):
    """An ``nn.Linear`` with a LoRA branch beside it: ``h = linear(x) + lora(dropout(x))``.

    The wrapped ``linear`` is kept as it is (its weight is frozen by
    ``mark_only_lora_as_trainable``); only ``lora.A`` and ``lora.B`` are meant to train.
    Dropout, when used, acts on the adapter's input only, as in loralib and PEFT.
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
        self.linear = linear
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self.enabled:  # merged: W already holds W + ΔW
            return self.linear(x)
        return self.linear(x) + self.lora(self.dropout(x))

    @torch.no_grad()
    def merge_(self) -> None:
        """Fold ΔW into the frozen weight: W ← W + s·(A·B)ᵀ. Merging twice is a no-op."""
        if self.merged:
            return
        if not self.enabled:
            raise RuntimeError("this LoRA branch is disabled; enable it before merging")
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
        """A new, plain nn.Linear whose weight is W + ΔW (this layer is left as it is)."""
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


def _linear_names(model: nn.Module) -> list[str]:
    """Names of the Linear layers a user can target: plain nn.Linear and LinearWithLoRA, but not
    the nn.Linear that sits inside a LinearWithLoRA (that one is already adapted)."""
    names, wrappers = [], []
    for name, module in model.named_modules():
        if any(name.startswith(w + ".") for w in wrappers):
            continue
        if isinstance(module, LinearWithLoRA):
            names.append(name)
            wrappers.append(name)
        elif isinstance(module, nn.Linear):
            names.append(name)
    return names


def replace_linear_with_lora(model: nn.Module, rank: int, alpha: float, *, scaling: str = "alpha/rank",
                             target_modules=None, exclude_modules=None, dropout: float = 0.0,
                             seed: int | None = None) -> LoRAReport:
    """Wrap ``nn.Linear`` layers of ``model`` in ``LinearWithLoRA``, in place.

    With no ``target_modules`` every Linear is wrapped (appendix E). ``target_modules`` and
    ``exclude_modules`` follow PEFT: a list of names or name suffixes, or one regex for the full
    name. Layers that already have LoRA are never wrapped again, so re-running a notebook cell is
    safe. ``seed`` draws the random A matrices from their own seeded stream (leaving the global
    random state alone), so a run does not depend on how many models were built before it.
    Returns a ``LoRAReport`` of what was wrapped.
    """
    _check_rank(rank)
    _check_alpha(alpha)
    lora_scaling(rank, alpha, scaling)  # validates the name early
    report = LoRAReport()
    candidates = _linear_names(model)
    to_wrap = []
    for name in candidates:
        if not name:
            raise TypeError("the model itself is a single nn.Linear: wrap it directly with LinearWithLoRA(model, rank, alpha)")
        module = model.get_submodule(name)
        if target_modules is not None and not _matches(name, target_modules):
            continue
        if _matches(name, exclude_modules):
            report.excluded.append(name)
        elif isinstance(module, LinearWithLoRA):
            report.already_wrapped.append(name)
        elif rank > min(module.in_features, module.out_features):
            # Checked for every layer before any is wrapped, so an error leaves the model as it was.
            raise ValueError(
                f"rank {rank} is larger than layer {name!r} allows ({module.in_features} -> "
                f"{module.out_features}, so at most rank {min(module.in_features, module.out_features)}). "
                f"Leave it out with exclude_modules=[{name.rsplit('.', 1)[-1]!r}] (a new classification "
                "head can stay fully trainable via mark_only_lora_as_trainable(model, modules_to_save=...)), "
                "or use a smaller rank."
            )
        else:
            to_wrap.append((name, module))
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        for name, module in to_wrap:
            _set_submodule(model, name, LinearWithLoRA(module, rank, alpha, scaling=scaling, dropout=dropout))
            report.wrapped.append(name)
    if target_modules is not None and not report.wrapped and not report.already_wrapped:
        raise ValueError(
            f"target_modules={target_modules!r} matched no nn.Linear layer of this model. "
            f"Its Linear layers are: {', '.join(candidates) or '(none)'}. Names match exactly or as "
            "a dotted suffix (e.g. 'W_query'); a single string is a regex for the full name."
        )
    return report


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LinearWithLoRA]]:
    """(name, layer) for every LinearWithLoRA in the model."""
    for name, module in model.named_modules():
        if isinstance(module, LinearWithLoRA):
            yield name, module


def _require_lora(model: nn.Module, action: str) -> list[LinearWithLoRA]:
    layers = [layer for _, layer in lora_layers(model)]
    if not layers:
        raise ValueError(f"cannot {action}: the model has no LoRA layers. "
                         "Add them first with replace_linear_with_lora(model, rank, alpha).")
    return layers


def mark_only_lora_as_trainable(model: nn.Module, modules_to_save: Iterable[str] = ()) -> int:
    """Freeze every parameter except LoRA's A and B (and the modules named in ``modules_to_save``,
    e.g. a new classification head, which stay fully trainable). Returns the trainable count.

    Names in ``modules_to_save`` match exactly or as a dotted suffix, like ``target_modules``.
    """
    _require_lora(model, "mark only LoRA as trainable")
    modules_to_save = list(modules_to_save)
    for name in modules_to_save:
        if not any(_matches(n, [name]) for n, _ in model.named_modules() if n):
            raise ValueError(f"modules_to_save: no module named {name!r} in this model")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in model.named_modules():
        if isinstance(module, LoRALayer) or (name and _matches(name, modules_to_save)):
            for p in module.parameters():
                p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge_lora_(model: nn.Module) -> int:
    """Fold every LoRA branch into its frozen weight (in place). Returns how many were merged.
    Merged layers cost exactly what the base layers cost at inference."""
    layers = _require_lora(model, "merge")
    for layer in layers:
        layer.merge_()
    return len(layers)


def unmerge_lora_(model: nn.Module) -> int:
    """Undo ``merge_lora_`` (in place), so that training can continue. Returns the count."""
    layers = _require_lora(model, "unmerge")
    for layer in layers:
        layer.unmerge_()
    return len(layers)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every LinearWithLoRA by a plain nn.Linear holding W + ΔW (like PEFT's
    ``merge_and_unload``). Modifies ``model`` in place and returns it."""
    for name, layer in list(lora_layers(model)):
        _set_submodule(model, name, layer.merged_linear())
    return model


def remove_lora(model: nn.Module) -> nn.Module:
    """Drop every LoRA branch without merging: the model is the base model again (in place)."""
    for name, layer in list(lora_layers(model)):
        layer.unmerge_()
        _set_submodule(model, name, layer.linear)
    return model


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def set_lora_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every LoRA branch on or off. Off, the model computes exactly the base model."""
    for layer in _require_lora(model, "enable or disable LoRA"):
        if layer.merged:
            raise RuntimeError("LoRA is merged into the weights; unmerge_lora_(model) before disabling it")
        layer.enabled = enabled


@contextlib.contextmanager
def lora_disabled(model: nn.Module):
    """``with lora_disabled(model):`` runs the base model, then turns LoRA back on."""
    set_lora_enabled(model, False)
    try:
        yield model
    finally:
        set_lora_enabled(model, True)
