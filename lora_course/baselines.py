"""Baselines that need no neural network: what a task gives away to a shortcut.

A fine-tuning result only means something next to the strongest simple method:

- ``majority_class``: always answer the most frequent training class.
- ``keyword_rule``: the best one-word rule, "if word w occurs answer class a, else class b",
  chosen on the training split. A task that one keyword solves is not worth fine-tuning for.
- ``bag_of_ngrams``: multinomial logistic regression on which words and word pairs (unigrams
  and bigrams) occur, with its L2 penalty chosen on the validation split. It sees every word
  and every neighbouring pair, but not which verdict belongs to which noun further away.

Each returns a ``BaselineResult`` with accuracies on the splits it was given.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from .data import Split, _words


@dataclass
class BaselineResult:
    name: str
    accuracy: dict[str, float]           # split name -> accuracy
    detail: dict = field(default_factory=dict)


def _labels(split: Split) -> list[int]:
    return [int(y) for y in split.labels]


def _check_splits(splits: dict) -> None:
    if "train" not in splits:
        raise ValueError("baselines are fitted on splits['train']: pass the dict of classification_splits")
    for name, split in splits.items():
        if len(split.texts) != len(split.labels) or not len(split.texts):
            raise ValueError(f"split {name!r} has {len(split.texts)} texts and {len(split.labels)} labels")


def majority_class(splits: dict[str, Split]) -> BaselineResult:
    _check_splits(splits)
    top = Counter(_labels(splits["train"])).most_common(1)[0][0]
    acc = {name: sum(y == top for y in _labels(s)) / len(s.texts) for name, s in splits.items()}
    return BaselineResult("majority class", acc, {"class": top})


def keyword_rule(splits: dict[str, Split]) -> BaselineResult:
    """The best rule "if ``word`` occurs answer ``if_present``, else ``if_absent``" on the
    training split, scored on every split."""
    _check_splits(splits)
    train = splits["train"]
    present = [set(_words(t)) for t in train.texts]
    labels = _labels(train)
    classes = sorted(set(labels))
    best = (-1, "", 0, 0)
    for word in sorted(set().union(*present)):
        hit = [y for p, y in zip(present, labels) if word in p]
        miss = [y for p, y in zip(present, labels) if word not in p]
        a = Counter(hit).most_common(1)[0][0] if hit else classes[0]
        b = Counter(miss).most_common(1)[0][0] if miss else classes[0]
        correct = hit.count(a) + miss.count(b)
        if correct > best[0]:
            best = (correct, word, a, b)
    _, word, a, b = best

    def accuracy(split):
        return sum((a if word in set(_words(t)) else b) == y
                   for t, y in zip(split.texts, _labels(split))) / len(split.texts)

    return BaselineResult("best one-word rule", {n: accuracy(s) for n, s in splits.items()},
                          {"word": word, "if_present": a, "if_absent": b})


def _ngrams(text: str, n: int) -> set[str]:
    words = _words(text)
    grams = set(words)
    for k in range(2, n + 1):
        grams |= {" ".join(words[i:i + k]) for i in range(len(words) - k + 1)}
    return grams


def _features(texts: list[str], index: dict[str, int], n: int) -> torch.Tensor:
    x = torch.zeros(len(texts), len(index))
    for row, text in enumerate(texts):
        cols = [index[g] for g in _ngrams(text, n) if g in index]
        x[row, cols] = 1.0
    return x


def bag_of_ngrams(splits: dict[str, Split], n: int = 2, penalties=(1e-4, 1e-3, 1e-2),
                  max_iter: int = 200) -> BaselineResult:
    """Logistic regression on n-gram presence (unigrams and bigrams for n = 2), trained to
    convergence with L-BFGS for each L2 ``penalty``; the one with the best validation accuracy
    is kept (``splits`` needs "train" and "val")."""
    _check_splits(splits)
    if "val" not in splits:
        raise ValueError("bag_of_ngrams chooses its penalty on splits['val']")
    grams = sorted(set().union(*(_ngrams(t, n) for t in splits["train"].texts)))
    index = {g: i for i, g in enumerate(grams)}
    x = {name: _features(s.texts, index, n) for name, s in splits.items()}
    y = {name: s.labels.long() for name, s in splits.items()}
    classes = int(max(int(s.labels.max()) for s in splits.values())) + 1
    best = None
    for penalty in penalties:
        weight = torch.zeros(len(index), classes, requires_grad=True)
        bias = torch.zeros(classes, requires_grad=True)
        optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = F.cross_entropy(x["train"] @ weight + bias, y["train"]) + penalty * weight.pow(2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        with torch.no_grad():
            acc = {name: ((x[name] @ weight + bias).argmax(-1) == y[name]).float().mean().item() for name in x}
        if best is None or acc["val"] > best[0]["val"]:
            best = (acc, penalty)
    return BaselineResult(f"bag of {'words' if n == 1 else f'1..{n}-grams'} + logistic regression", best[0],
                          {"penalty": best[1], "features": len(index)})
