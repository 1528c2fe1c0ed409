"""Train the course's GPT classifier on several processes: DistributedDataParallel and FSDP2.

Data parallelism: N processes ("ranks") each hold the model, each computes the loss on its own
slice of the global batch, and they agree on one gradient per step before the optimizer runs.
With DDP that is an all-reduce of every trainable parameter's gradient (averaged), so every
replica applies the same update and stays bit-identical; with FSDP2 (``fully_shard``) each rank
keeps a shard of every parameter and gathers full weights when a layer runs (see
``communication.py`` for what each moves).

    2 ranks × batch b  ==  1 process × batch 2b       (DDP averages: (g_0 + g_1) / 2 = mean over 2b)

The same code runs on CPU with the gloo backend and on GPUs with NCCL (one GPU per rank).

Three ways to start it:

- from Python (a notebook): ``launch([RunSpec(...), ...], world_size=2)`` starts the processes as
  ``python -m lora_course.distributed`` (a notebook's ``__main__`` cannot be imported by a spawned
  process, so the worker lives here), with a free port, one CPU thread each, and a timeout that
  kills the whole process group of every rank, so a hang becomes an error, never a stall;
- from the command line: ``torchrun --nproc_per_node 2 -m lora_course.distributed --method lora``;
- without torchrun: ``python -m lora_course.distributed --world-size 2 --method lora``.

Results come back as plain data: one JSON file per rank, and safetensors for parameters. Every
run is checked before any process starts: a world size that does not divide the batch, a backend
the machine does not have, a model with nothing to train.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from . import data, gpt, training
from .communication import AllReduceCounter, CollectiveCounter, counting_allreduce_hook
from .errors import ArgumentTypeError, check_bool, check_int, check_number, check_str
from .lora import mark_only_lora_as_trainable, replace_linear_with_lora, set_lora_enabled

METHODS = ("full", "lora")
WRAPPERS = ("ddp", "fsdp")
#: The mistakes a run can make on purpose, to show what goes wrong.
MISTAKES = {
    "freeze_after_wrap": "everything is trainable when DDP(model) is built; the base is frozen afterwards",
    "unused_adapter": "A and B stay trainable, but the LoRA branches are switched off in forward "
                      "(set_lora_enabled(model, False)), as when only the head is trained first",
    "hang": "the last rank stops before its first collective (as a deadlocked data loader would); "
            "the others wait for it",
}
BACKENDS = ("auto", "gloo", "nccl")


class DistributedRunError(RuntimeError):
    """A rank failed (the message holds the end of its error output)."""


class DistributedTimeoutError(DistributedRunError):
    """The ranks did not all finish within the timeout; every process was killed (``pids``)."""

    def __init__(self, message: str, pids: list[int]):
        super().__init__(message)
        self.pids = pids


# --------------------------------------------------------------------------------------------
# What to run
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSpec:
    """One training run on every rank. ``batch_size`` is the *global* batch, split evenly.

    method "full" trains every weight; "lora" adds LoRA of ``rank`` and ``alpha`` to the layers
    named in ``targets`` (``targets=()``: no LoRA, only the head) and trains the new head when
    ``train_head``. ``wrapper`` is "ddp" or "fsdp" (FSDP2 ``fully_shard`` per transformer block).
    ``count_collectives`` also counts every collective by kind and phase (slows the step: not
    for timing). ``save_parameters`` returns rank 0's trainable parameters. ``comm_hook=False``
    leaves DDP's built-in all-reduce in place (no byte count from the hook)."""

    name: str
    method: str = "lora"
    rank: int = 8
    alpha: float = 16
    targets: tuple[str, ...] = ("W_query", "W_value")
    train_head: bool = True
    wrapper: str = "ddp"
    find_unused_parameters: bool = False
    static_graph: bool = False
    mistake: str | None = None
    steps: int = 6
    batch_size: int = 16
    lr: float = 1e-3
    seed: int = 0
    count_collectives: bool = False
    save_parameters: bool = False
    comm_hook: bool = True

    def __post_init__(self):
        check_str(self.name, "name")
        if not self.name:
            raise ValueError("a RunSpec needs a name (it keys the results)")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.wrapper not in WRAPPERS:
            raise ValueError(f"wrapper must be one of {WRAPPERS}, got {self.wrapper!r}")
        check_int(self.rank, "rank", minimum=1)
        check_number(self.alpha, "alpha", positive=True)
        if isinstance(self.targets, str) or not all(isinstance(t, str) and t for t in self.targets):
            raise ArgumentTypeError(f"targets must be a tuple of layer names, got {self.targets!r}")
        object.__setattr__(self, "targets", tuple(self.targets))
        for flag in ("train_head", "find_unused_parameters", "static_graph", "count_collectives", "save_parameters",
                     "comm_hook"):
            check_bool(getattr(self, flag), flag)
        check_int(self.steps, "steps", minimum=1)
        check_int(self.batch_size, "batch_size", minimum=1)
        check_number(self.lr, "lr", positive=True)
        check_int(self.seed, "seed", minimum=0)
        if self.mistake is not None and self.mistake not in MISTAKES:
            raise ValueError(f"mistake must be None or one of {list(MISTAKES)}, got {self.mistake!r}")
        if self.mistake in ("freeze_after_wrap", "unused_adapter"):
            if self.wrapper != "ddp" or self.method != "lora" or not self.targets:
                raise ValueError(f"the {self.mistake!r} mistake is a DDP + LoRA one: use wrapper='ddp', method='lora' "
                                 "and some targets")
        if self.method == "lora" and not self.targets and not self.train_head:
            raise ValueError(f"run {self.name!r} trains nothing: no LoRA targets and train_head=False. Give targets "
                             "(e.g. ('W_query', 'W_value')) or train the head; DDP refuses a model without trainable "
                             "parameters.")

    def check_world_size(self, world_size: int) -> None:
        if self.batch_size < world_size:
            raise ValueError(f"run {self.name!r}: the world size {world_size} is larger than the global batch of "
                             f"{self.batch_size}, so some ranks would get no examples. Use batch_size >= world_size "
                             f"(a multiple of it, e.g. {2 * world_size}) or fewer processes.")
        if self.batch_size % world_size:
            raise ValueError(f"run {self.name!r}: the global batch of {self.batch_size} cannot be split evenly over "
                             f"{world_size} processes (each rank needs batch_size / world_size examples). Use a batch "
                             f"size that is a multiple of {world_size}, e.g. {world_size * max(1, self.batch_size // world_size)}.")

    def to_json(self) -> dict:
        return {**asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_json(cls, values: dict) -> "RunSpec":
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown RunSpec fields {sorted(unknown)}")
        return cls(**{**values, "targets": tuple(values.get("targets", cls.targets))})


@dataclass
class RunResult:
    """What a run measured. Lists hold one value per step (rank 0's, or the mean over ranks)."""

    name: str
    world_size: int
    backend: str
    trainable_parameters: int
    total_parameters: int
    losses: list[float] = field(default_factory=list)  # mean over ranks = the loss on the global batch
    step_seconds: list[float] = field(default_factory=list)
    allreduce_bytes: list[int] = field(default_factory=list)  # counted by the DDP hook
    buckets: list[int] = field(default_factory=list)
    collectives: dict = field(default_factory=dict)  # phase -> kind -> [bytes per step]
    optimizer_state_bytes: int = 0  # AdamW's m and v held by rank 0
    state_sha256: list[str] = field(default_factory=list)  # one per rank: the full state dict
    error: str | None = None  # the error a mistake run raised (the same on every rank)
    failed_at_step: int | None = None
    wall_seconds: float = 0.0  # the whole run on rank 0: build, wrap, train, checks
    parameters: dict | None = None  # rank 0's trainable parameters (when asked), loaded from safetensors

    @property
    def replicas_identical(self) -> bool:
        return len(self.state_sha256) == self.world_size and len(set(self.state_sha256)) == 1

    @property
    def bytes_per_step(self) -> int:
        """All-reduced bytes of one step (DDP; every step sends the same)."""
        if not self.allreduce_bytes or len(set(self.allreduce_bytes)) != 1:
            raise ValueError(f"run {self.name!r} has no constant bytes per step: {self.allreduce_bytes}")
        return self.allreduce_bytes[0]

    @property
    def median_step_ms(self) -> float:
        """Median step time in ms, leaving out step 1 (DDP builds its buckets then)."""
        times = self.step_seconds[1:] or self.step_seconds
        return 1000 * statistics.median(times)

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "parameters"}


