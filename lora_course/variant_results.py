"""Reading the variant sweep (``scripts/variant_sweep.py`` -> ``sweeps/variant_sweep.json``) for notebook 10.

Pure functions over the loaded JSON: no training, no torch. A "stat" is ``{"mean", "std", "n"}``
over seeds (sample standard deviation, as ``experiments.SeedRuns.std``).
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from .experiments import means_differ_beyond_noise
from .variants import magnitude_direction_slope, steps_to_target

VARIANT_SWEEP_PATH = Path(__file__).parent / "sweeps" / "variant_sweep.json"


def load_variant_sweep(path=VARIANT_SWEEP_PATH) -> dict:
    """The stored sweep; a clear error if it was never written."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `python scripts/variant_sweep.py` (about 12 min on 2 cores)")
    return json.loads(path.read_text())


def stat(values) -> dict:
    """Mean and sample standard deviation of a list of numbers (std 0 for one value)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("stat needs at least one value")
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def beyond_noise(a: dict, b: dict) -> bool:
    """The course's noise rule (``experiments.means_differ_beyond_noise``) on two stats."""
    return means_differ_beyond_noise(a["mean"], a["std"], b["mean"], b["std"])


def _rate_key(entry: dict, lr: float) -> str:
    key = f"{lr:g}"
    if key not in entry["rates"]:
        raise KeyError(f"rate {lr:g} is not in this variant's grid ({', '.join(entry['rates'])})")
    return key


def runs_at(data: dict, variant: str, lr: float) -> list[dict]:
    """The stored runs (one per seed) of ``variant`` at learning rate ``lr``."""
    if variant not in data["grid"]:
        raise KeyError(f"unknown variant {variant!r}: the sweep has {', '.join(data['grid'])}")
    entry = data["grid"][variant]
    return entry["rates"][_rate_key(entry, lr)]


def tuned_rates(data: dict) -> dict[str, float]:
    """Each variant's rate with the best mean final validation accuracy (ties: lower validation
    loss), recomputed with the rule of ``scripts/variant_sweep.py`` (test accuracy is never used)."""
    best = {}
    for label, entry in data["grid"].items():
        def score(lr):
            rows = entry["rates"][lr]
            return (statistics.mean(r["val_accuracy"][-1] for r in rows),
                    -statistics.mean(r["val_loss"][-1] for r in rows))
        best[label] = float(max(entry["rates"], key=score))
    return best


def comparison(data: dict) -> list[dict]:
    """One row per variant: test accuracy at the shared LoRA rate and at its tuned rate."""
    shared, tuned = data["shared_lr"], data["tuned"]
    rows = []
    for label in data["grid"]:
        at_shared, at_tuned = runs_at(data, label, shared), runs_at(data, label, tuned[label])
        rows.append({"variant": label, "shared_lr": shared, "tuned_lr": tuned[label],
                     "shared": stat(r["test_accuracy"] for r in at_shared),
                     "tuned": stat(r["test_accuracy"] for r in at_tuned),
                     "tuned_val": stat(r["val_accuracy"][-1] for r in at_tuned),
                     "trainable_parameters": at_tuned[0]["trainable_parameters"]})
    return rows


def lr_curve(data: dict, variant: str, key: str = "val_accuracy") -> tuple[list[float], list[dict]]:
    """(rates, stat of the final ``key`` over seeds at each rate), rates ascending."""
    entry = data["grid"][variant]
    rates = sorted(entry["rates"], key=float)
    return [float(r) for r in rates], [stat(run[key][-1] if isinstance(run[key], list) else run[key]
                                            for run in entry["rates"][r]) for r in rates]


def _rank_entry(data: dict, variant: str) -> dict:
    if variant not in data["ranks"]:
        raise KeyError(f"the rank sweep has {', '.join(data['ranks'])}, not {variant!r}")
    return data["ranks"][variant]


def rank_curve(data: dict, variant: str) -> tuple[list[int], list[dict]]:
    """(ranks, stat of test accuracy at each rank) for "LoRA" or "rsLoRA" at the shared rate."""
    entry = _rank_entry(data, variant)
    ranks = sorted(entry, key=int)
    return [int(r) for r in ranks], [stat(run["test_accuracy"] for run in entry[r]) for r in ranks]


def rank_steps_to_loss(data: dict, variant: str, target: float, window: int = 20) -> tuple[list[int], list[list]]:
    """(ranks, per rank the steps each seed needs to reach ``target`` (``steps_to_target``)) for
    "LoRA" or "rsLoRA" in the rank sweep: how fast each scaling learns as the rank grows."""
    entry = _rank_entry(data, variant)
    ranks = sorted(entry, key=int)
    return [int(r) for r in ranks], [[steps_to_target(run["train_loss"], target, window) for run in entry[r]]
                                     for r in ranks]


def trajectory_slopes(data: dict) -> dict[str, dict]:
    """DoRA's magnitude/direction analysis per method: for each seed the slope and correlation of
    ΔM against ΔD (``magnitude_direction_slope``), averaged over the recorded layers; then a stat
    over seeds. Returns {method: {"slope": stat, "corr": stat, "min_slope", "min_corr", "per_seed":
    [...]}}, where min_slope and min_corr are the smallest of any single layer and seed."""
    per_method: dict[str, list[dict]] = {}
    for record in data["trajectories"]:
        fits = [magnitude_direction_slope(layer["delta_m"], layer["delta_d"]) for layer in record["layers"].values()]
        per_method.setdefault(record["method"], []).append(
            {"seed": record["seed"], "slope": statistics.mean(f["slope"] for f in fits),
             "corr": statistics.mean(f["corr"] for f in fits),
             "min_slope": min(f["slope"] for f in fits), "min_corr": min(f["corr"] for f in fits)})
    return {method: {"slope": stat(s["slope"] for s in seeds), "corr": stat(s["corr"] for s in seeds),
                     "min_slope": min(s["min_slope"] for s in seeds), "min_corr": min(s["min_corr"] for s in seeds),
                     "per_seed": seeds}
            for method, seeds in per_method.items()}


def steps_to_loss(data: dict, variant: str, lr: float, target: float, window: int = 20) -> list[int | None]:
    """Per seed, the first step at which the running mean training loss reaches ``target``."""
    return [steps_to_target(run["train_loss"], target, window) for run in runs_at(data, variant, lr)]


def mean_loss(data: dict, variant: str, lr: float, start: int, stop: int) -> dict:
    """Stat over seeds of the mean training loss of steps ``start + 1`` to ``stop`` (1-based, inclusive):
    how far a run has got early in training."""
    runs = runs_at(data, variant, lr)
    if not 0 <= start < stop <= len(runs[0]["train_loss"]):
        raise ValueError(f"steps {start + 1} to {stop} are outside the {len(runs[0]['train_loss'])} recorded steps")
    return stat(statistics.mean(run["train_loss"][start:stop]) for run in runs)
