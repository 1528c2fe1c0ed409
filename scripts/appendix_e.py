"""Appendix E of "Build a Large Language Model From Scratch", end to end, with the course's code.

    python scripts/appendix_e.py                                  # downloads what it needs
    python scripts/appendix_e.py --model-dir gpt2/ --data-file SMSSpamCollection   # files by hand

It loads the real GPT-2 124M into the course's book-style GPTModel (lora_course.gpt2), builds the
book's spam data set from the UCI SMS Spam Collection (balanced, split 1,045 / 149 / 300),
replaces the output head by Linear(768, 2), freezes everything, wraps every Linear with the
course's ``replace_linear_with_lora(rank=16, alpha=16)``, trains five epochs with AdamW and
prints each count and accuracy next to the book's. It uses a GPU when there is one (CUDA, or
Apple's MPS); on a laptop CPU expect 10-20 minutes (the book: 12 minutes on an M1 CPU).

What it downloads (about 550 MB), unless you pass the files:
- from https://huggingface.co/openai-community/gpt2: config.json, model.safetensors and
  tokenizer.json (safetensors and JSON only: nothing that is loaded can run code);
- https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip (the URL chapter 6 uses).

Tokenizer: GPT-2's byte-level BPE read from the downloaded tokenizer.json with the `tokenizers`
package (installed with transformers); it gives the same token ids as tiktoken's "gpt2"
encoding, which the book uses, and never downloads anything by itself.

Faithful to the book, on purpose: the classifier reads the logits of the *last* position, which
is a padding token for every message shorter than the longest (the book's choice); the same
seeds are set at the same points; evaluation batches are drawn as the book draws them; and by
default A is re-drawn the book's way (``kaiming_uniform_`` on A itself, fan_in = r), which makes
A about sqrt(in / r) times larger than the course's default init and so changes the effective
learning rate (``--a-init course`` keeps the course's A; see notebook 03).
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import socket
import sys
import time
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lora_course import replace_linear_with_lora
from lora_course.accounting import total_parameters, trainable_parameters
from lora_course.gpt2 import CONFIG_FILE, WEIGHTS_FILE, load_gpt2

MODEL_URL = "https://huggingface.co/openai-community/gpt2/resolve/main/"
TOKENIZER_FILE = "tokenizer.json"
MODEL_FILES = (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE)
DATA_URL = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"
DATA_MEMBER = "SMSSpamCollection"  # the tab-separated file inside the zip
DATA_ZIP = "sms_spam_collection.zip"
SEED = 123

#: The numbers appendix E prints (stored outputs of the book's notebook; ch06 for the data).
BOOK = {
    "messages": 5572, "ham": 4825, "spam": 747, "balanced": 1494,
    "train": 1045, "val": 149, "test": 300, "max_length": 120,
    "train_batches": 130, "val_batches": 19, "test_batches": 38,
    "sample": "Every effort moves you forward.\n\nThe first step is to understand the importance of your work",
    "before_accuracy": (46.25, 45.00, 48.75),
    "trainable_before_freezing": 124_441_346, "trainable_lora": 2_666_528, "total_with_lora": 127_107_874,
    "final_accuracy": (99.81, 97.99, 96.67),
}
HOW_BY_HAND = f"""To run without a network, get these files on a machine that has one and pass them:
  --model-dir DIR   a folder with {', '.join(MODEL_FILES)}
                    from https://huggingface.co/openai-community/gpt2/tree/main
  --data-file FILE  the SMS Spam Collection: the zip from
                    {DATA_URL}
                    or the tab-separated file '{DATA_MEMBER}' inside it"""


# --------------------------------------------------------------------------------------------
# Network and downloads
# --------------------------------------------------------------------------------------------
def unreachable_hosts(urls, timeout: float = 5.0) -> list[str]:
    """Hosts among ``urls`` that a TCP connection cannot reach within ``timeout`` seconds."""
    hosts = sorted({urllib.parse.urlsplit(u).hostname for u in urls})
    failed = []
    for host in hosts:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
        except OSError:
            failed.append(host)
    return failed


def download(url: str, dest: Path, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` (via a .part file, so an interrupted download is not kept)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as out:
        size = int(response.headers.get("Content-Length") or 0)
        print(f"downloading {url} ({size / 1e6:.0f} MB)" if size else f"downloading {url}", flush=True)
        while chunk := response.read(1 << 20):
            out.write(chunk)
    part.replace(dest)
    return dest


def fetch_model_files(model_dir: Path) -> Path:
    for name in MODEL_FILES:
        if not (model_dir / name).is_file():
            download(MODEL_URL + name, model_dir / name)
    return model_dir


def fetch_data_file(work_dir: Path) -> Path:
    zip_path = work_dir / DATA_ZIP
    if not zip_path.is_file():
        download(DATA_URL, zip_path)
    return zip_path


# --------------------------------------------------------------------------------------------
# The data set, split exactly as the book splits it (without pandas)
# --------------------------------------------------------------------------------------------
def read_sms_collection(path) -> list[tuple[str, str]]:
    """(label, message) rows of the SMS Spam Collection, from its zip or its tab-separated file.

    Parsed as the book's ``pd.read_csv(path, sep="\\t", header=None)`` parses it: a field that
    starts with a double quote runs to the closing quote, even across lines (which is why the
    file's 5,574 lines give 5,572 messages), and blank lines are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no data file at {path}. {HOW_BY_HAND}")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if DATA_MEMBER not in archive.namelist():
                raise ValueError(f"{path} has no file {DATA_MEMBER!r} (it has {', '.join(archive.namelist())}); "
                                 f"it should be the SMS Spam Collection zip from {DATA_URL}")
            text = archive.read(DATA_MEMBER).decode("utf-8")
    else:
        text = path.read_text(encoding="utf-8")
    rows = []
    for number, fields in enumerate(csv.reader(io.StringIO(text, newline=""), delimiter="\t", quotechar='"'), 1):
        if not fields:
            continue
        if len(fields) != 2 or fields[0] not in ("ham", "spam"):
            raise ValueError(f"{path}, record {number}: expected 'ham' or 'spam', a tab, and the message; "
                             f"got {fields[:3]!r}")
        rows.append((fields[0], fields[1]))
    return rows


def sample_without_replacement(n_items: int, n: int, seed: int) -> np.ndarray:
    """The positions pandas' ``DataFrame.sample(n, random_state=seed)`` picks: pandas calls
    ``np.random.RandomState(seed).choice(n_items, n, replace=False)``, which is the first n
    entries of ``RandomState(seed).permutation(n_items)``."""
    return np.random.RandomState(seed).permutation(n_items)[:n]


def balance(rows, seed: int = SEED) -> list[tuple[str, str]]:
    """The book's ``create_balanced_dataset``: as many ham messages as there are spam ones, drawn
    at random (seed 123), then every spam message after them."""
    ham = [r for r in rows if r[0] == "ham"]
    spam = [r for r in rows if r[0] == "spam"]
    if len(ham) < len(spam):
        raise ValueError(f"need at least as many ham as spam messages, got {len(ham)} ham and {len(spam)} spam")
    return [ham[i] for i in sample_without_replacement(len(ham), len(spam), seed)] + spam


def random_split(rows, train_frac: float = 0.7, val_frac: float = 0.1, seed: int = SEED):
    """The book's ``random_split``: shuffle all rows (``sample(frac=1, random_state=123)``), then
    the first int(0.7 n) rows train, the next int(0.1 n) validate, the rest test."""
    shuffled = [rows[i] for i in sample_without_replacement(len(rows), len(rows), seed)]
    train_end = int(len(rows) * train_frac)
    val_end = train_end + int(len(rows) * val_frac)
    return shuffled[:train_end], shuffled[train_end:val_end], shuffled[val_end:]


# --------------------------------------------------------------------------------------------
# Tokens
# --------------------------------------------------------------------------------------------
def load_tokenizer(model_dir):
    """GPT-2's byte-level BPE from ``tokenizer.json`` (the `tokenizers` package; no download)."""
    path = Path(model_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {TOKENIZER_FILE} in {model_dir}. {HOW_BY_HAND}")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ImportError("the `tokenizers` package reads GPT-2's tokenizer.json; it comes with transformers: "
                          "pip install -r requirements.txt") from None
    return Tokenizer.from_file(str(path))


def pad_token_id(tokenizer) -> int:
    """The book pads with <|endoftext|> (id 50256 in GPT-2)."""
    pad = tokenizer.token_to_id("<|endoftext|>")
    if pad is None:
        raise ValueError("the tokenizer has no <|endoftext|> token: is it GPT-2's tokenizer.json?")
    return pad


def encode(rows, tokenizer, pad_id: int, max_length: int | None = None):
    """The book's ``SpamDataset``: token ids, cut to ``max_length`` (default: the longest
    message here), padded on the right with ``pad_id``. Returns (ids (N, L), labels (N,), L)."""
    encoded = [tokenizer.encode(text).ids for _, text in rows]
    if max_length is None:
        max_length = max(len(e) for e in encoded)
    ids = [e[:max_length] + [pad_id] * (max_length - len(e[:max_length])) for e in encoded]
    labels = [{"ham": 0, "spam": 1}[label] for label, _ in rows]
    return torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long), max_length