# --------------------------------------------------------------------------------------------
# The model and the batches (the same on every rank and in the one-process reference)
# --------------------------------------------------------------------------------------------
def build_classifier(base: nn.Module, run: RunSpec, num_classes: int) -> nn.Module:
    """A fresh classifier with the run's parameters trainable, as they are when DDP is built
    (for "freeze_after_wrap": everything). Seeded: the same on every rank."""
    model = training.make_classifier(base, num_classes=num_classes, seed=123 + run.seed)
    for p in model.parameters():
        p.requires_grad_(run.method == "full")
    if run.method == "lora" and run.targets:
        replace_linear_with_lora(model, run.rank, run.alpha, target_modules=list(run.targets), seed=run.seed)
    if run.mistake == "freeze_after_wrap":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        freeze_for(model, run)
    if run.mistake == "unused_adapter":
        set_lora_enabled(model, False)
    return model


def freeze_for(model: nn.Module, run: RunSpec) -> None:
    """Leave exactly the run's parameters trainable: LoRA's A and B (and the head when it trains)."""
    if run.method == "full":
        return
    if run.targets:
        mark_only_lora_as_trainable(model, modules_to_save=["out_head"] if run.train_head else [])
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in model.out_head.parameters():
            p.requires_grad_(run.train_head)


