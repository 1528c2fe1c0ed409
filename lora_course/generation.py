"""LoRA for generation: teach the pretrained tiny GPT a new skill as prompt -> response.

Everything else in the course trains a classifier on top of the GPT. Here the GPT keeps its
language-model head (``out_head``, D -> V) and learns to *write* an answer after a prompt:

    prompt:    the soup was not bad , but i hated the wine . what was the best part ?
    response:  the soup . <eos>

Two skills, both on two-aspect reviews (exactly one aspect praised) of the course's language:

- ``"best"``: after "... what was the best part ?" answer with the praised noun ("the soup .");
- ``"plain"``: after "... in short ," rewrite the review in plain words, one verdict per noun,
  in the order mentioned ("the soup was good , but the wine was bad ."; "were" for plurals).

and one on text messages, for a second adapter: ``"scam"``: after "... is it a scam ?" answer
"yes ." or "no ." (the spam task of appendix E, written out instead of classified).

Both responses are a function of the review's meaning and nouns (deterministic), and both
separators are words the vocabulary already has: "what was the best part ?" ends ham messages
("what was the best part of your day ?") and "in short ," opens ham news ("in short , the
party was fun ."), so the base model continues them fluently, but with the wrong text: it has
never seen the skill.

**Held out.** Reviews are assigned to train / validation / test by their skeleton
(``data.skeleton_split``): test prompts have compositions (aspects and clause forms in order)
that no training prompt has, and the pretraining corpus holds only training skeletons, so no
validation or test review occurs in pretraining; training reviews found in the pretraining
corpus are skipped as well. No review occurs twice.

**The loss** is the next-token cross-entropy on the response tokens only: prompt and padding
positions get target -100 (``ignore_index``), so the gradient is spent on the skill, not on
re-learning to predict the prompt, which the base model already does as well as it can.

Shapes: N = examples, T = tokens (prompt + response, <= CONTEXT_LENGTH), V = vocabulary (330).
"""
from __future__ import annotations

import copy
import random
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from . import data, language
from .errors import ArgumentTypeError, check_bool, check_int, check_number
from .experiments import TARGETS
from .lora import mark_only_lora_as_trainable, replace_linear_with_lora

IGNORE_INDEX = -100
#: The text that ends every prompt of a skill (words the vocabulary has, see the docstring).
SEPARATORS = {"best": "what was the best part ?", "plain": "in short ,", "scam": "is it a scam ?"}
SKILLS = tuple(SEPARATORS)
#: Clause forms of the reviews: the four short ones (every clause names its noun once).
FORMS = language.SHORT_FORMS
SPLIT_SIZES = (2000, 200, 300)


@dataclass(frozen=True)
class Example:
    """One prompt -> response pair (both plain text; the response ends with <eos> when encoded)."""

    prompt: str
    response: str


def _check_skill(skill) -> str:
    if not isinstance(skill, str):
        raise ArgumentTypeError(f"skill must be a skill name (a str such as 'best'), got {type(skill).__name__}")
    if skill not in SEPARATORS:
        raise ValueError(f"unknown skill {skill!r}: choose one of {list(SKILLS)}")
    return skill


def nouns_of(sentence: language.Sentence) -> list[str]:
    """The noun of each judged aspect, in the order mentioned ("soup", "wine")."""
    words = sentence.text.split()
    found = []
    for aspect, _ in sentence.meaning:
        names = {n.word for n in language.ASPECTS[aspect]}
        mine = [w for w in words if w in names]
        if not mine or len(set(mine)) != 1:
            raise ValueError(f"cannot find one noun of {aspect!r} in {sentence.text!r}")
        found.append(mine[0])
    return found