def make_loaders(splits, tokenizer, batch_size: int = 8):
    """Train (shuffled, drop_last), validation and test loaders, as the book builds them."""
    pad = pad_token_id(tokenizer)
    train_ids, train_labels, max_length = encode(splits[0], tokenizer, pad)
    val = encode(splits[1], tokenizer, pad, max_length)
    test = encode(splits[2], tokenizer, pad, max_length)
    torch.manual_seed(SEED)
    train_loader = DataLoader(TensorDataset(train_ids, train_labels), batch_size=batch_size, shuffle=True,
                              drop_last=True)
    val_loader = DataLoader(TensorDataset(val[0], val[1]), batch_size=batch_size)
    test_loader = DataLoader(TensorDataset(test[0], test[1]), batch_size=batch_size)
    return train_loader, val_loader, test_loader, max_length


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def greedy_continuation(model, tokenizer, prompt: str, new_tokens: int = 15) -> str:
    """The book's ``generate_text_simple``: append the most likely next token, ``new_tokens`` times."""
    device = next(model.parameters()).device
    ids = torch.tensor([tokenizer.encode(prompt).ids], device=device)
    for _ in range(new_tokens):
        logits = model(ids[:, -model.cfg.context_length:])[:, -1, :]
        ids = torch.cat([ids, logits.argmax(dim=-1, keepdim=True)], dim=1)
    return tokenizer.decode(ids[0].tolist())


