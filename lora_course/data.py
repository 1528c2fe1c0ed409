"""The course's data: a word tokenizer, the pretraining corpus and the two classification tasks.

Everything comes from the generated language of ``language.py`` (seeded; nothing downloaded):

- ``"aspect"`` (the main task, 6 classes): which aspect of an evening out does a review praise?
  Two aspects are judged, exactly one favourably. Counting words cannot answer it:
  every review holds the same mix of praising and criticising words, and the model must bind
  each verdict to its noun, across "not", "could have been better", "i expected ... , but it
  was ...", "sam said ... , but i disagree" and relative clauses.
- ``"spam"`` (2 classes): is a text message spam? Appendix E's task, kept as the reference. It
  is easy, as the SMS Spam Collection is (the book reaches 96.67 % with GPT-2).

**Held out, not just unseen.** A *skeleton* is a sentence's composition with its open words
removed: for a review the aspects and clause forms in order (("food", "negated"), ("view",
"reported")), for a message its template. Skeletons are assigned to train, validation or test by
a stable hash, so every validation and test sentence has a composition that no training sentence
has, and the pretraining corpus holds neither validation nor test skeletons. No sentence occurs
in two places (tests/test_language.py checks all of this).
"""
from __future__ import annotations

import hashlib
import random
from collections import Counter
from dataclasses import dataclass

import torch

from . import language
from .errors import ArgumentTypeError, check_bool, check_int
from .language import Sentence

# ---------------------------------------------------------------------------------------------
# Tokenizer: one token per word or punctuation mark
# ---------------------------------------------------------------------------------------------
PAD, UNK, EOS = "<pad>", "<unk>", "<eos>"


def _words(text: str) -> list[str]:
    return text.lower().split()


class Tokenizer:
    """Word-level tokenizer over the generated language. Unknown words map to <unk>."""

    def __init__(self, words):
        self.itos = [PAD, UNK, EOS] + sorted(set(words))
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.pad_id, self.unk_id, self.eos_id = 0, 1, 2

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode takes one text (a str), got {type(text).__name__}")
        return [self.stoi.get(w, self.unk_id) for w in _words(text)]

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < len(self.itos)]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (ids 0..{len(self.itos) - 1})")
        return " ".join(self.itos[i] for i in ids if i != self.pad_id)


TOKENIZER = Tokenizer(language.vocabulary())
#: Positions the model has. A review or message has at most 31 tokens; pretraining documents of
#: one to three sentences use all 48, so that prompts with a response (notebook 11) stay inside
#: positions the base model was trained on.
CONTEXT_LENGTH = 48

# ---------------------------------------------------------------------------------------------
# Tasks and held-out compositions
# ---------------------------------------------------------------------------------------------
TASKS = {"aspect": language.ASPECT_NAMES, "spam": ("ham", "spam")}
#: The task of the course's main experiments (notebooks 05-07 and beyond).
MAIN_TASK = "aspect"
SPLIT_NAMES = ("train", "val", "test")
ASPECTS_PER_REVIEW = 2


def num_classes(task: str) -> int:
    """How many classes a task has (the size of the classification head it needs)."""
    _check_task(task)
    return len(TASKS[task])


def _check_task(task) -> None:
    if not isinstance(task, str):
        raise ArgumentTypeError(f"task must be a task name (a str such as {MAIN_TASK!r}), got {type(task).__name__}")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: choose one of {sorted(TASKS)}")


def skeleton_split(skeleton: tuple) -> str:
    """'train', 'val' or 'test' for a composition, by a stable hash (SHA-256, the same on every
    machine; Python's hash() of a str changes between runs, and CRC-32 is linear, which would
    hold out whole families of similar compositions): 1 in 8 compositions is held out for
    validation and 1 in 8 for testing."""
    bucket = int.from_bytes(hashlib.sha256(repr(skeleton).encode()).digest()[:8], "little") % 8
    return "test" if bucket == 0 else "val" if bucket == 1 else "train"


