"""A small generated language, its tokenizer, the pretraining corpus and two downstream tasks.

Nothing is downloaded: every sentence comes from the grammar below, seeded, so the same seed gives
the same data on every machine. The language is a simple English of text messages and short
reviews with a vocabulary of about 500 words:

- everyday messages between friends ("ham"), which often use words that spam uses too
  ("free", "call", "won", "offer", "reply");
- spam messages, some of which sound friendly ("hi sam , are you free tonight ? ...");
- short reviews whose sentiment depends on word order ("the stew was awful but the staff was so
  fantastic" is positive; "the cake was not fresh" is negative).

Downstream tasks (two classes each): ``"spam"`` (ham = 0, spam = 1) and ``"sentiment"``
(negative = 0, positive = 1). No single word decides either task (``keyword_baseline`` measures
the best one-word rule), so a classifier has to read the message.
"""
from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass

import torch

# ---------------------------------------------------------------------------------------------
# Word lists (slots of the templates)
# ---------------------------------------------------------------------------------------------
W = {
    "name": "sam alex jo maria tom lena omar priya ben chloe dan emma felix grace hugo ivy jack kim "
            "leo mia nina oscar paul rosa sara theo uma victor wendy yusuf zoe ali bea carl dina eli "
            "fay gus hana ian".split(),
    "food": "pizza soup pasta curry salad cake bread noodles rice tacos sushi burgers pie coffee tea "
            "pancakes dumplings fries cookies fruit cheese chips stew waffles soda juice muffins "
            "sandwiches pancake omelette".split(),
    "place": "cafe park library station office gym market beach cinema museum school shop bakery "
             "garden bar hall kitchen square harbour stadium bridge pool theatre studio hotel clinic "
             "campus corner lobby".split(),
    "thing": "bike laptop phone charger umbrella jacket book camera guitar lamp chair desk bag keys "
             "ticket tent map scarf watch printer kettle blanket radio headphones mug plant board "
             "helmet wallet sofa fridge oven mirror table drill ladder speaker".split(),
    "doc": "report notes slides form essay plan list photos invoice contract schedule draft letter "
           "recipe summary".split(),
    "event": "meeting party game class concert dinner trip match lecture wedding picnic rehearsal "
             "interview exam festival workshop quiz barbecue launch reunion".split(),
    "time": "tonight tomorrow today later soon now friday monday saturday sunday morning evening "
            "afternoon weekend noon midnight tuesday wednesday thursday early".split(),
    "pos": "great lovely tasty amazing nice perfect fantastic excellent wonderful brilliant superb "
           "delightful pleasant fresh friendly helpful charming cosy clean quick fun smooth calm "
           "beautiful cheerful".split(),
    "neg": "awful terrible bland boring rude slow dirty cold stale noisy broken horrible dull "
           "greasy soggy messy grim cramped burnt late weak sour pricey gloomy shabby".split(),
    "game": "quiz race match tournament raffle contest lottery draw".split(),
    "award": "medal trophy prize certificate ribbon scholarship".split(),
    "prize": "holiday cruise car iphone laptop voucher tablet television scooter watch cash jackpot "
             "gift card vacation".split(),
    "account": "account card subscription parcel mailbox profile wallet loan".split(),
    "secret": "password pin bank details code login address".split(),
    "money": "pounds dollars euros".split(),
    "amount": "fifty hundred thousand five ten twenty two three".split(),
    "keyword": "yes win stop claim go offer prize now".split(),
    "number": "eight nine six seven four one zero".split(),
    "percent": "half fifty seventy ninety thirty".split(),
    "very": "very really quite so rather truly".split(),
    "greeting": "hi hey hello dear ok".split(),
    "closing": "thanks cheers bye xx later love".split(),
}

