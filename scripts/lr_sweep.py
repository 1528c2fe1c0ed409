"""The learning-rate sweep behind notebook 04's choice of rates (its table "The runs and their
learning rates").

    python scripts/lr_sweep.py            # 24 runs of 120 steps, about 5 minutes on one CPU thread

Each run is set up exactly as in notebook 04: sentiment task, batches of 32 in the same order
(seed 0), 120 AdamW steps, head trained fully, LoRA with alpha = rank on every Linear of the
blocks. For each run it prints the validation loss after 120 steps at every rate tried and
marks the lowest, which is the rate the notebook uses.
"""
from __future__ import annotations

import argparse

from lora_course.data import classification_splits
from lora_course.experiments import RunSpec, run
from lora_course.gpt import load_pretrained_gpt
from lora_course.notebook import setup_notebook

STEPS, EVAL_EVERY = 120, 20
FULL_RATES = (1e-4, 3e-4, 1e-3, 3e-3)
LORA_RATES = (1e-3, 3e-3, 1e-2, 3e-2)
RANKS = (1, 2, 4, 8, 16)


def sweep(steps: int = STEPS) -> dict[str, dict[float, float]]:
    """{run name: {learning rate: validation loss after ``steps`` steps}}."""
    setup_notebook()  # same seeds and one thread, as in the notebooks
    base = load_pretrained_gpt()
    splits = classification_splits("sentiment")
    runs = {"full FT": (None, FULL_RATES)} | {f"LoRA r={r}": (r, LORA_RATES) for r in RANKS}
    losses: dict[str, dict[float, float]] = {}
    for name, (rank, rates) in runs.items():
        losses[name] = {}
        for lr in rates:
            spec = RunSpec(name, lr=lr, rank=rank)
            _, history = run(base, spec, splits, steps=steps, eval_every=EVAL_EVERY, progress=False)
            losses[name][lr] = history.final_val_loss
            print(f"  {name:10s} lr {lr:.0e}: validation loss {history.final_val_loss:.3f}", flush=True)
    return losses


def table(losses: dict[str, dict[float, float]], steps: int = STEPS) -> str:
    """A Markdown table: the rates tried, their validation losses (lowest in bold), the chosen rate."""
    lines = [f"| run | rates tried | validation loss after {steps} steps | chosen |", "|---|---|---|---|"]
    for name, by_rate in losses.items():
        best = min(by_rate, key=by_rate.get)
        rates = ", ".join(f"{lr:.0e}" for lr in by_rate).replace("e-0", "e-")
        values = ", ".join(f"**{v:.2f}**" if lr == best else f"{v:.2f}" for lr, v in by_rate.items())
        lines.append(f"| {name} | {rates} | {values} | {best:.0e} |".replace("e-0", "e-"))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=STEPS, help="training steps per run (notebook 04: 120)")
    args = parser.parse_args()
    print(table(sweep(args.steps), args.steps))


if __name__ == "__main__":
    main()