def check_trainable(model: nn.Module, run: RunSpec) -> int:
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if count == 0:
        raise ValueError(f"run {run.name!r}: the model has no trainable parameters, so there is nothing to train "
                         "(DDP refuses such a model). Train the head or add LoRA targets.")
    return count


def batch_indices(n_examples: int, batch_size: int, steps: int, seed: int):
    """The global batch of every step, from a generator seeded by ``seed``: every rank draws the
    same indices (and so does the one-process reference); each rank keeps its ``shard``."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield torch.randint(n_examples, (batch_size,), generator=generator)


def shard(indices: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank r's contiguous slice [r·b, (r + 1)·b) of a global batch, b = batch / world_size."""
    b = len(indices) // world_size
    return indices[rank * b:(rank + 1) * b]


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """An FSDP shard (a DTensor) gathered into the full tensor (a collective); others as they are.
    (DTensor is looked up only when FSDP has imported it: importing it takes seconds.)"""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return tensor.full_tensor() if dtensor is not None and isinstance(tensor, dtensor.DTensor) else tensor


def state_sha256(model: nn.Module) -> str:
    """SHA-256 of the full state dict (names, dtypes, shapes and bytes); FSDP shards are gathered."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = _full(tensor).detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters, by name, as full CPU tensors (FSDP shards are gathered)."""
    return {name: _full(p).detach().cpu().clone().contiguous()
            for name, p in model.named_parameters() if p.requires_grad}


def max_parameter_difference(a: RunResult, b: RunResult) -> float:
    """Largest |difference| between the trainable parameters of two runs (both saved)."""
    if a.parameters is None or b.parameters is None:
        raise ValueError("both runs need save_parameters=True")
    if a.parameters.keys() != b.parameters.keys():
        raise ValueError(f"the runs train different parameters: {sorted(a.parameters.keys() ^ b.parameters.keys())[:3]}")
    return max((a.parameters[k] - b.parameters[k]).abs().max().item() for k in a.parameters)


# --------------------------------------------------------------------------------------------
# Data and base model, prepared once
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def task_train_split(task: str) -> training.EncodedSplit:
    """The task's training split, encoded (cached: generating it takes seconds)."""
    return training.EncodedSplit.from_split(data.classification_splits(task)["train"])


