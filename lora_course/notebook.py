"""One call at the top of every notebook: the same seeds, threads and display settings everywhere."""
from __future__ import annotations

import logging

import matplotlib
import torch

from .training import seed_everything


def setup_notebook(seed: int = 0, threads: int = 1) -> None:
    """Seed everything, use ``threads`` CPU threads and set plot and print defaults.

    One thread makes float results independent of the machine's core count (sums are taken in the
    same order), which keeps the numbers printed in the notebooks identical from run to run. The
    small models of this course do not get faster with more threads anyway.
    """
    torch.set_num_threads(threads)
    seed_everything(seed)
    # bitsandbytes (imported by peft) logs "Failed to load CPU gemm_4bit_forward ... pip install
    # kernels" on some CPUs: a red stderr line that depends on the machine. The course's 4-bit code
    # (quantization.py) does not use that kernel, so only its errors are shown.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    torch.set_printoptions(precision=3, sci_mode=False)
    matplotlib.rcParams.update({"figure.dpi": 100, "axes.grid": True, "grid.alpha": 0.3,
                                "axes.spines.top": False, "axes.spines.right": False})
