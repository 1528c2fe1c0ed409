"""The rank-and-alpha lab of notebook 06: plain functions that train, measure and plot, and thin
ipywidgets UIs around them.

Every widget here is two layers:

1. a plain function or method that computes and plots, and returns numbers you can check
   (``RankAlphaLab.show``, ``alpha_rank_grid`` + ``plot_alpha_rank_heatmaps``);
2. a UI (``RankAlphaLab.ui``, ``heatmap_ui``) that only reads its controls and calls layer 1.

So the notebook makes each figure once with a plain, asserted call, and the unit tests drive the
UIs without a browser (setting ``slider.value`` runs the same callbacks a drag does).

Speed. A redraw must feel live (notebook 06 asserts that one that trains takes under 1.5 s of
CPU time), so the lab trains a *short* proxy run (by default 20 AdamW steps of 16 messages of
the easy spam task, then one validation pass on 128 fixed messages), caches every run by its
settings, computes the full fine-tuning reference once per lab, and draws the plot into an Image
widget that is replaced in place. Runs are cached by
(rank, s, targets, lr) where s is the resulting scaling factor: two conventions that give the
same s for a rank (all three agree at rank 1) train the identical model, so they share one run
(``lab.cache`` holds one entry per training), shown under the label of the settings asked for.

Noise. One short run is an anecdote, so ``alpha_rank_grid`` takes several labs that differ only
by their seed and reports the mean and spread of every cell.
"""
from __future__ import annotations

import dataclasses
import io
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .data import classification_splits, num_classes
from .errors import ArgumentTypeError, check_int, check_number
from .lora import SCALINGS, lora_scaling, mark_only_lora_as_trainable, replace_linear_with_lora
from .training import EncodedSplit, evaluate, make_classifier, train_classifier

#: Target-layer choices offered by the lab, by label. Names match as dotted suffixes (PEFT's rule).
TARGETS = {
    "q, v (the paper's default)": ("W_query", "W_value"),
    "q, k, v, out_proj": ("W_query", "W_key", "W_value", "out_proj"),
    "all Linear (attention + feed-forward)": ("W_query", "W_key", "W_value", "out_proj", "ff.layers.0", "ff.layers.2"),
}
DEFAULT_TARGETS = "q, v (the paper's default)"
LEARNING_RATES = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
ALPHAS = (0.5, 1, 2, 4, 8, 16, 32, 64, 128)


@dataclass
class LabRun:
    """One short training run of the lab and what it measured."""

    label: str
    trainable_parameters: int
    train_loss: list[float]      # per step, on the same batches for every run of a lab
    final_val_loss: float        # on the lab's fixed validation subset, after the last step
    final_val_accuracy: float
    seconds: float               # wall time of the training run (when it was trained, not fetched)
    model: torch.nn.Module = field(default=None, repr=False)  # the trained model, for inspection

    def smoothed_loss(self, window: int = 5) -> np.ndarray:
        """Running mean of the training loss over ``window`` steps (fewer at the start)."""
        window = check_int(window, "window", minimum=1)
        loss = np.asarray(self.train_loss)
        cumulative = np.concatenate([[0.0], np.cumsum(loss)])
        starts = np.maximum(np.arange(1, len(loss) + 1) - window, 0)
        return (cumulative[1:] - cumulative[starts]) / (np.arange(1, len(loss) + 1) - starts)