def load_base(base_path: str | None) -> nn.Module:
    """The shipped base model (``base_path=None``) or a ``save_gpt`` checkpoint: safetensors only."""
    return gpt.load_pretrained_gpt() if base_path is None else gpt.load_gpt(base_path)[0]


def check_base_fits(base: nn.Module, train: training.EncodedSplit, num_classes: int) -> None:
    cfg = base.cfg
    if train.ids.shape[1] > cfg.context_length or int(train.ids.max()) >= cfg.vocab_size:
        raise ValueError(f"the training data ({train.ids.shape[1]} token columns, token ids up to {int(train.ids.max())}) "
                         f"does not fit the base model (context_length {cfg.context_length}, vocabulary "
                         f"{cfg.vocab_size}): the base was trained for other data. Regenerate it with "
                         "`python -m lora_course.pretrain`.")
    if int(train.labels.max()) >= num_classes or int(train.labels.min()) < 0:
        raise ValueError(f"labels must be 0..{num_classes - 1}, got values up to {int(train.labels.max())}")


def save_split(split: training.EncodedSplit, path) -> None:
    from safetensors.torch import save_file

    save_file({"ids": split.ids.contiguous(), "lengths": split.lengths.contiguous(),
               "labels": split.labels.contiguous()}, str(path))


def load_split(path) -> training.EncodedSplit:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    return training.EncodedSplit(tensors["ids"], tensors["lengths"], tensors["labels"])


def resolve_backend(backend: str, world_size: int) -> str:
    """"auto" is NCCL when there is a GPU for every rank, else gloo. Refused: a backend this
    machine cannot run (NCCL without enough GPUs, a torch built without it)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if backend == "auto":
        backend = "nccl" if gpus >= world_size and dist.is_nccl_available() else "gloo"
    if backend == "nccl" and (not dist.is_nccl_available() or gpus < world_size):
        raise ValueError(f"backend 'nccl' needs one CUDA GPU per process: {world_size} process(es), {gpus} GPU(s) "
                         f"here{'' if dist.is_nccl_available() else ', and this torch has no NCCL'}. "
                         "Use backend='gloo' (CPU) or 'auto'.")
    if backend == "gloo" and not dist.is_gloo_available():
        raise ValueError("this torch build has no gloo backend, which CPU training needs")
    return backend


def _check_runs(runs, world_size: int) -> list[RunSpec]:
    if isinstance(runs, RunSpec):
        runs = [runs]
    runs = list(runs)
    if not runs or not all(isinstance(r, RunSpec) for r in runs):
        raise ArgumentTypeError("runs must be a non-empty list of RunSpec")
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"run names must be unique (they key the results): {names}")
    for run in runs:
        run.check_world_size(world_size)
    return runs


# --------------------------------------------------------------------------------------------
# The worker: one process of the group
# --------------------------------------------------------------------------------------------
class _Training:
    """One run on this rank: the model, its wrapper, its optimizer, and a loop that can be
    advanced one step at a time (``interleave``: the steps of several runs alternate)."""

    def __init__(self, run: RunSpec, base: nn.Module, train: training.EncodedSplit, num_classes: int,
                 device: torch.device, rank: int = 0, world_size: int = 1, distributed: bool = True):
        self.run, self.train, self.device, self.rank, self.world_size = run, train, device, rank, world_size
        self.started = time.perf_counter()
        self.model = build_classifier(base, run, num_classes).to(device)
        self.result = RunResult(run.name, world_size, dist.get_backend() if distributed else "none", 0,
                                sum(p.numel() for p in self.model.parameters()))
        if run.mistake == "hang" and rank == world_size - 1:
            print(f"rank {rank}: stuck before the first collective of run {run.name!r} (simulated hang)",
                  file=sys.stderr, flush=True)
            while True:
                time.sleep(1)
        self.wrapped, self.counter = _wrap(run, self.model, device, world_size) if distributed else (self.model, None)
        if run.mistake == "freeze_after_wrap":
            freeze_for(self.model, run)  # the mistake: DDP has already registered every parameter
        self.optimizer = torch.optim.AdamW([p for p in self.wrapped.parameters() if p.requires_grad], lr=run.lr)
        self.counted = []  # per step: phase -> kind -> bytes (count_collectives only)
        self.batches = batch_indices(len(train), run.batch_size, run.steps, run.seed)
        self.done = False

    def step(self) -> None:
        """One optimizer step on this rank's slice [r·b, (r + 1)·b) of the global batch."""
        run, result = self.run, self.result
        idx = shard(next(self.batches), self.rank, self.world_size)
        ids, lengths, labels = (t[idx].to(self.device) for t in (self.train.ids, self.train.lengths, self.train.labels))
        phases = {}
        self.wrapped.train()
        start = time.perf_counter()
        try:
            with _counting(run, phases, "forward"):
                loss = F.cross_entropy(training.classification_logits(self.wrapped, ids, lengths), labels)
            self.optimizer.zero_grad(set_to_none=True)
            with _counting(run, phases, "backward"):
                loss.backward()
            self.optimizer.step()
        except RuntimeError as err:
            if run.mistake is None:
                raise
            result.error, result.failed_at_step, self.done = str(err)[:3000], len(result.losses) + 1, True
            return
        result.step_seconds.append(time.perf_counter() - start)
        result.losses.append(loss.item())
        self.counted.append(phases)
        if self.counter is not None:
            result.allreduce_bytes.append(self.counter.bytes)
            result.buckets.append(self.counter.buckets)
            self.counter.reset()
        self.done = len(result.losses) == run.steps

    def finish(self, results_dir: Path | None = None, index: int = 0) -> RunResult:
        """Collect what the run measured. Collectives in a distributed run (every rank of a
        mistake run failed at the same step, so they still pair up)."""
        result, model = self.result, self.model
        for phase in sorted({p for step in self.counted for p in step}):
            kinds = sorted({k for step in self.counted for k in step.get(phase, {})})
            result.collectives[phase] = {k: [step.get(phase, {}).get(k, 0) for step in self.counted] for k in kinds}
        result.optimizer_state_bytes = _optimizer_state_bytes(self.optimizer)
        result.trainable_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if result.backend == "none":
            result.state_sha256 = [state_sha256(model)]
            result.parameters = trainable_state(model) if self.run.save_parameters else None
        else:
            result.losses = mean_over_ranks(result.losses, self.device)
            result.state_sha256 = gather_digests(state_sha256(model), self.device)
            if self.run.save_parameters:
                state = trainable_state(model)  # a collective under FSDP: every rank takes part
                if self.rank == 0 and results_dir is not None:
                    from safetensors.torch import save_file
                    save_file(state, str(results_dir / f"run{index}_parameters.safetensors"))
        result.wall_seconds = time.perf_counter() - self.started
        return result


