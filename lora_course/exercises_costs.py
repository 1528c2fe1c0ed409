"""Checkers for the exercises of notebook 01 (what fine-tuning costs) and 12 (a real GPT-2).

Each takes the learner's number, compares it with a value computed here from the course's own
counting code (``lora_course.architectures``), and returns a ``CheckResult`` (see
``lora_course.exercises``): correct, not done (still ``None``) or incorrect with a hint that
points at the usual slip.
"""
from __future__ import annotations

import numbers

from .architectures import Architecture, get_architecture, lora_parameters, mixed_precision_memory, parameter_breakdown
from .exercises import CORRECT, INCORRECT, NOT_DONE, CheckResult

#: GPT-3 175B as the LoRA paper describes it (Brown et al. 2020, Table 2.1; LoRA paper §7.1).
GPT3 = Architecture("GPT-3 175B", 50257, 12288, 96, 96, 4 * 12288, 2048)


def _number(name: str, value):
    """(int or float, None), or (None, CheckResult) when the value is missing or not a number."""
    if value is None or value is Ellipsis:
        return None, CheckResult(name, NOT_DONE, "the placeholder is still there: replace None with your answer "
                                 "and run the cell again")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None, CheckResult(name, INCORRECT, f"expected a number, got {value!r} ({type(value).__name__})")
    return value, None


def check_gpt3_lora_count(trainable) -> CheckResult:
    """Exercise: LoRA of rank 4 on W_q and W_v of every GPT-3 block: how many trainable parameters?"""
    name = "GPT-3 175B, LoRA r=4 on q,v"
    got, problem = _number(name, trainable)
    if problem is not None:
        return problem
    right = lora_parameters(GPT3, 4, "q,v")
    if got == right:
        return CheckResult(name, CORRECT, f"{right:,}: the LoRA paper's '18M' (§7.1, Table 5), against "
                           "175 billion for full fine-tuning")
    hints = {right // 2: "that is one matrix per block: q AND v are adapted",
             right // 96: "that is one block: GPT-3 has 96",
             2 * right: "A is d × r and B is r × d: each adapted matrix trains r·(d + d), counted once"}
    return CheckResult(name, INCORRECT, f"you have {got:,}, which is not the count",
                       [hints.get(got, "per block: 2 matrices × r·(d + d) with d = 12288, r = 4; then × 96 blocks")])


def check_mixed_precision_bytes(per_trainable, per_frozen) -> CheckResult:
    """Exercise: bytes per trainable and per frozen parameter in mixed-precision AdamW training
    (16-bit weights and gradients, float32 master weights and moments)."""
    name = "mixed-precision bytes per parameter"
    got_t, problem = _number(name, per_trainable)
    if problem is not None:
        return problem
    got_f, problem = _number(name, per_frozen)
    if problem is not None:
        return problem
    right_t, right_f = sum(mixed_precision_memory(1, 1).values()), sum(mixed_precision_memory(0, 1).values())
    if (got_t, got_f) == (right_t, right_f):
        return CheckResult(name, CORRECT, f"{right_t} bytes per trainable parameter (2 + 2 + 4 + 8: the same as "
                           f"float32) and {right_f} per frozen one (its 16-bit weight): mixed precision halves "
                           "LoRA's floor, not full fine-tuning's states")
    hints = []
    if got_t != right_t:
        hints.append({8: "you counted only 16-bit weight, gradient and moments; Adam's m and v stay float32",
                      12: "add the float32 master copy of the weight (4 bytes): the optimizer updates it, "
                          "not the 16-bit weight",
                      20: "the 16-bit gradient is the one stored (2 bytes); a float32 copy, if any, is transient"
                      }.get(got_t, "a trainable parameter: 16-bit weight (2) + 16-bit gradient (2) + float32 "
                                   "master weight (4) + float32 m and v (8)"))
    if got_f != right_f:
        hints.append("a frozen parameter has no gradient, no master copy and no optimizer state: only its "
                     "16-bit weight")
    return CheckResult(name, INCORRECT, f"you have {got_t} and {got_f} bytes", hints)


def last_block_parameters(arch="gpt2-small") -> int:
    """Every parameter of one transformer block (attention, feed-forward, its two norms)."""
    parts, a = parameter_breakdown(arch), get_architecture(arch)
    norm = 2 * a.d_model if a.norm == "layernorm" else a.d_model
    return (parts["attention"] + parts["feed_forward"]) // a.n_layers + 2 * norm