def add_classification_head(model, num_classes: int = 2):
    """Replace the language-model head by Linear(emb_dim, classes), drawn under seed 123 as in the book."""
    torch.manual_seed(SEED)
    model.out_head = nn.Linear(model.cfg.emb_dim, num_classes)
    return model


def add_lora(model, rank: int = 16, alpha: float = 16, a_init: str = "book") -> int:
    """Freeze every weight, then wrap every Linear (the head too) with the course's LoRA, as
    appendix E does. ``a_init="book"`` re-draws each A as the book's LoRALayer does
    (``kaiming_uniform_`` on the (in, r) tensor itself, from the CPU generator, in module order);
    "course" keeps the course's A. Returns the trainable count."""
    if a_init not in ("book", "course"):
        raise ValueError(f"a_init must be 'book' or 'course', got {a_init!r}")
    for p in model.parameters():
        p.requires_grad = False
    # seed=: the course's own draw of A leaves the global generator alone, so that the book's
    # draws below come from exactly where the book's come from.
    replace_linear_with_lora(model, rank=rank, alpha=alpha, seed=0)
    if a_init == "book":
        for module in model.modules():
            if hasattr(module, "lora") and hasattr(module.lora, "A"):
                A = torch.empty(module.lora.A.shape)
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))
                with torch.no_grad():
                    module.lora.A.copy_(A)
    return trainable_parameters(model)


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------
# Training and evaluation, as the book's train_classifier_simple
# --------------------------------------------------------------------------------------------
def _last_token_logits(model, ids, device):
    return model(ids.to(device))[:, -1, :]  # the book reads the last position, padding or not


@torch.no_grad()
def accuracy(model, loader, device, num_batches: int | None = None) -> float:
    model.eval()
    correct = seen = 0
    for i, (ids, labels) in enumerate(loader):
        if num_batches is not None and i >= num_batches:
            break
        predicted = _last_token_logits(model, ids, device).argmax(dim=-1)
        correct += (predicted == labels.to(device)).sum().item()
        seen += len(labels)
    return correct / seen


@torch.no_grad()
def mean_loss(model, loader, device, num_batches: int) -> float:
    losses = []
    for i, (ids, labels) in enumerate(loader):
        if i >= num_batches:
            break
        losses.append(nn.functional.cross_entropy(_last_token_logits(model, ids, device), labels.to(device)).item())
    return sum(losses) / len(losses)


