"""Parameter counts from published shapes, checked against independent references: the totals the
model authors published, LoRA counts printed in the LoRA paper and in appendix E of the book,
and real PyTorch modules whose numel() we count."""
import pytest
from torch import nn

from lora_course import accounting, mark_only_lora_as_trainable, replace_linear_with_lora
from lora_course.architectures import (ARCHITECTURES, Architecture, block_matrices, cost_table, from_gpt_config,
                                       get_architecture, lora_parameters, parameter_breakdown,
                                       total_parameters, training_memory)
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
    # (whose LoRA branch has 16·(768 + 2) = 12,320 parameters).
    assert lora_parameters("gpt2-small", 16, "all-linear") + 16 * (768 + 2) == 2_666_528


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
    rows = cost_table("gpt2-small", ranks=(8,), targets=("q,v",))
    full, lora = rows
    n = PUBLISHED["gpt2-small"]
    assert full["memory_bytes"] == 16 * n  # weight + gradient + Adam m + Adam v, float32
    assert full["checkpoint_bytes"] == 4 * n
    assert lora["trainable"] == 12 * 2 * 8 * (768 + 768) == 294_912
    # LoRA stores the frozen model and A, B (4 bytes each); A and B also have a gradient and
    # Adam's m and v (12 bytes each): 4 · (124,439,808 + 294,912) + 12 · 294,912, by hand.
    assert lora["memory_bytes"] == 4 * (n + 294_912) + 12 * 294_912 == 502_477_824
    assert lora["checkpoint_bytes"] == 4 * lora["trainable"]
    assert training_memory(10, 10, bytes_per_value=2) == 80
    assert accounting.training_memory_bytes(0, 10)["gradients"] == 0


def test_block_matrices_accepts_a_key():
    assert block_matrices("gpt2-small") == block_matrices(ARCHITECTURES["gpt2-small"])
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
