"""The planted-rank experiment and the spectrum tools, against numpy's SVD and closed forms."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from lora_course import planted


def test_eckart_young_error_matches_numpy_truncated_svd():
    # An independently built matrix: numpy random, numpy SVD, numpy truncation.
    rng = np.random.default_rng(0)
    m = rng.normal(size=(7, 5))
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    for rank in range(0, 6):
        best = (u[:, :rank] * s[:rank]) @ vt[:rank]          # the truncated SVD, the best rank-r matrix
        expected = np.linalg.norm(m - best)                  # Frobenius norm
        assert planted.eckart_young_error(torch.tensor(m), rank) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_eckart_young_error_agrees_with_lowrank_and_allows_large_ranks():
    from lora_course import lowrank

    m = torch.tensor(np.random.default_rng(1).normal(size=(4, 6)))
    sigma = lowrank.singular_values(m)
    assert [planted.eckart_young_error(m, r) for r in range(5)] == [lowrank.eckart_young_error(sigma, r)
                                                                    for r in range(5)]
    assert planted.eckart_young_error(m, 9) == 0.0                # more rank than the matrix has: nothing lost


def test_plot_spectra_title_names_the_layers():
    import matplotlib.pyplot as plt

    spectra = [planted.UpdateSpectrum(f"trf_blocks.{i}.att.{k}", torch.tensor([2.0, 1.0]))
               for i in range(2) for k in ("W_key", "out_proj")]
    assert planted.plot_spectra(spectra, spectra[:2]).get_title() == \
        "Spectrum of the weight update (W_key, out_proj; 4 matrices)"
    assert planted.plot_spectra(spectra, [], title="mine").get_title() == "mine"
    plt.close("all")


def test_eckart_young_error_rejects_bad_rank():
    with pytest.raises(ValueError, match="non-negative integer"):
        planted.eckart_young_error(torch.eye(3), -1)


def test_planted_update_has_the_requested_singular_values():
    delta = planted.planted_update(12, 9, (5.0, 2.0, 0.5), seed=3)
    s = np.linalg.svd(delta.numpy().astype(np.float64), compute_uv=False)
    np.testing.assert_allclose(s[:3], [5.0, 2.0, 0.5], rtol=1e-5)
    assert np.all(s[3:] < 1e-5) and delta.shape == (12, 9)


@pytest.mark.parametrize("values, match", [((1.0, 1.0, 1.0, 1.0), "do not fit"), ((1.0, -1.0), "positive")])
def test_planted_update_errors(values, match):
    with pytest.raises(ValueError, match=match):
        planted.planted_update(3, 3, values)


def test_whitened_inputs_make_the_loss_a_frobenius_norm():
    x = planted.whitened_inputs(40, 6, seed=1)
    torch.testing.assert_close(x.T @ x / 40, torch.eye(6), atol=1e-5, rtol=0)
    d = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
    mse = ((x @ d.T) ** 2).sum(dim=1).mean()
    assert mse.item() == pytest.approx(torch.linalg.matrix_norm(d).item() ** 2, rel=1e-4)
    with pytest.raises(ValueError, match="at least as many"):
        planted.whitened_inputs(3, 6)


def test_fit_reaches_the_eckart_young_bound():
    torch.manual_seed(0)
    base = nn.Linear(8, 8)
    delta_star = planted.planted_update(8, 8, (3.0, 1.0), seed=5)
    below = planted.fit_lora_to_teacher(base, delta_star, rank=1, steps=400)
    at = planted.fit_lora_to_teacher(base, delta_star, rank=2, steps=400)
    assert below.predicted == pytest.approx(1.0, rel=1e-5)      # loses σ₂ = 1
    assert below.error == pytest.approx(1.0, abs=0.01)
    assert at.error < 0.01
    assert not base.weight.requires_grad                       # the base stays frozen


def test_effective_ranks_on_known_spectra():
    assert planted.entropy_effective_rank(torch.ones(5)) == pytest.approx(5.0)
    assert planted.entropy_effective_rank(torch.tensor([2.0, 0.0, 0.0])) == pytest.approx(1.0)
    sv = torch.tensor([4.0, 3.0, 1.0])                # energies 16, 9, 1 of 26
    assert planted.energy_rank(sv, 0.6) == 1          # 16/26 = 0.615
    assert planted.energy_rank(sv, 0.9) == 2          # 25/26 = 0.96
    assert planted.energy_rank(sv, 1.0) == 3
    p = np.array([4, 3, 1]) / 8
    assert planted.entropy_effective_rank(sv) == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    with pytest.raises(ValueError, match="fraction"):
        planted.energy_rank(sv, 0)


def test_full_update_spectra_match_numpy():
    torch.manual_seed(0)
    before = nn.Sequential(nn.Linear(5, 4))
    after = nn.Sequential(nn.Linear(5, 4))
    (spectrum,) = planted.full_update_spectra(before, after, ["0"])
    expected = np.linalg.svd((after[0].weight - before[0].weight).detach().numpy().astype(np.float64), compute_uv=False)
    np.testing.assert_allclose(spectrum.singular_values.numpy(), expected, rtol=1e-6)


def test_lora_update_spectra_have_at_most_rank_nonzero_values():
    from lora_course import replace_linear_with_lora

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 10))
    replace_linear_with_lora(model, rank=2, alpha=2)
    with torch.no_grad():
        model[0].lora.B.normal_()
    (spectrum,) = planted.lora_update_spectra(model)
    sv = spectrum.singular_values
    assert sv[1] > 1e-3 and sv[2] < 1e-6 * sv[0]
