"""Parameter counts from published shapes, checked against independent references: the totals the
model authors published, LoRA counts printed in the LoRA paper and in appendix E of the book,
real PyTorch modules whose numel() we count, and PEFT itself on real-shaped Hugging Face models
(built on the meta device: real shapes, no memory, no download)."""
import warnings

import pytest
import torch
from torch import nn

from lora_course import accounting, mark_only_lora_as_trainable, replace_linear_with_lora
from lora_course.architectures import (ARCHITECTURES, TARGETS, Architecture, available_targets, block_matrices,
                                       cost_table, from_gpt_config, get_architecture, lora_parameters,
                                       mixed_precision_memory, parameter_breakdown, peft_target_modules,
                                       total_parameters, training_memory, with_separate_qkv)
from lora_course.gpt import GPTConfig, GPTModel

# Published totals: Hugging Face model cards / num_parameters() of the original checkpoints
# (GPT-2 counts with the output head tied to the token embedding).
PUBLISHED = {
    "gpt2-small": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
    "llama-2-7b": 6_738_415_616,
}


@pytest.mark.parametrize("key", sorted(PUBLISHED))
def test_totals_match_published_counts(key):
    assert total_parameters(ARCHITECTURES[key]) == PUBLISHED[key]


def test_breakdown_sums_to_total_and_llama_has_untied_head():
    llama = parameter_breakdown("llama-2-7b")
    assert llama["output_head"] == 32000 * 4096  # untied: a second vocab × d matrix
    assert parameter_breakdown("gpt2-small")["output_head"] == 0  # tied
    assert sum(llama.values()) == PUBLISHED["llama-2-7b"]


def test_appendix_e_lora_count_for_gpt2_small():
    # Appendix E of "Build a Large Language Model From Scratch" prints 2,666,528 trainable
    # parameters for rank 16 on every Linear of GPT-2 small, including the new 768 -> 2 head
    # (whose LoRA branch has 16·(768 + 2) = 12,320 parameters). Its model has separate
    # W_query, W_key, W_value: 12 blocks x 221,184.
    book = with_separate_qkv("gpt2-small")
    assert lora_parameters(book, 16, "all-linear") == 12 * 221_184
    assert lora_parameters(book, 16, "all-linear") + 16 * (768 + 2) == 2_666_528
    assert total_parameters(book) == total_parameters("gpt2-small")  # same weights, other LoRA counts


def test_fused_and_separate_qkv_differ_by_two_rd_per_block():
    # fused: r·(d + 3d) = 4rd per block; separate: 3·r·(d + d) = 6rd per block
    d, r, blocks = 768, 16, 12
    fused, separate = ARCHITECTURES["gpt2-small"], with_separate_qkv("gpt2-small")
    assert lora_parameters(fused, r, "q,k,v") == blocks * 4 * r * d == 589_824
    assert lora_parameters(separate, r, "q,k,v") == blocks * 6 * r * d == 884_736
    assert lora_parameters(fused, r, "all-linear") == 2_359_296
    assert lora_parameters(separate, r, "all-linear") - lora_parameters(fused, r, "all-linear") == blocks * 2 * r * d
    # PEFT's default for GPT-2 (c_attn) at rank 8 trains exactly as many numbers as q,v separately
    assert lora_parameters(fused, 8, "q,k,v") == lora_parameters(separate, 8, "q,v") == 294_912


def test_fused_qkv_cannot_target_q_and_v_alone():
    with pytest.raises(ValueError, match="cannot adapt 'q,v' without the rest.*with_separate_qkv"):
        lora_parameters("gpt2-small", 8, "q,v")
    assert available_targets("gpt2-small") == ["q,k,v", "attention", "all-linear"]
    assert available_targets("llama-2-7b") == list(TARGETS)


# --------------------------------------------------------------------------------------------
# Against PEFT on real-shaped Hugging Face models
# --------------------------------------------------------------------------------------------
def _peft_trainable(model, target_modules, rank):
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "fan_in_fan_out is set to False ... Conv1D": PEFT fixes it itself
        wrapped = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=target_modules))
    return sum(p.numel() for p in wrapped.parameters() if p.requires_grad)


def _meta_gpt2():
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):  # the real 124M shapes, no memory
        return transformers.GPT2LMHeadModel(transformers.GPT2Config())


def test_gpt2_small_total_equals_transformers():
    assert sum(p.numel() for p in _meta_gpt2().parameters()) == total_parameters("gpt2-small")


@pytest.mark.parametrize("targets, peft_targets", [("q,k,v", ["c_attn"]),
                                                   ("attention", ["c_attn", "attn.c_proj"]),
                                                   ("all-linear", "all-linear")])
def test_gpt2_lora_counts_equal_peft(targets, peft_targets):
    assert _peft_trainable(_meta_gpt2(), peft_targets, 16) == lora_parameters("gpt2-small", 16, targets)


