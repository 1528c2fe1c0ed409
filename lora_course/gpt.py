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

from .errors import CheckpointError

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
    """Save weights and config as safetensors (config and ``extra`` go into the JSON header).

    Refused before anything is written: a model that is not a ``GPTModel``, weights with NaN or
    inf, an ``extra`` that is not JSON, a folder as ``path`` or a missing folder. The file is
    written whole or not at all, with ordinary permissions under the user's umask."""
    from .adapters import _check_path, _non_finite, _save_safetensors, _write_atomically
    from .errors import ArgumentTypeError

    if not isinstance(model, GPTModel):
        raise ArgumentTypeError(f"save_gpt saves a lora_course GPTModel, got {type(model).__name__}. For an adapted "
                                "model save the adapter instead: save_adapter(model, path)")
    path = _check_path(path)
    if extra is not None and not isinstance(extra, dict):
        raise ArgumentTypeError(f"extra must be a dict of JSON values, got {type(extra).__name__}")
    extra = extra or {}
    if "config" in extra or not all(isinstance(k, str) for k in extra):
        raise CheckpointError("extra must have str keys other than 'config' (the model's config is stored "
                              f"under it), got keys {list(extra)}")
    try:
        meta = {"config": json.dumps(asdict(model.cfg)), **{k: json.dumps(v, allow_nan=False) for k, v in extra.items()}}
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"cannot save {path!r}: extra must hold finite JSON values (numbers, strings, lists, "
                              f"dicts) ({err})") from err
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    bad = _non_finite(state)
    if bad is not None:
        raise CheckpointError(f"cannot save {path!r}: {bad!r} holds NaN or inf values (did training diverge?). "
                              "Nothing was written.")
    _write_atomically(path, _save_safetensors(state, meta), error=CheckpointError)


def load_gpt(path=PRETRAINED_PATH) -> tuple[GPTModel, dict]:
    """Load a model saved by ``save_gpt``: returns (model in eval mode, the header's extra info).

    A folder, a damaged file, a file that is not a lora_course GPT checkpoint, a config that does
    not build a model, and weights with NaN or inf are refused with a ``CheckpointError`` that
    names the file."""
    from .adapters import _check_path, _non_finite, _open_safetensors

    path = Path(_check_path(path))
    if not path.exists():
        raise FileNotFoundError(f"no model file at {path}. The shipped base model is regenerated with "
                                "`python -m lora_course.pretrain`.")
    meta, state = _open_safetensors(str(path), "model checkpoint", error=CheckpointError)
    if "config" not in meta:
        raise CheckpointError(f"{path} is not a lora_course GPT checkpoint (no 'config' in its header)")
    try:
        config = json.loads(meta.pop("config"))
        extra = {k: json.loads(v) for k, v in meta.items()}
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: the checkpoint header is corrupted (not valid JSON: {err})") from err
    try:
        model = GPTModel(GPTConfig(**config))
    except (TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: the config in its header does not build a GPTModel ({err})") from err
    bad = _non_finite(state)
    if bad is not None:
        raise CheckpointError(f"{path}: tensor {bad!r} holds NaN or inf values, so the checkpoint is broken "
                              "(a diverged training run?). Regenerate or re-download it.")
    load_checked_state(model, state, source=str(path))
    return model.eval(), extra


def load_checked_state(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """``model.load_state_dict(state)`` with a clear message when the checkpoint belongs to a
    different architecture: it names the first missing, unexpected or mis-shaped key. NaN or inf
    values are refused too. Nothing is changed unless every check passes."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise TypeError(f"state must be a dict of str -> torch.Tensor (a state_dict), got {type(state).__name__}")
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing:
        raise CheckpointError(f"{source} is for a different architecture: it has no tensor {missing[0]!r} "
                              f"({len(missing)} missing in all). Build the model with the checkpoint's config.")
    if unexpected:
        raise CheckpointError(f"{source} is for a different architecture: it has {unexpected[0]!r}, which this "
                              f"model does not ({len(unexpected)} unexpected in all)")
    for key, value in state.items():
        if value.shape != own[key].shape:
            raise CheckpointError(f"{source} is for a different architecture: {key!r} has shape "
                                  f"{tuple(value.shape)} there but {tuple(own[key].shape)} in this model")
        if value.is_floating_point() != own[key].is_floating_point():
            raise CheckpointError(f"{source}: {key!r} holds {value.dtype} values but the model's is {own[key].dtype}")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{source}: tensor {key!r} holds NaN or inf values; refusing to load it")
    model.load_state_dict(state)


def load_pretrained_gpt() -> GPTModel:
    """The course's base model: the small GPT pretrained on the generated corpus (eval mode)."""
    return load_gpt(PRETRAINED_PATH)[0]