# Templates: {slot} is filled from W; "{pos|neg}" picks by the review's label (see _review).
HAM = [
    "{name} are you free {time} ? we could get {food} at the {place}",
    "call me when you get to the {place} , i have your {thing}",
    "did you win the {game} {time} ? {name} said it was {pos}",
    "there is free {food} at the {place} {time} if you want some",
    "i got a {pos} {thing} for {name} , do you think they will like it ?",
    "can you send me the {doc} before the {event} {time} ?",
    "thanks for the {food} , it was {very} {pos}",
    "the {event} is moved to {time} , please tell {name}",
    "my {thing} is broken again , can i borrow yours {time} ?",
    "{name} won a {award} at school {time} , we are so proud",
    "reply when you can , no rush . the {doc} can wait until {time}",
    "{name} offered to bring {food} to the {event} , so we are fine",
    "i left my {thing} at the {place} , can you check {time} ?",
    "the {place} has a {pos} offer on {food} {time} , want to go ?",
    "claim your seat early for the {event} , it gets busy at the {place}",
    "are we still on for {food} {time} ? text me when you leave",
    "i will call you {time} about the {doc} for the {event}",
    "your {thing} is ready at the {place} , the repair was free",
    "i got a text saying i won a {prize} , it is a scam right ?",
    "do not reply to that message about the {prize} , it is fake",
    "the bank called about my {account} , can you remind me {time} ?",
    "{name} lost the {secret} for the {place} wifi again , can you send it ?",
    "we still owe {name} {amount} {money} for the {food} , i will pay {time}",
]
SPAM = [
    "congratulations you have won a {prize} ! call {number} {number} now to claim your reward",
    "urgent : your {account} is locked . reply with your {secret} to unlock it {time}",
    "free {prize} for the first {amount} customers . text {keyword} to {number} {number}",
    "you are a winner ! claim your {amount} {money} bonus {time} only",
    "{name} , your {thing} order is waiting . confirm your {secret} at the link to avoid a fee",
    "limited offer : {percent} off every {thing} {time} . call {number} {number} now",
    "dear customer , we tried to reach you about your {amount} {money} refund . reply {keyword}",
    "are you free {time} ? i found a way to earn {amount} {money} a week from home",
    "your {doc} for the {event} is ready , send your {secret} to receive it",
    "you have been selected for a {pos} {prize} . text {keyword} to claim before {time}",
    "final notice : your {account} will close {time} unless you confirm your {secret}",
    "{name} sent you a {prize} ! open the link and enter your {secret} to accept",
    "your {account} has a pending payment of {amount} {money} . reply {keyword} to stop it",
    "we have a {pos} deal for you : a {prize} for just {amount} {money} , call now",
    "your {thing} is ready at the {place} , pay the {amount} {money} fee at the link",
    "call {number} {number} when you get this , we have your {prize}",
    "{name} , you won a {prize} {time} , reply {keyword} to claim it",
    "we will call you {time} about your {amount} {money} refund , keep your {secret} ready",
    "are you still looking for {thing} deals ? text {keyword} to {number} {number}",
]
# Reviews: the label decides which adjective slot is positive; order and "not" matter.
REVIEW = [
    "the {food} at the {place} was {very} {L}",
    "i think the {thing} is {very} {L}",
    "the {food} was {O} but the staff was {very} {L}",
    "the {event} was {O} , but the {food} was {L}",
    "the {food} was not {O}",
    "i would not say the {thing} is {O}",
    "{name} said the {place} was {O} , but i found it {very} {L}",
    "not {O} at all , the {event} was {very} {L}",
    "at first the {thing} seemed {O} , now it feels {L}",
    "the {place} is never {O} and always {L}",
    "{name} thought the {food} was {L} , and i agree",
    "{name} thought the {food} was {O} , but i did not agree",
    "i expected the {event} to be {O} but it was not",
    "i expected the {event} to be {L} and it was",
    "the {thing} looks {O} , but it works and feels {L}",
]


def _fill(template: str, rng: random.Random, **fixed: str) -> str:
    def pick(m):
        slot = m.group(1)
        return fixed[slot] if slot in fixed else rng.choice(W[slot])
    return re.sub(r"\{(\w+)\}", pick, template)


def _decorate(text: str, rng: random.Random) -> str:
    """Optional greeting and closing, so that templates do not all start and end alike."""
    if rng.random() < 0.3:
        text = f"{rng.choice(W['greeting'])} {rng.choice(W['name'])} , {text}"
    if rng.random() < 0.3:
        text = f"{text} . {rng.choice(W['closing'])}"
    return text


def _review(label: int, rng: random.Random) -> str:
    template = rng.choice(REVIEW)
    good, bad = rng.choice(W["pos"]), rng.choice(W["neg"])
    # {L} carries the label's sentiment, {O} the opposite one; for "not {O}" the negation flips
    # the opposite word into the label's direction ("not bland" -> positive).
    lab, opp = (good, bad) if label == 1 else (bad, good)
    return _fill(template, rng, L=lab, O=opp)


def make_message(kind: str, rng: random.Random) -> str:
    """One generated sentence of a kind: 'ham', 'spam', 'positive' or 'negative'."""
    if kind == "ham":
        return _decorate(_fill(rng.choice(HAM), rng), rng)
    if kind == "spam":
        return _decorate(_fill(rng.choice(SPAM), rng), rng)
    if kind in ("positive", "negative"):
        return _review(int(kind == "positive"), rng)
    raise ValueError(f"unknown kind {kind!r}: use 'ham', 'spam', 'positive' or 'negative'")


