"""The no-network baselines, held against data whose answer is known by construction."""
import pytest
import torch

from lora_course.baselines import bag_of_ngrams, keyword_rule, majority_class
from lora_course.data import Split


def _split(pairs):
    return Split([t for t, _ in pairs], torch.tensor([y for _, y in pairs]))


def _splits(pairs):
    return {"train": _split(pairs), "val": _split(pairs), "test": _split(pairs)}


def test_majority_class_answers_the_most_frequent_training_label():
    splits = _splits([("a", 0), ("b", 1), ("c", 1), ("d", 1)])
    result = majority_class(splits)
    assert result.detail["class"] == 1 and result.accuracy["test"] == 0.75


def test_keyword_rule_finds_the_one_word_that_decides():
    pairs = [(f"the {noun} is {w}", int(w == "great")) for noun in ("tea", "cake", "soup", "bread")
             for w in ("great", "fine", "cold")]
    result = keyword_rule(_splits(pairs))
    assert result.detail == {"word": "great", "if_present": 1, "if_absent": 0}
    assert result.accuracy == {"train": 1.0, "val": 1.0, "test": 1.0}


def test_bigrams_see_word_order_that_unigrams_cannot():
    """Label = which of two words comes first. Every text has the same words, so unigram
    presence carries no information (at most chance), while the bigram "x y" decides it."""
    pairs = [(f"{a} {b} {c}", int(a == "red")) for c in ("one", "two", "three", "four", "five")
             for a, b in (("red", "blue"), ("blue", "red"))]
    unigram = bag_of_ngrams(_splits(pairs), n=1)
    bigram = bag_of_ngrams(_splits(pairs), n=2)
    assert unigram.accuracy["test"] <= 0.6
    assert bigram.accuracy["test"] == 1.0
    assert bigram.detail["penalty"] in (1e-4, 1e-3, 1e-2)


def test_bag_of_ngrams_needs_a_validation_split():
    pairs = [("a b", 0), ("b a", 1)]
    with pytest.raises(ValueError, match="val"):
        bag_of_ngrams({"train": _split(pairs), "test": _split(pairs)})
