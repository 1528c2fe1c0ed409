"""Parameter counts of real transformer architectures, from their published shapes alone.

No weights are needed to know what fine-tuning a model costs: its shape (vocabulary, width,
depth, feed-forward size, which layers have biases) fixes how many numbers it has, and those
numbers fix the memory of training and the size of a checkpoint. Notebook 01 uses this module
to compare full fine-tuning with LoRA on GPT-2 (small to XL) and Llama-2-7B.

Shapes come from the models' published configurations (Radford et al. 2019, GPT-2; Touvron
et al. 2023, Llama 2). The unit tests check every total against the published count.

Conventions: a weight matrix is described as (in_features, out_features), like nn.Linear.

Fused or separate q, k, v. GPT-2 as OpenAI and Hugging Face ship it stores the query, key and
value projections in one fused ``c_attn`` matrix (d × 3d); the book's GPT (and this course's)
has three d × d layers. The model has the same number of weights either way, but LoRA does
not: an adapter on the fused matrix is one A (d × r) and one B (r × 3d), r·(d + 3d) = 4rd
numbers, while three separate adapters are 3·r·(d + d) = 6rd. And a fused adapter cannot adapt
q and v without k. ``Architecture.fused_qkv`` records which layout a model has, so that the
counts here equal what PEFT counts on the real model (``tests/test_architectures.py`` runs
PEFT on a real-shaped ``GPT2LMHeadModel`` to check). ``with_separate_qkv`` gives the same model
with three projections, as appendix E's model has.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from .accounting import lora_parameter_count, training_memory_bytes
from .lora import _check_rank


@dataclass(frozen=True)
class Architecture:
    """The shape of a decoder-only transformer: everything its parameter count depends on.

    Args:
        name: a label for tables.
        vocab_size: rows of the token embedding (and of the output head).
        d_model: the width (embedding size), d.
        n_layers: number of transformer blocks.
        n_heads: attention heads (does not change the count; kept for completeness).
        d_ff: hidden size of the feed-forward block (4·d in GPT-2, 11008 in Llama-2-7B).
        context_length: rows of a learned position embedding (GPT-2); None for rotary
            position encodings (Llama), which have no parameters.
        mlp: "gelu" (two matrices, up and down, as in GPT-2) or "swiglu" (three: gate, up and
            down, as in Llama).
        qkv_bias: whether the query, key and value projections have biases.
        bias: whether the other linear layers (attention output, feed-forward) have biases.
        norm: "layernorm" (scale and shift, 2·d numbers) or "rmsnorm" (scale only, d numbers).
        tied_embeddings: the output head reuses the token embedding (GPT-2): no extra weights.
        head_bias: whether an untied output head has a bias.
        fused_qkv: q, k and v are one (d × 3d) matrix, as GPT-2's ``c_attn``; False: three
            d × d matrices, as in Llama and in the book's GPT.
    """

    name: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    context_length: int | None
    mlp: str = "gelu"
    qkv_bias: bool = True
    bias: bool = True
    norm: str = "layernorm"
    tied_embeddings: bool = True
    head_bias: bool = False
    fused_qkv: bool = False

    def __post_init__(self):
        for field_name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff"):
            value = getattr(self, field_name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{field_name} must be a positive integer, got {value!r}")
        if self.mlp not in ("gelu", "swiglu"):
            raise ValueError(f"mlp must be 'gelu' (up, down) or 'swiglu' (gate, up, down), got {self.mlp!r}")
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {self.norm!r}")


#: The published shapes. Totals (checked in tests/test_architectures.py): GPT-2 small
#: 124,439,808; medium 354,823,168; large 774,030,080; XL 1,557,611,200; Llama-2-7B 6,738,415,616.
ARCHITECTURES: dict[str, Architecture] = {
    "gpt2-small": Architecture("GPT-2 small", 50257, 768, 12, 12, 3072, 1024, fused_qkv=True),
    "gpt2-medium": Architecture("GPT-2 medium", 50257, 1024, 24, 16, 4096, 1024, fused_qkv=True),
    "gpt2-large": Architecture("GPT-2 large", 50257, 1280, 36, 20, 5120, 1024, fused_qkv=True),
    "gpt2-xl": Architecture("GPT-2 XL", 50257, 1600, 48, 25, 6400, 1024, fused_qkv=True),
    "llama-2-7b": Architecture("Llama-2-7B", 32000, 4096, 32, 32, 11008, None, mlp="swiglu",
                               qkv_bias=False, bias=False, norm="rmsnorm", tied_embeddings=False),
}

#: Which weight matrices of each block LoRA adapts, by the roles used in ``block_matrices``.
#: "q,v" is the LoRA paper's default (§7.1) and PEFT's default for Llama; "q,k,v" is PEFT's
#: default for GPT-2 (its fused ``c_attn``); "all-linear" is every matrix of the block (PEFT's
#: "all-linear", which leaves out the output head).
ATTENTION = ("q", "k", "v", "qkv", "o")
TARGETS: dict[str, tuple[str, ...]] = {
    "q,v": ("q", "v"),
    "q,k,v": ("q", "k", "v"),
    "attention": ("q", "k", "v", "o"),
    "all-linear": ("q", "k", "v", "o", "gate", "up", "down"),
}

#: PEFT's module names for each role: GPT-2 (Hugging Face ``GPT2LMHeadModel``, fused) and
#: Llama (``LlamaForCausalLM``). A name matches a module whose full name ends with it.
PEFT_MODULE_NAMES = {
    "gpt2": {"qkv": "attn.c_attn", "o": "attn.c_proj", "up": "mlp.c_fc", "down": "mlp.c_proj"},
    "llama": {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj",
              "up": "up_proj", "down": "down_proj"},
}


def get_architecture(name: str | Architecture) -> Architecture:
    """Look up one of ``ARCHITECTURES`` by key (an ``Architecture`` is returned as it is), with a
    helpful error for a typo."""
    if isinstance(name, Architecture):
        return name
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; choose one of {', '.join(ARCHITECTURES)}") from None


def from_gpt_config(cfg, name: str = "course GPT") -> Architecture:
    """The ``Architecture`` of the course's own ``GPTModel`` (lora_course.gpt): untied head without
    bias, LayerNorm, GELU feed-forward of width 4·d, learned position embeddings."""
    return Architecture(name, cfg.vocab_size, cfg.emb_dim, cfg.n_layers, cfg.n_heads, 4 * cfg.emb_dim,
                        cfg.context_length, mlp="gelu", qkv_bias=cfg.qkv_bias, bias=True, norm="layernorm",
                        tied_embeddings=False, head_bias=False)


def with_separate_qkv(arch: str | Architecture) -> Architecture:
    """The same model with q, k and v as three d × d matrices (the book's GPT-2): the same
    parameters, but other LoRA counts."""
    arch = get_architecture(arch)
    return replace(arch, name=f"{arch.name} (separate q, k, v)", fused_qkv=False)


def block_matrices(arch: str | Architecture) -> dict[str, tuple[int, int]]:
    """The weight matrices of one transformer block as role -> (in_features, out_features).
    Roles: q, k, v (or one fused qkv), o (attention output), gate, up, down (feed-forward)."""
    arch = get_architecture(arch)
    d, f = arch.d_model, arch.d_ff
    if arch.fused_qkv:
        matrices = {"qkv": (d, 3 * d), "o": (d, d)}  # GPT-2's c_attn: output columns [q | k | v]
    else:
        matrices = {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d)}
    if arch.mlp == "swiglu":
        matrices["gate"] = (d, f)  # silu(x W_gate) * (x W_up), then W_down
    matrices["up"] = (d, f)
    matrices["down"] = (f, d)
    return matrices


def parameter_breakdown(arch: Architecture) -> dict[str, int]:
    """Parameters by group: embeddings, attention, feed-forward, norms, output head."""
    arch = get_architecture(arch)
    d, L = arch.d_model, arch.n_layers
    m = block_matrices(arch)
    norm_size = 2 * d if arch.norm == "layernorm" else d  # scale (+ shift)
    attention = sum(i * o for name, (i, o) in m.items() if name in ATTENTION)
    attention += 3 * d * arch.qkv_bias + d * arch.bias  # biases of q, k, v and of the output projection
    feed_forward = sum(i * o for name, (i, o) in m.items() if name not in ATTENTION)
    feed_forward += arch.bias * sum(o for name, (i, o) in m.items() if name not in ATTENTION)
    embeddings = arch.vocab_size * d + (arch.context_length or 0) * d
    head = 0 if arch.tied_embeddings else arch.vocab_size * d + arch.vocab_size * arch.head_bias
    return {
        "embeddings": embeddings,
        "attention": L * attention,
        "feed_forward": L * feed_forward,
        "norms": L * 2 * norm_size + norm_size,  # two per block, one final
        "output_head": head,
    }


def total_parameters(arch) -> int:
    """Every parameter of the architecture (what full fine-tuning trains)."""
    return sum(parameter_breakdown(arch).values())


def target_roles(arch, targets: str) -> list[str]:
    """The roles of ``block_matrices`` that ``targets`` adapts in this architecture. With a fused
    qkv matrix, q, k and v come together or not at all: "q,v" has no meaning there."""
    arch = get_architecture(arch)
    if targets not in TARGETS:
        raise ValueError(f"unknown targets {targets!r}; choose one of {', '.join(map(repr, TARGETS))}")
    wanted = set(TARGETS[targets])
    if arch.fused_qkv:
        qkv = wanted & {"q", "k", "v"}
        if qkv and qkv != {"q", "k", "v"}:
            raise ValueError(
                f"{arch.name} stores q, k and v in one fused matrix (GPT-2's c_attn), so LoRA cannot adapt "
                f"{targets!r} without the rest: an adapter on c_attn adapts q, k and v together. Use 'q,k,v' "
                f"(c_attn, PEFT's default for GPT-2) or 'attention', or count the model with separate "
                "projections, as appendix E's model has them (architectures.with_separate_qkv).")
        if qkv:
            wanted = (wanted - {"q", "k", "v"}) | {"qkv"}
    return [role for role in block_matrices(arch) if role in wanted]


def available_targets(arch) -> list[str]:
    """The names of ``TARGETS`` that make sense for this architecture (no "q,v" when fused)."""
    arch = get_architecture(arch)
    return [t for t in TARGETS if not (arch.fused_qkv and t == "q,v")]


def lora_parameters(arch, rank: int, targets: str = "q,v") -> int:
    """Trainable parameters when LoRA of rank r adapts the ``targets`` matrices of every block:
    n_layers · Σ r·(in + out) over the targeted matrices (A: in×r, B: r×out). A fused qkv
    matrix (d × 3d) counts once: r·(d + 3d), not three times r·(d + d)."""
    arch = get_architecture(arch)
    _check_rank(rank)
    matrices = block_matrices(arch)
    per_block = sum(lora_parameter_count(*matrices[role], rank) for role in target_roles(arch, targets))
    return arch.n_layers * per_block


def peft_target_modules(arch, targets: str) -> list[str]:
    """The ``target_modules`` to give PEFT's ``LoraConfig`` for the same adapters on the Hugging
    Face model (GPT-2: fused; Llama: separate). PEFT's ``"all-linear"`` equals "all-linear"."""
    arch = get_architecture(arch)
    family = "gpt2" if arch.fused_qkv else "llama" if arch.mlp == "swiglu" else None
    if family is None:
        raise ValueError(f"no PEFT module names for {arch.name}: they are known for GPT-2 (fused q, k, v) "
                         "and Llama-style (SwiGLU) models")
    return [PEFT_MODULE_NAMES[family][role] for role in target_roles(arch, targets)]


def training_memory(trainable: int, total: int, bytes_per_value: int = 4) -> int:
    """Bytes for weights + gradients + AdamW's two moments (activations excluded), see
    ``lora_course.accounting.training_memory_bytes``."""
    return sum(training_memory_bytes(trainable, total, bytes_per_value).values())


#: Bytes per parameter in mixed-precision training with AdamW (ZeRO paper, arXiv:1910.02054,
#: §3.1): a trainable parameter keeps its 16-bit weight (2) and 16-bit gradient (2), plus a
#: float32 master copy of the weight (4) and AdamW's two float32 moments m and v (4 + 4):
#: 16 bytes, exactly as in float32 training. A frozen one keeps only its 16-bit weight (2).
MIXED_PRECISION_BYTES = {"weights (16-bit)": 2, "gradients (16-bit)": 2, "master weights (fp32)": 4,
                         "optimizer_states (fp32 m, v)": 8}


def mixed_precision_memory(trainable: int, total: int) -> dict[str, int]:
    """Bytes by kind in mixed-precision AdamW training (activations excluded): every parameter's
    16-bit weight; a 16-bit gradient, a float32 master weight and float32 m and v per trainable one.
    What mixed precision saves is in the activations and the frozen weights, not in the states."""
    if not 0 <= trainable <= total:
        raise ValueError(f"need 0 <= trainable <= total, got trainable={trainable}, total={total}")
    return {"weights (16-bit)": 2 * total, "gradients (16-bit)": 2 * trainable,
            "master weights (fp32)": 4 * trainable, "optimizer_states (fp32 m, v)": 8 * trainable}


def cost_table(arch, ranks=(8,), targets=None, bytes_per_value: int = 4) -> list[dict]:
    """One row for full fine-tuning and one per (targets, rank) under LoRA. ``targets`` defaults
    to the usual first choice: "q,v", or "q,k,v" (the fused c_attn) for GPT-2.

    Each row: method, trainable parameters, their share of the model, training memory in bytes
    (weights, gradients, AdamW states; float32 by default) and the checkpoint a task needs
    (every weight for full fine-tuning; only A and B for LoRA). Under LoRA the stored weights are
    the frozen model plus A and B, and only A and B have gradients and AdamW states.
    """
    arch = get_architecture(arch)
    targets = tuple(targets) if targets is not None else (available_targets(arch)[0],)
    total = total_parameters(arch)
    rows = [{"method": "full fine-tuning", "trainable": total, "share": 1.0,
             "memory_bytes": training_memory(total, total, bytes_per_value),
             "checkpoint_bytes": total * bytes_per_value}]
    for target in targets:
        for rank in ranks:
            n = lora_parameters(arch, rank, target)
            rows.append({"method": f"LoRA r={rank} ({target})", "trainable": n, "share": n / total,
                         "memory_bytes": training_memory(n, total + n, bytes_per_value),
                         "checkpoint_bytes": n * bytes_per_value})
    return rows
