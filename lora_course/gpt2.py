"""Real GPT-2 weights, as Hugging Face publishes them, in the course's book-style ``GPTModel``.

A user's download of GPT-2 (https://huggingface.co/openai-community/gpt2) holds two files this
module reads: ``config.json`` (the shape) and ``model.safetensors`` (the weights). Neither can
run code: JSON is data, and safetensors is a header plus raw tensor bytes (no pickle).

Hugging Face's GPT-2 differs from the book's model in three ways, and the converter undoes each:

1. **Conv1D stores weights as in × out.** GPT-2's linear layers are ``Conv1D`` modules that
   compute ``y = x @ W + b`` with W of shape (in, out); ``nn.Linear`` computes ``x @ W.T + b``
   with W of shape (out, in). So every weight is transposed: ``Linear.weight = W_conv1d.T``.
2. **q, k and v are fused.** ``attn.c_attn`` is one (d, 3d) matrix whose output columns are
   [q | k | v]; the book has three (d, d) layers ``W_query``, ``W_key``, ``W_value``. We split
   the columns (and the bias) in three, in that order, then transpose each.
3. **The output head is tied.** GPT-2 reuses the token embedding ``wte`` (V, d) as its output
   head, so the file has no head; the book's ``out_head`` is a separate Linear(d, V, bias=False),
   so we give it a copy of ``wte`` (the book does the same). Untied, the course model has
   38,597,376 more parameters (one more V × d matrix) than GPT-2's published 124,439,808.

Names, HF (with or without a ``transformer.`` prefix) -> course:

    wte.weight (V, d)                   -> tok_emb.weight, and a copy in out_head.weight
    wpe.weight (P, d)                   -> pos_emb.weight
    h.{i}.ln_1.weight / .bias           -> trf_blocks.{i}.norm1.scale / .shift
    h.{i}.attn.c_attn.weight (d, 3d)    -> att.W_query / W_key / W_value .weight  (split, .T)
    h.{i}.attn.c_attn.bias (3d,)        -> att.W_query / W_key / W_value .bias    (split)
    h.{i}.attn.c_proj.weight (d, d)     -> att.out_proj.weight (.T), bias as it is
    h.{i}.ln_2.weight / .bias           -> trf_blocks.{i}.norm2.scale / .shift
    h.{i}.mlp.c_fc.weight (d, 4d)       -> ff.layers.0.weight (.T)
    h.{i}.mlp.c_proj.weight (4d, d)     -> ff.layers.2.weight (.T)
    ln_f.weight / .bias                 -> final_norm.scale / .shift

Every check runs on the file's header (names and shapes) before a tensor is read, so a wrong
file fails fast and with a message that names it. ``tests/test_gpt2.py`` checks the logits
against ``transformers.GPT2LMHeadModel`` itself.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .errors import CheckpointError
from .gpt import GPTConfig, GPTModel

HF_REPO_URL = "https://huggingface.co/openai-community/gpt2"
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
HOW_TO_GET = (f"download {CONFIG_FILE} and {WEIGHTS_FILE} from {HF_REPO_URL}/tree/main (or run "
              "`python scripts/appendix_e.py`, which downloads them), and put both in one folder")

#: Tensors a GPT-2 file may hold that are not weights: the causal-mask buffers of old
#: transformers versions (``attn.bias``, ``attn.masked_bias``) and the tied head ``lm_head``.
_IGNORED = re.compile(r"(h\.\d+\.attn\.(bias|masked_bias)|lm_head\.weight)")
#: The activations that are GPT-2's tanh-approximated GELU, which the course's FeedForward uses.
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


class GPT2FormatError(CheckpointError):
    """A file that is not (or does not match) a Hugging Face GPT-2 checkpoint (a ValueError)."""


# --------------------------------------------------------------------------------------------
# config.json -> GPTConfig
# --------------------------------------------------------------------------------------------
def read_hf_config(path) -> dict:
    """Read a Hugging Face ``config.json`` (plain JSON: nothing in it can run)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} at {path}: {HOW_TO_GET}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GPT2FormatError(f"{path} is not a JSON file ({exc}); it should be GPT-2's {CONFIG_FILE}") from None
    if not isinstance(config, dict):
        raise GPT2FormatError(f"{path} holds a JSON {type(config).__name__}, not the object of a {CONFIG_FILE}")
    return config


