"""Ground truth for "what rank does LoRA need?": a planted low-rank update, and real spectra.

The planted-rank experiment. A teacher layer computes ``x (W + ΔW*)ᵀ`` where ΔW* (out × in) has a
known rank r* and known, distinct singular values σ₁ > σ₂ > ... > σ_r*. A student keeps W frozen
and learns ΔW = s·(A·B)ᵀ with LoRA of rank r, trained to match the teacher's outputs.

With whitened inputs (XᵀX / N = I, exactly), the mean squared output error is a matrix norm:

    (1/N) ‖X (ΔW − ΔW*)ᵀ‖²_F = trace((ΔW − ΔW*) XᵀX/N (ΔW − ΔW*)ᵀ) = ‖ΔW − ΔW*‖²_F

so training LoRA here is best rank-r approximation of ΔW*, and the Eckart–Young theorem (1936)
says the best any rank-r matrix can do is

    min_{rank(M) <= r} ‖M − ΔW*‖_F = sqrt(σ²_{r+1} + ... + σ²_{r*})

i.e. the singular values it has to leave out. Below r* the error plateaus at that value; from
r = r* on it can reach zero. The functions here measure it, and also look at the singular values
of real updates (full fine-tuning vs LoRA) on the course's GPT.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from . import lowrank
from .errors import ArgumentTypeError, check_int, check_names, check_number
from .lora import LinearWithLoRA, lora_layers

# ------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------
PLANTED_SINGULAR_VALUES = (4.0, 3.0, 2.0, 1.0)  # r* = 4, distinct so the best rank-r answer is unique


def random_orthonormal(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """A (rows × cols) matrix with orthonormal columns (rows >= cols): Q of a Gaussian's QR."""
    rows, cols = check_int(rows, "rows", minimum=1), check_int(cols, "cols", minimum=1)
    if not isinstance(generator, torch.Generator):
        raise ArgumentTypeError(f"generator must be a torch.Generator (torch.Generator().manual_seed(0)), "
                                f"got {type(generator).__name__}")
    if cols > rows:
        raise ValueError(f"cannot have {cols} orthonormal columns in {rows} dimensions")
    q, r = torch.linalg.qr(torch.randn(rows, cols, generator=generator))
    return q * torch.sign(torch.diagonal(r))  # fix signs so the result is unique for a seed


def planted_update(out_dim: int, in_dim: int, singular_values=PLANTED_SINGULAR_VALUES, seed: int = 0) -> torch.Tensor:
    """ΔW* = U · diag(σ) · Vᵀ (out × in) with the given singular values, so rank(ΔW*) = len(σ)."""
    out_dim, in_dim = check_int(out_dim, "out_dim", minimum=1), check_int(in_dim, "in_dim", minimum=1)
    seed = check_int(seed, "seed")
    try:
        sigma = torch.as_tensor(singular_values, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"singular_values must be a non-empty list of positive numbers, got {singular_values!r}") from err
    if sigma.ndim != 1 or len(sigma) == 0 or not bool((sigma > 0).all()) or not bool(torch.isfinite(sigma).all()):
        raise ValueError(f"singular_values must be a non-empty list of positive numbers, got {singular_values!r}")
    if len(sigma) > min(out_dim, in_dim):
        raise ValueError(f"{len(sigma)} singular values do not fit in a {out_dim} × {in_dim} matrix")
    g = torch.Generator().manual_seed(seed)
    u = random_orthonormal(out_dim, len(sigma), g)  # (out, r*)
    v = random_orthonormal(in_dim, len(sigma), g)   # (in, r*)
    return u @ torch.diag(sigma) @ v.T


def eckart_young_error(delta: torch.Tensor, rank: int) -> float:
    """The smallest Frobenius error any rank-``rank`` matrix can reach when approximating
    ``delta``: sqrt of the sum of its discarded squared singular values (σ_{r+1}, σ_{r+2}, ...).
    A matrix-in wrapper around ``lowrank.eckart_young_error``, which takes the singular values."""
    rank = _non_negative_rank(rank)
    sigma = lowrank.singular_values(delta)  # float64, descending
    return lowrank.eckart_young_error(sigma, min(rank, len(sigma)))  # a rank above min(n, m) loses nothing


def _non_negative_rank(rank) -> int:
    try:
        return check_int(rank, "rank", minimum=0)
    except ValueError:  # ArgumentTypeError included
        raise ValueError(f"rank must be a non-negative integer, got {rank!r}") from None