class RankAlphaLab:
    """Short LoRA fine-tunes of the course GPT on a classification task, cached by settings.

    The curve drawn is the training loss of every step: all runs of a lab see the same batches in
    the same order (seeded), so two curves differ only by the settings. The final metric is the
    validation loss and accuracy on a fixed subset of ``n_val`` held-out messages, measured once
    at the end (measuring it at every step would double the cost of a redraw).

    Args:
        base: the pretrained model (``load_pretrained_gpt()``); it is never modified.
        task: ``"spam"`` (2 classes, the default) or ``"aspect"`` (the course's main task, 6
            classes); the head gets one output per class. The lab defaults to spam because it is
            *easy*: a bag of words solves it, so 20 steps already show how fast a setting learns
            (on aspect, 100 steps of 16 barely leave chance). The lab measures how the settings
            change the speed of learning, not what LoRA can reach: that is notebook 04's question.
        steps: AdamW steps per run (a short proxy of a real fine-tune, chosen for speed).
        batch_size: messages per step.
        n_val: size of the fixed validation subset for the final metric.
        full_lr: learning rate of the full fine-tuning reference.
    """

    def __init__(self, base, task: str = "spam", steps: int = 20, batch_size: int = 16, n_val: int = 128,
                 full_lr: float = 1e-3, seed: int = 0):
        if not isinstance(base, torch.nn.Module) or not hasattr(base, "out_head"):
            raise ArgumentTypeError(f"base must be the pretrained course GPT (load_pretrained_gpt()), got "
                                    f"{type(base).__name__}")
        if not isinstance(task, str):
            raise ArgumentTypeError(f"task must be a task name such as 'aspect', got {task!r}")
        steps = check_int(steps, "steps", minimum=1)
        batch_size = check_int(batch_size, "batch_size", minimum=1)
        n_val = check_int(n_val, "n_val", minimum=1)
        full_lr = _check_lr(full_lr, "full_lr")
        seed = check_int(seed, "seed")
        splits = classification_splits(task)
        self.num_classes = num_classes(task)
        self.base, self.task, self.steps = base, task, steps
        self.full_lr, self.batch_size, self.seed = full_lr, batch_size, seed
        self.train = EncodedSplit.from_split(splits["train"])          # encoded once, reused by every run
        val = EncodedSplit.from_split(splits["val"])
        self.val = EncodedSplit(val.ids[:n_val], val.lengths[:n_val], val.labels[:n_val])
        self.cache: dict[tuple, LabRun] = {}         # (rank, s, targets, lr) -> run: one entry per training
        self._labelled: dict[tuple, LabRun] = {}     # the settings asked for -> that run under their label
        self._full_runs: dict[float, LabRun] = {}
        self._untrained: float | None = None

    # -- computing ---------------------------------------------------------------------------
    def _train(self, model, lr: float, label: str) -> LabRun:
        start = time.perf_counter()
        history = train_classifier(model, self.train, self.val, steps=self.steps, lr=lr, batch_size=self.batch_size,
                                   eval_every=self.steps, seed=self.seed, name=label, progress=False)
        return LabRun(label, history.trainable_parameters, history.train_loss, history.final_val_loss,
                      history.final_val_accuracy, time.perf_counter() - start, model)

    def untrained_loss(self) -> float:
        """Validation loss before any step: every LoRA run starts here, since B = 0."""
        if self._untrained is None:
            self._untrained = evaluate(make_classifier(self.base, self.num_classes), self.val)[0]
        return self._untrained

    def clear_cache(self) -> None:
        """Forget every LoRA run (the full fine-tuning reference is kept)."""
        self.cache.clear()
        self._labelled.clear()

    def full_finetuning(self, lr: float) -> LabRun:
        """Full fine-tuning (every weight trains) with the same steps and batches, at ``lr``;
        computed once per learning rate."""
        lr = _check_lr(lr)
        if lr not in self._full_runs:
            self._full_runs[lr] = self._train(make_classifier(self.base, self.num_classes), lr, "full fine-tuning")
        return self._full_runs[lr]

    def reference(self) -> LabRun:
        """The curve every LoRA run is drawn against: full fine-tuning at ``full_lr``."""
        return self.full_finetuning(self.full_lr)

    def run(self, rank: int, alpha: float, scaling: str = "alpha/rank", targets: str = DEFAULT_TARGETS,
            lr: float = 3e-3) -> LabRun:
        """A short LoRA run with these settings (from the cache when it was trained before).

        Settings with the same rank and s share one training; the returned run's label always
        names the settings asked for (the same object for the same settings)."""
        _check_targets(targets)
        s = lora_scaling(rank, alpha, scaling)  # validates rank, alpha and the convention's name
        rank, lr = int(rank), _check_lr(lr)
        key = (rank, round(s, 12), targets, float(lr))
        if key not in self.cache:
            model = make_classifier(self.base, self.num_classes)  # a fresh copy each time: re-running never double-wraps
            torch.manual_seed(self.seed)  # A's random init: the same for every run of this rank, whatever ran before
            replace_linear_with_lora(model, rank, alpha, scaling=scaling, target_modules=list(TARGETS[targets]))
            mark_only_lora_as_trainable(model, modules_to_save=["out_head"])
            self.cache[key] = self._train(model, lr, f"LoRA r={rank}, s={s:.3g}")  # any settings with this s
        settings = (rank, float(alpha), scaling, targets, float(lr))
        labelled = self._labelled.get(settings)
        if labelled is None or labelled.model is not self.cache[key].model:
            label = f"LoRA r={rank}, α={alpha:g}, {scaling} (s={s:.3g})"
            labelled = self._labelled[settings] = dataclasses.replace(self.cache[key], label=label)
        return labelled

    # -- plotting ----------------------------------------------------------------------------
    def plot(self, run: LabRun, ax=None, ylim=None):
        """The run's training loss per step (thin) and its 5-step mean (thick), over the same curves of
        the full fine-tuning reference; the legend gives each one's final validation loss and
        accuracy. Returns the axes."""
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        if not isinstance(run, LabRun):
            raise ArgumentTypeError(f"run must be a LabRun (what lab.run(...) returns), got {type(run).__name__}")
        ax = ax or plt.subplots(figsize=(7, 3.8))[1]
        ref = self.reference()
        steps = np.arange(1, self.steps + 1)
        for r, style, color in ((ref, "--", "gray"), (run, "-", "C1")):
            ax.plot(steps, r.train_loss, style, color=color, lw=0.8, alpha=0.35)
            ax.plot(steps, r.smoothed_loss(), style, color=color, lw=2.5,
                    label=f"{r.label}\n{r.trainable_parameters:,} trainable · final val loss "
                          f"{r.final_val_loss:.3f} · acc {r.final_val_accuracy:.2f}")
        ax.set(xlabel="training step (same batches for every run)", ylabel="training loss (thick: 5-step mean)",
               ylim=ylim or (0, 1.1 * max(max(ref.train_loss), max(run.train_loss))), xlim=(1, self.steps),
               title=f"{self.task} classifier: LoRA vs full fine-tuning, {self.steps} steps")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        ax.legend(loc="upper right", fontsize=8)
        return ax

    def show(self, rank: int = 4, alpha: float = 64, scaling: str = "alpha/rank", targets: str = DEFAULT_TARGETS,
             lr: float = 3e-3) -> LabRun:
        """Train (or fetch) a run, draw its curve over the reference, and return it (plain function)."""
        import matplotlib.pyplot as plt

        run = self.run(rank, alpha, scaling, targets, lr)
        self.plot(run)
        plt.show()
        return run

    # -- the UI ------------------------------------------------------------------------------
    def ui(self, rank: int = 4, alpha: float = 64, scaling: str = "alpha/rank", targets: str = DEFAULT_TARGETS,
           lr: float = 3e-3) -> "LabUI":
        """Sliders and menus around ``show``; see ``LabUI``."""
        return LabUI(self, rank, alpha, scaling, targets, lr)


