"""Low-rank approximation: the linear algebra behind ΔW ≈ A·B (notebook 02).

The singular value decomposition writes any matrix M (n × m) as M = U·diag(σ)·Vᵀ with
σ₁ ≥ σ₂ ≥ ... ≥ 0. Keeping the r largest singular values gives M_r = U_r·diag(σ_1..r)·V_rᵀ, and
the Eckart–Young theorem (1936) says no matrix of rank ≤ r is closer to M:

        min_{rank(X) ≤ r} ‖M − X‖_F = ‖M − M_r‖_F = sqrt(σ_{r+1}² + ... + σ_min(n,m)²)

So how well a rank-r product A·B can stand in for a full update ΔW is decided by ΔW's spectrum:
a fast-decaying spectrum is captured by a few directions, a flat one (a random matrix) is not.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from .errors import ArgumentTypeError, check_int, check_number


def _check_matrix(M) -> torch.Tensor:
    if not isinstance(M, torch.Tensor) or M.ndim != 2:
        raise ValueError(f"expected a 2-D torch.Tensor (a matrix), got {type(M).__name__}"
                         + (f" with shape {tuple(M.shape)}" if isinstance(M, torch.Tensor) else ""))
    if M.is_complex() or M.dtype == torch.bool:
        raise ArgumentTypeError(f"expected a real matrix, got {M.dtype}")
    if M.numel() == 0:
        raise ValueError(f"the matrix is empty (shape {tuple(M.shape)}): it has no singular values")
    M = M.detach().to(torch.float64)  # SVD in float64: the identities below hold to ~1e-12
    if not bool(torch.isfinite(M).all()):
        raise ValueError("the matrix holds NaN or inf values: its SVD is undefined")
    return M


def _is_whole(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_rank_for(M: torch.Tensor, rank) -> int:
    full = min(M.shape)
    if not _is_whole(rank) or not 0 <= rank <= full:
        raise ValueError(f"rank must be an integer between 0 and min{tuple(M.shape)} = {full}, got {rank!r}")
    return int(rank)


def _check_spectrum(sigma, name: str = "sigma", descending: bool = True) -> torch.Tensor:
    """Singular values: a 1-D sequence of finite numbers >= 0, in descending order unless
    ``descending=False``. A floating-point tensor keeps its dtype; anything else becomes float64."""
    if isinstance(sigma, (str, bytes)):
        raise ArgumentTypeError(f"{name} must be a sequence of singular values, got a str")
    try:
        if not (isinstance(sigma, torch.Tensor) and sigma.is_floating_point()):
            sigma = torch.as_tensor(sigma, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ArgumentTypeError(f"{name} must be a 1-D sequence of numbers (singular values), got "
                                f"{type(sigma).__name__}") from err
    if sigma.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one singular value per direction), got shape {tuple(sigma.shape)}")
    if not bool(torch.isfinite(sigma).all()):
        raise ValueError(f"{name} holds NaN or inf values")
    if bool((sigma < 0).any()):
        raise ValueError(f"{name} has a negative value ({float(sigma.min()):g}); singular values are >= 0 "
                         "(σᵢ = sqrt of an eigenvalue of MᵀM)")
    if descending and bool((sigma[1:] > sigma[:-1]).any()):
        raise ValueError(f"{name} must be in descending order (σ₁ >= σ₂ >= ...), as singular_values() returns them; "
                         "sort it first: torch.sort(sigma, descending=True).values")
    return sigma


def _check_spectrum_and_rank(sigma, rank, name: str = "rank") -> tuple[torch.Tensor, int]:
    sigma = _check_spectrum(sigma)
    if not _is_whole(rank) or not 0 <= rank <= len(sigma):
        extra = " (the number of singular values)" if name == "k" else ""
        raise ValueError(f"{name} must be an integer between 0 and {len(sigma)}{extra}, got {rank!r}")
    return sigma, int(rank)


def singular_values(M: torch.Tensor) -> torch.Tensor:
    """σ₁ ≥ σ₂ ≥ ... (float64), min(n, m) of them."""
    return torch.linalg.svdvals(_check_matrix(M))


def low_rank_factors(M: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-r factorisation M ≈ A·B in LoRA's layout: A (n × r), B (r × m).

    A = U_r·diag(sqrt σ), B = diag(sqrt σ)·V_rᵀ: the singular values are split evenly between the
    factors, so A·B = U_r·diag(σ)·V_rᵀ, the truncated SVD. Returned in float64.
    """
    M = _check_matrix(M)
    rank = _check_rank_for(M, rank)
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    root = S[:rank].sqrt()
    return U[:, :rank] * root, root[:, None] * Vh[:rank]