@contextlib.contextmanager
def _counting(run: RunSpec, phases: dict, phase: str):
    if not run.count_collectives:
        yield
        return
    with CollectiveCounter() as counter:
        yield
    phases[phase] = dict(counter.bytes)


def _optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of AdamW's m and v on this rank (the local shard under FSDP)."""
    total = 0
    for state in optimizer.state.values():
        for key in ("exp_avg", "exp_avg_sq"):
            t = state.get(key)
            if t is not None:
                t = t.to_local() if hasattr(t, "to_local") else t
                total += t.numel() * t.element_size()
    return total


def _wrap(run: RunSpec, model: nn.Module, device: torch.device, world_size: int):
    """(module to train, DDP byte counter or None)."""
    if run.wrapper == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world_size,))
        for block in getattr(model, "trf_blocks", []):  # one FSDP unit per transformer block
            fully_shard(block, mesh=mesh)
        return fully_shard(model, mesh=mesh), None
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
              find_unused_parameters=run.find_unused_parameters, static_graph=run.static_graph)
    if not run.comm_hook:
        return ddp, None
    counter = AllReduceCounter()
    ddp.register_comm_hook(counter, counting_allreduce_hook)
    return ddp, counter


def mean_over_ranks(values: list[float], device) -> list[float]:
    """The mean over the ranks of each value (e.g. each step's loss: the global batch's loss)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)  # sum
    return (tensor / dist.get_world_size()).tolist()


def gather_digests(digest: str, device) -> list[str]:
    """Every rank's hex digest, in rank order (an all-gather of the 32 bytes as integers)."""
    mine = torch.tensor(list(bytes.fromhex(digest)), dtype=torch.int64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    return [bytes(t.cpu().tolist()).hex() for t in everyone]


def init_process_group(backend: str, timeout_s: float) -> torch.device:
    """Join the group described by torchrun's environment variables; returns this rank's device
    (GPU LOCAL_RANK under NCCL). A collective that waits longer than ``timeout_s`` fails."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                            device_id=device if backend == "nccl" else None)
    return device


def worker(job: dict, results_dir: Path | None, train: training.EncodedSplit | None = None,
           base: nn.Module | None = None) -> list[RunResult]:
    """Run the job's runs on this rank (RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT come from
    the environment, as torchrun sets them) and write ``rank{r}.json`` (and parameters) to
    ``results_dir``. ``train`` and ``base`` default to the job's files (or the task's training
    split and the shipped model). With ``job["interleave"]`` the runs' steps alternate."""
    torch.set_num_threads(1)
    runs = [RunSpec.from_json(r) for r in job["runs"]]
    if base is None:
        base = load_base(job.get("base_path"))
    if train is None:
        train = load_split(job["train_path"]) if job.get("train_path") else task_train_split(job["task"])
    num_classes = data.num_classes(job["task"])
    device = init_process_group(job["backend"], job["timeout_s"])
    try:
        dist.barrier()  # every rank has started: times from here on are not waits for a slow start
        rank, world_size = dist.get_rank(), dist.get_world_size()
        if job.get("interleave"):
            trainings = [_Training(run, base, train, num_classes, device, rank, world_size) for run in runs]
            while not all(t.done for t in trainings):
                for t in trainings:
                    if not t.done:
                        t.step()
            results = [t.finish(results_dir, i) for i, t in enumerate(trainings)]
        else:
            results = []
            for i, run in enumerate(runs):
                t = _Training(run, base, train, num_classes, device, rank, world_size)
                while not t.done:
                    t.step()
                results.append(t.finish(results_dir, i))
        if results_dir is not None:
            (results_dir / f"rank{rank}.json").write_text(
                json.dumps({"rank": rank, "runs": [r.to_json() for r in results]}))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return results


