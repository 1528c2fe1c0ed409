"""Plots of training runs: they take the ``History`` objects that ``train_classifier`` returns.

Every function draws into a Matplotlib Axes (a new figure unless ``ax`` is given) and returns
that Axes, so a notebook can add to it and a test can read back what was drawn.
"""
from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np

from .training import History


def smooth(values: Sequence[float], window: int = 10) -> np.ndarray:
    """Trailing moving average: point i is the mean of values[max(0, i-window+1) .. i].

    Mini-batch losses jump from step to step; the average over the last ``window`` steps shows
    the trend without shifting it into the future (each point uses only past steps)."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive integer number of steps, got {window!r}")
    x = np.asarray(values, dtype=float)
    if x.ndim != 1:
        raise ValueError(f"smooth expects a 1-D sequence of numbers, got shape {x.shape}")
    csum = np.cumsum(np.insert(x, 0, 0.0))
    idx = np.arange(1, len(x) + 1)
    start = np.maximum(idx - window, 0)
    return (csum[idx] - csum[start]) / (idx - start)


def _axes(ax, figsize):
    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def _check_histories(histories) -> list[History]:
    histories = list(histories)
    if not histories:
        raise ValueError("no runs to plot: pass a list of History objects from train_classifier")
    for h in histories:
        if not isinstance(h, History):
            raise TypeError(f"expected History objects (what train_classifier returns), got {type(h).__name__}")
    return histories


def plot_loss_curves(histories: Sequence[History], *, smooth_window: int = 10, ax=None, log_y: bool = True,
                     title: str = "Training (smoothed, solid) and validation (dashed) loss"):
    """All runs in one Axes: each run has one colour; its smoothed training loss is a solid line
    and its validation loss a dashed line with markers at the evaluation steps."""
    histories = _check_histories(histories)
    ax = _axes(ax, (8, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, h in enumerate(histories):
        color = colors[i % len(colors)]
        ax.plot(h.train_steps, smooth(h.train_loss, smooth_window), color=color, lw=1.5, label=h.name)
        ax.plot(h.eval_steps, h.val_loss, color=color, lw=1.2, ls="--", marker="o", ms=3)
    ax.set_xlabel("training step")
    ax.set_ylabel("cross-entropy loss" + (" (log scale)" if log_y else ""))
    if log_y:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=2)
    return ax


def plot_accuracy_vs_parameters(histories: Sequence[History], *, reference: History | None = None, ax=None,
                                accuracies: Sequence[float] | None = None, reference_accuracy: float | None = None,
                                chance: float | None = None,
                                title: str = "Final validation accuracy against trainable parameters"):
    """Final validation accuracy (y) against trainable parameters (x, log scale), one labelled
    point per run; ``reference`` (e.g. full fine-tuning) is drawn as a point and a dotted
    horizontal line. ``accuracies`` and ``reference_accuracy`` override the y values (e.g. with
    test accuracies). ``chance`` draws the chance level and starts the y axis just below it, so
    that small differences near the top are not blown up."""
    histories = _check_histories(histories)
    ys = list(accuracies) if accuracies is not None else [h.final_val_accuracy for h in histories]
    if len(ys) != len(histories):
        raise ValueError(f"got {len(ys)} accuracies for {len(histories)} runs")
    ax = _axes(ax, (7, 4))
    xs = [h.trainable_parameters for h in histories]
    ax.plot(xs, ys, "o-", color="C0", label="LoRA runs")
    for h, x, y in zip(histories, xs, ys):
        ax.annotate(h.name, (x, y), textcoords="offset points", xytext=(4, -12), fontsize=8)
    if reference is not None:
        ref_y = reference.final_val_accuracy if reference_accuracy is None else reference_accuracy
        ax.axhline(ref_y, color="C3", ls=":", label=f"{reference.name}")
        ax.plot([reference.trainable_parameters], [ref_y], "s", color="C3")
    if chance is not None:
        ax.axhline(chance, color="0.5", ls="--", lw=1, label="chance")
        ax.set_ylim(chance - 0.05, 1.02)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("validation accuracy")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
    return ax


def plot_bars(labels: Sequence[str], values: Sequence[float], *, ylabel: str, ax=None, log_y: bool = False,
              title: str = "", fmt: str = "{:,.0f}", color: str = "C0"):
    """A labelled bar per run, with its value printed above the bar."""
    labels, values = list(labels), list(values)
    if len(labels) != len(values):
        raise ValueError(f"got {len(labels)} labels for {len(values)} values")
    ax = _axes(ax, (8, 3.5))
    bars = ax.bar(labels, values, color=color)
    for bar, v in zip(bars, values):
        ax.annotate(fmt.format(v), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    if log_y:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.tick_params(axis="x", labelrotation=20)
    return ax


def plot_memory(labels: Sequence[str], memories: Sequence, *, ax=None,
                title: str = "Memory alive at the training peak (measured)"):
    """Stacked bars per run: weights, gradients, AdamW states and saved activations, in MiB.
    ``memories`` are ``lora_course.memory.TrainingMemory`` objects."""
    labels, memories = list(labels), list(memories)
    if len(labels) != len(memories):
        raise ValueError(f"got {len(labels)} labels for {len(memories)} measurements")
    ax = _axes(ax, (8, 4))
    bottom = np.zeros(len(memories))
    for part, color in [("weights", "C7"), ("gradients", "C1"), ("optimizer_states", "C3"), ("activations", "C0")]:
        values = np.array([getattr(m, part) for m in memories], dtype=float) / 2 ** 20
        ax.bar(labels, values, bottom=bottom, color=color, label=part.replace("_", " "))
        bottom += values
    ax.set_ylabel("MiB")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.tick_params(axis="x", labelrotation=20)
    return ax


# ---------------------------------------------------------------------------------------------
# Several seeds: means with their spread
# ---------------------------------------------------------------------------------------------
def _check_seed_runs(runs):
    runs = list(runs)
    if not runs:
        raise ValueError("no runs to plot: pass a list of SeedRuns from experiments.run_seeds")
    for r in runs:
        if not hasattr(r, "test_accuracy") or not hasattr(r, "histories"):
            raise TypeError(f"expected SeedRuns objects (what experiments.run_seeds returns), got {type(r).__name__}")
    return runs


def plot_curves_with_bands(runs, *, key: str = "val_accuracy", ax=None, title: str = "", ylabel: str | None = None):
    """One line per method: the mean over seeds of a recorded curve, with a band of ± one
    standard deviation across seeds."""
    runs = _check_seed_runs(runs)
    ax = _axes(ax, (7, 4))
    for i, r in enumerate(runs):
        steps, mean, std = r.curve(key)
        mean, std = np.array(mean), np.array(std)
        color = f"C{i % 10}"
        ax.plot(steps, mean, color=color, lw=1.6, label=r.spec.name)
        ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.18, lw=0)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel or key.replace("_", " "))
    ax.set_title(title or f"{key.replace('_', ' ')}: mean over {len(runs[0].seeds)} seeds, band = ± 1 std")
    ax.legend(fontsize=8, loc="best", frameon=False)
    return ax


def plot_accuracy_vs_parameters_seeds(runs, *, baselines: dict[str, float] | None = None, chance: float | None = None,
                                      ax=None, title: str = "Test accuracy against trainable parameters",
                                      label_offsets: dict[str, tuple[int, int]] | None = None):
    """Each method at its number of trainable parameters (x, log scale): mean test accuracy over
    seeds with error bars of ± one standard deviation, labelled; LoRA runs are joined by a line.
    ``baselines`` (name -> accuracy, e.g. the bag-of-words model) and ``chance`` are drawn as
    horizontal lines. The y axis starts just below the lowest thing drawn."""
    runs = _check_seed_runs(runs)
    ax = _axes(ax, (8, 4.5))
    offsets = label_offsets or {}
    lora = [r for r in runs if r.spec.method == "lora"]
    if len(lora) > 1:
        ax.plot([r.trainable_parameters for r in lora], [r.mean for r in lora], "-", color="C0", lw=1, alpha=0.6)
    lows = []
    for r in runs:
        color = "C0" if r.spec.method == "lora" else {"full": "C3", "head only": "C2", "last block": "C1"}[r.spec.method]
        ax.errorbar([r.trainable_parameters], [r.mean], yerr=[r.std], fmt="o", color=color, capsize=4, ms=6)
        ax.annotate(r.spec.name, (r.trainable_parameters, r.mean), textcoords="offset points",
                    xytext=offsets.get(r.spec.name, (6, -4)), fontsize=8, color=color)
        lows.append(r.mean - r.std)
    for i, (name, value) in enumerate((baselines or {}).items()):
        ax.axhline(value, color="0.4", ls=[":", "-."][i % 2], lw=1.2, label=name)
        lows.append(value)
    if chance is not None:
        ax.axhline(chance, color="0.6", ls="--", lw=1, label="chance")
        lows.append(chance)
    ax.set_ylim(max(0.0, min(lows) - 0.05), 1.0)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    if baselines or chance is not None:
        ax.legend(fontsize=8, loc="lower right", frameon=True)
    return ax
