"""Learning rates and rank comparison for notebook 11 (LoRA for generation), stored as JSON.

    python scripts/generation_sweep.py      # about 5 minutes on 2 cores

Skill "plain" (rewrite a review in plain words), ``STEPS`` steps of AdamW, batch 32, seeds 0-2:

1. the learning rate of each method (full fine-tuning; LoRA at rank 4 on all linear layers of
   the blocks, alpha 8, alpha/rank) is chosen on the grid by mean *validation* exact match;
2. at the chosen rates: full fine-tuning and LoRA r = 1, 4, 16, 3 seeds, exact match on the
   validation and the held-out test prompts.

Writes lora_course/sweeps/generation_sweep.json. Every run is single-threaded and seeded, so
the numbers do not depend on the number of worker processes.
"""
from __future__ import annotations

import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "lora_course" / "sweeps" / "generation_sweep.json"
SKILL, STEPS, SEEDS, GRID, RANKS = "plain", 400, (0, 1, 2), (0.002, 0.004, 0.008, 0.016, 0.032), (1, 4, 16)


def job(method: str, rank: int | None, lr: float, seed: int) -> dict:
    import torch

    from lora_course import generation as g
    from lora_course.gpt import load_pretrained_gpt

    torch.set_num_threads(1)
    base = load_pretrained_gpt()
    splits = g.skill_splits(SKILL)
    model = g.full_model(base) if method == "full" else g.lora_model(base, rank, seed=seed)
    g.train_generator(model, splits["train"], steps=STEPS, lr=lr, seed=seed)
    return {"method": method, "rank": rank, "lr": lr, "seed": seed,
            "val": g.exact_match(model, splits["val"]), "test": g.exact_match(model, splits["test"])}


def run_all(jobs, pool) -> list[dict]:
    return [f.result() for f in [pool.submit(job, *j) for j in jobs]]


def main() -> None:
    start = time.time()
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(2, mp_context=context) as pool:
        grid = run_all([(m, r, lr, s) for m, r in (("full", None), ("lora", 4)) for lr in GRID for s in SEEDS], pool)
        mean_val = {m: {str(lr): sum(x["val"] for x in grid if x["method"] == m and x["lr"] == lr) / len(SEEDS)
                        for lr in GRID} for m in ("full", "lora")}
        best = {m: float(max(row, key=row.get)) for m, row in mean_val.items()}
        extra = run_all([("lora", r, best["lora"], s) for r in RANKS if r != 4 for s in SEEDS], pool)
    runs = [x for x in grid if x["lr"] == best[x["method"]]] + extra
    results = {}
    for x in runs:
        name = "full FT" if x["method"] == "full" else f"LoRA r={x['rank']}"
        results.setdefault(name, {"val": [], "test": []})
        results[name]["val"].append(x["val"])
        results[name]["test"].append(x["test"])
    out = {"skill": SKILL, "steps": STEPS, "batch_size": 32, "seeds": list(SEEDS), "grid": list(GRID),
           "tuned_on": "mean validation exact match (LoRA at rank 4)", "mean_val_by_lr": mean_val, "best": best,
           "results": {k: results[k] for k in ["full FT"] + [f"LoRA r={r}" for r in RANKS]},
           "seconds": round(time.time() - start)}
    OUT.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
