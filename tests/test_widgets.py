"""The lab's plain functions and its UIs, driven without a browser (setting a control's value runs
the same callbacks as a drag in JupyterLab)."""
from fractions import Fraction

import numpy as np
import pytest

from lora_course import widgets
from lora_course.gpt import load_pretrained_gpt

QV = "q, v (the paper's default)"


@pytest.fixture(scope="module")
def lab():
    # A very short lab: the tests check plumbing and numbers, not learning quality.
    return widgets.RankAlphaLab(load_pretrained_gpt(), steps=3, batch_size=8, n_val=16)


def expected_trainable(rank: int, matrices_per_block: int = 2, blocks: int = 3) -> int:
    """By hand: r·(48 + 48) per adapted 48×48 matrix of the course GPT (3 blocks, width 48), plus
    the spam task's 48×2 head with its 2 biases."""
    return blocks * matrices_per_block * rank * (48 + 48) + 48 * 2 + 2


def test_model_shape_behind_the_hand_counts(lab):
    cfg = lab.base.cfg
    assert (cfg.n_layers, cfg.emb_dim) == (3, 48) and lab.num_classes == 2


def test_run_counts_parameters_and_is_cached(lab):
    run = lab.run(2, 4, "alpha/rank", QV, 3e-3)
    assert run.trainable_parameters == expected_trainable(2)
    assert len(run.train_loss) == 3 and 0 <= run.final_val_accuracy <= 1
    assert lab.run(2, 4, "alpha/rank", QV, 3e-3) is run               # same settings: from the cache
    shared = lab.run(2, 2, "alpha", QV, 3e-3)                         # same rank and s = 2: the same training
    assert shared.model is run.model and shared.train_loss == run.train_loss
    assert lab.run(2, 8, "alpha", QV, 3e-3).model is not run.model    # s = 8: a different run


def test_label_names_the_settings_asked_for(lab):
    lab.clear_cache()
    first = lab.run(1, 64, "alpha/rank", QV, 3e-3)                    # trains: s = 64 at rank 1
    again = lab.run(1, 64, "alpha", QV, 3e-3)                         # s = 64 too: no new training
    assert len(lab.cache) == 1 and again.model is first.model
    assert first.label == "LoRA r=1, α=64, alpha/rank (s=64)"
    assert again.label == "LoRA r=1, α=64, alpha (s=64)"
    assert lab.run(1, 64, "alpha/rank", QV, 3e-3).label == first.label   # asking again keeps its own label


def test_runs_do_not_depend_on_what_ran_before(lab):
    first = lab.run(3, 6, "alpha/rank", QV, 1e-3).train_loss
    lab.clear_cache()
    lab.run(1, 1, "alpha", QV, 1e-3)                                  # consumes random numbers
    again = lab.run(3, 6, "alpha/rank", QV, 1e-3).train_loss
    assert again == first


def test_all_linear_targets_count(lab):
    run = lab.run(1, 1, "alpha/rank", "all Linear (attention + feed-forward)", 1e-3)
    attention, feed_forward = 4 * 1 * (48 + 48), 2 * 1 * (48 + 192)   # 4 attention 48×48; 48→192, 192→48
    assert run.trainable_parameters == 3 * (attention + feed_forward) + 98 == 2_690


def test_aspect_lab_has_a_six_class_head():
    lab = widgets.RankAlphaLab(load_pretrained_gpt(), task="aspect", steps=1, batch_size=4, n_val=8)
    run = lab.run(1, 1, "alpha/rank", QV, 1e-3)
    assert run.trainable_parameters == 3 * 2 * 1 * (48 + 48) + 48 * 6 + 6


def test_bad_settings_have_clear_errors(lab):
    with pytest.raises(ValueError, match="unknown targets"):
        lab.run(2, 4, "alpha/rank", "every layer", 1e-3)
    with pytest.raises(ValueError, match="unknown scaling"):
        lab.run(2, 4, "alpha*rank", QV, 1e-3)


def test_smoothed_loss_is_a_running_mean():
    run = widgets.LabRun("x", 0, [1.0, 3.0, 5.0, 7.0], 0.0, 0.0, 0.0)
    np.testing.assert_allclose(run.smoothed_loss(window=2), [1.0, 2.0, 4.0, 6.0])


def test_ui_slider_moves_retrain_and_redraw(lab):
    ui = lab.ui(rank=2, alpha=4, scaling="alpha/rank", targets=QV, lr=3e-3)
    assert ui.last_run.trainable_parameters == expected_trainable(2)
    first_png = bytes(ui.image.value)
    assert first_png[:4] == b"\x89PNG"
    ui.rank.value = 3                                                  # what dragging the slider does
    assert ui.last_run.trainable_parameters == expected_trainable(3)
    assert f"{expected_trainable(3):,}" in ui.count.value
    assert bytes(ui.image.value) != first_png
    ui.targets.value = "q, k, v, out_proj"
    assert ui.last_run.trainable_parameters == expected_trainable(3, matrices_per_block=4)
    assert ui.last_redraw_seconds > 0 and ui.last_redraw_cpu_seconds >= 0