def truncated_svd(M: torch.Tensor, rank: int) -> torch.Tensor:
    """M_r, the best rank-r approximation of M in the Frobenius norm (float64)."""
    A, B = low_rank_factors(M, rank)
    return A @ B


def eckart_young_error(sigma: torch.Tensor, rank: int) -> float:
    """‖M − M_r‖_F predicted from the singular values alone: sqrt of the discarded σ²."""
    sigma, rank = _check_spectrum_and_rank(sigma, rank)  # σ >= 0 descending, 0 <= rank <= len(σ)
    return math.sqrt(float((sigma[rank:] ** 2).sum()))


def energy_captured(sigma: torch.Tensor, k: int) -> float:
    """Share of ‖M‖_F² held by the top k singular directions: Σ_{i≤k} σᵢ² / Σ σᵢ² (between 0 and 1)."""
    sigma, k = _check_spectrum_and_rank(sigma, k, "k")
    total = float((sigma ** 2).sum())
    if total == 0:
        raise ValueError("the matrix is all zeros: it has no energy to capture")
    return float((sigma[:k] ** 2).sum()) / total


def relative_errors(M: torch.Tensor, ranks) -> list[float]:
    """‖M − M_r‖_F / ‖M‖_F for each rank r (by Eckart–Young, from the singular values)."""
    sigma = singular_values(M)
    norm = math.sqrt(float((sigma ** 2).sum()))
    if norm == 0:
        raise ValueError("the matrix is all zeros: its relative error is undefined (0 / 0)")
    if isinstance(ranks, (str, bytes)) or _is_whole(ranks):
        raise ArgumentTypeError(f"ranks must be a list of ranks (e.g. [1, 2, 4]), got {ranks!r}")
    try:
        ranks = list(ranks)
    except TypeError:
        raise ArgumentTypeError(f"ranks must be a list of ranks (e.g. [1, 2, 4]), got {type(ranks).__name__}") from None
    for r in ranks:
        if not _is_whole(r) or not 0 <= r <= len(sigma):
            raise ValueError(f"every rank must be an integer between 0 and {len(sigma)}, got {r!r}")
    return [eckart_young_error(sigma, r) / norm for r in ranks]


def rank_for_error(M: torch.Tensor, tolerance: float) -> int:
    """The smallest rank whose relative error ‖M − M_r‖_F / ‖M‖_F is at most ``tolerance``."""
    hint = "for example 0.1 for 10%"
    try:
        tolerance = check_number(tolerance, "tolerance", minimum=0, allow_inf=True, hint=hint)
    except ValueError:  # ArgumentTypeError included
        raise ValueError(f"tolerance must be a relative error >= 0 ({hint}), got {tolerance!r}") from None
    M = _check_matrix(M)
    errors = relative_errors(M, range(min(M.shape) + 1))
    return next(r for r, e in enumerate(errors) if e <= tolerance + 1e-12)


def matrix_with_spectrum(sigma, n: int, m: int, seed: int = 0) -> torch.Tensor:
    """A random n × m matrix whose singular values are exactly ``sigma`` (random orthonormal
    U and V from QR decompositions of Gaussian matrices). float64. ``sigma`` may come in any
    order (the matrix has those singular values all the same); none may be negative."""
    n, m = check_int(n, "n", minimum=1), check_int(m, "m", minimum=1)
    seed = check_int(seed, "seed")
    sigma = _check_spectrum(sigma, descending=False)
    k = len(sigma)
    if k > min(n, m):
        raise ValueError(f"at most min(n, m) = {min(n, m)} singular values, got {k}")
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    return (U * sigma) @ V.T


def random_matrix(n: int, m: int, seed: int = 0) -> torch.Tensor:
    """An n × m Gaussian matrix: its spectrum is nearly flat (no direction matters more)."""
    n, m, seed = check_int(n, "n", minimum=1), check_int(m, "m", minimum=1), check_int(seed, "seed")
    return torch.randn(n, m, generator=torch.Generator().manual_seed(seed))