def test_peft_target_modules_for_gpt2_match_every_linear_but_the_head():
    names = peft_target_modules("gpt2-small", "all-linear")
    assert names == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    assert _peft_trainable(_meta_gpt2(), names, 16) == 2_359_296  # = PEFT's "all-linear" (lm_head left out)


def test_peft_suffix_match_of_c_proj_catches_both_projections():
    # "c_proj" is a suffix of attn.c_proj AND mlp.c_proj: PEFT adapts both (the attention output
    # and the feed-forward down projection), r·(4d + 2d + 5d) per block.
    assert _peft_trainable(_meta_gpt2(), ["c_attn", "c_proj"], 16) == 12 * 16 * (4 + 2 + 5) * 768 == 1_622_016


def test_peft_all_linear_on_gpt2_numbers_of_notebook_01():
    assert _peft_trainable(_meta_gpt2(), "all-linear", 8) == lora_parameters("gpt2-small", 8, "all-linear") == 1_179_648
    assert _peft_trainable(_meta_gpt2(), ["c_attn", "attn.c_proj"], 8) == lora_parameters("gpt2-small", 8, "attention") == 442_368


def _meta_llama_2_7b():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                                      max_position_embeddings=4096, tie_word_embeddings=False)
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(config)


def test_llama_2_7b_total_and_lora_counts_equal_transformers_and_peft():
    assert sum(p.numel() for p in _meta_llama_2_7b().parameters()) == PUBLISHED["llama-2-7b"]
    assert peft_target_modules("llama-2-7b", "q,v") == ["q_proj", "v_proj"]
    assert _peft_trainable(_meta_llama_2_7b(), ["q_proj", "v_proj"], 8) == lora_parameters("llama-2-7b", 8, "q,v")
    assert _peft_trainable(_meta_llama_2_7b(), "all-linear", 8) == lora_parameters("llama-2-7b", 8, "all-linear")


def test_lora_paper_gpt3_budgets():
    # LoRA paper: GPT-3 175B (d = 12288, 96 layers) with W_q, W_v adapted trains 4.7M parameters
    # at r = 1 and 37.7M at r = 8 (Table 4), and 18M at r = 4 (§7.1, Table 5).
    gpt3 = Architecture("GPT-3", 50257, 12288, 96, 96, 4 * 12288, 2048)
    assert lora_parameters(gpt3, 1, "q,v") == 4_718_592
    assert lora_parameters(gpt3, 4, "q,v") == 18_874_368
    assert lora_parameters(gpt3, 8, "q,v") == 37_748_736


def test_course_gpt_matches_real_module():
    cfg = GPTConfig(vocab_size=97, context_length=11, emb_dim=16, n_heads=2, n_layers=3)
    model = GPTModel(cfg)
    assert total_parameters(from_gpt_config(cfg)) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("targets, names", [("q,v", ["W_query", "W_value"]),
                                            ("attention", ["W_query", "W_key", "W_value", "out_proj"]),
                                            ("all-linear", r"trf_blocks\.\d+\.(att\..*|ff\.layers\.\d)")])
def test_lora_count_matches_wrapped_module(targets, names):
    cfg = GPTConfig(vocab_size=50, context_length=8, emb_dim=32, n_heads=4, n_layers=2)
    model = GPTModel(cfg)
    replace_linear_with_lora(model, rank=4, alpha=8, target_modules=names)
    trainable = mark_only_lora_as_trainable(model)
    assert trainable == lora_parameters(from_gpt_config(cfg), 4, targets)


class _SwiGLUBlock(nn.Module):
    """A Llama-style block written with plain torch modules, as an independent count."""

    def __init__(self, d, f):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.gate, self.up, self.down = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False), nn.Linear(f, d, bias=False)
        self.norm1, self.norm2 = nn.RMSNorm(d), nn.RMSNorm(d)


def test_llama_style_count_matches_torch_modules():
    arch = Architecture("tiny llama", 101, 24, 3, 4, 40, None, mlp="swiglu", qkv_bias=False, bias=False,
                        norm="rmsnorm", tied_embeddings=False)
    model = nn.ModuleDict({"emb": nn.Embedding(101, 24), "blocks": nn.ModuleList(_SwiGLUBlock(24, 40) for _ in range(3)),
                           "norm": nn.RMSNorm(24), "head": nn.Linear(24, 101, bias=False)})
    assert total_parameters(arch) == sum(p.numel() for p in model.parameters())
    # all-linear LoRA: r·(in + out) summed over the seven matrices of each block
    assert lora_parameters(arch, 2, "all-linear") == 3 * 2 * (4 * 48 + 3 * 64)


