"""Benchmark: full fine-tuning vs lora_course LoRA vs PEFT LoRA, one training step and one
inference pass, on the course's GPT and on a stack of wide Linear layers.

    python scripts/benchmark.py                 # about 1-2 minutes on a 2-core CPU
    python scripts/benchmark.py --rounds 30     # more repeats, tighter medians

Method
- Same model, same rank, same target layers for both LoRA implementations (PEFT gets the
  course's A and B copied in, so both compute the same function).
- The variants run alternately in one process (round 1: full, course, PEFT; round 2: ...),
  so slow drifts of the machine hit all of them alike; we report medians over rounds.
- Step = forward + backward + AdamW update on one batch. Inference = one no-grad forward (the
  fastest of 3 back-to-back calls in each round).
- Memory (CPU): what is alive for training, by kind: weights + gradients + AdamW state (after
  one step) + the activations autograd saves for backward, each storage counted once
  (``lora_course.memory.live_tensor_breakdown``), and the peak the allocator reports for a
  whole step, temporaries included (``lora_course.memory.measure_peak_memory``, the profiler's
  memory events), the same measurements as notebook 04.
- One thread by default (``--threads``), as in the notebooks.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn
from torch.nn import functional as F

from lora_course import mark_only_lora_as_trainable, merge_and_unload, replace_linear_with_lora
from lora_course.accounting import trainable_parameters
from lora_course.data import TOKENIZER
from lora_course.gpt import load_pretrained_gpt
from lora_course.memory import live_tensor_breakdown, measure_peak_memory
from lora_course.peft_bridge import peft_state_dict
from lora_course.training import make_classifier


# --------------------------------------------------------------------------------------------
# Setups
# --------------------------------------------------------------------------------------------
class WideStack(nn.Module):
    """depth × (Linear(width, width) + GELU) and a small head: the weight matrices dominate."""

    def __init__(self, width: int = 1024, depth: int = 6, classes: int = 2):
        super().__init__()
        self.layers = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.GELU()) for _ in range(depth)])
        self.out_head = nn.Linear(width, classes)

    def forward(self, x):
        return self.out_head(self.layers(x))


def gpt_setup(batch: int):
    base = make_classifier(load_pretrained_gpt())
    ids = torch.randint(0, len(TOKENIZER), (batch, base.cfg.context_length), generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 2, (batch,), generator=torch.Generator().manual_seed(1))

    def loss_fn(model):
        return F.cross_entropy(model(ids)[:, -1], labels)

    targets = ["W_query", "W_key", "W_value", "out_proj", "ff.layers.0", "ff.layers.2"]
    return base, loss_fn, (lambda model: model(ids)), targets


def wide_setup(batch: int, width: int = 1024, depth: int = 6):
    torch.manual_seed(0)
    base = WideStack(width, depth)
    x = torch.randn(batch, width, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 2, (batch,), generator=torch.Generator().manual_seed(1))
    targets = [f"layers.{i}.0" for i in range(depth)]
    return base, (lambda model: F.cross_entropy(model(x), labels)), (lambda model: model(x)), targets


# --------------------------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------------------------
def build_variants(base: nn.Module, targets: list[str], rank: int, alpha: float) -> dict[str, nn.Module]:
    from peft import LoraConfig, get_peft_model
    from peft.utils import set_peft_model_state_dict

    full = copy.deepcopy(base)  # every parameter trains
    course = copy.deepcopy(base)
    replace_linear_with_lora(course, rank, alpha, target_modules=targets)
    mark_only_lora_as_trainable(course, modules_to_save=["out_head"])
    with torch.no_grad():  # a "trained" adapter: B non-zero, so no path is trivially zero
        g = torch.Generator().manual_seed(2)
        for name, p in course.named_parameters():
            if name.endswith("lora.B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets,
                                                                modules_to_save=["out_head"]))
    set_peft_model_state_dict(peft_model, peft_state_dict(course, ["out_head"]))
    return {"full": full, "lora_course": course, "peft": peft_model}


def time_step(model, optimizer, loss_fn) -> float:
    start = time.perf_counter()
    loss = loss_fn(model)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


@torch.no_grad()
def time_inference(model, infer, calls: int = 3) -> float:
    """Fastest of a few back-to-back calls: one forward is short, so a single call is easily
    hit by another process; the minimum is the least disturbed measurement."""
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        infer(model)
        times.append(time.perf_counter() - start)
    return min(times)


def run(name, base, loss_fn, infer, targets, rank, alpha, rounds):
    variants = build_variants(base, targets, rank, alpha)
    optimizers = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5)
                  for k, m in variants.items()}
    merged = {"base": copy.deepcopy(base).eval(),
              "merged lora_course": merge_and_unload(copy.deepcopy(variants["lora_course"])).eval(),
              "merged peft": copy.deepcopy(variants["peft"]).merge_and_unload().eval()}
    for k, m in variants.items():  # warm-up: allocator, first-call costs
        m.train(); time_step(m, optimizers[k], loss_fn); m.eval(); time_inference(m, infer)
    for m in merged.values():
        time_inference(m, infer)
    step = {k: [] for k in variants}
    inference = {k: [] for k in list(variants) + list(merged)}
    for _ in range(rounds):  # alternate the variants inside each round
        for k, m in variants.items():
            m.train()
            step[k].append(time_step(m, optimizers[k], loss_fn))
        for k, m in variants.items():
            m.eval()
            inference[k].append(time_inference(m, infer))
        for k, m in merged.items():
            inference[k].append(time_inference(m, infer))
    med = lambda xs: statistics.median(xs)  # noqa: E731
    memory = {k: live_tensor_breakdown(m, loss_fn) for k, m in variants.items()}
    peak = {k: measure_peak_memory(m, loss_fn) for k, m in variants.items()}

    print(f"\n## {name}: rank {rank}, alpha {alpha}, {len(targets)} target pattern(s), {rounds} rounds")
    print(f"{'variant':20s} {'trainable':>11s} {'step ms':>9s} {'infer ms':>9s} {'train MB':>9s}"
          f" {'(weights':>9s} {'grads':>7s} {'adam':>7s} {'activ.)':>8s} {'peak MB':>8s}")
    for k in variants:
        mem = memory[k]
        print(f"{k:20s} {trainable_parameters(variants[k]):11,d} {1e3 * med(step[k]):9.2f} {1e3 * med(inference[k]):9.2f}"
              f" {mem.total / 1e6:9.2f} {mem.weights / 1e6:9.2f} {mem.gradients / 1e6:7.2f}"
              f" {mem.optimizer_states / 1e6:7.2f} {mem.activations / 1e6:8.2f} {peak[k] / 1e6:8.2f}")
    for k in merged:  # inference only: the base model and the two merged models
        print(f"{k:20s} {'':11s} {'':9s} {1e3 * med(inference[k]):9.2f}")
    ratios = {
        "step lora_course / peft": med(step["lora_course"]) / med(step["peft"]),
        "inference lora_course / peft (unmerged)": med(inference["lora_course"]) / med(inference["peft"]),
        "memory lora_course / peft": memory["lora_course"].total / memory["peft"].total,
        "step lora_course / full": med(step["lora_course"]) / med(step["full"]),
        "step peft / full": med(step["peft"]) / med(step["full"]),
        "memory lora_course / full": memory["lora_course"].total / memory["full"].total,
        "peak lora_course / full": peak["lora_course"] / peak["full"],
        "memory peft / full": memory["peft"].total / memory["full"].total,
        "inference merged lora_course / base": med(inference["merged lora_course"]) / med(inference["base"]),
        "inference merged peft / base": med(inference["merged peft"]) / med(inference["base"]),
        "inference unmerged lora_course / base": med(inference["lora_course"]) / med(inference["base"]),
    }
    for k, v in ratios.items():
        print(f"  {k:42s} {v:5.2f}")
    return ratios


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} thread(s), medians of {args.rounds} alternating rounds")
    print("train MB = weights + grads + AdamW state + activations saved for backward (live tensors, CPU); "
          "peak MB = the allocator's peak over a whole step")
    start = time.perf_counter()
    results = {}
    base, loss_fn, infer, targets = gpt_setup(batch=32)
    cfg = base.cfg
    label = f"course GPT (emb {cfg.emb_dim}, {cfg.n_layers} blocks, {cfg.context_length} tokens, batch 32)"
    results["gpt"] = run(label, base, loss_fn, infer, targets,
                         args.rank, 2 * args.rank, args.rounds)
    base, loss_fn, infer, targets = wide_setup(batch=256)
    results["wide"] = run("6 × Linear(1024, 1024), batch 256", base, loss_fn, infer, targets,
                          args.rank, 2 * args.rank, args.rounds)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    return results


if __name__ == "__main__":
    main()
