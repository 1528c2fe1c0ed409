"""Each exercise checker on a right answer, on the placeholder, and on the typical wrong answers
(with the specific hint each should give)."""
import math

import pytest
import torch

from lora_course import exercises as ex
from lora_course.lora import LoRALayer


def placeholder(*args):
    raise NotImplementedError


def status(result):
    return result.status


# ---- count LoRA's parameters -----------------------------------------------------------------
def test_count_right_and_placeholder():
    assert ex.check_lora_parameter_count(lambda i, o, r: r * i + r * o)
    assert status(ex.check_lora_parameter_count(placeholder)) == ex.NOT_DONE
    assert status(ex.check_lora_parameter_count(lambda i, o, r: ...)) == ex.NOT_DONE


@pytest.mark.parametrize("wrong, hint", [
    (lambda i, o, r: i * o, "full weight"),
    (lambda i, o, r: r * i, "only A"),
    (lambda i, o, r: r * o, "only B"),
    (lambda i, o, r: i * o + r * (i + o), "frozen W"),
    (lambda i, o, r: r * (i + o) + o, "no bias"),
    (lambda i, o, r: 2 * r * i, "different shapes"),
])
def test_count_wrong_answers_get_specific_hints(wrong, hint):
    result = ex.check_lora_parameter_count(wrong)
    assert status(result) == ex.INCORRECT and hint in result.hints[0]


def test_count_code_that_raises_is_reported():
    result = ex.check_lora_parameter_count(lambda i, o, r: i / 0)
    assert status(result) == ex.INCORRECT and "ZeroDivisionError" in result.message


# ---- implement LoRALayer (pre-existing checker, kept) ----------------------------------------
def test_lora_layer_checker_keeps_its_behaviour():
    assert ex.check_lora_layer(LoRALayer)

    class Placeholder(torch.nn.Module):
        def __init__(self, *args):
            raise NotImplementedError

    assert status(ex.check_lora_layer(Placeholder)) == ex.NOT_DONE

    class RawAlpha(LoRALayer):
        def __init__(self, i, o, r, a):
            super().__init__(i, o, r, a, scaling="alpha")

    result = ex.check_lora_layer(RawAlpha)
    assert status(result) == ex.INCORRECT and "alpha / rank" in result.hints[0]


# ---- implement merging -----------------------------------------------------------------------
def test_merge_right_in_place_and_placeholder():
    assert ex.check_merge(lambda W, A, B, s: W + s * (A @ B).T)

    def in_place(W, A, B, s):
        W += s * (A @ B).T
        return W

    assert ex.check_merge(in_place)
    assert status(ex.check_merge(placeholder)) == ex.NOT_DONE
    assert status(ex.check_merge(None)) == ex.NOT_DONE


@pytest.mark.parametrize("wrong, hint", [
    (lambda W, A, B, s: W + s * (A @ B), "transpose the product"),      # shape error, in != out
    (lambda W, A, B, s: W + s * (B @ A).T, "B @ A does not fit"),
    (lambda W, A, B, s: W + (A @ B).T, "forgot the scaling"),
    (lambda W, A, B, s: W - s * (A @ B).T, "unmerging"),
    (lambda W, A, B, s: s * (A @ B).T, "ΔW alone"),
    (lambda W, A, B, s: W + s * s * (A @ B).T, "applied twice"),
])
def test_merge_wrong_answers_get_specific_hints(wrong, hint):
    result = ex.check_merge(wrong)
    assert status(result) == ex.INCORRECT and hint in " ".join(result.hints)


def test_merge_returning_wrong_type():
    result = ex.check_merge(lambda W, A, B, s: 3)
    assert status(result) == ex.INCORRECT and "tensor" in result.message


# ---- pick a rank for a target error ----------------------------------------------------------
def reference_rank(sv, target):
    """Independent: numpy-free brute force over ranks with math.fsum."""
    for r in range(len(sv) + 1):
        if math.sqrt(math.fsum(s * s for s in sorted(sv, reverse=True)[r:])) <= target:
            return r


def test_rank_choice_right_and_placeholder():
    right = reference_rank(ex.RANK_EXERCISE_SINGULAR_VALUES, ex.RANK_EXERCISE_TARGET)
    assert right == 2
    assert ex.check_rank_choice(right)
    assert status(ex.check_rank_choice(None)) == ex.NOT_DONE
    assert status(ex.check_rank_choice(...)) == ex.NOT_DONE


@pytest.mark.parametrize("rank, hint", [
    (1, "spectral-norm"),          # compared only the largest dropped σ with the target
    (3, "added the discarded σ"),  # plain sum instead of sqrt of the sum of squares
    (4, "squared error"),          # compared sum of σ² with the target
    (0, "above the target"),
    (5, "already reaches"),
    (9, "has rank 6"),
])
def test_rank_choice_wrong_answers_get_specific_hints(rank, hint):
    result = ex.check_rank_choice(rank)
    assert status(result) == ex.INCORRECT and hint in " ".join(result.hints + [result.message])


def test_rank_choice_rejects_non_integers():
    assert "whole number" in ex.check_rank_choice(2.5).message


# ---- explain a loss curve (multiple choice) --------------------------------------------------
def test_loss_curve_answers():
    assert ex.check_loss_curve_answer("b") and ex.check_loss_curve_answer(" (B) ")
    assert status(ex.check_loss_curve_answer(None)) == ex.NOT_DONE
    assert "overfitting" in ex.check_loss_curve_answer("a").hints[0]
    assert "first updates" in ex.check_loss_curve_answer("c").hints[0]
    assert "reset_parameters" in ex.check_loss_curve_answer("d").hints[0]
    assert "one letter" in ex.check_loss_curve_answer("z").message


# ---- target_modules for a parameter budget ---------------------------------------------------
def test_budget_right_answers():
    # rank 8: each 64×64 attention matrix 8·128 = 1,024 per block, each feed-forward one 8·320 = 2,560.
    # q, v, ff.layers.0 in 4 blocks: 4·(1024 + 1024 + 2560) = 18,432 <= 20,000.
    result = ex.check_target_modules_for_budget(["W_query", "W_value", "ff.layers.0"])
    assert result and "18,432" in result.message
    assert status(ex.check_target_modules_for_budget(None)) == ex.NOT_DONE


@pytest.mark.parametrize("targets, text", [
    (["W_query", "W_key", "W_value", "out_proj", "ff.layers.0", "ff.layers.2"], "over the budget"),
    (["W_query"], "is reachable"),
    (["W_querry"], "matched no nn.Linear"),
])
def test_budget_wrong_answers(targets, text):
    result = ex.check_target_modules_for_budget(targets)
    assert status(result) == ex.INCORRECT and text in result.message


def test_repr_says_status_and_hints():
    text = repr(ex.check_lora_parameter_count(lambda i, o, r: i * o))
    assert text.startswith("[not yet right] count LoRA's parameters") and "\n  hint: " in text
