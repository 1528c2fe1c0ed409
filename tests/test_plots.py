"""Plotting helpers: what they draw is read back from the Axes and compared with the data."""
import matplotlib.pyplot as plt
import numpy as np
import pytest

from lora_course.memory import TrainingMemory
from lora_course.plots import plot_accuracy_vs_parameters, plot_bars, plot_loss_curves, plot_memory, smooth
from lora_course.training import History


def history(name, trainable, acc, n=30, eval_every=10):
    rng = np.random.default_rng(len(name))
    h = History(name=name, lr=1e-3, trainable_parameters=trainable)
    h.train_steps = list(range(1, n + 1))
    h.train_loss = list(np.exp(-np.arange(n) / 10) + 0.1 * rng.random(n))
    h.eval_steps = list(range(eval_every, n + 1, eval_every))
    h.val_loss = [0.5 / k for k in range(1, len(h.eval_steps) + 1)]
    h.val_accuracy = [acc - 0.1 / k for k in range(len(h.eval_steps), 0, -1)]
    return h


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_smooth_matches_a_loop_over_trailing_windows():
    values = np.random.default_rng(0).random(23)
    for window in (1, 4, 10, 50):
        reference = [values[max(0, i - window + 1):i + 1].mean() for i in range(len(values))]
        np.testing.assert_allclose(smooth(values, window), reference, rtol=1e-12)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_smooth_rejects_bad_windows(bad):
    with pytest.raises(ValueError, match="window"):
        smooth([1.0, 2.0], bad)


def test_loss_curves_draw_train_and_validation_for_every_run():
    runs = [history("full FT", 1000, 0.9), history("LoRA r=1", 10, 0.8)]
    ax = plot_loss_curves(runs, smooth_window=5)
    lines = ax.get_lines()
    assert len(lines) == 4
    for i, h in enumerate(runs):
        train, val = lines[2 * i], lines[2 * i + 1]
        np.testing.assert_allclose(train.get_ydata(), smooth(h.train_loss, 5))
        np.testing.assert_allclose(val.get_xdata(), h.eval_steps)
        np.testing.assert_allclose(val.get_ydata(), h.val_loss)
        assert train.get_color() == val.get_color()
    assert ax.get_yscale() == "log"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["full FT", "LoRA r=1"]


def test_loss_curves_reject_wrong_inputs():
    with pytest.raises(ValueError, match="no runs"):
        plot_loss_curves([])
    with pytest.raises(TypeError, match="History"):
        plot_loss_curves([{"train_loss": [1.0]}])


def test_accuracy_against_parameters_uses_a_log_axis_and_the_reference():
    runs = [history(f"r={r}", r * 100, 0.8 + r / 100) for r in (1, 2, 4)]
    full = history("full FT", 200_000, 0.95)
    ax = plot_accuracy_vs_parameters(runs, reference=full)
    assert ax.get_xscale() == "log"
    points = ax.get_lines()[0]
    np.testing.assert_allclose(points.get_xdata(), [100, 200, 400])
    np.testing.assert_allclose(points.get_ydata(), [h.final_val_accuracy for h in runs])
    assert any(np.allclose(line.get_ydata(), full.final_val_accuracy) for line in ax.get_lines()[1:])
    with pytest.raises(ValueError, match="accuracies"):
        plot_accuracy_vs_parameters(runs, accuracies=[0.5])


def test_bars_have_the_given_heights_and_labels():
    ax = plot_bars(["a", "b"], [3, 1500], ylabel="count", log_y=True)
    assert [p.get_height() for p in ax.patches] == [3, 1500]
    assert [t.get_text() for t in ax.texts] == ["3", "1,500"]
    assert ax.get_yscale() == "log"
    with pytest.raises(ValueError, match="labels"):
        plot_bars(["a"], [1, 2], ylabel="x")


def test_memory_bars_stack_to_the_total():
    mems = [TrainingMemory(2 ** 20, 2 ** 20, 2 ** 21, 2 ** 22), TrainingMemory(2 ** 20, 0, 0, 2 ** 22)]
    ax = plot_memory(["full", "lora"], mems)
    tops = {}
    for patch in ax.patches:
        x = round(patch.get_x(), 6)
        tops[x] = max(tops.get(x, 0), patch.get_y() + patch.get_height())
    assert sorted(tops.values()) == pytest.approx(sorted(m.total / 2 ** 20 for m in mems))


def test_accuracy_against_parameters_with_test_accuracies_and_chance():
    runs = [history(f"r={r}", r * 100, 0.8 + r / 100) for r in (1, 2)]
    full = history("full FT", 200_000, 0.95)
    ax = plot_accuracy_vs_parameters(runs, reference=full, accuracies=[0.7, 0.75], reference_accuracy=0.9, chance=0.5)
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), [0.7, 0.75])
    others = [line.get_ydata() for line in ax.get_lines()[1:]]
    assert any(np.allclose(y, 0.9) for y in others)  # the reference follows reference_accuracy
    assert not any(np.allclose(y, full.final_val_accuracy) for y in others)
    assert any(np.allclose(y, 0.5) for y in others)
    assert ax.get_ylim()[0] < 0.5
