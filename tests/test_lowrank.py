"""Low-rank approximation, checked against NumPy's own SVD and rank, and against brute force;
the rank slider is driven without a browser (ipywidgets run callbacks when a value is set)."""
import math
import warnings

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from lora_course import lowrank


@pytest.fixture(autouse=True)
def _close_figures():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*non-interactive.*")  # plt.show() under Agg
        warnings.filterwarnings("ignore", message=".*cannot show the figure.*")
        yield
    plt.close("all")


def test_factors_match_numpy_truncated_svd():
    M = lowrank.random_matrix(9, 7, seed=3)
    U, S, Vt = np.linalg.svd(M.numpy().astype(np.float64), full_matrices=False)
    for r in (0, 1, 3, 7):
        A, B = lowrank.low_rank_factors(M, r)
        assert A.shape == (9, r) and B.shape == (r, 7)
        reference = (U[:, :r] * S[:r]) @ Vt[:r]
        np.testing.assert_allclose((A @ B).numpy(), reference, atol=1e-10)
        if r:
            assert np.linalg.matrix_rank((A @ B).numpy()) == r


def test_eckart_young_error_matches_measured_and_beats_other_rank_r_matrices():
    M = lowrank.decaying_matrix(12, 10, half_life=3, seed=1).to(torch.float64)
    sigma = np.linalg.svd(M.numpy(), compute_uv=False)
    g = torch.Generator().manual_seed(0)
    for r in range(11):
        measured = np.linalg.norm(M.numpy() - lowrank.truncated_svd(M, r).numpy())
        assert measured == pytest.approx(math.sqrt((sigma[r:] ** 2).sum()), rel=1e-9, abs=1e-12)
        assert lowrank.eckart_young_error(torch.from_numpy(sigma), r) == pytest.approx(measured, rel=1e-9, abs=1e-12)
        if 0 < r < 10:  # no other rank-r product does better (here: 20 random ones and a perturbed optimum)
            A, B = lowrank.low_rank_factors(M, r)
            for _ in range(20):
                X = torch.randn(12, r, generator=g, dtype=torch.float64) @ torch.randn(r, 10, generator=g, dtype=torch.float64)
                assert np.linalg.norm(M.numpy() - X.numpy()) > measured
            perturbed = (A + 1e-3 * torch.randn(A.shape, generator=g, dtype=torch.float64)) @ B
            assert np.linalg.norm(M.numpy() - perturbed.numpy()) > measured


def test_matrix_with_spectrum_has_that_spectrum():
    sigma = [5.0, 2.0, 1.0, 0.5]
    M = lowrank.matrix_with_spectrum(sigma, 8, 6, seed=2)
    np.testing.assert_allclose(np.linalg.svd(M.numpy(), compute_uv=False)[:4], sigma, atol=1e-10)
    assert np.linalg.matrix_rank(M.numpy()) == 4
    assert M.dtype == torch.float64  # as documented


def test_energy_and_rank_for_error():
    M = lowrank.matrix_with_spectrum([3.0, 4.0], 5, 5)  # σ = (4, 3) once sorted; energy 16 / 25 in the first
    sigma = lowrank.singular_values(M)
    assert lowrank.energy_captured(sigma, 1) == pytest.approx(16 / 25)
    assert lowrank.energy_captured(sigma, 2) == pytest.approx(1.0)
    assert lowrank.relative_errors(M, [0, 1, 2]) == pytest.approx([1.0, 3 / 5, 0.0], abs=1e-9)
    assert lowrank.rank_for_error(M, 0.6) == 1
    assert lowrank.rank_for_error(M, 0.5) == 2
    # a decaying spectrum needs fewer directions than a flat one for the same error
    assert lowrank.rank_for_error(lowrank.decaying_matrix(40, 40), 0.1) < lowrank.rank_for_error(lowrank.random_matrix(40, 40), 0.1)


def test_approximate_counts_parameters():
    result = lowrank.approximate(lowrank.random_matrix(20, 30), 4)
    assert (result.full_parameters, result.factor_parameters) == (600, 4 * (20 + 30))
    assert result.error == pytest.approx(result.predicted_error, rel=1e-9)


def test_show_rank_approximation_plots_and_returns_numbers():
    M = lowrank.decaying_matrix(16, 12, seed=4)
    result = lowrank.show_rank_approximation(M, 3)
    assert result == lowrank.approximate(M, 3)
    fig = plt.gcf()
    assert len(fig.axes) == 4  # M, A·B, the spectrum, and the colour bar the two heatmaps share
    assert "relative error" in fig.axes[2].get_title()
    assert fig.axes[3].get_label() == "<colorbar>"


def test_rank_slider_reruns_the_function():
    M = lowrank.decaying_matrix(16, 12, seed=4)
    ui = lowrank.rank_slider(M, rank=1)
    slider = ui.children[0]
    assert (slider.min, slider.max, slider.value) == (0, 12, 1)
    assert ui.result.rank == 1
    slider.value = 5  # what dragging the slider does
    assert ui.result.rank == 5
    assert ui.result == lowrank.approximate(M, 5)
    slider.value = 12
    assert ui.result.error == pytest.approx(0.0, abs=1e-9)


def test_clear_errors():
    with pytest.raises(ValueError, match="rank must be an integer between 0 and"):
        lowrank.low_rank_factors(torch.zeros(3, 4), 4)
    with pytest.raises(ValueError, match="expected a 2-D torch.Tensor"):
        lowrank.singular_values(torch.zeros(3))
    with pytest.raises(ValueError, match="all zeros"):
        lowrank.energy_captured(torch.zeros(3), 1)
    with pytest.raises(ValueError, match="at most min"):
        lowrank.matrix_with_spectrum([1, 1, 1], 2, 5)
    with pytest.raises(ValueError, match="all zeros"):
        lowrank.relative_errors(torch.zeros(3, 4), [1])
    with pytest.raises(ValueError, match="tolerance must be"):
        lowrank.rank_for_error(lowrank.random_matrix(4, 4), -0.1)
    with pytest.raises(ValueError, match="tolerance must be"):
        lowrank.rank_for_error(lowrank.random_matrix(4, 4), float("nan"))
    for k in (-1, 4, 1.5):
        with pytest.raises(ValueError, match="k must be an integer between 0 and 3"):
            lowrank.energy_captured(torch.tensor([3.0, 2.0, 1.0]), k)
