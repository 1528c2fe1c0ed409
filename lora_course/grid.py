"""Many fine-tuning runs side by side: every (spec, seed) pair of an experiment on worker processes.

One run of the course's tiny GPT is a chain of small matrix products; a second CPU thread barely
speeds it up, but a second *process* doubles the throughput. ``run_grid`` therefore trains each
(spec, seed) pair as a single-threaded job on a pool of worker processes (one per CPU core, at
most one per job) and gathers the results into one ``SeedRuns`` per spec, exactly as
``experiments.run_seeds`` would, one after another.

The result does not depend on the number of workers: every job runs on one thread, seeds its own
batch order, head and A matrices, and sees only the base weights and splits it is given.

    grid = run_grid(base, [RunSpec("full FT", 2e-3, method="full"), RunSpec("LoRA r=4", 4e-3, rank=4)],
                    splits, seeds=(0, 1, 2), steps=200, eval_every=50)
    grid["LoRA r=4"].mean, grid["LoRA r=4"].std     # test accuracy over the 3 seeds

Workers are started with "spawn" (a clean interpreter, safe in Jupyter and with torch's threads)
and receive the base model's configuration and weights and the splits as plain tensors and
lists; what comes back are the histories, test accuracies and, if asked for, trained weights.
"""
from __future__ import annotations

import multiprocessing
import os
import random
from concurrent.futures import ProcessPoolExecutor
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .experiments import RunSpec, SeedRuns, build_model, run
from .training import Progress, evaluate

_WORKER_STATE: dict = {}


def _start_worker(config, base_weights: dict, splits: dict) -> None:
    """Runs once in each worker process: one thread, and the base model and splits it trains on."""
    from .gpt import GPTModel

    torch.set_num_threads(1)
    os.environ["LORA_COURSE_PROGRESS"] = "0"
    base = GPTModel(config)
    base.load_state_dict(base_weights)
    _WORKER_STATE.update(base=base.eval(), splits=splits)


def _run_job(spec: RunSpec, seed: int, steps: int, eval_every: int, batch_size: int, num_classes: int,
             keep_weights: bool):
    base, splits = _WORKER_STATE["base"], _WORKER_STATE["splits"]
    model, history = run(base, spec, splits, steps=steps, eval_every=eval_every, seed=seed, batch_size=batch_size,
                         num_classes=num_classes, progress=False)
    test_accuracy = evaluate(model, splits["test"])[1]
    weights = {k: v.clone() for k, v in model.state_dict().items()} if keep_weights else None
    return history, test_accuracy, weights


def default_workers(jobs: int) -> int:
    """One worker per available CPU core, never more than there are jobs."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(jobs, cores))


def run_grid(base: nn.Module, specs: Sequence[RunSpec], splits: dict, *, seeds: Sequence[int] = (0, 1, 2),
             steps: int, eval_every: int, batch_size: int = 32, keep_models: bool = False,
             workers: int | None = None, progress: bool = True) -> dict[str, SeedRuns]:
    """Train every spec with every seed; returns {spec.name: SeedRuns} in the order of ``specs``.

    ``keep_models=True`` also rebuilds each trained model in this process (``SeedRuns.models``),
    e.g. to truncate a full fine-tuning update. ``workers`` defaults to one per CPU core;
    ``workers=1`` runs every job here, in this process (same results)."""
    specs, seeds = list(specs), list(seeds)
    if not specs or not all(isinstance(s, RunSpec) for s in specs):
        raise TypeError("specs must be a non-empty list of RunSpec, e.g. [RunSpec('LoRA r=4', 4e-3, rank=4)]")
    if len({s.name for s in specs}) != len(specs):
        raise ValueError(f"every spec needs its own name, got {[s.name for s in specs]}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"give distinct seeds, e.g. (0, 1, 2); got {seeds!r}")
    if not {"train", "val", "test"} <= set(splits):
        raise ValueError(f"splits needs 'train', 'val' and 'test', got {sorted(splits)}")
    num_classes = int(max(int(s.labels.max()) for s in splits.values())) + 1
    jobs = [(spec, seed) for spec in specs for seed in seeds]
    workers = default_workers(len(jobs)) if workers is None else int(workers)
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    # The line names no worker count: it is stored in notebooks and must read the same on any machine.
    bar = Progress(len(jobs), "training", progress, unit="runs")
    base_weights = {k: v.detach().clone() for k, v in base.state_dict().items()}
    args = [(spec, seed, steps, eval_every, batch_size, num_classes, keep_models) for spec, seed in jobs]
    results = []
    if workers == 1:
        # In this process: training seeds Python, NumPy and torch, so their random states are
        # saved and restored. Later cells then draw the same numbers whether the grid ran here
        # (one core) or in workers (several), and the notebook's outputs do not depend on the CPU.
        threads, py_state, np_state = torch.get_num_threads(), random.getstate(), np.random.get_state()
        progress_env = os.environ.get("LORA_COURSE_PROGRESS")
        try:
            with torch.random.fork_rng(devices=[]):
                _start_worker(base.cfg, base_weights, splits)  # builds a model: draws random numbers
                for k, job in enumerate(args, 1):
                    results.append(_run_job(*job))
                    bar.update(k)
        finally:
            torch.set_num_threads(threads)
            random.setstate(py_state)
            np.random.set_state(np_state)
            if progress_env is None:
                os.environ.pop("LORA_COURSE_PROGRESS", None)
            else:
                os.environ["LORA_COURSE_PROGRESS"] = progress_env
            _WORKER_STATE.clear()
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                                 initargs=(base.cfg, base_weights, splits)) as pool:
            futures = [pool.submit(_run_job, *job) for job in args]
            for k, future in enumerate(futures, 1):
                results.append(future.result())
                bar.update(k)
    out = {}
    for i, spec in enumerate(specs):
        mine = results[i * len(seeds):(i + 1) * len(seeds)]
        models = []
        if keep_models:
            for seed, (_, _, weights) in zip(seeds, mine):
                model = build_model(base, spec, head_seed=123 + seed, lora_seed=seed, num_classes=num_classes)
                model.load_state_dict(weights)
                models.append(model.eval())
        out[spec.name] = SeedRuns(spec, seeds, [h for h, _, _ in mine], [a for _, a, _ in mine], models)
    return out