# --------------------------------------------------------------------------------------------
# The launcher: start the ranks, wait with a timeout, collect the results
# --------------------------------------------------------------------------------------------
def free_port() -> int:
    """A TCP port that is free now (the OS picks it), for rank 0's rendezvous store."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, chars: int = 2500) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return text[-chars:]


def _kill(procs: list[subprocess.Popen]) -> None:
    """Kill each rank's whole process group (the rank and anything it started), then reap it."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL) if hasattr(os, "killpg") else proc.kill()
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


def _wait(procs: list[subprocess.Popen], logs: list[Path], timeout_s: float, grace_s: float = 5.0) -> None:
    """Wait for every rank. A rank that fails gives the others ``grace_s`` to fail too (they
    usually wait for it in a collective), then all are killed; past ``timeout_s`` all are killed."""
    deadline, failed_since = time.monotonic() + timeout_s, None
    while True:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            break
        now = time.monotonic()
        if failed_since is None and any(c not in (None, 0) for c in codes):
            failed_since = now
        if failed_since is not None and now - failed_since > grace_s:
            break
        if now > deadline:
            running = [r for r, c in enumerate(codes) if c is None]
            _kill(procs)
            tails = "\n".join(f"--- rank {r} (last output) ---\n{_tail(logs[r], 800)}" for r in running)
            raise DistributedTimeoutError(
                f"the distributed run did not finish within {timeout_s:g} s: rank(s) {running} were still running "
                f"and every process was killed. A rank waiting in a collective that another rank never reaches "
                f"hangs; check that every rank runs the same steps.\n{tails}", [p.pid for p in procs])
        time.sleep(0.05)
    _kill(procs)
    codes = [p.returncode for p in procs]
    failed = [r for r, c in enumerate(codes) if c != 0]
    if failed:
        # Show a rank that failed by itself, not one we killed after it.
        first = next((r for r in failed if codes[r] != -signal.SIGKILL), failed[0])
        raise DistributedRunError(f"rank(s) {failed} failed (exit codes {[codes[r] for r in failed]}). "
                                  f"End of rank {first}'s output:\n{_tail(logs[first])}")


