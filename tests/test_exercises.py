"""Each exercise checker on a right answer, on the placeholder, and on the typical wrong answers
(with the specific hint each should give)."""
import math

import numpy as np
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
    result = ex.check_lora_parameter_count(lambda i, o, r: r * i + r * o)
    assert result and "8·(48 + 48) = 768" in result.message and f"{48 * 48:,} for the full" in result.message
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


def test_count_non_number_asks_for_an_int():
    result = ex.check_lora_parameter_count(lambda i, o, r: [r * i, r * o])     # unhashable: must not crash
    assert status(result) == ex.INCORRECT and "return an int" in result.message and "list" in result.message
    assert status(ex.check_lora_parameter_count(lambda i, o, r: str(r * (i + o)))) == ex.INCORRECT
    assert ex.check_lora_parameter_count(lambda i, o, r: torch.tensor(r * (i + o)))   # a 0-d tensor is a number


def test_count_code_that_raises_is_reported():
    result = ex.check_lora_parameter_count(lambda i, o, r: i / 0)
    assert status(result) == ex.INCORRECT and "ZeroDivisionError" in result.message


# ---- count a whole LoRA classifier's parameters ----------------------------------------------
# Hand counts for the course GPT (3 blocks, width 48, vocabulary 330) with a new 6-class head for
# "aspect" (48·6 weights + 6 biases = 294), LoRA at rank r on W_query and W_value of every block.
HEAD = 48 * 6 + 6


def qv_by_hand(r):
    return 3 * 2 * r * (48 + 48)


def test_classifier_count_right_and_placeholder():
    assert ex.CLASSIFIER_COUNT_EXERCISE == {"rank": 4, "targets": "q,v"}
    right = qv_by_hand(4) + HEAD
    assert right == 2_598
    result = ex.check_classifier_trainable_count(right)
    assert result and "2,598" in result.message
    assert ex.check_classifier_trainable_count(torch.tensor(right))             # a 0-d integer tensor is a count
    assert status(ex.check_classifier_trainable_count(None)) == ex.NOT_DONE
    assert status(ex.check_classifier_trainable_count(...)) == ex.NOT_DONE


@pytest.mark.parametrize("rank", [1, 2, 8, 16])
def test_classifier_count_other_ranks(rank):
    assert ex.check_classifier_trainable_count(qv_by_hand(rank) + HEAD, rank=rank)
    assert not ex.check_classifier_trainable_count(qv_by_hand(rank), rank=rank)


def test_classifier_count_other_targets_and_task():
    # all linear: per block 4 attention matrices 4·r·(48 + 48) and 2 feed-forward ones 2·r·(48 + 192)
    all_linear = 3 * (4 * 4 * (48 + 48) + 2 * 4 * (48 + 192))
    assert all_linear + HEAD == 10_662                                           # notebook 04's count
    assert ex.check_classifier_trainable_count(all_linear + HEAD, targets="all linear")
    spam_head = 48 * 2 + 2
    assert ex.check_classifier_trainable_count(qv_by_hand(4) + spam_head, task="spam")
    assert not ex.check_classifier_trainable_count(qv_by_hand(4) + HEAD, task="spam")


@pytest.mark.parametrize("wrong, hint", [
    (qv_by_hand(4), "forgot the new head"),
    (3 * 2 * 4 * 48 + HEAD, "only A"),                        # A only: in·r per matrix (equals "only B" here)
    (3 * 2 * 4 * 48 + HEAD, "only B"),
    (3 * 1 * 4 * (48 + 48) + HEAD, "only W_query or only W_value"),    # one matrix per block: same number
    (3 * 2 * 4 * 48 * 48 + HEAD, "r·in·out"),
    (3 * 2 * 48 * 48 + HEAD, "full weights W"),
    (3 * 2 * 48 * 48 + qv_by_hand(4) + HEAD, "frozen W"),
    (1 * 2 * 4 * (48 + 48) + HEAD, "one block"),
    (qv_by_hand(4) + 48 * 6, "has a bias too"),
    (qv_by_hand(4) + 48 * 330, "pretraining head"),
    (qv_by_hand(4) + 48 * 2 + 2, "2-class head"),
])
def test_classifier_count_wrong_answers_get_specific_hints(wrong, hint):
    result = ex.check_classifier_trainable_count(wrong)
    assert status(result) == ex.INCORRECT and hint in " ".join(result.hints), result