def response_for(skill: str, sentence: language.Sentence) -> str:
    """The response of ``skill`` to a review: deterministic, from its meaning and nouns."""
    skill = _check_skill(skill)
    if not isinstance(sentence, language.Sentence):
        raise ArgumentTypeError(f"response_for takes a language.Sentence, got {type(sentence).__name__}")
    nouns = nouns_of(sentence)
    if skill == "best":
        praised = [n for n, (_, good) in zip(nouns, sentence.meaning) if good]
        if len(praised) != 1:
            raise ValueError(f"'best' needs a review that praises exactly one aspect: {sentence.text!r}")
        return f"the {praised[0]} ."
    plural = {n.word: n.plural for nouns_ in language.ASPECTS.values() for n in nouns_}
    clauses = [f"the {n} {'were' if plural[n] else 'was'} {'good' if good else 'bad'}"
               for n, (_, good) in zip(nouns, sentence.meaning)]
    out = clauses[0]
    for prev, (clause, (_, good)) in zip(sentence.meaning, zip(clauses[1:], sentence.meaning[1:])):
        out += f" , {'and' if prev[1] == good else 'but'} {clause}"
    return out + " ."


def example_for(skill: str, sentence: language.Sentence) -> Example:
    return Example(f"{sentence.text} {SEPARATORS[_check_skill(skill)]}", response_for(skill, sentence))


def review_for_skills(rng: random.Random) -> language.Sentence:
    """A review of two aspects in short clause forms, exactly one of them praised."""
    aspects = rng.sample(language.ASPECT_NAMES, 2)
    praised = rng.randrange(2)
    forms = [rng.choice(FORMS) for _ in aspects]
    return language.review(rng, aspects, [i == praised for i in range(2)], forms)


_SPLIT_CACHE: dict = {}


def review_splits(sizes=SPLIT_SIZES, seed: int = 0) -> dict[str, list[language.Sentence]]:
    """Train / val / test reviews for the skills: held-out skeletons, none in the pretraining
    corpus, none twice (see the module docstring). Deterministic for a given seed."""
    sizes = tuple(check_int(n, "split size", minimum=1) for n in sizes)
    if len(sizes) != 3:
        raise ValueError(f"give three split sizes (train, val, test), got {sizes}")
    key = (sizes, check_int(seed, "seed", minimum=0))
    if key not in _SPLIT_CACHE:
        rng = random.Random(10_000 + seed)
        taken = data.sentence_runs(data.pretraining_texts())
        rows = {name: [] for name in data.SPLIT_NAMES}
        want = dict(zip(data.SPLIT_NAMES, sizes))
        attempts = 0
        while any(len(rows[s]) < want[s] for s in data.SPLIT_NAMES):
            attempts += 1
            if attempts > 200 * sum(sizes):
                raise ValueError(f"the grammar cannot supply {want} distinct reviews: ask for fewer")
            sentence = review_for_skills(rng)
            split = data.skeleton_split(sentence.skeleton)
            if sentence.text in taken or len(rows[split]) >= want[split]:
                continue
            taken.add(sentence.text)
            rows[split].append(sentence)
        _SPLIT_CACHE[key] = rows
    return {k: list(v) for k, v in _SPLIT_CACHE[key].items()}


def skill_splits(skill: str, sizes=SPLIT_SIZES, seed: int = 0) -> dict[str, list[Example]]:
    """The prompt -> response pairs of ``skill``: for "best" and "plain" on ``review_splits``
    (the same reviews for both); for "scam" on the messages of ``data.classification_splits
    ("spam")`` (held out the same way), answered "yes ." or "no ."."""
    skill = _check_skill(skill)
    if skill == "scam":
        sizes = tuple(check_int(n, "split size", minimum=2) for n in sizes)
        splits = data.classification_splits("spam", *sizes, seed=1 + check_int(seed, "seed", minimum=0))
        return {k: [Example(f"{t} {SEPARATORS['scam']}", "yes ." if y else "no .")
                    for t, y in zip(v.texts, v.labels.tolist())] for k, v in splits.items()}
    return {k: [example_for(skill, s) for s in v] for k, v in review_splits(sizes, seed).items()}