# ---------------------------------------------------------------------------------------------
# Tokenizer: one token per word or punctuation mark
# ---------------------------------------------------------------------------------------------
PAD, UNK, EOS = "<pad>", "<unk>", "<eos>"


def _words(text: str) -> list[str]:
    return text.lower().split()


class Tokenizer:
    """Word-level tokenizer over the generated language. Unknown words map to <unk>."""

    def __init__(self):
        words = set()
        for template in HAM + SPAM + REVIEW:
            words.update(w for w in _words(template) if not w.startswith("{"))
        for options in W.values():
            words.update(options)
        self.itos = [PAD, UNK, EOS] + sorted(words)
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.pad_id, self.unk_id, self.eos_id = 0, 1, 2

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        return [self.stoi.get(w, self.unk_id) for w in _words(text)]

    def decode(self, ids) -> str:
        return " ".join(self.itos[int(i)] for i in ids if int(i) != self.pad_id)


TOKENIZER = Tokenizer()
CONTEXT_LENGTH = 24  # the longest generated message plus <eos> fits; checked in tests


# ---------------------------------------------------------------------------------------------
# Pretraining corpus and classification tasks
# ---------------------------------------------------------------------------------------------
TASKS = {"spam": ("ham", "spam"), "sentiment": ("negative", "positive")}
#: The task of the course's main experiments (notebooks 04-06 and beyond).
MAIN_TASK = "sentiment"


def num_classes(task: str) -> int:
    """How many classes a task has (the size of the classification head it needs)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: choose one of {sorted(TASKS)}")
    return len(TASKS[task])


def _unique(kinds, n: int, seed: int) -> list[tuple[str, int]]:
    """n distinct (text, class index) pairs, classes balanced, in a seeded random order."""
    rng = random.Random(seed)
    seen, out = set(), []
    while len(out) < n:
        label = len(out) % len(kinds)
        text = make_message(kinds[label], rng)
        if text not in seen:
            seen.add(text)
            out.append((text, label))
    rng.shuffle(out)
    return out


def pretraining_texts(n: int = 40_000, seed: int = 0) -> list[str]:
    """The pretraining corpus: n distinct sentences of every kind (messages and reviews)."""
    return [t for t, _ in _unique(("ham", "spam", "positive", "negative"), n, seed)]


@dataclass
class Split:
    texts: list[str]
    labels: torch.Tensor  # (N,) class indices


def classification_splits(task: str = "spam", n_train: int = 2000, n_val: int = 500, n_test: int = 500,
                          seed: int = 1) -> dict[str, Split]:
    """Train / validation / test splits of a task, balanced, with no sentence in two splits."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: choose one of {sorted(TASKS)}")
    rows = _unique(TASKS[task], n_train + n_val + n_test, seed=hash_seed(task, seed))
    cuts = {"train": rows[:n_train], "val": rows[n_train:n_train + n_val], "test": rows[n_train + n_val:]}
    return {k: Split([t for t, _ in v], torch.tensor([y for _, y in v])) for k, v in cuts.items()}


def hash_seed(task: str, seed: int) -> int:
    """A stable per-task seed (Python's hash() of a str changes between runs)."""
    return seed * 1000 + sum(ord(c) for c in task)


def encode_batch(texts: list[str], length: int = CONTEXT_LENGTH, add_eos: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token ids (N, length) and the number of real tokens per row (N,)."""
    ids = torch.full((len(texts), length), TOKENIZER.pad_id, dtype=torch.long)
    lengths = torch.empty(len(texts), dtype=torch.long)
    for row, text in enumerate(texts):
        tokens = TOKENIZER.encode(text) + ([TOKENIZER.eos_id] if add_eos else [])
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


def keyword_baseline(texts: list[str], labels) -> tuple[float, str]:
    """Accuracy of the best one-word rule ("class c if word w is present, else the other") and
    its word. A task that one keyword solves is not worth fine-tuning for."""
    labels = [int(y) for y in labels]
    present = [set(_words(t)) for t in texts]
    best, best_word = 0.0, ""
    for word in set().union(*present):
        hits = sum((word in p) == bool(y) for p, y in zip(present, labels))
        acc = max(hits, len(labels) - hits) / len(labels)
        if acc > best:
            best, best_word = acc, word
    return best, best_word


def vocabulary_stats(texts: list[str]) -> dict[str, int]:
    counts = Counter(w for t in texts for w in _words(t))
    return {"sentences": len(texts), "distinct_sentences": len(set(texts)), "distinct_words": len(counts)}