def _check_lr(lr, name: str = "lr") -> float:
    return float(check_number(lr, name, positive=True, hint="a learning rate such as 3e-3"))


def _option(value, options):
    """The option equal to ``value`` up to float32 rounding (np.float32(3e-3) is 3e-3), or None."""
    return next((o for o in options if math.isclose(float(value), o, rel_tol=1e-6)), None)


def _check_targets(targets) -> str:
    if not isinstance(targets, str) or targets not in TARGETS:
        raise ValueError(f"unknown targets {targets!r}: choose one of {list(TARGETS)}")
    return targets


def figure_png(fig) -> bytes:
    """Render a figure to PNG bytes and close it (for Image widgets)."""
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    if not isinstance(fig, Figure):
        raise ArgumentTypeError(f"fig must be a matplotlib Figure, got {type(fig).__name__}")

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


class LabUI:
    """The lab's controls. ``widget`` is what a notebook displays; the controls are attributes, so
    code (and tests) can move them: ``ui.rank.value = 8`` runs a redraw just like a drag does.
    After each redraw ``last_run`` holds the run shown, ``last_redraw_seconds`` its wall time and
    ``last_redraw_cpu_seconds`` the CPU time it used."""

    #: The rank slider's range: a value outside it would be clamped silently by ipywidgets.
    RANK_RANGE = (1, 16)

    def __init__(self, lab: RankAlphaLab, rank, alpha, scaling, targets, lr):
        import ipywidgets as w

        rank, alpha, lr = self._check_settings(lab, rank, alpha, scaling, targets, lr)
        self.lab = lab
        style, layout = {"description_width": "110px"}, w.Layout(width="420px")
        # continuous_update=False: a drag trains once, when the mouse is released.
        self.rank = w.IntSlider(value=int(rank), min=self.RANK_RANGE[0], max=self.RANK_RANGE[1], description="rank r", continuous_update=False,
                                style=style, layout=layout)
        self.alpha = w.SelectionSlider(options=list(ALPHAS), value=alpha, description="alpha α",
                                       continuous_update=False, style=style, layout=layout)
        self.scaling = w.Dropdown(options=list(SCALINGS), value=scaling, description="scaling s =", style=style,
                                  layout=layout)
        self.targets = w.Dropdown(options=list(TARGETS), value=targets, description="target layers", style=style,
                                  layout=layout)
        self.lr = w.SelectionSlider(options=[(f"{v:g}", v) for v in LEARNING_RATES], value=lr, description="learning rate",
                                    continuous_update=False, style=style, layout=layout)
        self.count = w.HTML()
        # The plot is a PNG in an Image widget, replaced in place at each redraw (no flicker, and
        # the bytes can be checked by tests).
        self.image = w.Image(format="png")
        controls = [self.rank, self.alpha, self.scaling, self.targets, self.lr]
        self.widget = w.VBox([w.HBox([w.VBox(controls), self.count]), self.image])
        self.last_run: LabRun | None = None
        self.last_redraw_seconds = float("nan")      # wall time: includes other programs' share of the CPU
        self.last_redraw_cpu_seconds = float("nan")  # CPU time of this process: the cost on an idle machine
        for control in controls:
            control.observe(lambda change: self.redraw(), names="value")
        self.redraw()

    @classmethod
    def _check_settings(cls, lab, rank, alpha, scaling, targets, lr) -> tuple:
        """Every starting value must be one the controls can show: a slider would otherwise
        clamp it (rank 40 shown as 16) or refuse it with a traitlets error. Returns (rank,
        alpha, lr) as the controls' own values (np.float32(8.0) becomes the option 8)."""
        if not isinstance(lab, RankAlphaLab):
            raise ArgumentTypeError(f"lab must be a RankAlphaLab, got {type(lab).__name__}")
        lora_scaling(rank, alpha, scaling)  # rank, alpha and scaling are valid at all
        low, high = cls.RANK_RANGE
        if not low <= rank <= high:
            raise ValueError(f"the lab's rank slider goes from {low} to {high}, got rank {rank}. For another rank "
                             f"call the plain function: lab.show(rank={rank}, ...)")
        alpha_option = _option(alpha, ALPHAS)
        if alpha_option is None:
            raise ValueError(f"the alpha slider offers {', '.join(f'{a:g}' for a in ALPHAS)}; got {alpha!r}. "
                             f"For another alpha call lab.show(alpha={alpha!r}, ...)")
        _check_targets(targets)
        lr_option = _option(_check_lr(lr), LEARNING_RATES)
        if lr_option is None:
            raise ValueError(f"the learning-rate slider offers {', '.join(f'{v:g}' for v in LEARNING_RATES)}; got "
                             f"{lr!r}. For another one call lab.show(lr={lr!r}, ...)")
        return int(rank), alpha_option, lr_option

    def settings(self) -> dict:
        return {"rank": self.rank.value, "alpha": self.alpha.value, "scaling": self.scaling.value,
                "targets": self.targets.value, "lr": self.lr.value}

    def redraw(self) -> LabRun:
        """Train (or fetch) the run of the current settings, update the numbers and the plot."""
        import matplotlib.pyplot as plt

        start, cpu_start = time.perf_counter(), time.process_time()
        self.count.value = "<i>training…</i>"
        run = self.lab.run(**self.settings())
        s = lora_scaling(self.rank.value, self.alpha.value, self.scaling.value)
        self.count.value = (f"<b>trainable parameters: {run.trainable_parameters:,}</b><br>"
                            f"scaling factor s = {s:.3g}<br>"
                            f"final validation loss: {run.final_val_loss:.3f}<br>"
                            f"final validation accuracy: {run.final_val_accuracy:.2f}<br>"
                            f"full fine-tuning: {self.lab.reference().trainable_parameters:,} parameters, "
                            f"accuracy {self.lab.reference().final_val_accuracy:.2f}")
        fig, ax = plt.subplots(figsize=(7, 3.8), layout="constrained")
        self.lab.plot(run, ax)
        self.image.value = figure_png(fig)
        self.last_run, self.last_redraw_seconds = run, time.perf_counter() - start
        self.last_redraw_cpu_seconds = time.process_time() - cpu_start
        return run