def launch(runs, *, world_size: int = 2, backend: str = "auto", task: str | None = None,
           train: training.EncodedSplit | None = None, base_path: str | None = None,
           interleave: bool = False, timeout_s: float = 120.0) -> dict[str, RunResult]:
    """Run ``runs`` (RunSpecs, one after the other) on ``world_size`` new processes; returns
    {name: RunResult}.

    ``train`` is the training data (default: the training split of ``task``, default
    ``data.MAIN_TASK``), prepared here once and handed to the ranks as a safetensors file.
    ``base_path`` is a ``save_gpt`` checkpoint (default: the shipped base model). Everything is
    checked before any process starts; a run that does not finish within ``timeout_s`` seconds
    raises ``DistributedTimeoutError`` after every process was killed.

    ``interleave=True`` alternates the runs step by step (run 1 step 1, run 2 step 1, ...), so
    that a busy moment of the machine slows every run alike: use it to compare step times."""
    world_size = check_int(world_size, "world_size", minimum=1, hint="the number of processes, e.g. 2")
    runs = _check_runs(runs, world_size)
    backend = resolve_backend(backend, world_size)
    timeout_s = float(check_number(timeout_s, "timeout_s", positive=True))
    interleave = check_bool(interleave, "interleave")
    task = data.MAIN_TASK if task is None else task
    num_classes = data.num_classes(task)
    if train is None:
        train = task_train_split(task)
    elif not isinstance(train, training.EncodedSplit):
        raise ArgumentTypeError(f"train must be an EncodedSplit, got {type(train).__name__}")
    base = load_base(base_path)
    check_base_fits(base, train, num_classes)
    for run in runs:
        check_trainable(build_classifier(base, run, num_classes), run)

    with tempfile.TemporaryDirectory(prefix="lora_course_ddp_") as tmp:
        tmp = Path(tmp)
        save_split(train, tmp / "train.safetensors")
        job = {"runs": [r.to_json() for r in runs], "backend": backend, "task": task, "timeout_s": timeout_s,
               "train_path": str(tmp / "train.safetensors"), "base_path": base_path, "interleave": interleave}
        (tmp / "job.json").write_text(json.dumps(job))
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
               "WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size), "OMP_NUM_THREADS": "1",
               "MKL_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                              *filter(None, [os.environ.get("PYTHONPATH")])])}
        logs = [tmp / f"rank{r}.log" for r in range(world_size)]
        command = [sys.executable, "-m", "lora_course.distributed", "--job", str(tmp / "job.json"),
                   "--results", str(tmp)]
        procs = []
        try:
            for r in range(world_size):
                with open(logs[r], "wb") as log:
                    procs.append(subprocess.Popen(command, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                                                  stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                  start_new_session=True))
            _wait(procs, logs, timeout_s)
        finally:
            _kill(procs)
        return _collect(tmp, runs, world_size)


def _collect(folder: Path, runs: list[RunSpec], world_size: int) -> dict[str, RunResult]:
    from safetensors.torch import load_file

    per_rank = [json.loads((folder / f"rank{r}.json").read_text())["runs"] for r in range(world_size)]
    results = {}
    for i, run in enumerate(runs):
        result = RunResult(**per_rank[0][i])
        params = folder / f"run{i}_parameters.safetensors"
        result.parameters = load_file(str(params)) if params.exists() else None
        results[run.name] = result
    return results


