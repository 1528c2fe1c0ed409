"""Train notebook 09's PEFT model (LoRA r=8 on W_query and W_value, the new head in
``modules_to_save``) on several processes with DistributedDataParallel.

    torchrun --nproc_per_node 2 scripts/peft_ddp.py --steps 20 --output peft_adapter

gloo on CPU, NCCL when every process has a GPU. The order is what matters: ``get_peft_model``
freezes the base *before* ``DistributedDataParallel(model)`` is built, so DDP registers only the
trainable LoRA matrices and head copy, all-reduces exactly 4 bytes × those per step, and needs no
``find_unused_parameters``. Rank 0 saves the adapter with ``save_pretrained`` (load it with
``PeftModel.from_pretrained(make_classifier(base, num_classes=...), folder)``) and prints one
JSON line: trainable parameters, all-reduced bytes per step, losses, whether the replicas are
bit-identical.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from lora_course import data, distributed, training
from lora_course.communication import AllReduceCounter, counting_allreduce_hook


def build_peft_classifier(base, num_classes: int):
    """Notebook 09's model: a fresh head for the task, LoRA r=8, alpha 16 on W_query and W_value."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=8, lora_alpha=16, target_modules=["W_query", "W_value"], modules_to_save=["out_head"])
    return get_peft_model(training.make_classifier(base, num_classes=num_classes), config)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16, help="the global batch, split over the processes")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task", default=None, help="default: data.MAIN_TASK")
    p.add_argument("--train-data", default=None, help="a split saved with lora_course.distributed.save_split")
    p.add_argument("--base", default=None, help="a save_gpt checkpoint (default: the shipped base model)")
    p.add_argument("--backend", choices=distributed.BACKENDS, default="auto")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a collective may wait")
    p.add_argument("--output", default=None, help="folder for the adapter (save_pretrained)")
    p.add_argument("--summary", default=None, help="also write the JSON summary to this file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if "RANK" not in os.environ:
        print("error: start this script with torchrun, e.g. torchrun --nproc_per_node 2 scripts/peft_ddp.py",
              file=sys.stderr)
        return 2
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    task = data.MAIN_TASK if args.task is None else args.task
    try:  # every check before the process group starts
        if args.steps < 1 or args.batch_size < world_size or args.batch_size % world_size:
            raise ValueError(f"need steps >= 1 and a batch size that is a multiple of the {world_size} processes, "
                             f"got steps={args.steps}, batch size {args.batch_size}")
        backend = distributed.resolve_backend(args.backend, world_size)
        train = distributed.load_split(args.train_data) if args.train_data else distributed.task_train_split(task)
        base = distributed.load_base(args.base)
        distributed.check_base_fits(base, train, data.num_classes(task))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    device = distributed.init_process_group(backend, args.timeout)
    try:
        torch.manual_seed(args.seed)  # PEFT draws LoRA's A from the global generator: the same on every rank
        model = build_peft_classifier(base, data.num_classes(task)).to(device)
        ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        counter = AllReduceCounter()
        ddp.register_comm_hook(counter, counting_allreduce_hook)
        optimizer = torch.optim.AdamW([p for p in ddp.parameters() if p.requires_grad], lr=args.lr)
        losses, sent = [], []
        ddp.train()
        for idx in distributed.batch_indices(len(train), args.batch_size, args.steps, args.seed):
            mine = distributed.shard(idx, rank, world_size)
            ids, lengths, labels = (t[mine].to(device) for t in (train.ids, train.lengths, train.labels))
            loss = F.cross_entropy(training.classification_logits(ddp, ids, lengths), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            sent.append(counter.bytes)
            counter.reset()
        digests = distributed.gather_digests(distributed.state_sha256(model), device)
        summary = {"world_size": world_size, "backend": backend,
                   "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
                   "allreduce_bytes_per_step": sent, "losses": distributed.mean_over_ranks(losses, device),
                   "replicas_identical": len(set(digests)) == 1}
        if rank == 0:
            if args.output:
                model.save_pretrained(args.output)
            if args.summary:
                Path(args.summary).write_text(json.dumps(summary))
            print(json.dumps(summary), flush=True)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()  # then leave without the interpreter's teardown (seconds, once DDP imported
    sys.stderr.flush()  # torch._dynamo); the adapter and the summary are written by now
    os._exit(code)