def task_sentence(task: str, label: int, rng: random.Random) -> Sentence:
    """One sentence of ``task`` with class ``label``."""
    _check_task(task)
    label = check_int(label, "label", minimum=0)
    if label >= num_classes(task):
        raise ValueError(f"label {label} is not a class of {task!r} (0..{num_classes(task) - 1})")
    if not isinstance(rng, random.Random):
        raise ArgumentTypeError(f"rng must be a random.Random, got {type(rng).__name__}")
    if task == "aspect":
        aspects = rng.sample(language.ASPECT_NAMES, ASPECTS_PER_REVIEW)
        if language.ASPECT_NAMES[label] not in aspects:
            aspects[rng.randrange(len(aspects))] = language.ASPECT_NAMES[label]
        return language.review(rng, aspects, [a == language.ASPECT_NAMES[label] for a in aspects])
    if task == "spam":
        return language.message(rng, ("ham", "spam")[label])
    _check_task(task)


def label_of(task: str, sentence: Sentence) -> int:
    """The class of a sentence under a task, read from its meaning."""
    _check_task(task)
    if not isinstance(sentence, Sentence):
        raise ArgumentTypeError(f"label_of takes a language.Sentence, got {type(sentence).__name__}")
    if task == "aspect":
        praised = [a for a, good in sentence.meaning if good]
        return language.ASPECT_NAMES.index(praised[0])
    return int(dict(sentence.meaning)["spam"])


@dataclass
class Split:
    texts: list[str]
    labels: torch.Tensor  # (N,) class indices

    def __post_init__(self):
        self.texts = _check_texts(self.texts)
        if not isinstance(self.labels, torch.Tensor) or self.labels.ndim != 1 or self.labels.is_floating_point():
            raise ArgumentTypeError("labels must be a 1-D integer tensor with one class index per text")
        if len(self.labels) != len(self.texts):
            raise ValueError(f"{len(self.texts)} texts but {len(self.labels)} labels: give one label per text")

    def __len__(self) -> int:
        return len(self.texts)


SPLIT_SIZES = {"aspect": (3000, 600, 1200), "spam": (2000, 500, 500)}


def classification_splits(task: str = MAIN_TASK, n_train: int | None = None, n_val: int | None = None,
                          n_test: int | None = None, seed: int = 1) -> dict[str, Split]:
    """Train / validation / test splits of a task: classes balanced, held-out compositions (see
    the module docstring), no sentence twice, none from the pretraining corpus."""
    _check_task(task)
    sizes = dict(zip(SPLIT_NAMES, SPLIT_SIZES[task]))
    for name, n in zip(SPLIT_NAMES, (n_train, n_val, n_test)):
        if n is not None:
            sizes[name] = check_int(n, f"n_{name}", minimum=num_classes(task), hint="at least one text per class")
    if sum(sizes.values()) > 100_000:
        raise ValueError(f"{sum(sizes.values())} texts asked for: the splits are capped at 100,000 texts in all")
    rng = random.Random(stable_seed(task, check_int(seed, "seed", minimum=0)))
    taken = sentence_runs(pretraining_texts())
    rows = {name: [] for name in SPLIT_NAMES}
    k = num_classes(task)
    attempts = 0
    while any(len(rows[s]) < sizes[s] for s in SPLIT_NAMES):
        attempts += 1
        if attempts > 100 * sum(sizes.values()):
            raise ValueError(f"the grammar cannot supply {sizes} distinct sentences of {task!r}: ask for fewer")
        # Cycle through the classes; a sentence goes to the split its composition belongs to,
        # if that split still needs this class.
        label = sum(len(r) for r in rows.values()) % k
        sentence = task_sentence(task, label, rng)
        split = skeleton_split(sentence.skeleton)
        per_class = sizes[split] // k + (label < sizes[split] % k)
        if sentence.text in taken or sum(y == label for _, y in rows[split]) >= per_class:
            continue
        taken.add(sentence.text)
        rows[split].append((sentence.text, label))
    out = {}
    for name in SPLIT_NAMES:
        rng.shuffle(rows[name])
        out[name] = Split([t for t, _ in rows[name]], torch.tensor([y for _, y in rows[name]]))
    return out


def stable_seed(task: str, seed: int) -> int:
    """A stable per-task seed (Python's hash() of a str changes between runs)."""
    _check_task(task)
    return check_int(seed, "seed", minimum=0) * 1000 + sum(ord(c) for c in task)


# ---------------------------------------------------------------------------------------------
# Pretraining corpus
# ---------------------------------------------------------------------------------------------
def pretraining_sentence(rng: random.Random) -> Sentence:
    """A sentence for the pretraining corpus: a review (half the time) or a message, never one
    whose composition is held out for validation or testing."""
    while True:
        if rng.random() < 0.5:
            sentence = language.any_review(rng)
        else:
            sentence = language.message(rng, rng.choice(("ham", "spam")))
        if skeleton_split(sentence.skeleton) == "train":
            return sentence