def decaying_matrix(n: int, m: int, half_life: float = 2.0, seed: int = 0) -> torch.Tensor:
    """An n × m matrix with σᵢ = 2^(−i / half_life): each ``half_life`` directions halve σ."""
    n, m = check_int(n, "n", minimum=1), check_int(m, "m", minimum=1)
    half_life = check_number(half_life, "half_life", positive=True)
    k = min(n, m)
    return matrix_with_spectrum(2.0 ** (-torch.arange(k, dtype=torch.float64) / half_life), n, m, seed)


@dataclass(frozen=True)
class RankApproximation:
    """What ``show_rank_approximation`` measured for one rank."""

    rank: int
    error: float  # ‖M − A·B‖_F, measured on the reconstructed matrix
    predicted_error: float  # sqrt(σ_{r+1}² + ...), Eckart–Young
    relative_error: float  # error / ‖M‖_F
    energy: float  # share of ‖M‖_F² captured by the top r directions
    full_parameters: int  # n·m numbers in M
    factor_parameters: int  # r·(n + m) numbers in A and B


def approximate(M: torch.Tensor, rank: int) -> RankApproximation:
    """Factor M at the given rank and measure the result (no plotting)."""
    M64 = _check_matrix(M)
    rank = _check_rank_for(M64, rank)
    A, B = low_rank_factors(M64, rank)
    sigma = singular_values(M64)
    error = float(torch.linalg.matrix_norm(M64 - A @ B))
    norm = float(torch.linalg.matrix_norm(M64))
    if norm == 0:
        raise ValueError("the matrix is all zeros: its relative error is undefined (0 / 0) and it has no energy")
    n, m = M64.shape
    return RankApproximation(rank, error, eckart_young_error(sigma, rank), error / norm,
                             energy_captured(sigma, rank), n * m, rank * (n + m))


def show_rank_approximation(M: torch.Tensor, rank: int, title: str = "M") -> RankApproximation:
    """Plot M, its best rank-r approximation A·B and the spectrum with the cut; return the numbers.

    This is the plain function behind the rank slider (``rank_slider``): call it directly to get
    the same picture and a checkable result.
    """
    import matplotlib.pyplot as plt

    if not isinstance(title, str):
        raise ArgumentTypeError(f"title must be a str, got {type(title).__name__}")
    result = approximate(M, rank)
    M64 = _check_matrix(M)
    approx = truncated_svd(M64, rank)
    sigma = singular_values(M64)
    limit = float(M64.abs().max())
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), gridspec_kw={"width_ratios": [1, 1, 1.3]})
    for ax, matrix, label in ((axes[0], M64, f"{title}  ({M64.shape[0]}×{M64.shape[1]})"),
                              (axes[1], approx, f"best rank-{rank} A·B")):
        image = ax.imshow(matrix.numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit)  # one colour scale for both
        ax.set_title(label)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.grid(False)
    ax = axes[2]
    index = torch.arange(1, len(sigma) + 1)
    ax.semilogy(index[:rank], sigma[:rank], "o", color="C1", ms=4, label="kept")
    ax.semilogy(index[rank:], sigma[rank:], "o", color="0.6", ms=4, label="discarded")
    ax.axvline(rank + 0.5, color="C3", lw=1)
    ax.set_xlabel("index i")
    ax.set_ylabel("singular value σᵢ")
    ax.set_title(f"relative error {result.relative_error:.1%}, "
                 f"{result.factor_parameters:,} vs {result.full_parameters:,} numbers", fontsize=10)
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.colorbar(image, ax=axes[:2].tolist(), shrink=0.85, label="entry value")
    plt.show()
    return result


def rank_slider(M: torch.Tensor, rank: int = 1, title: str = "M"):
    """A slider over the rank that redraws ``show_rank_approximation`` (a thin ipywidgets UI).

    Returns the ``ipywidgets.interactive``: ``ui.children[0]`` is the slider and ``ui.result``
    the ``RankApproximation`` for its current value (setting ``ui.children[0].value`` re-runs it,
    with or without a browser).
    """
    import ipywidgets as widgets

    M64 = _check_matrix(M)
    rank = _check_rank_for(M64, rank)  # a slider would silently clamp a rank out of its range
    if not isinstance(title, str):
        raise ArgumentTypeError(f"title must be a str, got {type(title).__name__}")
    slider = widgets.IntSlider(value=rank, min=0, max=min(M64.shape), step=1, description="rank r",
                               continuous_update=False)
    return widgets.interactive(show_rank_approximation, M=widgets.fixed(M64), rank=slider,
                               title=widgets.fixed(title))