# ---------------------------------------------------------------------------------------------
# Tensors: prompt masked with -100
# ---------------------------------------------------------------------------------------------
def _check_examples(examples) -> list[Example]:
    if isinstance(examples, Example):
        raise ArgumentTypeError("expected a list of Example, got one Example (wrap it in a list: [example])")
    try:
        examples = list(examples)
    except TypeError:
        raise ArgumentTypeError(f"expected a list of Example, got {type(examples).__name__}") from None
    if not examples:
        raise ValueError("no examples: give at least one Example(prompt, response)")
    bad = next((e for e in examples if not isinstance(e, Example)), None)
    if bad is not None:
        raise ArgumentTypeError(f"every item must be an Example(prompt, response), got {type(bad).__name__}")
    return examples


def encode_examples(examples, length: int = data.CONTEXT_LENGTH, mask_prompt: bool = True):
    """Inputs (N, T) and next-token targets (N, T) for prompt -> response training.

    Row i holds the tokens of prompt + response + <eos>, right-padded. Position t predicts
    token t + 1; targets are IGNORE_INDEX (-100) on padding and, with ``mask_prompt``, on every
    position whose next token is still part of the prompt. So the first counted target is the
    first response token, predicted from the last prompt token. T is the longest row (at most
    ``length``), so no batch carries columns of padding only."""
    examples = _check_examples(examples)
    length = check_int(length, "length", minimum=2)
    mask_prompt = check_bool(mask_prompt, "mask_prompt")
    rows, prompt_lengths = [], []
    for i, ex in enumerate(examples):
        prompt, response = data.TOKENIZER.encode(ex.prompt), data.TOKENIZER.encode(ex.response)
        if not prompt:
            raise ValueError(f"example {i} has an empty prompt: the model needs a token to start from")
        if not response:
            raise ValueError(f"example {i} has an empty response {ex.response!r}: there is nothing to learn")
        unknown = [w for w, t in zip((ex.prompt + " " + ex.response).split(), prompt + response)
                   if t == data.TOKENIZER.unk_id]
        if unknown:
            raise ValueError(f"example {i}: {unknown[0]!r} is not in the vocabulary (it would become <unk>)")
        tokens = prompt + response + [data.TOKENIZER.eos_id]
        if len(tokens) > length:
            raise ValueError(f"example {i}: prompt ({len(prompt)} tokens) + response ({len(response)}) + <eos> "
                             f"= {len(tokens)} tokens do not fit in the context of {length}")
        rows.append(tokens)
        prompt_lengths.append(len(prompt))
    width = max(len(r) for r in rows) - 1
    inputs = torch.full((len(rows), width), data.TOKENIZER.pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (tokens, p) in enumerate(zip(rows, prompt_lengths)):
        n = len(tokens) - 1
        inputs[i, :n] = torch.tensor(tokens[:-1])
        targets[i, :n] = torch.tensor(tokens[1:])
        if mask_prompt:
            targets[i, :p - 1] = IGNORE_INDEX  # targets 1 .. p-1 are prompt tokens
    return inputs, targets


def masked_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the positions whose target is not -100: (N, T, V), (N, T) -> ()."""
    if logits.ndim != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(f"logits must be (N, T, V) and targets (N, T), got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")
    if not (targets != IGNORE_INDEX).any():
        raise ValueError("every target is -100: there is no response token to learn from")
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


# ---------------------------------------------------------------------------------------------
# Models and training
# ---------------------------------------------------------------------------------------------
def full_model(base: nn.Module) -> nn.Module:
    """A copy of the base GPT with every parameter trainable (full fine-tuning)."""
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def lora_model(base: nn.Module, rank: int, alpha: float = 8, targets: str = "all linear", seed: int = 0) -> nn.Module:
    """A copy of the base GPT with LoRA on the blocks' linear layers; only A and B train. The
    language-model head stays the base model's (frozen): the skill is written with the same
    words the base model already predicts."""
    if targets not in TARGETS:
        raise ValueError(f"unknown targets {targets!r}: choose one of {list(TARGETS)}")
    model = copy.deepcopy(base)
    replace_linear_with_lora(model, rank, alpha, target_modules=TARGETS[targets], seed=seed)
    mark_only_lora_as_trainable(model)
    return model


def train_generator(model: nn.Module, examples, *, steps: int, lr: float, batch_size: int = 32, seed: int = 0,
                    mask_prompt: bool = True, callback=None) -> list[float]:
    """AdamW on the masked loss for ``steps`` batches drawn with ``seed``; returns the losses.
    With ``mask_prompt=False`` the loss also counts every prompt token (for the comparison).
    ``callback(step)``, if given, runs after every step (with the model in eval mode), e.g. to
    measure a checkpoint."""
    steps = check_int(steps, "steps", minimum=1)
    lr = check_number(lr, "lr", positive=True)
    batch_size = check_int(batch_size, "batch_size", minimum=1)
    inputs, targets = encode_examples(examples, mask_prompt=mask_prompt)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameter: use full_model(base) or lora_model(base, rank)")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(check_int(seed, "seed", minimum=0))
    real = (inputs != data.TOKENIZER.pad_id).sum(1)  # (N,) tokens per row: batches cut to their longest
    if callback is not None and not callable(callback):
        raise ArgumentTypeError(f"callback must be a function of the step number, got {type(callback).__name__}")
    losses = []
    model.train()
    for step in range(1, steps + 1):
        idx = torch.randint(len(inputs), (batch_size,), generator=generator)
        width = int(real[idx].max())
        loss = masked_loss(model(inputs[idx, :width]), targets[idx, :width])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if callback is not None:
            model.eval()
            callback(step)
            model.train()
    model.eval()
    return losses


# ---------------------------------------------------------------------------------------------
# Greedy generation and exact match
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def greedy_generate(model: nn.Module, prompts, max_new_tokens: int = 16) -> list[str]:
    """Continue each prompt with the most likely token, one at a time, until <eos> (not
    included in the text) or ``max_new_tokens``. Prompts of the same length run as one batch
    (no padding, so a batch gives exactly what one prompt alone gives)."""
    if isinstance(prompts, str):
        raise ArgumentTypeError("expected a list of prompts, got one str (wrap it in a list: [prompt])")
    prompts = list(prompts)
    if not all(isinstance(p, str) for p in prompts):
        raise ArgumentTypeError("every prompt must be a str")
    max_new_tokens = check_int(max_new_tokens, "max_new_tokens", minimum=1)
    context = model.cfg.context_length
    encoded = [data.TOKENIZER.encode(p) for p in prompts]
    for i, ids in enumerate(encoded):
        if not ids:
            raise ValueError(f"prompt {i} is empty: give at least one word to continue")
        if len(ids) >= context:
            raise ValueError(f"prompt {i} has {len(ids)} tokens: it leaves no room in the context of {context}")
    was_training = model.training
    model.eval()
    out = [""] * len(prompts)
    try:
        for n in sorted({len(ids) for ids in encoded}):
            rows = [i for i, ids in enumerate(encoded) if len(ids) == n]
            x = torch.tensor([encoded[i] for i in rows])             # (B, n)
            done = torch.zeros(len(rows), dtype=torch.bool)
            new = []
            for _ in range(min(max_new_tokens, context - n)):
                nxt = model(x)[:, -1].argmax(-1)                     # (B,) the most likely next token
                nxt = torch.where(done, data.TOKENIZER.eos_id, nxt)  # finished rows stay finished
                new.append(nxt)
                done |= nxt == data.TOKENIZER.eos_id
                if done.all():
                    break
                x = torch.cat([x, nxt[:, None]], 1)
            new = torch.stack(new, 1).tolist()                       # (B, new tokens)
            for i, ids in zip(rows, new):
                ids = ids[:ids.index(data.TOKENIZER.eos_id)] if data.TOKENIZER.eos_id in ids else ids
                out[i] = data.TOKENIZER.decode(ids)
    finally:
        model.train(was_training)
    return out


def exact_match(model: nn.Module, examples) -> float:
    """Share of examples whose greedy response equals the reference word for word."""
    examples = _check_examples(examples)
    got = greedy_generate(model, [e.prompt for e in examples])
    return sum(g == e.response for g, e in zip(got, examples)) / len(examples)
