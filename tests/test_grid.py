"""The parallel seed grid gives exactly what training one run after another gives."""
import os
import random

import numpy as np
import pytest
import torch

from lora_course.data import classification_splits
from lora_course.experiments import RunSpec, run_seeds
from lora_course.gpt import load_pretrained_gpt
from lora_course.grid import default_workers, run_grid

SPECS = [RunSpec("full", 2e-3, method="full"), RunSpec("LoRA r=2", 4e-3, rank=2, targets="q,v")]


@pytest.fixture(scope="module")
def setup():
    return load_pretrained_gpt(), classification_splits("spam", n_train=64, n_val=16, n_test=16)


def _same(a, b):
    assert a.test_accuracy == b.test_accuracy
    assert [h.train_loss for h in a.histories] == [h.train_loss for h in b.histories]
    assert [h.val_loss for h in a.histories] == [h.val_loss for h in b.histories]
    assert a.trainable_parameters == b.trainable_parameters


def test_two_processes_equal_one_process_equal_run_seeds(setup):
    base, splits = setup
    here = run_grid(base, SPECS, splits, seeds=(0, 1), steps=4, eval_every=2, workers=1, progress=False,
                    keep_models=True)
    pool = run_grid(base, SPECS, splits, seeds=(0, 1), steps=4, eval_every=2, workers=2, progress=False)
    assert list(here) == list(pool) == [s.name for s in SPECS]  # in the order of the specs
    for spec in SPECS:
        _same(here[spec.name], pool[spec.name])
        # the reference: the plain loop of experiments.run_seeds, in this process, on one thread
        # as every job is (more threads split the sums differently: equal up to float rounding)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            reference = run_seeds(base, spec, splits, seeds=(0, 1), steps=4, eval_every=2, progress=False)
        finally:
            torch.set_num_threads(threads)
        _same(here[spec.name], reference)
    # kept models are the trained ones: their weights moved away from the base
    full = here["full"].models[0]
    assert not torch.equal(full.trf_blocks[0].att.W_query.weight, base.trf_blocks[0].att.W_query.weight)


def test_the_grid_leaves_this_process_as_it_was(setup):
    base, splits = setup
    threads, state = torch.get_num_threads(), torch.random.get_rng_state()
    py_state, np_state = random.getstate(), np.random.get_state()[1].copy()
    env = dict(os.environ)
    run_grid(base, SPECS[1:], splits, seeds=(0,), steps=1, eval_every=1, workers=1, progress=False)
    assert dict(os.environ) == env
    # as if the runs had happened in other processes: a later cell draws the same numbers on any core count
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.random.get_rng_state(), state)
    assert random.getstate() == py_state and (np.random.get_state()[1] == np_state).all()


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(specs=[]), TypeError, "RunSpec"),
    (dict(specs=[SPECS[0], SPECS[0]]), ValueError, "own name"),
    (dict(seeds=(0, 0)), ValueError, "distinct seeds"),
    (dict(workers=0), ValueError, "at least 1"),
])
def test_bad_grids_are_refused(setup, kwargs, error, message):
    base, splits = setup
    args = dict(specs=SPECS, seeds=(0,), workers=1)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        run_grid(base, args.pop("specs"), splits, steps=1, eval_every=1, progress=False, **args)


def test_default_workers_never_exceed_the_jobs():
    assert default_workers(1) == 1
    assert 1 <= default_workers(100) <= 100