def check_rank_for_last_block(rank) -> CheckResult:
    """Exercise: the largest rank at which LoRA on all linear layers of GPT-2 small (fused
    c_attn, as PEFT counts) trains no more parameters than fully fine-tuning its last block."""
    name = "rank with the budget of one block"
    got, problem = _number(name, rank)
    if problem is not None:
        return problem
    budget = last_block_parameters("gpt2-small")
    right = max(r for r in range(1, 769) if lora_parameters("gpt2-small", r, "all-linear") <= budget)
    if got == right:
        return CheckResult(name, CORRECT, f"rank {right}: {lora_parameters('gpt2-small', right, 'all-linear'):,} "
                           f"LoRA parameters across all 12 blocks, against {budget:,} in the last block alone")
    hint = ("LoRA on every block at rank r trains 12 · r · (768+2304 + 768+768 + 768+3072 + 3072+768) = "
            "147,456 · r; the last block holds 7,087,872 parameters (weights, biases, two LayerNorms)")
    if got == right + 1:
        hint = f"at rank {got} LoRA trains {lora_parameters('gpt2-small', got, 'all-linear'):,}: just over the budget"
    return CheckResult(name, INCORRECT, f"rank {got} is not it", [hint])


def check_equal_budget_rank(separate_rank, fused_rank: int = 6) -> CheckResult:
    """Exercise (notebook 12): the rank of separate q, k, v adapters that trains as many numbers
    as one adapter of rank ``fused_rank`` on the fused c_attn (d × 3d)."""
    name = "separate rank with the fused budget"
    got, problem = _number(name, separate_rank)
    if problem is not None:
        return problem
    # fused: r·(d + 3d) = 4rd; separate: 3 · r'·(d + d) = 6r'd  ->  r' = 2r/3
    right = 2 * fused_rank / 3
    if got == right:
        return CheckResult(name, CORRECT, f"rank {right:g}: 3 · {right:g} · (d + d) = {fused_rank} · (d + 3d) = "
                           f"{4 * fused_rank}·d numbers per block")
    return CheckResult(name, INCORRECT, f"rank {got} is not it",
                       ["fused: one A (d × r) and one B (r × 3d); separate: three pairs A (d × r'), B (r' × d); "
                        "set r·(d + 3d) = 3 · r'·(d + d) and solve for r'"])


def check_gpt2_medium_counts(fused, separate) -> CheckResult:
    """Exercise (notebook 12): LoRA r=8 on every linear layer of GPT-2 medium's blocks, with its
    fused c_attn (PEFT's all-linear) and with separate q, k, v (the book's layout)."""
    name = "GPT-2 medium, all-linear, r=8"
    got_fused, problem = _number(name, fused)
    if problem is not None:
        return problem
    got_separate, problem = _number(name, separate)
    if problem is not None:
        return problem
    from .architectures import with_separate_qkv

    right = (lora_parameters("gpt2-medium", 8, "all-linear"),
             lora_parameters(with_separate_qkv("gpt2-medium"), 8, "all-linear"))
    if (got_fused, got_separate) == right:
        return CheckResult(name, CORRECT, f"{right[0]:,} fused and {right[1]:,} separate: 2·r·d = 16,384 more "
                           "per block for the separate layout")
    hints = []
    if got_fused != right[0]:
        hints.append("fused, per block: r·(d + 3d) + r·(d + d) + r·(d + 4d) + r·(4d + d), d = 1024, 24 blocks")
    if got_separate != right[1]:
        hints.append("separate: c_attn becomes three d × d matrices, 3·r·(d + d) instead of r·(d + 3d)")
    return CheckResult(name, INCORRECT, f"you have {got_fused!r} and {got_separate!r}", hints)


def check_conv1d_to_linear(fn) -> CheckResult:
    """Exercise (notebook 12): ``fn(weight, bias)`` turns a Conv1D weight (in × out) and bias into
    an ``nn.Linear`` that computes the same; checked against transformers' Conv1D when present,
    else against x @ W + b."""
    import torch

    name = "Conv1D to nn.Linear"
    generator = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(5, 3, generator=generator), torch.randn(3, generator=generator)
    x = torch.randn(4, 5, generator=generator)
    try:
        linear = fn(weight, bias)
    except NotImplementedError:
        linear = None
    except Exception as exc:  # the learner's code failed: say how
        return CheckResult(name, INCORRECT, f"calling it raised {type(exc).__name__}: {exc}")
    if linear is None or linear is Ellipsis:
        return CheckResult(name, NOT_DONE, "the placeholder is still there: return an nn.Linear")
    if not isinstance(linear, torch.nn.Linear):
        return CheckResult(name, INCORRECT, f"expected an nn.Linear, got {type(linear).__name__}")
    if tuple(linear.weight.shape) != (3, 5):
        return CheckResult(name, INCORRECT, f"its weight has shape {tuple(linear.weight.shape)}; a 5-in, 3-out "
                           "nn.Linear stores (out, in) = (3, 5)", ["transpose the Conv1D weight: weight.T"])
    with torch.no_grad():
        if not torch.allclose(linear(x), x @ weight + bias, atol=1e-5):
            return CheckResult(name, INCORRECT, "its output differs from x @ W + b",
                               ["copy weight.T into linear.weight and bias into linear.bias"])
    return CheckResult(name, CORRECT, "the same outputs: Linear.weight = Conv1D.weight.T, the bias unchanged")