def test_classifier_count_full_finetuning_and_non_numbers():
    from lora_course.gpt import load_pretrained_gpt

    base = load_pretrained_gpt()
    body = sum(p.numel() for n, p in base.named_parameters() if not n.startswith("out_head."))
    # embeddings (330 words, 48 positions); per block q, k, v, out_proj (48 × 48, only out_proj with a
    # bias), feed-forward 48 → 192 → 48 with biases, two LayerNorms (scale, shift); the final LayerNorm
    assert body == 330 * 48 + 48 * 48 + 3 * (4 * 48 * 48 + 48 + 48 * 192 + 192 + 192 * 48 + 48 + 4 * 48) + 2 * 48
    result = ex.check_classifier_trainable_count(body + HEAD)
    assert status(result) == ex.INCORRECT and "full fine-tuning trains" in result.hints[0]
    assert f"{body + HEAD:,} that full fine-tuning trains" in ex.check_classifier_trainable_count(2_598).message
    result = ex.check_classifier_trainable_count(2_598.0)
    assert status(result) == ex.INCORRECT and "whole number" in result.message
    assert status(ex.check_classifier_trainable_count("2598")) == ex.INCORRECT
    assert status(ex.check_classifier_trainable_count(True)) == ex.INCORRECT
    assert "r·(in + out)" in ex.check_classifier_trainable_count(7).hints[0]     # no known slip: the general hint


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

    class ZeroA(LoRALayer):
        def __init__(self, i, o, r, a):
            super().__init__(i, o, r, a)
            torch.nn.init.zeros_(self.A)

    result = ex.check_lora_layer(ZeroA)
    assert status(result) == ex.INCORRECT and "self.A.T" in result.hints[0]


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
    (lambda W, A, B, s: W + (A @ B).T / s, "you divided by the scaling"),
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


def test_rank_choice_right_answer_zero_has_no_rank_minus_one():
    sv, target = (1.0, 0.5), 2.0                     # sqrt(1 + 0.25) = 1.118 <= 2 already at rank 0
    assert reference_rank(sv, target) == 0
    result = ex.check_rank_choice(0, singular_values=sv, target_error=target)
    assert result and "rank -1" not in result.message and "1.118" in result.message
    result = ex.check_rank_choice(2, singular_values=(3.0, 2.0, 1.0), target_error=1.5)
    assert result and "rank 1 would leave" in result.message   # sqrt(4 + 1) = 2.236 > 1.5


def test_rank_choice_rejects_non_integers():
    assert "whole number" in ex.check_rank_choice(2.5).message


# ---- carry alpha to a new rank ---------------------------------------------------------------
def test_alpha_for_new_rank_by_hand():
    # From rank 8, alpha 24 to rank 32 (4x): keep s·r. Raw alpha: s·r = 24·8 = α·32 -> 6.
    # alpha/rank: s·r = α -> 24. alpha/sqrt(rank): s·r = α·√r = 24·√8 = α·√32 -> 12.
    right = {"alpha": 6, "alpha/rank": 24, "alpha/sqrt(rank)": 12}
    assert ex.check_alpha_for_new_rank(right)
    assert ex.check_alpha_for_new_rank({k: np.float32(v) for k, v in right.items()})   # numpy numbers are numbers
    assert ex.check_alpha_for_new_rank({"alpha": 4, "alpha/rank": 16, "alpha/sqrt(rank)": 8},
                                       {"rank": 4, "alpha": 16, "new_rank": 16})         # notebook 06's grid: 16, 4, 1
    same = ex.check_alpha_for_new_rank({"alpha": 24, "alpha/rank": 24, "alpha/sqrt(rank)": 12})
    assert status(same) == ex.INCORRECT and "r times larger" in same.hints[0] and "1 of 3" not in same.message
    up = ex.check_alpha_for_new_rank({"alpha": 96, "alpha/rank": 24, "alpha/sqrt(rank)": 12})
    assert "wrong direction" in up.hints[0]
    moved = ex.check_alpha_for_new_rank({"alpha": 6, "alpha/rank": 6, "alpha/sqrt(rank)": 12})
    assert "same α" in moved.hints[0]
    assert status(ex.check_alpha_for_new_rank(None)) == ex.NOT_DONE
    assert status(ex.check_alpha_for_new_rank({"alpha": None, "alpha/rank": 1, "alpha/sqrt(rank)": 1})) == ex.NOT_DONE
    assert "no alpha for 'alpha/sqrt(rank)'" in ex.check_alpha_for_new_rank({"alpha": 6, "alpha/rank": 24}).message
    assert "dict" in ex.check_alpha_for_new_rank(6).message
    assert "positive number" in ex.check_alpha_for_new_rank({"alpha": -6, "alpha/rank": 24, "alpha/sqrt(rank)": 12}).message