def config_from_hf(config: dict, source: str = CONFIG_FILE) -> GPTConfig:
    """The course's ``GPTConfig`` for a Hugging Face GPT-2 config (as read from config.json).

    GPT-2 has biases on q, k, v (``qkv_bias=True``). Dropout is set to 0, as appendix E does
    (fine-tuning rarely uses it; ``drop_rate`` can be changed afterwards with
    ``dataclasses.replace``). Settings the course's model cannot represent are refused here, so
    a loaded model never computes something else than the checkpoint's authors trained.
    """
    model_type = config.get("model_type")
    if model_type != "gpt2":
        raise GPT2FormatError(f"{source} describes a {model_type or 'model without a model_type'!r} model, not "
                              "GPT-2 (model_type 'gpt2'); this loader reads GPT-2 checkpoints only")
    missing = [k for k in ("n_embd", "n_layer", "n_head", "n_positions", "vocab_size") if k not in config]
    if missing:
        raise GPT2FormatError(f"{source} has no {', '.join(missing)}: it is not a complete GPT-2 config")
    d = config["n_embd"]
    unsupported = {
        "n_inner": (config.get("n_inner") in (None, 4 * d), f"a feed-forward width of 4·n_embd = {4 * d}"),
        "activation_function": (config.get("activation_function", "gelu_new") in _TANH_GELU,
                                "the tanh-approximated GELU ('gelu_new')"),
        "layer_norm_epsilon": (config.get("layer_norm_epsilon", 1e-5) == 1e-5, "layer_norm_epsilon = 1e-5"),
        "scale_attn_weights": (config.get("scale_attn_weights", True) is True, "attention scaled by 1/sqrt(head_dim)"),
        "scale_attn_by_inverse_layer_idx": (config.get("scale_attn_by_inverse_layer_idx", False) is False,
                                            "no extra scaling by layer index"),
        "add_cross_attention": (config.get("add_cross_attention", False) is False, "no cross-attention"),
    }
    for key, (ok, needed) in unsupported.items():
        if not ok:
            raise GPT2FormatError(f"{source} sets {key} = {config.get(key)!r}; the course's GPTModel supports only "
                                  f"{needed}, as in the released GPT-2 checkpoints")
    try:
        return GPTConfig(vocab_size=config["vocab_size"], context_length=config["n_positions"], emb_dim=d,
                         n_heads=config["n_head"], n_layers=config["n_layer"], drop_rate=0.0, qkv_bias=True)
    except (TypeError, ValueError) as exc:
        raise GPT2FormatError(f"{source}: {exc}") from None


# --------------------------------------------------------------------------------------------
# Checking a file's names and shapes against the config
# --------------------------------------------------------------------------------------------
def gpt2_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """The tensors of a GPT-2 checkpoint for ``cfg``, HF name (no prefix) -> Conv1D-layout shape."""
    d, V, P = cfg.emb_dim, cfg.vocab_size, cfg.context_length
    shapes = {"wte.weight": (V, d), "wpe.weight": (P, d), "ln_f.weight": (d,), "ln_f.bias": (d,)}
    for i in range(cfg.n_layers):
        shapes.update({
            f"h.{i}.ln_1.weight": (d,), f"h.{i}.ln_1.bias": (d,),
            f"h.{i}.attn.c_attn.weight": (d, 3 * d), f"h.{i}.attn.c_attn.bias": (3 * d,),
            f"h.{i}.attn.c_proj.weight": (d, d), f"h.{i}.attn.c_proj.bias": (d,),
            f"h.{i}.ln_2.weight": (d,), f"h.{i}.ln_2.bias": (d,),
            f"h.{i}.mlp.c_fc.weight": (d, 4 * d), f"h.{i}.mlp.c_fc.bias": (4 * d,),
            f"h.{i}.mlp.c_proj.weight": (4 * d, d), f"h.{i}.mlp.c_proj.bias": (d,),
        })
    return shapes


def _what_is_it(names) -> str:
    """A guess at what a non-GPT-2 file is, for the error message."""
    names = list(names)
    if any(n.startswith(("tok_emb.", "trf_blocks.")) for n in names):
        return ("it is a lora_course (book-style) checkpoint; load it with lora_course.gpt.load_gpt, "
                "not with the GPT-2 converter")
    if any("word_embeddings" in n or ".encoder.layer." in n or n.startswith("encoder.layer.") for n in names):
        return "its names (embeddings.word_embeddings, encoder.layer.*) are those of a BERT-like encoder"
    if any(n.endswith(("embed_tokens.weight", "q_proj.weight")) for n in names):
        return "its names (embed_tokens, q_proj, ...) are those of a Llama-like model"
    return f"it has no 'wte.weight' (its first tensors are {', '.join(names[:3]) or 'none: it is empty'})"


