"""The learning-rate sweep behind the course's one tuned learning rate per method.

    python scripts/lr_sweep.py                # writes lora_course/sweeps/lr_sweep.json and prints the table

The course follows its own advice (pitfall #1): LoRA uses alpha/rank scaling with one alpha for
every rank, so its learning rate is tuned once, at one rank, and used for all ranks. Every method
(full fine-tuning, LoRA, the head-only probe, the book's last-block fine-tuning) gets its rate from
the same grid, set up exactly as in notebook 05: the main task, the same batches, the same number
of steps. The score is the mean validation accuracy over the sweep's seeds after the last step
(ties: the lower validation loss). Test data is never looked at.

Notebooks read the JSON (``experiments.tuned_learning_rates()``) and print this table, and assert
that the rate they use is the best of the sweep.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from lora_course.data import MAIN_TASK, classification_splits
from lora_course.experiments import MAIN_STEPS, SWEEP_PATH, RunSpec
from lora_course.grid import run_grid
from lora_course.gpt import load_pretrained_gpt
from lora_course.notebook import setup_notebook

GRID = (1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2)
METHODS = {  # name -> spec at the grid's rate
    "full": lambda name, lr: RunSpec(name, lr, method="full"),
    "lora": lambda name, lr: RunSpec(name, lr, rank=4),
    "head only": lambda name, lr: RunSpec(name, lr, method="head only"),
    "last block": lambda name, lr: RunSpec(name, lr, method="last block"),
}
SEEDS = (0, 1, 2)


def sweep(steps: int = MAIN_STEPS, seeds=SEEDS, grid=GRID) -> dict:
    setup_notebook()  # same seeds and one thread, as in the notebooks
    base = load_pretrained_gpt()
    splits = classification_splits(MAIN_TASK)
    splits = {"train": splits["train"], "val": splits["val"], "test": splits["val"]}  # never the test split
    specs = [make(f"{method} @ {lr:g}", lr) for method, make in METHODS.items() for lr in grid]
    start = time.time()
    runs = run_grid(base, specs, splits, seeds=seeds, steps=steps, eval_every=steps)
    print(f"{len(specs) * len(seeds)} runs in {time.time() - start:.0f} s")
    results = {}
    for method in METHODS:
        results[method] = {}
        for lr in grid:
            seed_runs = runs[f"{method} @ {lr:g}"]
            results[method][f"{lr:g}"] = {
                "val_accuracy": round(statistics.mean(seed_runs.val_accuracy), 4),
                "val_loss": round(statistics.mean(h.final_val_loss for h in seed_runs.histories), 4)}
    best = {m: max(r, key=lambda lr: (r[lr]["val_accuracy"], -r[lr]["val_loss"])) for m, r in results.items()}
    return {"task": MAIN_TASK, "steps": steps, "seeds": list(seeds), "grid": [f"{lr:g}" for lr in grid],
            "lora_rank": 4, "results": results, "best": {m: float(lr) for m, lr in best.items()}}


def table(data: dict) -> str:
    """A Markdown table: validation accuracy at every rate (best in bold) and the chosen rate."""
    grid = data["grid"]
    lines = [f"| method | {' | '.join(grid)} | chosen |", "|---|" + "---|" * (len(grid) + 1)]
    for method, by_rate in data["results"].items():
        best = f"{data['best'][method]:g}"
        cells = [(f"**{by_rate[lr]['val_accuracy']:.3f}**" if lr == best else f"{by_rate[lr]['val_accuracy']:.3f}")
                 for lr in grid]
        lines.append(f"| {method} | {' | '.join(cells)} | {best} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=MAIN_STEPS)
    parser.add_argument("--out", default=str(SWEEP_PATH))
    args = parser.parse_args()
    data = sweep(args.steps)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(data, indent=1) + "\n")
    print(table(data))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