# ---- LoRA for an embedding -------------------------------------------------------------------
class EmbeddingLoRA(torch.nn.Module):
    """A reference written independently of the checker: the dense update added to the table,
    looked up with F.embedding (not by indexing A)."""

    def __init__(self, base, rank, alpha, zero="A", factor=None, freeze=True, add_base=True):
        super().__init__()
        self.base, self.add_base = base, add_base
        if freeze:
            base.weight.requires_grad_(False)
        a, b = torch.randn(base.num_embeddings, rank), torch.randn(rank, base.embedding_dim)
        (a if zero == "A" else b).zero_()
        if zero == "both":
            a.zero_()
        self.A, self.B = torch.nn.Parameter(a), torch.nn.Parameter(b)
        self.scaling = alpha / rank if factor is None else factor

    def forward(self, ids):
        delta = torch.nn.functional.embedding(ids, self.A @ self.B)
        return (self.base(ids) if self.add_base else 0) + self.scaling * delta


def test_embedding_lora_accepts_either_zero_factor():
    assert ex.check_embedding_lora(EmbeddingLoRA)
    assert ex.check_embedding_lora(lambda b, r, a: EmbeddingLoRA(b, r, a, zero="B"))


def test_embedding_lora_names_the_mistake():
    def message(**kw):
        result = ex.check_embedding_lora(lambda b, r, a: EmbeddingLoRA(b, r, a, **kw))
        assert status(result) == ex.INCORRECT
        return result.message + " " + " ".join(result.hints)

    assert "still trains" in message(freeze=False)
    assert "both zero" in message(zero="both")
    assert "wrong factor" in message(factor=4.0)            # alpha instead of alpha / rank
    assert "base lookup" in message(add_base=False)

    class Placeholder(torch.nn.Module):
        def __init__(self, base, rank, alpha):
            raise NotImplementedError

    assert status(ex.check_embedding_lora(Placeholder)) == ex.NOT_DONE

    class Transposed(EmbeddingLoRA):
        def __init__(self, base, rank, alpha):
            super().__init__(base, rank, alpha)
            self.A = torch.nn.Parameter(torch.zeros(rank, base.num_embeddings))

    assert "(num_embeddings, dim)" in ex.check_embedding_lora(Transposed).message


# ---- target_modules for a parameter budget ---------------------------------------------------
# Hand counts for the course GPT (3 blocks, width 48, feed-forward 48 → 192 → 48) at rank 8:
ATTENTION_KIND = 3 * 8 * (48 + 48)      # 2,304: one of W_query, W_key, W_value, out_proj in all 3 blocks
FF_KIND = 3 * 8 * (48 + 192)            # 5,760: ff.layers.0 or ff.layers.2 in all 3 blocks


def test_budget_hand_counts():
    assert (ATTENTION_KIND, FF_KIND) == (2_304, 5_760) and ex.BUDGET_EXERCISE == {"rank": 8, "budget": 20_000}
    # Every whole-kind choice by hand: a attention kinds (0..4) and f feed-forward kinds (0..2).
    totals = {(a, f): a * ATTENTION_KIND + f * FF_KIND for a in range(5) for f in range(3)}
    assert totals[4, 2] == 20_736 > 20_000                      # every linear layer: just over the budget
    assert max(t for t in totals.values() if t <= 20_000) == totals[3, 2] == 18_432
    assert totals[4, 1] == 14_976 and totals[4, 0] == 9_216     # the runners-up are well below