def train_single_process(run: RunSpec, *, task: str | None = None, train: training.EncodedSplit | None = None,
                         base_path: str | None = None) -> RunResult:
    """The reference: the same run in this process, without any wrapper, on the whole global
    batch of every step (what DDP over N ranks must reproduce)."""
    if not isinstance(run, RunSpec):
        raise ArgumentTypeError(f"run must be a RunSpec, got {type(run).__name__}")
    if run.mistake is not None:
        raise ValueError("the one-process reference has no mistakes to make: use mistake=None")
    task = data.MAIN_TASK if task is None else task
    num_classes = data.num_classes(task)
    train = task_train_split(task) if train is None else train
    base = load_base(base_path)
    check_base_fits(base, train, num_classes)
    check_trainable(build_classifier(base, run, num_classes), run)
    single = _Training(run, base, train, num_classes, torch.device("cpu"), distributed=False)
    while not single.done:
        single.step()
    return single.finish()


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def summary_table(results: dict[str, RunResult]) -> str:
    rows = [("run", "trainable", "all-reduce B/step", "= 4 B x trainable", "ms/step", "replicas equal", "error")]
    for r in results.values():
        nbytes = r.allreduce_bytes[-1] if r.allreduce_bytes else 0
        error = (r.error or "").split(".")[0][:60]
        rows.append((r.name, f"{r.trainable_parameters:,}", f"{nbytes:,}", str(nbytes == 4 * r.trainable_parameters),
                     f"{r.median_step_ms:.1f}" if r.step_seconds else "-", str(r.replicas_identical), error))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lora_course.distributed", description=__doc__.split("\n\n")[0])
    p.add_argument("--method", choices=METHODS, default="lora")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--targets", nargs="*", default=["W_query", "W_value"])
    p.add_argument("--wrapper", choices=WRAPPERS, default="ddp")
    p.add_argument("--find-unused-parameters", action="store_true")
    p.add_argument("--static-graph", action="store_true")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=16, help="the global batch, split over the processes")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=BACKENDS, default="auto")
    p.add_argument("--task", default=None, help="default: data.MAIN_TASK")
    p.add_argument("--train-data", default=None, help="a training split saved with save_split (safetensors)")
    p.add_argument("--base", default=None, help="a save_gpt checkpoint (default: the shipped base model)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before a hang is an error")
    p.add_argument("--world-size", type=int, default=2, help="processes to start (without torchrun)")
    p.add_argument("--results", default=None, help="folder for rank{r}.json (kept)")
    p.add_argument("--job", default=None, help=argparse.SUPPRESS)  # written by launch()
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    results_dir = Path(args.results) if args.results else None
    if args.job:  # a rank started by launch()
        worker(json.loads(Path(args.job).read_text()), results_dir)
        return 0
    try:
        run = RunSpec("cli", method=args.method, rank=args.rank, alpha=args.alpha, targets=tuple(args.targets),
                      wrapper=args.wrapper, find_unused_parameters=args.find_unused_parameters,
                      static_graph=args.static_graph, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                      seed=args.seed)
        task = data.MAIN_TASK if args.task is None else args.task
        train = load_split(args.train_data) if args.train_data else None
        if "RANK" not in os.environ:  # no torchrun: start the processes ourselves
            results = launch([run], world_size=args.world_size, backend=args.backend, task=task, train=train,
                             base_path=args.base, timeout_s=args.timeout)
            print(summary_table(results))
            return 0
        world_size = int(os.environ["WORLD_SIZE"])
        run.check_world_size(world_size)
        backend = resolve_backend(args.backend, world_size)
        train = task_train_split(task) if train is None else train
        base = load_base(args.base)
        check_base_fits(base, train, data.num_classes(task))
        check_trainable(build_classifier(base, run, data.num_classes(task)), run)
    except (ValueError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if results_dir is not None:
        results_dir.mkdir(parents=True, exist_ok=True)
    job = {"runs": [run.to_json()], "backend": backend, "task": task, "timeout_s": args.timeout}
    results = worker(job, results_dir, train=train, base=base)
    if int(os.environ["RANK"]) == 0:
        print(summary_table({r.name: r for r in results}), flush=True)
    return 0


if __name__ == "__main__":
    code = main()
    # Leave without the interpreter's teardown: once DDP has imported torch._dynamo (its
    # constructor does) that takes seconds per process. Every result is written by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