def find_prefix(names, source: str = WEIGHTS_FILE) -> str:
    """The prefix in front of GPT-2's names: '' (a download of openai-community/gpt2),
    'transformer.' (``GPT2LMHeadModel.save_pretrained``) or any other, found from ``wte.weight``."""
    prefixes = sorted({n[: -len("wte.weight")] for n in names if n == "wte.weight" or n.endswith(".wte.weight")})
    if not prefixes:
        raise GPT2FormatError(f"{source} is not a GPT-2 checkpoint: {_what_is_it(names)}")
    if len(prefixes) > 1:
        raise GPT2FormatError(f"{source} holds more than one GPT-2 ({', '.join(repr(p) for p in prefixes)}); "
                              "save a single model")
    return prefixes[0]


def check_gpt2_shapes(shapes: dict[str, tuple[int, ...]], cfg: GPTConfig, source: str = WEIGHTS_FILE,
                      config_source: str = CONFIG_FILE) -> str:
    """Check a file's tensor names and shapes (``shapes``: name -> shape) against ``cfg``.
    Returns the name prefix. Raises ``GPT2FormatError`` naming the first problem."""
    prefix = find_prefix(shapes, source)
    own = {n[len(prefix):]: s for n, s in shapes.items() if n.startswith(prefix)}
    others = sorted(n for n in shapes if not n.startswith(prefix))
    # The sizes the tensors themselves imply, against what config.json says.
    wte, wpe = own["wte.weight"], own.get("wpe.weight")
    blocks = {int(m.group(1)) for n in own if (m := re.match(r"h\.(\d+)\.", n))}
    implied = {"vocab_size": wte[0], "n_embd": wte[-1], "n_layer": len(blocks),
               "n_positions": wpe[0] if wpe else None}
    declared = {"vocab_size": cfg.vocab_size, "n_embd": cfg.emb_dim, "n_layer": cfg.n_layers,
                "n_positions": cfg.context_length}
    for key, value in implied.items():
        if value is not None and value != declared[key]:
            raise GPT2FormatError(f"{config_source} and {source} disagree: {config_source} says {key} = "
                                  f"{declared[key]}, but the tensors in {source} have {key} = {value}. "
                                  "Use the config.json that came with these weights.")
    expected = gpt2_shapes(cfg)
    missing = [n for n in expected if n not in own]
    if missing:
        raise GPT2FormatError(f"{source} is missing the tensor {prefix + missing[0]!r} ({len(missing)} missing in "
                              "all): the file is incomplete or damaged; download it again")
    unexpected = others + sorted(n for n in own if n not in expected and not _IGNORED.fullmatch(n))
    if unexpected:
        raise GPT2FormatError(f"{source} has a tensor {unexpected[0]!r} that GPT-2 does not have "
                              f"({len(unexpected)} unexpected in all): it is not a plain GPT-2 checkpoint")
    for name, shape in expected.items():
        if tuple(own[name]) != shape:
            raise GPT2FormatError(f"{source}: {prefix + name!r} has shape {tuple(own[name])}, but a GPT-2 of this "
                                  f"{config_source} needs {shape}")
    return prefix


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------
def convert_gpt2_state_dict(tensors: dict[str, torch.Tensor], cfg: GPTConfig,
                            source: str = WEIGHTS_FILE) -> dict[str, torch.Tensor]:
    """Hugging Face GPT-2 tensors (Conv1D layout, fused c_attn) -> a state dict of the course's
    ``GPTModel(cfg)``. The input is checked first (``check_gpt2_shapes``) and is not modified."""
    prefix = check_gpt2_shapes({n: tuple(t.shape) for n, t in tensors.items()}, cfg, source)
    hf = {n[len(prefix):]: t for n, t in tensors.items()}
    d = cfg.emb_dim

    def linear(name: str) -> torch.Tensor:  # Conv1D (in, out) -> nn.Linear (out, in)
        return hf[name].T.contiguous()

    state = {"tok_emb.weight": hf["wte.weight"], "pos_emb.weight": hf["wpe.weight"],
             "final_norm.scale": hf["ln_f.weight"], "final_norm.shift": hf["ln_f.bias"],
             # an untied copy: training the head must not change the token embedding
             "out_head.weight": hf["wte.weight"].clone()}
    for i in range(cfg.n_layers):
        h, b = f"h.{i}.", f"trf_blocks.{i}."
        # c_attn's output columns are [q | k | v], each d wide: (d, 3d) -> three (d, d)
        q, k, v = hf[h + "attn.c_attn.weight"].split(d, dim=1)
        q_bias, k_bias, v_bias = hf[h + "attn.c_attn.bias"].split(d, dim=0)
        state.update({
            b + "att.W_query.weight": q.T.contiguous(), b + "att.W_query.bias": q_bias.contiguous(),
            b + "att.W_key.weight": k.T.contiguous(), b + "att.W_key.bias": k_bias.contiguous(),
            b + "att.W_value.weight": v.T.contiguous(), b + "att.W_value.bias": v_bias.contiguous(),
            b + "att.out_proj.weight": linear(h + "attn.c_proj.weight"), b + "att.out_proj.bias": hf[h + "attn.c_proj.bias"],
            b + "ff.layers.0.weight": linear(h + "mlp.c_fc.weight"), b + "ff.layers.0.bias": hf[h + "mlp.c_fc.bias"],
            b + "ff.layers.2.weight": linear(h + "mlp.c_proj.weight"), b + "ff.layers.2.bias": hf[h + "mlp.c_proj.bias"],
            b + "norm1.scale": hf[h + "ln_1.weight"], b + "norm1.shift": hf[h + "ln_1.bias"],
            b + "norm2.scale": hf[h + "ln_2.weight"], b + "norm2.shift": hf[h + "ln_2.bias"],
        })
    return state


