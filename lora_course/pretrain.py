"""Pretrain the course's base GPT on the generated corpus and ship it (next-token prediction).

    python -m lora_course.pretrain            # rewrites lora_course/pretrained/tiny_gpt.safetensors

Deterministic (seeded, one thread): the same command on the same machine writes the same
weights. It takes a few minutes on a 2-core CPU; learners never need to run it, since the file
ships with the course. The validation loss is recorded in the file's header, and a test checks
that the shipped file still reproduces it.
"""
from __future__ import annotations

import argparse
import math
import time

import torch
from torch.nn import functional as F

from .data import CONTEXT_LENGTH, TOKENIZER, lm_batch, pretraining_texts
from .gpt import PRETRAINED_PATH, GPTConfig, GPTModel, save_gpt
from .training import language_model_loss, seed_everything

CONFIG = GPTConfig(vocab_size=len(TOKENIZER), context_length=CONTEXT_LENGTH, emb_dim=48, n_heads=4, n_layers=3)
N_TRAIN, N_VAL, CORPUS_SEED = 22_000, 2_000, 0


def corpus_split() -> tuple[list[str], list[str]]:
    """The pretraining sentences, split into train and validation (no sentence in both)."""
    texts = pretraining_texts(N_TRAIN + N_VAL, seed=CORPUS_SEED)
    return texts[:N_TRAIN], texts[N_TRAIN:]


def pretrain(steps: int = 3000, batch_size: int = 64, lr: float = 3e-3, seed: int = 0, log_every: int = 250,
             eval_every: int = 500) -> tuple[GPTModel, dict]:
    seed_everything(seed)
    train_texts, val_texts = corpus_split()
    inputs, targets = lm_batch(train_texts)
    lengths = (targets != -100).sum(1)  # real tokens per document: batches are cut to their longest
    model = GPTModel(CONFIG)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    # Linear warm-up for 100 steps, then cosine decay to 10 % of lr.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 100) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    generator = torch.Generator().manual_seed(seed)
    start = time.time()
    train_curve, val_curve = [], []  # (step, loss): the pretraining curve notebook 02 plots
    model.train()
    for step in range(1, steps + 1):
        idx = torch.randint(len(inputs), (batch_size,), generator=generator)
        width = int(lengths[idx].max())
        logits = model(inputs[idx, :width])
        loss = F.cross_entropy(logits.flatten(0, 1), targets[idx, :width].flatten(), ignore_index=-100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        train_curve.append(loss.item())
        if step % eval_every == 0 or step == 1:
            val_curve.append((step, round(language_model_loss(model, val_texts), 4)))
            model.train()
        if step % log_every == 0 or step == steps:
            print(f"step {step:5d}  train loss {loss.item():.3f}  ({time.time() - start:.0f} s)", flush=True)
    model.eval()
    val_loss = language_model_loss(model, val_texts)
    # The training curve is stored as means over windows of 50 steps (each batch is noisy).
    window = 50
    smoothed = [(s + window, round(sum(train_curve[s:s + window]) / len(train_curve[s:s + window]), 4))
                for s in range(0, steps, window)]
    info = {"val_loss": round(val_loss, 6), "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
            "corpus": {"n_train": N_TRAIN, "n_val": N_VAL, "seed": CORPUS_SEED},
            "train_curve": smoothed, "val_curve": val_curve + [(steps, round(val_loss, 4))],
            "seconds": round(time.time() - start)}
    print(f"validation loss {val_loss:.4f} (perplexity {math.exp(val_loss):.2f}) after {time.time() - start:.0f} s")
    return model, info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--out", default=str(PRETRAINED_PATH))
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, info = pretrain(steps=args.steps)
    PRETRAINED_PATH.parent.mkdir(exist_ok=True)
    save_gpt(model, args.out, extra=info)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