def test_budget_right_answers():
    # 3 attention kinds + both feed-forward kinds: 3·2,304 + 2·5,760 = 18,432 <= 20,000, reached by
    # C(4,3) = 4 choices (which attention kind to drop).
    result = ex.check_target_modules_for_budget(["W_query", "W_key", "W_value", "ff.layers.0", "ff.layers.2"])
    assert result and f"{3 * ATTENTION_KIND + 2 * FF_KIND:,}" in result.message and "4 choices" in result.message
    assert ex.check_target_modules_for_budget(["W_key", "W_value", "out_proj", "ff.layers.0", "ff.layers.2"])
    assert status(ex.check_target_modules_for_budget(None)) == ex.NOT_DONE


@pytest.mark.parametrize("targets, text", [
    (["W_query", "W_key", "W_value", "out_proj", "ff.layers.0", "ff.layers.2"],      # 4·2,304 + 2·5,760
     "adds 20,736 trainable parameters, over the budget"),
    (["W_query"], "2,304 parameters: within budget, but 18,432 is reachable"),
    (["W_query", "W_key", "W_value", "out_proj"], "9,216 parameters: within budget, but 18,432"),
    (["W_query", "W_key", "W_value", "out_proj", "ff.layers.0"], "14,976 parameters: within budget, but 18,432"),
    (["W_query", "W_value", "ff.layers.0", "ff.layers.2"], "16,128 parameters"),        # 2·2,304 + 2·5,760
    (["W_querry"], "matched no nn.Linear"),
])
def test_budget_wrong_answers(targets, text):
    result = ex.check_target_modules_for_budget(targets)
    assert status(result) == ex.INCORRECT and text in result.message


def test_budget_rejects_names_that_match_only_some_blocks():
    # The best choice plus out_proj of block 0 only: 18,432 + 8·(48 + 48) = 19,200 <= 20,000 beats the
    # best whole-kind count, but it is not a whole kind of layer.
    result = ex.check_target_modules_for_budget(["W_query", "W_key", "W_value", "ff.layers.0", "ff.layers.2",
                                                 "trf_blocks.0.att.out_proj"])
    assert status(result) == ex.INCORRECT and "block(s) 0 only" in result.message
    assert "'out_proj'" in result.hints[0]


def test_budget_best_count_comes_from_the_model():
    from lora_course.gpt import GPTConfig, GPTModel

    def factory():  # 2 blocks of width 32: attention 4·(32 + 32) = 256 per block, feed-forward 4·(32 + 128) = 640
        torch.manual_seed(0)
        return GPTModel(GPTConfig(vocab_size=10, emb_dim=32, n_heads=2, n_layers=2))

    # Budget 2,000 at rank 4, over 2 blocks: attention kinds 512 each, feed-forward kinds 1,280 each.
    # Best by hand: 1 ff + 1 attention = 1,792 (2 ff = 2,560 and 1 ff + 2 attention = 2,304 are over;
    # 4 attention = 2,048 is over; 3 attention = 1,536).
    best, choices = ex.best_budget_choices(factory(), 4, 2_000)
    assert best == 1_792 and len(choices) == 8
    assert ex.check_target_modules_for_budget(["W_value", "ff.layers.2"], model_factory=factory, rank=4, budget=2_000)
    result = ex.check_target_modules_for_budget(["W_query", "W_key", "W_value"], model_factory=factory, rank=4,
                                                budget=2_000)
    assert status(result) == ex.INCORRECT and "1,536" in result.message and "1,792 is reachable" in result.message


def test_repr_says_status_and_hints():
    text = repr(ex.check_lora_parameter_count(lambda i, o, r: i * o))
    assert text.startswith("[not yet right] count LoRA's parameters") and "\n  hint: " in text