# ------------------------------------------------------------------------------------------------
# The rank × alpha heatmaps (pitfall #1: alpha vs rank)
# ------------------------------------------------------------------------------------------------
@dataclass
class AlphaRankGrid:
    """Final validation losses of short LoRA runs over ranks × alphas, one grid per convention.

    One short run is noisy (20 steps of 16 messages), so a grid is measured with several labs
    that differ only by their seed (batch order and A's initialisation), and ``final_loss`` is the
    mean over seeds; ``seed_losses`` keeps every seed, ``spread`` their sample standard deviation.
    ``untrained_loss`` is the loss before any step (B = 0: the base model with its fresh head).
    ``threshold``, halfway between it and the best mean loss of all grids, marks "this run learned".
    """

    ranks: list[int]
    alphas: list[float]
    final_loss: dict[str, np.ndarray]  # scaling -> (len(ranks), len(alphas)) mean final validation loss
    untrained_loss: float
    distinct_runs: int                 # how many (rank, s) pairs, i.e. trainings per seed, the grids needed
    seed_losses: dict[str, np.ndarray] = field(default_factory=dict)  # scaling -> (seeds, ranks, alphas)

    @property
    def seeds(self) -> int:
        return len(next(iter(self.seed_losses.values()))) if self.seed_losses else 1

    def spread(self, scaling: str) -> np.ndarray:
        """Sample standard deviation over seeds of each cell (zeros for a single seed)."""
        self._check_scaling(scaling)
        losses = self.seed_losses.get(scaling)
        if losses is None or len(losses) < 2:
            return np.zeros_like(self.final_loss[scaling])
        return losses.std(axis=0, ddof=1)

    @property
    def threshold(self) -> float:
        best = min(float(loss.min()) for loss in self.final_loss.values())
        return (self.untrained_loss + best) / 2

    def _check_scaling(self, scaling) -> str:
        if not isinstance(scaling, str) or scaling not in self.final_loss:
            raise ValueError(f"this grid has no scaling {scaling!r}; it has {', '.join(map(repr, self.final_loss))}")
        return scaling

    def best_alpha(self, scaling: str) -> list[float]:
        """For each rank, the alpha with the lowest final loss under ``scaling``."""
        self._check_scaling(scaling)
        return [self.alphas[int(i)] for i in np.argmin(self.final_loss[scaling], axis=1)]

    def onset_alpha(self, scaling: str) -> list[float]:
        """For each rank, the smallest alpha whose run gets below ``threshold``: where learning
        starts. In short runs this edge is sharp, while the loss near its minimum is flat and
        bumpy, so it locates a row better than the argmin does."""
        self._check_scaling(scaling)
        out = []
        for row in self.final_loss[scaling]:
            below = np.flatnonzero(row < self.threshold)
            out.append(self.alphas[int(below[0])] if len(below) else math.inf)
        return out

    def octaves_moved(self, scaling: str, which: str = "onset") -> float:
        """How far the onset (or best) alpha moves across the ranks, in factors of 2."""
        if which not in ("onset", "best"):
            raise ValueError(f"which must be 'onset' or 'best', got {which!r}")
        values = self.onset_alpha(scaling) if which == "onset" else self.best_alpha(scaling)
        return math.log2(max(values) / min(values))