def gpt2_from_state_dict(tensors: dict[str, torch.Tensor], cfg: GPTConfig, source: str = WEIGHTS_FILE) -> GPTModel:
    """A course ``GPTModel`` (eval mode) holding the Hugging Face GPT-2 ``tensors``."""
    state = {name: t.float() for name, t in convert_gpt2_state_dict(tensors, cfg, source).items()}
    with torch.device("meta"):  # allocates nothing: the converted tensors become the parameters
        model = GPTModel(cfg)
    # The file was checked name by name and shape by shape (check_gpt2_shapes, in the style of
    # lora_course.gpt.load_checked_state), so a mismatch here would be a bug in this module;
    # strict loading would still say so. assign=True: no copy, no second 650 MB.
    model.load_state_dict(state, assign=True)
    return model.eval()


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------
def _read_header(path: Path):
    """(names -> shapes) of a safetensors file, reading only its header."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise GPT2FormatError(f"{path} is not a readable safetensors file ({exc}); it should be GPT-2's "
                              f"{WEIGHTS_FILE}: {HOW_TO_GET}") from None


def gpt2_files(model_dir) -> tuple[Path, Path]:
    """(config.json, model.safetensors) in ``model_dir``, with a clear error when one is missing."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir} is not a folder. The GPT-2 loader needs a folder with "
                                f"{CONFIG_FILE} and {WEIGHTS_FILE}: {HOW_TO_GET}")
    config_path, weights_path = model_dir / CONFIG_FILE, model_dir / WEIGHTS_FILE
    missing = [p.name for p in (config_path, weights_path) if not p.is_file()]
    if missing:
        pickled = [p.name for p in model_dir.glob("*.bin")] + [p.name for p in model_dir.glob("*.pt*")]
        note = (f" ({', '.join(sorted(pickled))} is a pickle file, which can run code when loaded; "
                "the course reads safetensors only)") if pickled and WEIGHTS_FILE in missing else ""
        raise FileNotFoundError(f"{model_dir} has no {' and no '.join(missing)}{note}. The GPT-2 loader needs "
                                f"{CONFIG_FILE} and {WEIGHTS_FILE} there: {HOW_TO_GET}")
    return config_path, weights_path


def load_gpt2(model_dir) -> GPTModel:
    """Load Hugging Face GPT-2 (``config.json`` + ``model.safetensors`` in ``model_dir``) into the
    course's ``GPTModel``, in eval mode, on the CPU. Any size of GPT-2 works (small to XL).

    Checks the config and every tensor's name and shape before reading the weights; a file of
    another model, another size, or a damaged one raises ``GPT2FormatError`` (a ``ValueError``)
    that names the file and the problem.
    """
    from safetensors.torch import load_file

    config_path, weights_path = gpt2_files(model_dir)
    cfg = config_from_hf(read_hf_config(config_path), source=str(config_path))
    check_gpt2_shapes(_read_header(weights_path), cfg, str(weights_path), str(config_path))
    return gpt2_from_state_dict(load_file(str(weights_path)), cfg, str(weights_path))