def whitened_inputs(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """N inputs (N × dim, N >= dim) that are exactly white: XᵀX / N = I. Then the mean squared
    output error of a linear map equals the squared Frobenius norm of its weight error."""
    n, dim, seed = check_int(n, "n", minimum=1), check_int(dim, "dim", minimum=1), check_int(seed, "seed")
    if n < dim:
        raise ValueError(f"need at least as many inputs as dimensions to whiten (n={n} < dim={dim})")
    return math.sqrt(n) * random_orthonormal(n, dim, torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------
# The experiment
# ------------------------------------------------------------------------------------------------
@dataclass
class PlantedFit:
    rank: int
    error: float        # ‖ΔW − ΔW*‖_F after training (= sqrt of the final loss, inputs white)
    predicted: float    # Eckart–Young: sqrt(sum of discarded σ²)
    losses: list[float]  # training loss per logged step


def fit_lora_to_teacher(base: nn.Linear, delta_star: torch.Tensor, rank: int, *, steps: int = 600,
                        lr: float = 0.05, n_inputs: int = 64, seed: int = 0) -> PlantedFit:
    """Train a rank-``rank`` LoRA student on the frozen ``base`` to match the teacher
    ``base(x) + x ΔW*ᵀ`` on whitened inputs. Adam with cosine decay, full batch."""
    if not isinstance(base, nn.Linear) or isinstance(base, LinearWithLoRA):
        raise ArgumentTypeError(f"base must be a plain torch.nn.Linear (the frozen layer), got {type(base).__name__}")
    if not isinstance(delta_star, torch.Tensor) or tuple(delta_star.shape) != (base.out_features, base.in_features):
        shape = tuple(delta_star.shape) if isinstance(delta_star, torch.Tensor) else type(delta_star).__name__
        raise ValueError(f"delta_star must be a tensor of shape (out, in) = {(base.out_features, base.in_features)}, "
                         f"like base.weight; got {shape}")
    if not delta_star.is_floating_point() or not bool(torch.isfinite(delta_star).all()):
        raise ValueError("delta_star must hold finite floating-point values")
    rank = check_int(rank, "rank", minimum=1)
    steps = check_int(steps, "steps", minimum=1)
    lr = float(check_number(lr, "lr", positive=True))
    n_inputs, seed = check_int(n_inputs, "n_inputs", minimum=1), check_int(seed, "seed")
    if n_inputs < base.in_features:
        raise ValueError(f"n_inputs must be at least in_features = {base.in_features} to whiten the inputs, "
                         f"got {n_inputs}")
    torch.manual_seed(seed)  # A's random init; B starts at zero as always in LoRA
    student = LinearWithLoRA(base, rank=rank, alpha=rank)  # scaling alpha/rank = 1: ΔW = (A·B)ᵀ
    base.requires_grad_(False)
    x = whitened_inputs(n_inputs, base.in_features, seed=seed + 1)  # (N, in)
    with torch.no_grad():
        target = base(x) + x @ delta_star.T                           # (N, out): the teacher
    params = [student.lora.A, student.lora.B]
    optimizer = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=lr * 1e-3)
    losses = []
    for step in range(steps):
        # mean over inputs of the squared error summed over outputs = ‖ΔW − ΔW*‖²_F (white x)
        loss = ((student(x) - target) ** 2).sum(dim=1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 10 == 0 or step == steps - 1:
            losses.append(loss.item())
    with torch.no_grad():
        error = float(torch.linalg.matrix_norm(student.lora.delta_weight() - delta_star))
    return PlantedFit(rank, error, eckart_young_error(delta_star, rank), losses)


def planted_rank_experiment(ranks=None, singular_values=PLANTED_SINGULAR_VALUES, dim: int = 32,
                            steps: int = 600, seed: int = 0) -> list[PlantedFit]:
    """Fit LoRA students of each rank (default 1 … 2·r*) to a teacher with a planted ΔW*."""
    dim, steps, seed = check_int(dim, "dim", minimum=1), check_int(steps, "steps", minimum=1), check_int(seed, "seed")
    delta_star = planted_update(dim, dim, singular_values, seed=seed + 100)  # checks singular_values first
    r_star = len(singular_values)
    if isinstance(ranks, (str, bytes)) or (ranks is not None and not hasattr(ranks, "__iter__")):
        raise ArgumentTypeError(f"ranks must be a list of ranks (e.g. [1, 2, 4]) or None, got {ranks!r}")
    ranks = list(range(1, 2 * r_star + 1)) if ranks is None else [check_int(r, "each rank", minimum=1) for r in ranks]
    if not ranks:
        raise ValueError("ranks is empty: give at least one rank")
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(dim, dim)
    with torch.no_grad():
        base.weight.copy_(torch.randn(dim, dim, generator=g) / math.sqrt(dim))
        base.bias.zero_()
    return [fit_lora_to_teacher(base, delta_star, r, steps=steps, seed=seed) for r in ranks]


def plot_planted(fits: list[PlantedFit], r_star: int | None = None, ax=None):
    """Measured error vs rank next to the Eckart–Young prediction. Returns the axes."""
    import matplotlib.pyplot as plt

    fits = list(fits) if isinstance(fits, (list, tuple)) else fits
    if not isinstance(fits, list) or not fits or not all(isinstance(f, PlantedFit) for f in fits):
        raise ArgumentTypeError("fits must be a non-empty list of PlantedFit (what planted_rank_experiment returns)")
    if r_star is not None:
        r_star = check_int(r_star, "r_star", minimum=1)
    ax = ax or plt.subplots(figsize=(6, 3.6))[1]
    ranks = [f.rank for f in fits]
    ax.plot(ranks, [f.predicted for f in fits], "s--", color="gray", ms=9, mfc="none",
            label="Eckart–Young prediction")
    ax.plot(ranks, [f.error for f in fits], "o-", color="C0", label="trained LoRA student")
    if r_star is not None:
        ax.axvline(r_star, color="C3", lw=1, ls=":", label=f"planted rank r* = {r_star}")
    ax.set(xlabel="LoRA rank r", ylabel="‖ΔW − ΔW*‖_F", xticks=ranks,
           title="Error left after training vs what rank r can do at best")
    ax.legend()
    return ax


# ------------------------------------------------------------------------------------------------
# Spectra of real updates
# ------------------------------------------------------------------------------------------------
def _spectrum(singular_values) -> torch.Tensor:
    """Singular values as float64, checked: 1-D, finite, >= 0 and not all zero."""
    sigma = lowrank._check_spectrum(singular_values, "singular_values", descending=False).to(torch.float64)
    if not bool((sigma > 0).any()):
        raise ValueError("the singular values are all zero (ΔW = 0): no effective rank or energy to measure")
    return sigma


def entropy_effective_rank(singular_values: torch.Tensor) -> float:
    """exp(Shannon entropy of p), p_i = σ_i / Σσ (Roy & Vetterli, 2007). It is k for k equal
    non-zero singular values, and between 1 and k when a few of them dominate."""
    sigma = _spectrum(singular_values)  # float64, 1-D, finite, >= 0, not all zero
    p = sigma[sigma > 0] / sigma.sum()
    return float(torch.exp(-(p * p.log()).sum()))


def energy_rank(singular_values: torch.Tensor, fraction: float = 0.9) -> int:
    """The fewest singular values whose squares hold ``fraction`` of ‖ΔW‖²_F: the rank a
    truncated SVD needs to keep that share of the update's energy."""
    fraction = check_number(fraction, "fraction", positive=True, hint="a share of the energy in (0, 1], e.g. 0.9")
    if fraction > 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    energy = _spectrum(singular_values) ** 2
    cumulative = energy.cumsum(0) / energy.sum()
    return int((cumulative < fraction - 1e-12).sum()) + 1


@dataclass
class UpdateSpectrum:
    name: str
    singular_values: torch.Tensor  # descending

    @property
    def effective_rank(self) -> float:
        return entropy_effective_rank(self.singular_values)

    def energy_rank(self, fraction: float = 0.9) -> int:
        return energy_rank(self.singular_values, fraction)


def full_update_spectra(before: nn.Module, after: nn.Module, names) -> list[UpdateSpectrum]:
    """Singular values of ΔW = W_after − W_before for each named Linear (full fine-tuning).
    ``names`` is a list of layer names (a single str is one name)."""
    names = check_names(names, "names", allow_none=False)
    for model, which in ((before, "before"), (after, "after")):
        if not isinstance(model, nn.Module):
            raise ArgumentTypeError(f"{which} must be a torch.nn.Module, got {type(model).__name__}")
        for name in names:
            try:
                weight = model.get_submodule(name).weight
            except AttributeError:
                raise ValueError(f"the {which!r} model has no layer {name!r} with a weight (print(model) lists "
                                 "its layers)") from None
            if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
                raise ValueError(f"{name!r} in the {which!r} model has no 2-D weight matrix")
    for name in names:
        if before.get_submodule(name).weight.shape != after.get_submodule(name).weight.shape:
            raise ValueError(f"{name!r} has weight shape {tuple(before.get_submodule(name).weight.shape)} before and "
                             f"{tuple(after.get_submodule(name).weight.shape)} after: not the same layer")
    out = []
    for name in names:
        delta = after.get_submodule(name).weight.detach() - before.get_submodule(name).weight.detach()
        out.append(UpdateSpectrum(name, torch.linalg.svdvals(delta.double())))
    return out


def lora_update_spectra(model: nn.Module, names=None) -> list[UpdateSpectrum]:
    """Singular values of ΔW = s·(A·B)ᵀ for the model's LoRA layers (all, or those named; a
    single str is one name)."""
    present = [name for name, _ in lora_layers(model)]
    if not present:
        raise ValueError("the model has no LoRA layers (add them with replace_linear_with_lora)")
    if names is not None:
        names = check_names(names, "names")
        unknown = [n for n in names if n not in present]
        if unknown:
            raise ValueError(f"{unknown[0]!r} is not a LoRA layer of this model; its LoRA layers are: "
                             f"{', '.join(present[:4])}{', ...' if len(present) > 4 else ''}")
    out = []
    for name, layer in lora_layers(model):
        if names is None or name in names:
            out.append(UpdateSpectrum(name, torch.linalg.svdvals(layer.lora.delta_weight().detach().double())))
    return out


def _subscript(number: int) -> str:
    return str(number).translate(str.maketrans("0123456789", "₀₁₂₃₄₅₆₇₈₉"))


#: Singular values below this fraction of σ_1 are treated as zero when plotted (float32 rounding).
NUMERICAL_ZERO = 1e-6


def plot_spectra(full: list[UpdateSpectrum], lora: list[UpdateSpectrum], ax=None, title: str | None = None):
    """Normalised singular values (σ_i / σ_1) of full-FT and LoRA updates on a log scale. The
    default title names the kinds of layer in the spectra ("W_query, W_value") and how many."""
    import matplotlib.pyplot as plt

    for which, spectra in (("full", full), ("lora", lora)):
        if not isinstance(spectra, (list, tuple)) or not all(isinstance(s, UpdateSpectrum) for s in spectra):
            raise ArgumentTypeError(f"{which} must be a list of UpdateSpectrum (from full_update_spectra / "
                                    "lora_update_spectra)")
    if not full and not lora:
        raise ValueError("both lists of spectra are empty: nothing to plot")
    if title is not None and not isinstance(title, str):
        raise ArgumentTypeError(f"title must be a str or None, got {type(title).__name__}")
    ax = ax or plt.subplots(figsize=(6.5, 3.6))[1]
    drawn = []  # every normalised value drawn, to set the axis from the data
    for i, s in enumerate(full):
        sv = s.singular_values / s.singular_values[0]
        ax.semilogy(range(1, len(sv) + 1), sv, color="C0", alpha=0.5,
                    label="full fine-tuning ΔW" if i == 0 else None)
        drawn.append(sv[sv > 0])
    zero_from = []
    for i, s in enumerate(lora):
        # A rank-r update has exactly r non-zero singular values; the rest are float32 rounding
        # (about 1e-7 of σ_1), not signal, so they are not drawn.
        sv = s.singular_values / s.singular_values[0]
        kept = sv[sv > NUMERICAL_ZERO]
        ax.semilogy(range(1, len(kept) + 1), kept, color="C1", alpha=0.6, marker=".",
                    label="LoRA ΔW = s·(A·B)ᵀ" if i == 0 else None)
        drawn.append(kept)
        if len(kept) < len(sv):
            zero_from.append(len(kept) + 1)
    if zero_from:
        ax.text(0.2, 0.1, f"LoRA: σ{_subscript(max(zero_from))} onwards are zero\n(below {NUMERICAL_ZERO:g}·σ₁: float rounding), not drawn",
                transform=ax.transAxes, ha="left", va="bottom", fontsize=8, color="C1")
    floor = float(torch.cat(drawn).min()) if drawn else 1e-3
    if title is None:
        kinds = list(dict.fromkeys(s.name.rsplit(".", 1)[-1] for s in [*full, *lora]))
        layers = len({s.name for s in [*full, *lora]})
        title = f"Spectrum of the weight update ({', '.join(kinds)}; {layers} matrices)"
    ax.set(xlabel="index i of the singular value", ylabel="σᵢ / σ₁", ylim=(floor / 2, 2), title=title)
    ax.legend()
    return ax