def train(model, train_loader, val_loader, device, epochs: int = 5, lr: float = 8e-4, weight_decay: float = 0.1,
          eval_freq: int = 50, eval_iter: int = 5, log=print):
    """AdamW, ``epochs`` passes over the shuffled training batches; every ``eval_freq`` steps the
    loss on ``eval_iter`` batches, and after each epoch the accuracy on ``eval_iter`` batches."""
    torch.manual_seed(SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    step = -1
    for epoch in range(1, epochs + 1):
        model.train()
        for ids, labels in train_loader:
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(_last_token_logits(model, ids, device), labels.to(device))
            loss.backward()
            optimizer.step()
            step += 1
            if step % eval_freq == 0:
                model.eval()
                train_loss = mean_loss(model, train_loader, device, eval_iter)
                val_loss = mean_loss(model, val_loader, device, eval_iter)
                model.train()
                log(f"Ep {epoch} (Step {step:06d}): Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")
        log(f"Training accuracy: {100 * accuracy(model, train_loader, device, eval_iter):.2f}% | "
            f"Validation accuracy: {100 * accuracy(model, val_loader, device, eval_iter):.2f}%")


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
def _row(what: str, ours, book) -> str:
    def show(v):
        return f"{v:,}" if isinstance(v, int) else f"{v:.2f} %" if isinstance(v, float) else str(v)
    return f"  {what:42s} {show(ours):>16s}   book: {show(book)}"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=HOW_BY_HAND)
    parser.add_argument("--model-dir", type=Path, help=f"folder with {', '.join(MODEL_FILES)} (skips the download)")
    parser.add_argument("--data-file", type=Path, help="the SMS Spam Collection zip or TSV (skips the download)")
    parser.add_argument("--work-dir", type=Path, default=Path("appendix_e_files"),
                        help="where downloads go (default: ./appendix_e_files)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=8e-4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=16)
    parser.add_argument("--a-init", choices=("book", "course"), default="book")
    parser.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cached_model = args.work_dir / "gpt2"
    needs_model = args.model_dir is None and not all((cached_model / name).is_file() for name in MODEL_FILES)
    needs_data = args.data_file is None and not (args.work_dir / DATA_ZIP).is_file()
    needed = [MODEL_URL] * needs_model + [DATA_URL] * needs_data
    if needed:  # a quick check (5 s at most per host) before anything heavy
        failed = unreachable_hosts(needed)
        if failed:
            print(f"Cannot reach {', '.join(failed)}, so nothing was downloaded.\n"
                  f"This script needs GPT-2 124M (about 550 MB) and the SMS Spam Collection (200 kB).\n"
                  f"{HOW_BY_HAND}", file=sys.stderr)
            return 2
    model_dir = args.model_dir or fetch_model_files(cached_model)
    data_file = args.data_file or fetch_data_file(args.work_dir)

    rows = read_sms_collection(data_file)
    ham = sum(label == "ham" for label, _ in rows)
    splits = random_split(balance(rows))
    tokenizer = load_tokenizer(model_dir)
    train_loader, val_loader, test_loader, max_length = make_loaders(splits, tokenizer)
    report = [_row("messages (ham / spam)", f"{len(rows):,} ({ham:,} / {len(rows) - ham:,})",
                   f"{BOOK['messages']:,} ({BOOK['ham']:,} / {BOOK['spam']:,})"),
              _row("train / validation / test", " / ".join(f"{len(s):,}" for s in splits),
                   f"{BOOK['train']:,} / {BOOK['val']:,} / {BOOK['test']:,}"),
              _row("longest training message (tokens)", max_length, BOOK["max_length"]),
              _row("batches of 8", f"{len(train_loader)} / {len(val_loader)} / {len(test_loader)}",
                   f"{BOOK['train_batches']} / {BOOK['val_batches']} / {BOOK['test_batches']}")]
    print("\n".join(["Data"] + report), flush=True)

    device = torch.device(args.device) if args.device else pick_device()
    model = load_gpt2(model_dir)
    sample = greedy_continuation(model, tokenizer, "Every effort moves you")
    print(f"\nGPT-2 check, greedy continuation of 'Every effort moves you':\n{sample}\n"
          f"(the book's: {'the same' if sample == BOOK['sample'] else repr(BOOK['sample'])})", flush=True)

    add_classification_head(model)
    model.to(device)
    torch.manual_seed(SEED)
    before = [100 * accuracy(model, loader, device, 10) for loader in (train_loader, val_loader, test_loader)]
    trainable_before = trainable_parameters(model)
    trainable_lora = add_lora(model, args.rank, args.alpha, args.a_init)
    model.to(device)
    print(f"\nLoRA rank {args.rank}, alpha {args.alpha}, A drawn the {args.a_init}'s way; training on {device}", flush=True)
    start = time.perf_counter()
    train(model, train_loader, val_loader, device, epochs=args.epochs, lr=args.lr)
    minutes = (time.perf_counter() - start) / 60
    after = [100 * accuracy(model, loader, device) for loader in (train_loader, val_loader, test_loader)]

    print("\nResult (this run next to appendix E's printed numbers)")
    print(_row("trainable parameters before freezing", trainable_before, BOOK["trainable_before_freezing"]))
    print(_row("trainable LoRA parameters", trainable_lora, BOOK["trainable_lora"]))
    print(_row("all parameters with LoRA", total_parameters(model), BOOK["total_with_lora"]))
    for name, ours, book in zip(("train", "validation", "test"), before, BOOK["before_accuracy"]):
        print(_row(f"{name} accuracy before training (10 batches)", ours, book))
    for name, ours, book in zip(("train", "validation", "test"), after, BOOK["final_accuracy"]):
        print(_row(f"{name} accuracy after training", ours, book))
    print(f"  training took {minutes:.2f} min on {device} (the book: 2.16 min on an M4 Pro GPU, 12.10 min on an M1 CPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