def alpha_rank_grid(labs, ranks=(1, 4, 16), alphas=ALPHAS, scalings=SCALINGS,
                    targets: str = DEFAULT_TARGETS, lr: float = 3e-3) -> AlphaRankGrid:
    """Final validation loss of a short LoRA run for every (scaling, rank, alpha), averaged over
    ``labs``: one ``RankAlphaLab`` or a list of them that differ only by their seed.

    With ranks that are powers of 4 and alphas that are powers of 2, every scaling factor s is a
    power of 2, so many cells of the three grids are the same run (same rank and s) and each
    lab's cache trains each only once. Every setting is checked before the first run."""
    labs = [labs] if hasattr(labs, "run") else labs
    if isinstance(labs, (str, bytes)) or not hasattr(labs, "__iter__"):
        raise ArgumentTypeError(f"labs must be a RankAlphaLab or a list of them, got {type(labs).__name__}")
    labs = list(labs)
    if not labs:
        raise ValueError("labs is empty: pass one RankAlphaLab, or several with different seeds")
    for lab in labs:
        if not hasattr(lab, "run") or not hasattr(lab, "untrained_loss"):
            raise ArgumentTypeError(f"labs must be RankAlphaLab objects, got {type(lab).__name__}")
    seeds = [getattr(lab, "seed", None) for lab in labs]
    if len(labs) > 1 and len(set(seeds)) < len(seeds):
        raise ValueError(f"the labs repeat a seed ({seeds}): the same seed gives the same runs, not a second "
                         f"measurement. Build them as RankAlphaLab(base, seed=s) with different s")
    for what, values in (("ranks", ranks), ("alphas", alphas), ("scalings", scalings)):
        if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__") or not list(values):
            raise ValueError(f"{what} must be a non-empty list, got {values!r}")
    ranks, alphas, scalings = list(ranks), list(alphas), list(scalings)
    for sc in scalings:
        for r in ranks:
            for a in alphas:
                lora_scaling(r, a, sc)  # each combination valid before anything trains
    _check_targets(targets)
    lr = _check_lr(lr)
    # (seeds, ranks, alphas) per convention
    per_seed = {sc: np.array([[[lab.run(r, a, sc, targets, lr).final_val_loss for a in alphas] for r in ranks]
                              for lab in labs]) for sc in scalings}
    distinct = {(r, round(lora_scaling(r, a, sc), 12)) for sc in scalings for r in ranks for a in alphas}
    untrained = float(np.mean([lab.untrained_loss() for lab in labs]))
    return AlphaRankGrid(list(ranks), list(alphas), {sc: v.mean(axis=0) for sc, v in per_seed.items()},
                         untrained, len(distinct), per_seed)


