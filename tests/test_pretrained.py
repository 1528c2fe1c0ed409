"""The shipped base model and the task data it is fine-tuned on."""
import math

import pytest

from lora_course.data import CONTEXT_LENGTH, TOKENIZER, classification_splits, keyword_baseline
from lora_course.gpt import GPTModel, load_gpt, load_pretrained_gpt
from lora_course.pretrain import CONFIG, corpus_split
from lora_course.training import language_model_loss

TASKS = ["spam", "sentiment"]


def test_shipped_model_reproduces_its_recorded_validation_loss():
    model, info = load_gpt()
    assert isinstance(model, GPTModel) and model.cfg == CONFIG
    assert not model.training  # returned in eval mode
    measured = language_model_loss(model, corpus_split()[1])
    assert measured == pytest.approx(info["val_loss"], abs=1e-4)
    # and it did learn the language: far below the loss of guessing uniformly, ln(vocab) ≈ 6.2
    assert measured < 0.25 * math.log(len(TOKENIZER))


def test_load_pretrained_gpt_is_the_shipped_model():
    a, b = load_pretrained_gpt(), load_gpt()[0]
    assert all((x == y).all() for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_pretraining_corpus_splits_are_disjoint():
    train, val = corpus_split()
    assert not set(train) & set(val)


@pytest.mark.parametrize("task", TASKS)
def test_no_text_in_two_splits(task):
    splits = classification_splits(task)
    sets = {name: set(split.texts) for name, split in splits.items()}
    assert [len(s) for s in sets.values()] == [len(split.texts) for split in splits.values()]  # no duplicates
    names = list(sets)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not sets[a] & sets[b], f"{task}: {a} and {b} share texts"


@pytest.mark.parametrize("task", TASKS)
def test_splits_are_balanced_and_sized(task):
    splits = classification_splits(task)
    assert {k: len(v.texts) for k, v in splits.items()} == {"train": 2000, "val": 500, "test": 500}
    for split in splits.values():
        assert split.labels.float().mean().item() == pytest.approx(0.5, abs=0.05)


@pytest.mark.parametrize("task", TASKS)
def test_no_single_keyword_solves_the_task(task):
    train = classification_splits(task)["train"]
    accuracy, word = keyword_baseline(train.texts, train.labels)
    assert accuracy < 0.8, f"{task}: the word {word!r} alone gets {accuracy:.1%}"


def test_every_text_fits_the_context_with_eos():
    texts = list(corpus_split()[0]) + list(corpus_split()[1])
    for task in TASKS:
        texts += [t for split in classification_splits(task).values() for t in split.texts]
    longest = max(len(TOKENIZER.encode(t)) for t in texts)
    assert longest + 1 <= CONTEXT_LENGTH  # + <eos> for language modelling
    assert all(TOKENIZER.unk_id not in TOKENIZER.encode(t) for t in texts)