def test_ui_scaling_menu_changes_s(lab):
    ui = lab.ui(rank=4, alpha=4, scaling="alpha/rank", targets=QV, lr=3e-3)
    assert "s = 1<" in ui.count.value
    ui.scaling.value = "alpha"
    assert "s = 4<" in ui.count.value
    assert ui.last_run is lab.run(4, 4, "alpha", QV, 3e-3)


class FakeLab:
    """Stands in for RankAlphaLab with losses chosen by hand: loss = 0.2 when s·r is in [8, 32],
    0.8 when s·r < 8 (too small a step to learn), 0.5 above (too big); ``offset`` is added to
    every loss, to stand for another seed."""

    def __init__(self, seed=0, offset=0.0):
        self.seed, self.offset = seed, offset

    def untrained_loss(self):
        return 0.8 + self.offset

    def run(self, rank, alpha, scaling, targets, lr):
        from lora_course.lora import lora_scaling

        step = lora_scaling(rank, alpha, scaling) * rank
        loss = (0.8 if step < 8 else (0.2 if step <= 32 else 0.5)) + self.offset
        return widgets.LabRun("fake", 0, [loss], loss, 0.0, 0.0)


def test_grid_locates_the_onset_alpha():
    grid = widgets.alpha_rank_grid(FakeLab(), ranks=(1, 4, 16), alphas=(1, 2, 4, 8, 16, 32, 64, 128))
    assert grid.threshold == pytest.approx(0.5)                       # halfway between 0.8 and 0.2
    # Onset where s·r >= 8: alpha/rank: alpha >= 8 at every rank; raw alpha: alpha >= 8 / r.
    assert grid.onset_alpha("alpha/rank") == [8, 8, 8]
    assert grid.onset_alpha("alpha") == [8, 2, 1]                     # 8/16 is not on the grid: 1 is the first
    assert grid.onset_alpha("alpha/sqrt(rank)") == [8, 4, 2]          # s·r = alpha·sqrt(r) >= 8
    assert grid.octaves_moved("alpha/rank") == 0 and grid.octaves_moved("alpha") == 3
    assert grid.best_alpha("alpha/rank") == [8, 8, 8]
    assert grid.final_loss["alpha"].shape == (3, 8)


def test_grid_over_seeds_is_the_mean_and_keeps_the_spread():
    labs = [FakeLab(0, 0.0), FakeLab(1, 0.1), FakeLab(2, -0.1)]
    grid = widgets.alpha_rank_grid(labs, ranks=(1, 4), alphas=(1, 2, 4, 8, 16))
    single = widgets.alpha_rank_grid(FakeLab(), ranks=(1, 4), alphas=(1, 2, 4, 8, 16))
    assert grid.seeds == 3 and single.seeds == 1
    for sc in grid.final_loss:
        np.testing.assert_allclose(grid.final_loss[sc], single.final_loss[sc])   # offsets average to 0
        np.testing.assert_allclose(grid.spread(sc), 0.1)                         # std of (0, 0.1, -0.1), ddof=1
        np.testing.assert_allclose(single.spread(sc), 0.0)
        assert grid.seed_losses[sc].shape == (3, 2, 5)
    assert grid.untrained_loss == pytest.approx(0.8)
    with pytest.raises(ValueError, match="repeat a seed"):
        widgets.alpha_rank_grid([FakeLab(0), FakeLab(0)], ranks=(1,), alphas=(1,))
    with pytest.raises(ValueError, match="labs is empty"):
        widgets.alpha_rank_grid([], ranks=(1,), alphas=(1,))


def test_grid_counts_distinct_runs_like_fractions():
    grid = widgets.alpha_rank_grid(FakeLab(), ranks=(1, 4, 16), alphas=(1, 2, 4, 8, 16, 32, 64, 128))
    # Independent count with exact fractions: s = alpha, alpha/r, alpha/sqrt(r) (sqrt of 4 and 16 are exact).
    pairs = {(r, Fraction(a, d)) for r in (1, 4, 16) for a in (1, 2, 4, 8, 16, 32, 64, 128)
             for d in (1, r, int(r ** 0.5))}
    assert grid.distinct_runs == len(pairs) == 30


def test_heatmaps_plot_and_ui():
    import matplotlib.pyplot as plt

    grid = widgets.alpha_rank_grid(FakeLab(), ranks=(1, 4), alphas=(1, 2, 4, 8))
    axes = widgets.plot_alpha_rank_heatmaps(grid)
    assert [ax.get_title() for ax in axes] == ["s = alpha/rank", "s = alpha", "s = alpha/sqrt(rank)"]
    plt.close("all")
    box = widgets.heatmap_ui(grid)
    first = bytes(box.image.value)
    box.choice.value = "alpha"                                        # clicking the toggle button
    assert bytes(box.image.value) != first and bytes(box.image.value)[:4] == b"\x89PNG"