def sentence_runs(documents) -> set[str]:
    """Every run of consecutive whole sentences of every document ("a . b ." gives "a .", "b ."
    and "a . b ."). A task sentence found here occurs in the pretraining corpus, even inside a
    longer document, and is never used for a task."""
    runs = set()
    for doc in documents:
        words, sentences, start = doc.split(), [], 0
        for i, word in enumerate(words):
            if word in (".", "?", "!") and (i + 1 == len(words) or words[i + 1] not in (".", "?", "!")):
                sentences.append(" ".join(words[start:i + 1]))
                start = i + 1
        for i in range(len(sentences)):
            for j in range(i + 1, len(sentences) + 1):
                runs.add(" ".join(sentences[i:j]))
    return runs


_CORPUS_CACHE: dict[tuple[int, int], list[str]] = {}


def pretraining_texts(n: int = 24_000, seed: int = 0) -> list[str]:
    """The pretraining corpus: n distinct documents of one to three sentences (at most
    CONTEXT_LENGTH - 1 tokens, so that <eos> fits). No labels: the base model learns the
    language, never the tasks."""
    n = check_int(n, "n", minimum=1)
    if n > 200_000:
        raise ValueError(f"n={n} documents asked for: the corpus generator is capped at 200,000")
    key = (n, check_int(seed, "seed", minimum=0))
    if key not in _CORPUS_CACHE:
        rng = random.Random(seed)
        seen, docs, attempts = set(), [], 0
        while len(docs) < n:
            parts, length = [], 0
            for _ in range(rng.choice((1, 2, 2, 3))):
                text = pretraining_sentence(rng).text
                if length + len(text.split()) > CONTEXT_LENGTH - 1:
                    break
                parts.append(text)
                length += len(text.split())
            doc = " ".join(parts)
            attempts += 1
            if attempts > 50 * n:
                raise ValueError(f"the grammar cannot supply {n} distinct documents: ask for fewer")
            if doc and doc not in seen:
                seen.add(doc)
                docs.append(doc)
        _CORPUS_CACHE[key] = docs
    return list(_CORPUS_CACHE[key])


# ---------------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------------
def _check_texts(texts) -> list[str]:
    if isinstance(texts, str):
        raise ArgumentTypeError("expected a list of texts, got one str (wrap it in a list: [text])")
    try:
        texts = list(texts)
    except TypeError:
        raise ArgumentTypeError(f"expected a list of texts, got {type(texts).__name__}") from None
    bad = next((t for t in texts if not isinstance(t, str)), None)
    if bad is not None:
        raise ArgumentTypeError(f"every text must be a str, got {bad!r} ({type(bad).__name__})")
    return texts


def encode_batch(texts: list[str], length: int = CONTEXT_LENGTH, add_eos: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token ids (N, length) and the number of real tokens per row (N,)."""
    texts = _check_texts(texts)
    length = check_int(length, "length", minimum=1)
    add_eos = check_bool(add_eos, "add_eos")
    ids = torch.full((len(texts), length), TOKENIZER.pad_id, dtype=torch.long)
    lengths = torch.empty(len(texts), dtype=torch.long)
    for row, text in enumerate(texts):
        tokens = TOKENIZER.encode(text) + ([TOKENIZER.eos_id] if add_eos else [])
        if not tokens:
            raise ValueError(f"text {row} is empty: every text needs at least one word")
        if len(tokens) > length:
            raise ValueError(f"{len(tokens)} tokens do not fit in {length}: {text!r}")
        ids[row, :len(tokens)] = torch.tensor(tokens)
        lengths[row] = len(tokens)
    return ids, lengths


def lm_batch(texts: list[str], length: int = CONTEXT_LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (N, length) and next-token targets (N, length) for language modelling; padding
    positions get target -100 so the loss ignores them."""
    ids, lengths = encode_batch(texts, length + 1, add_eos=True)
    inputs, targets = ids[:, :-1].clone(), ids[:, 1:].clone()
    targets[torch.arange(length + 1)[1:].expand_as(targets) >= lengths[:, None]] = -100
    return inputs, targets


def vocabulary_stats(texts: list[str]) -> dict[str, int]:
    texts = _check_texts(texts)
    counts = Counter(w for t in texts for w in _words(t))
    return {"sentences": len(texts), "distinct_sentences": len(set(texts)), "distinct_words": len(counts)}
