"""A small GPT in the style of "Build a Large Language Model From Scratch" (chapter 4).

The layer names are the book's, so LoRA targets read the same here as there:
``trf_blocks.{i}.att.W_query / W_key / W_value / out_proj``, ``trf_blocks.{i}.ff.layers.0 / 2``
(the feed-forward block) and ``out_head``.

Shapes: B = batch, T = tokens, D = emb_dim, H = n_heads, V = vocab_size.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

PRETRAINED_PATH = Path(__file__).parent / "pretrained" / "tiny_gpt.safetensors"


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    context_length: int = 32
    emb_dim: int = 64
    n_heads: int = 4
    n_layers: int = 4
    drop_rate: float = 0.0
    qkv_bias: bool = False


class MultiHeadAttention(nn.Module):
    """Causal self-attention with separate query, key and value projections (the book's names)."""

    def __init__(self, d_in: int, d_out: int, num_heads: int, dropout: float, qkv_bias: bool = False):
        super().__init__()
        if d_out % num_heads:
            raise ValueError(f"d_out ({d_out}) must be divisible by num_heads ({num_heads})")
        self.num_heads, self.head_dim, self.dropout = num_heads, d_out // num_heads, dropout
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape

        def heads(z):  # (B, T, D) -> (B, H, T, D/H)
            return z.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.W_query(x)), heads(self.W_key(x)), heads(self.W_value(x))
        # softmax(q kᵀ / sqrt(D/H)) v with a causal mask: token t only sees tokens <= t.
        z = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(z.transpose(1, 2).reshape(b, t, -1))


class LayerNorm(nn.Module):
    """LayerNorm with the book's parameter names (scale, shift)."""

    def __init__(self, emb_dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.scale, self.shift, self.eps)


class FeedForward(nn.Module):
    def __init__(self, emb_dim: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(emb_dim, 4 * emb_dim), nn.GELU(approximate="tanh"),
                                    nn.Linear(4 * emb_dim, emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class TransformerBlock(nn.Module):
    """Pre-norm block: x + att(norm1(x)), then x + ff(norm2(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.att = MultiHeadAttention(cfg.emb_dim, cfg.emb_dim, cfg.n_heads, cfg.drop_rate, cfg.qkv_bias)
        self.ff = FeedForward(cfg.emb_dim)
        self.norm1, self.norm2 = LayerNorm(cfg.emb_dim), LayerNorm(cfg.emb_dim)
        self.drop_shortcut = nn.Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_shortcut(self.att(self.norm1(x)))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class GPTModel(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg.n_layers)])
        self.final_norm = LayerNorm(cfg.emb_dim)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)

    def features(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, D) hidden states after the final LayerNorm."""
        t = idx.shape[1]
        if t > self.cfg.context_length:
            raise ValueError(f"sequence of {t} tokens is longer than context_length={self.cfg.context_length}")
        pos = torch.arange(t, device=idx.device)
        x = self.drop_emb(self.tok_emb(idx) + self.pos_emb(pos))
        return self.final_norm(self.trf_blocks(x))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, V) logits (or (B, T, classes) after the head is swapped)."""
        return self.out_head(self.features(idx))


def save_gpt(model: GPTModel, path, extra: dict | None = None) -> None:
    """Save weights and config as safetensors (config and ``extra`` go into the JSON header)."""
    from safetensors.torch import save_file

    meta = {"config": json.dumps(asdict(model.cfg)), **{k: json.dumps(v) for k, v in (extra or {}).items()}}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=meta)


def load_gpt(path=PRETRAINED_PATH) -> tuple[GPTModel, dict]:
    """Load a model saved by ``save_gpt``: returns (model in eval mode, the header's extra info)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no model file at {path}. The shipped base model is regenerated with "
                                "`python -m lora_course.pretrain`.")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    if "config" not in meta:
        raise ValueError(f"{path} is not a lora_course GPT checkpoint (no 'config' in its header)")
    model = GPTModel(GPTConfig(**json.loads(meta.pop("config"))))
    load_checked_state(model, state, source=str(path))
    return model.eval(), {k: json.loads(v) for k, v in meta.items()}


def load_checked_state(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """``model.load_state_dict(state)`` with a clear message when the checkpoint belongs to a
    different architecture: it names the first missing, unexpected or mis-shaped key."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing:
        raise ValueError(f"{source} is for a different architecture: it has no tensor {missing[0]!r} "
                         f"({len(missing)} missing in all). Build the model with the checkpoint's config.")
    if unexpected:
        raise ValueError(f"{source} is for a different architecture: it has {unexpected[0]!r}, which this "
                         f"model does not ({len(unexpected)} unexpected in all)")
    for key, value in state.items():
        if value.shape != own[key].shape:
            raise ValueError(f"{source} is for a different architecture: {key!r} has shape "
                             f"{tuple(value.shape)} there but {tuple(own[key].shape)} in this model")
    model.load_state_dict(state)


def load_pretrained_gpt() -> GPTModel:
    """The course's base model: the small GPT pretrained on the generated corpus (eval mode)."""
    return load_gpt(PRETRAINED_PATH)[0]
