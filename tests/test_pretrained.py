"""The shipped base model and the task data it is fine-tuned on: sizes, balance, no shared
texts, and tasks that the strongest simple baselines do not solve (issue 8, item 3)."""
import math

import pytest

from lora_course.baselines import bag_of_ngrams, keyword_rule, majority_class
from lora_course.data import CONTEXT_LENGTH, MAIN_TASK, SPLIT_SIZES, TASKS, TOKENIZER, classification_splits, num_classes
from lora_course.gpt import GPTModel, load_gpt, load_pretrained_gpt
from lora_course.pretrain import CONFIG, corpus_split
from lora_course.training import language_model_loss

TASK_NAMES = sorted(TASKS)


@pytest.fixture(scope="module")
def all_splits():
    return {task: classification_splits(task) for task in TASK_NAMES}


def test_shipped_model_reproduces_its_recorded_validation_loss():
    model, info = load_gpt()
    assert isinstance(model, GPTModel) and model.cfg == CONFIG
    assert not model.training  # returned in eval mode
    measured = language_model_loss(model, corpus_split()[1])
    assert measured == pytest.approx(info["val_loss"], abs=1e-4)
    # and it did learn the language: far below the loss of guessing uniformly, ln(vocab) ≈ 5.8
    assert measured < 0.25 * math.log(len(TOKENIZER))


def test_load_pretrained_gpt_is_the_shipped_model():
    a, b = load_pretrained_gpt(), load_gpt()[0]
    assert all((x == y).all() for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_pretraining_corpus_splits_are_disjoint():
    train, val = corpus_split()
    assert not set(train) & set(val)


@pytest.mark.parametrize("task", TASK_NAMES)
def test_no_text_in_two_splits(all_splits, task):
    splits = all_splits[task]
    sets = {name: set(split.texts) for name, split in splits.items()}
    assert [len(s) for s in sets.values()] == [len(split.texts) for split in splits.values()]  # no duplicates
    names = list(sets)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not sets[a] & sets[b], f"{task}: {a} and {b} share texts"


@pytest.mark.parametrize("task", TASK_NAMES)
def test_splits_are_balanced_and_sized(all_splits, task):
    splits = all_splits[task]
    assert tuple(len(v.texts) for v in splits.values()) == SPLIT_SIZES[task]
    k = num_classes(task)
    for split in splits.values():
        counts = [int((split.labels == c).sum()) for c in range(k)]
        assert max(counts) - min(counts) <= 0.1 * len(split) / k, (task, counts)  # every class ≈ 1/k


def test_the_main_task_resists_shortcuts(all_splits):
    """Issue 8: the best one-word rule ≤ 70 % and bag-of-words + bigram ≤ 80 % on the test split."""
    splits = all_splits[MAIN_TASK]
    assert num_classes(MAIN_TASK) == 6
    majority = majority_class(splits).accuracy["test"]
    keyword = keyword_rule(splits).accuracy["test"]
    bow = bag_of_ngrams(splits).accuracy["test"]
    assert majority < 0.2 and keyword <= 0.70 and bow <= 0.80, (majority, keyword, bow)
    assert bow > majority + 0.05  # the baseline is not broken: it does learn something


def test_every_text_fits_the_context_with_eos(all_splits):
    texts = list(corpus_split()[0]) + list(corpus_split()[1])
    for task in TASK_NAMES:
        texts += [t for split in all_splits[task].values() for t in split.texts]
    longest = max(len(TOKENIZER.encode(t)) for t in texts)
    assert longest + 1 <= CONTEXT_LENGTH  # + <eos> for language modelling
    assert all(TOKENIZER.unk_id not in TOKENIZER.encode(t) for t in texts)