def test_memory_and_checkpoint_rows():
    rows = cost_table("gpt2-small", ranks=(8,))  # default targets for GPT-2: its fused c_attn
    full, lora = rows
    assert lora["method"] == "LoRA r=8 (q,k,v)"
    n = PUBLISHED["gpt2-small"]
    assert full["memory_bytes"] == 16 * n  # weight + gradient + Adam m + Adam v, float32
    assert full["checkpoint_bytes"] == 4 * n
    assert lora["trainable"] == 12 * 8 * (768 + 3 * 768) == 294_912
    # LoRA stores the frozen model and A, B (4 bytes each); A and B also have a gradient and
    # Adam's m and v (12 bytes each): 4 · (124,439,808 + 294,912) + 12 · 294,912, by hand.
    assert lora["memory_bytes"] == 4 * (n + 294_912) + 12 * 294_912 == 502_477_824
    assert lora["checkpoint_bytes"] == 4 * lora["trainable"]
    assert training_memory(10, 10, bytes_per_value=2) == 80
    assert accounting.training_memory_bytes(0, 10)["gradients"] == 0


def test_mixed_precision_is_still_16_bytes_per_trainable_parameter():
    # ZeRO (arXiv:1910.02054) §3.1: 2 + 2 + K with K = 12 (fp32 master, m, v): 16 bytes
    assert sum(mixed_precision_memory(10, 10).values()) == 16 * 10 == training_memory(10, 10)
    assert sum(mixed_precision_memory(0, 10).values()) == 2 * 10  # frozen: the 16-bit weight only
    with pytest.raises(ValueError, match="need 0 <= trainable <= total"):
        mixed_precision_memory(11, 10)


def test_block_matrices_accepts_a_key():
    assert block_matrices("gpt2-small") == block_matrices(ARCHITECTURES["gpt2-small"])
    assert block_matrices("gpt2-small")["qkv"] == (768, 2304)
    assert block_matrices(with_separate_qkv("gpt2-small"))["k"] == (768, 768)
    assert block_matrices("llama-2-7b")["gate"] == (4096, 11008)


def test_clear_errors():
    with pytest.raises(ValueError, match="unknown architecture 'gpt-2'"):
        get_architecture("gpt-2")
    with pytest.raises(ValueError, match="unknown architecture"):
        block_matrices("gpt-2")
    with pytest.raises(ValueError, match="unknown targets"):
        lora_parameters("gpt2-small", 8, "qv")
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        lora_parameters("gpt2-small", 0)
    with pytest.raises(ValueError, match="mlp must be"):
        Architecture("x", 10, 8, 1, 1, 32, None, mlp="relu")
    with pytest.raises(ValueError, match="no PEFT module names"):
        peft_target_modules(from_gpt_config(GPTConfig(vocab_size=10)), "q,v")


# --------------------------------------------------------------------------------------------
# The checkers of notebooks 01 and 13 (lora_course.exercises_costs)
# --------------------------------------------------------------------------------------------
def test_cost_exercise_checkers_accept_the_answers_and_explain_slips():
    from lora_course import exercises_costs as ex

    assert ex.check_gpt3_lora_count(18_874_368)  # LoRA paper §7.1: "18M"
    assert "one matrix per block" in repr(ex.check_gpt3_lora_count(9_437_184))
    assert ex.check_gpt3_lora_count(None).status == "not done"
    assert ex.check_mixed_precision_bytes(16, 2)  # ZeRO §3.1: 2 + 2 + 12
    assert "master copy" in repr(ex.check_mixed_precision_bytes(12, 2))
    assert not ex.check_mixed_precision_bytes(16, 4)
    # GPT-2 small's last block: 4·768² + 2·768·3072 weights, 3·768 + 768 + 3072 + 768 biases, 4·768 norm values
    assert ex.last_block_parameters() == 4 * 768**2 + 2 * 768 * 3072 + 5 * 768 + 3072 + 4 * 768 == 7_087_872
    assert ex.check_rank_for_last_block(48)  # 48 · 147,456 = 7,077,888 <= 7,087,872 < 49 · 147,456
    assert "just over" in repr(ex.check_rank_for_last_block(49))
    assert ex.check_equal_budget_rank(4, fused_rank=6)
    assert not ex.check_equal_budget_rank(6, fused_rank=6)
    assert not ex.check_rank_for_last_block("48")


def test_notebook_13_checkers():
    from lora_course import exercises_costs as ex

    # GPT-2 medium, r = 8: 24 · 8 · (4d + 2d + 5d + 5d) fused, 2 · 8 · d more per block separate
    assert ex.check_gpt2_medium_counts(24 * 8 * 16 * 1024, 24 * 8 * 18 * 1024)
    assert "three d × d" in repr(ex.check_gpt2_medium_counts(24 * 8 * 16 * 1024, 24 * 8 * 16 * 1024))

    def right(weight, bias):
        linear = nn.Linear(*weight.shape)
        with torch.no_grad():
            linear.weight.copy_(weight.T)
            linear.bias.copy_(bias)
        return linear

    def untransposed(weight, bias):
        linear = nn.Linear(weight.shape[1], weight.shape[0])
        return linear

    assert ex.check_conv1d_to_linear(right)
    assert "transpose" in repr(ex.check_conv1d_to_linear(untransposed))
    assert ex.check_conv1d_to_linear(lambda w, b: None).status == "not done"
