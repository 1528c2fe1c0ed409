"""The runs behind notebook 10 (LoRA variants): every variant at several learning rates, 3 seeds.

    python scripts/variant_sweep.py        # writes lora_course/sweeps/variant_sweep.json (about 12 min on 2 cores)

Notebook 10 compares plain LoRA with rsLoRA, LoRA+, DoRA, PiSSA, QLoRA and VeRA on the main task
(``data.MAIN_TASK``, ``experiments.MAIN_STEPS`` steps, the pretrained base) twice: at the course's
one shared LoRA learning rate (``experiments.tuned_learning_rates()["lora"]``, from
``scripts/lr_sweep.py``) and at each variant's own tuned rate. Tuning needs a grid of rates times
3 seeds per variant, which does not fit the notebook's 90 s, so this script trains them all once
(``grid.run_grid``, one single-threaded process per core, exactly as the notebooks train) and
stores every run; the notebook reads the file, re-runs some of its runs on one seed and checks
that they come out the same.

What is trained (all LoRA-family runs at rank 4 on every Linear layer of the blocks, alpha 8,
the new head trained fully, as in scripts/lr_sweep.py; VeRA at rank 64, its shared projections
drawn from the run's seed):

- ``grid``: each variant at 5 rates around the shared one (LoRA+ lower, VeRA higher, because
  LoRA+ multiplies B's rate by 16 and VeRA trains two small vectors). The **tuned rate** of a
  variant is the one with the best mean *validation* accuracy over the seeds (ties: lower
  validation loss), the rule of scripts/lr_sweep.py; test accuracy is recorded for every run but
  never used to choose.
- ``ranks``: plain LoRA (alpha/r) and rsLoRA (alpha/sqrt(r)) at ranks 1 to 32, at the shared rate.
- ``trajectories``: the query weights of the three blocks every 25 steps for full fine-tuning
  (at its tuned rate), LoRA and DoRA (at the shared rate): DoRA's magnitude/direction analysis.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from lora_course.data import MAIN_TASK, classification_splits
from lora_course.experiments import MAIN_EVAL_EVERY, MAIN_STEPS, SWEEP_PATH, RunSpec, tuned_learning_rates
from lora_course.gpt import load_pretrained_gpt
from lora_course.grid import run_grid
from lora_course.notebook import setup_notebook

OUT = SWEEP_PATH.parent / "variant_sweep.json"
SEEDS = (0, 1, 2)
RANK, VERA_RANK, LORAPLUS_RATIO = 4, 64, 16
#: name -> (RunSpec keyword arguments, multiples of the shared learning rate to try)
VARIANTS = {
    "LoRA": (dict(rank=RANK), (0.25, 0.5, 1, 2, 4)),
    "rsLoRA": (dict(rank=RANK, variant="rslora", scaling="alpha/sqrt(rank)"), (0.25, 0.5, 1, 2, 4)),
    "LoRA+": (dict(rank=RANK, loraplus_ratio=LORAPLUS_RATIO), (0.125, 0.25, 0.5, 1, 2)),
    "DoRA": (dict(rank=RANK, variant="dora"), (0.25, 0.5, 1, 2, 4)),
    "PiSSA": (dict(rank=RANK, variant="pissa"), (0.25, 0.5, 1, 2, 4)),
    "QLoRA": (dict(rank=RANK, variant="qlora"), (0.25, 0.5, 1, 2, 4)),
    "VeRA": (dict(rank=VERA_RANK, variant="vera"), (1, 2, 4, 8, 16)),
}
SWEEP_RANKS = (1, 2, 4, 8, 16, 32)
TRAJECTORY_LAYERS = [f"trf_blocks.{i}.att.W_query" for i in range(3)]
TRAJECTORY_EVERY = 25


def run_name(label: str, rank: int, lr: float) -> str:
    return f"{label} r={rank} @ {lr:g}"


def specs(shared_lr: float) -> list[RunSpec]:
    out = {}
    for label, (kwargs, multiples) in VARIANTS.items():
        for k in multiples:
            lr = shared_lr * k
            out[run_name(label, kwargs["rank"], lr)] = RunSpec(run_name(label, kwargs["rank"], lr), lr, **kwargs)
    for rank in SWEEP_RANKS:
        for label, variant in (("LoRA", "lora"), ("rsLoRA", "rslora")):
            name = run_name(label, rank, shared_lr)
            scaling = "alpha/sqrt(rank)" if variant == "rslora" else "alpha/rank"
            out.setdefault(name, RunSpec(name, shared_lr, rank=rank, variant=variant, scaling=scaling))
    return list(out.values())


def _record(seed_runs) -> list[dict]:
    rows = []
    for seed, history, test in zip(seed_runs.seeds, seed_runs.histories, seed_runs.test_accuracy):
        rows.append({"seed": seed, "test_accuracy": test, "val_accuracy": history.val_accuracy,
                     "val_loss": [round(v, 5) for v in history.val_loss], "eval_steps": history.eval_steps,
                     "train_loss": [round(v, 4) for v in history.train_loss],
                     "trainable_parameters": history.trainable_parameters,
                     "seconds_per_step": round(history.seconds_per_step, 5)})
    return rows


def _trajectory(job):
    """One recorded run (in a worker process): effective query weights every 25 steps."""
    import torch

    from lora_course.experiments import build_model
    from lora_course.training import train_classifier
    from lora_course.variants import WeightRecorder, magnitude_direction_change

    torch.set_num_threads(1)
    method, spec, seed = job
    base, splits = load_pretrained_gpt(), classification_splits(MAIN_TASK)
    model = build_model(base, spec, head_seed=123 + seed, lora_seed=seed,
                        num_classes=int(splits["train"].labels.max()) + 1)
    recorder = WeightRecorder(model, TRAJECTORY_LAYERS, every=TRAJECTORY_EVERY)
    with recorder:  # the same call as experiments.run
        train_classifier(model, splits["train"], splits["val"], steps=MAIN_STEPS, lr=spec.lr, eval_every=MAIN_STEPS,
                         seed=seed, progress=False)
    layers = {}
    for name, weights in recorder.weights.items():
        delta_m, delta_d = magnitude_direction_change(weights[0], weights[1:])
        layers[name] = {"delta_m": delta_m, "delta_d": delta_d}
    return {"method": method, "seed": seed, "lr": spec.lr, "steps": recorder.steps[1:], "layers": layers}


def sweep() -> dict:
    setup_notebook()
    rates = tuned_learning_rates()
    shared = rates["lora"]
    base, splits = load_pretrained_gpt(), classification_splits(MAIN_TASK)
    all_specs = specs(shared)
    start = time.time()
    runs = run_grid(base, all_specs, splits, seeds=SEEDS, steps=MAIN_STEPS, eval_every=MAIN_EVAL_EVERY)
    print(f"{len(all_specs) * len(SEEDS)} runs in {time.time() - start:.0f} s", flush=True)

    grid = {}
    for label, (kwargs, multiples) in VARIANTS.items():
        grid[label] = {"spec": {k: v for k, v in kwargs.items()}, "rates": {}}
        for k in multiples:
            lr = shared * k
            grid[label]["rates"][f"{lr:g}"] = _record(runs[run_name(label, kwargs["rank"], lr)])
    ranks = {label: {str(r): _record(runs[run_name(label, r, shared)]) for r in SWEEP_RANKS}
             for label in ("LoRA", "rsLoRA")}

    jobs = [(m, s, seed) for seed in SEEDS for m, s in (
        ("full FT", RunSpec("full FT", rates["full"], method="full")),
        ("LoRA", RunSpec("LoRA", shared, rank=RANK)),
        ("DoRA", RunSpec("DoRA", shared, rank=RANK, variant="dora")))]
    start = time.time()
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        trajectories = list(pool.map(_trajectory, jobs))
    print(f"{len(jobs)} recorded runs in {time.time() - start:.0f} s", flush=True)

    return {"task": MAIN_TASK, "steps": MAIN_STEPS, "eval_every": MAIN_EVAL_EVERY, "seeds": list(SEEDS),
            "shared_lr": shared, "full_lr": rates["full"], "rank": RANK, "vera_rank": VERA_RANK,
            "loraplus_ratio": LORAPLUS_RATIO, "grid": grid, "ranks": ranks,
            "trajectory_every": TRAJECTORY_EVERY, "trajectories": trajectories}


def tuned(data: dict) -> dict[str, float]:
    """The tuned rate per variant: best mean validation accuracy (ties: lower validation loss)."""
    best = {}
    for label, entry in data["grid"].items():
        def score(lr):
            rows = entry["rates"][lr]
            return (statistics.mean(r["val_accuracy"][-1] for r in rows), -statistics.mean(r["val_loss"][-1] for r in rows))
        best[label] = float(max(entry["rates"], key=score))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    data = sweep()
    data["tuned"] = tuned(data)
    Path(args.out).write_text(json.dumps(data) + "\n")
    for label, entry in data["grid"].items():
        cells = "  ".join(f"{lr}: {statistics.mean(r['val_accuracy'][-1] for r in rows):.3f}"
                          for lr, rows in entry["rates"].items())
        print(f"{label:7s} {cells}  -> tuned {data['tuned'][label]:g}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