def plot_alpha_rank_heatmaps(grid: AlphaRankGrid, scalings=None, axes=None, vmax: float | None = None):
    """One heatmap per scaling convention: rows = rank, columns = alpha, colour = final loss,
    with the lowest loss of each row circled and the first alpha that learns marked. Returns the axes."""
    import matplotlib.pyplot as plt

    if not isinstance(grid, AlphaRankGrid):
        raise ArgumentTypeError(f"grid must be an AlphaRankGrid (from alpha_rank_grid), got {type(grid).__name__}")
    scalings = [scalings] if isinstance(scalings, str) else list(scalings or grid.final_loss)
    for sc in scalings:
        grid._check_scaling(sc)
    if vmax is not None:
        vmax = check_number(vmax, "vmax")
    if axes is None:
        _, axes = plt.subplots(1, len(scalings), figsize=(4.3 * len(scalings), 3.6), squeeze=False,
                               layout="constrained")
        axes = axes[0]
    values = np.concatenate([grid.final_loss[s].ravel() for s in scalings])
    # The colour scale ends at the untrained loss: a cell darker than that did worse than no
    # training at all (a step too large), and the colour bar's arrow says so.
    vmin, vmax = float(values.min()), vmax or float(grid.untrained_loss)
    for ax, sc in zip(axes, scalings):
        image = ax.imshow(grid.final_loss[sc], cmap="viridis_r", vmin=vmin, vmax=vmax, aspect="auto")
        best = np.argmin(grid.final_loss[sc], axis=1)
        onset = [grid.alphas.index(a) if a in grid.alphas else np.nan for a in grid.onset_alpha(sc)]
        ax.scatter(best, range(len(grid.ranks)), s=170, facecolors="none", edgecolors="red", linewidths=2,
                   label="lowest loss of the row")
        ax.plot(onset, range(len(grid.ranks)), "w^--", ms=9, mec="black", lw=1.5,
                label=f"first α with loss < {grid.threshold:.2f}")
        ax.set_xticks(range(len(grid.alphas)), [f"{a:g}" for a in grid.alphas])
        ax.set_yticks(range(len(grid.ranks)), [str(r) for r in grid.ranks])
        ax.grid(False)
        ax.set(xlabel="alpha", ylabel="rank", title=f"s = {sc}")
    handles, labels = axes[0].get_legend_handles_labels()
    axes[0].figure.legend(handles, labels, loc="outside lower center", ncol=2, fontsize=9, frameon=False)
    mean_of = f", mean of {grid.seeds} seeds" if grid.seeds > 1 else ""
    extend = "max" if values.max() > vmax else "neither"
    plt.colorbar(image, ax=list(axes), label=f"final validation loss{mean_of}\n(yellow = low)", shrink=0.9,
                 extend=extend)
    return axes


def heatmap_ui(grid: AlphaRankGrid):
    """A menu to show one convention's heatmap at a time (all grids are already computed)."""
    import ipywidgets as w
    import matplotlib.pyplot as plt

    if not isinstance(grid, AlphaRankGrid):
        raise ArgumentTypeError(f"grid must be an AlphaRankGrid (from alpha_rank_grid), got {type(grid).__name__}")
    choice = w.ToggleButtons(options=list(grid.final_loss), description="scaling")
    image = w.Image(format="png")

    def draw(_=None):
        fig, ax = plt.subplots(figsize=(5.5, 3.6), layout="constrained")
        plot_alpha_rank_heatmaps(grid, [choice.value], axes=[ax])
        image.value = figure_png(fig)

    choice.observe(draw, names="value")
    draw()
    box = w.VBox([choice, image])
    box.choice, box.image = choice, image  # for tests and notebook code
    return box
