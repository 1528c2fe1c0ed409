"""Saving and loading LoRA adapters as safetensors files.

An adapter file holds only the LoRA matrices A and B (plus any fully trained modules such as a
new classification head): for one task, r·(in + out) numbers per adapted layer instead of a
copy of the whole model. safetensors stores raw tensor bytes and a JSON header, so loading a file
never runs code (unlike unpickling, ``torch.load(..., weights_only=False)``).

The header's metadata records what the adapter needs to be applied correctly: the adapted layers
with their rank, alpha and scaling; the shapes of every base parameter (the architecture); a
SHA-256 fingerprint of the base weights; and one SHA-256 checksum over the adapter's tensors and
this metadata, so a file that was truncated, corrupted or edited by hand, or saved for another
base model or architecture, is refused with a clear message and leaves the model untouched.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .lora import LinearWithLoRA, _matches, _set_submodule, lora_layers, lora_scaling, mark_only_lora_as_trainable

FORMAT = "lora_course.adapter"
VERSION = 1


class AdapterError(ValueError):
    """An adapter file cannot be applied to this model (wrong model, wrong shapes, bad file)."""


# --------------------------------------------------------------------------------------------
# What belongs to the base model, what to the adapter
# --------------------------------------------------------------------------------------------
def _is_lora_key(key: str) -> bool:
    return ".lora." in key or key.startswith("lora.")


def _base_name(key: str, wrappers: Iterable[str]) -> str:
    """State-dict key as the unwrapped model would name it: 'x.W_query.linear.weight' -> 'x.W_query.weight'.

    Only the ``.linear.`` that a LinearWithLoRA (named in ``wrappers``) inserts is removed, so a
    model that has its own submodule called ``linear`` keeps its names."""
    for wrapper in wrappers:
        prefix = f"{wrapper}.linear." if wrapper else "linear."
        if key.startswith(prefix):
            return (f"{wrapper}." if wrapper else "") + key[len(prefix):]
    return key


def _wrapper_names(model: nn.Module) -> list[str]:
    return [name for name, _ in lora_layers(model)]


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's tensors (everything but LoRA's A and B), under their unwrapped names."""
    if any(layer.merged for _, layer in lora_layers(model)):
        raise AdapterError("the model has merged LoRA layers, so its weights are not the base weights "
                           "(W + ΔW is stored in them); call unmerge_lora_(model) first")
    wrappers = _wrapper_names(model)
    return {_base_name(k, wrappers): v for k, v in model.state_dict().items() if not _is_lora_key(k)}


def _sha256(tensors: dict[str, torch.Tensor], extra: bytes = b"") -> str:
    """SHA-256 over names, shapes, dtypes and raw bytes of the tensors (sorted by name), then ``extra``."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu").contiguous()
        digest.update(f"{key}:{tuple(t.shape)}:{t.dtype}".encode())
        # reshape(-1): a 0-d tensor cannot be viewed as bytes directly.
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    digest.update(extra)
    return digest.hexdigest()


def _metadata_bytes(meta: dict) -> bytes:
    """The metadata in a canonical form (sorted keys), without the checksum it is covered by."""
    return json.dumps({k: v for k, v in meta.items() if k != "sha256"}, sort_keys=True).encode()


def _check_modules_to_save(model: nn.Module, modules_to_save: list[str]) -> None:
    names = [n for n, _ in model.named_modules() if n]
    for name in modules_to_save:
        if not any(_matches(n, [name]) for n in names):
            raise AdapterError(f"modules_to_save: no module named {name!r} in this model "
                               f"(top-level modules: {', '.join(n for n in names if '.' not in n)})")


def base_fingerprint(model: nn.Module, exclude: Iterable[str] = ()) -> str:
    """SHA-256 over the base weights, leaving out modules the adapter itself replaces."""
    exclude = list(exclude)
    state = base_state(model)
    return _sha256({k: v for k, v in state.items() if not (exclude and _matches(k.rpartition(".")[0], exclude))})


def lora_state_dict(model: nn.Module, modules_to_save: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """Only the adapter's tensors: every LoRA A and B, plus the parameters of ``modules_to_save``."""
    modules_to_save = list(modules_to_save)
    _check_modules_to_save(model, modules_to_save)
    wrappers = _wrapper_names(model)
    state = {}
    for key, value in model.state_dict().items():
        owner = _base_name(key, wrappers).rpartition(".")[0]
        if _is_lora_key(key) or (modules_to_save and _matches(owner, modules_to_save)):
            state[key] = value.detach().clone()
    if not any(_is_lora_key(k) for k in state):
        raise AdapterError("the model has no LoRA layers, so there is no adapter to save; "
                           "add them with replace_linear_with_lora(model, rank, alpha)")
    return state


# --------------------------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------------------------
def adapter_metadata(model: nn.Module, modules_to_save: Iterable[str] = ()) -> dict:
    modules_to_save = list(modules_to_save)
    return {
        "format": FORMAT,
        "version": VERSION,
        "layers": {name: {"rank": layer.lora.rank, "alpha": layer.lora.alpha, "scaling": layer.lora.scaling_name,
                          "in_features": layer.in_features, "out_features": layer.out_features}
                   for name, layer in lora_layers(model)},
        "modules_to_save": modules_to_save,
        "base_parameter_shapes": {k: list(v.shape) for k, v in base_state(model).items()},
        "base_weights_sha256": base_fingerprint(model, exclude=modules_to_save),
    }


def save_adapter(model: nn.Module, path: str | os.PathLike, modules_to_save: Iterable[str] = ()) -> dict:
    """Write the adapter of ``model`` to ``path`` (a .safetensors file). Returns its metadata.

    ``modules_to_save`` names fully trained modules (e.g. ``["out_head"]``) whose weights must
    travel with the adapter: without them a reloaded classifier gets a random head.
    """
    modules_to_save = list(modules_to_save)
    tensors = {k: v.contiguous() for k, v in lora_state_dict(model, modules_to_save).items()}
    meta = adapter_metadata(model, modules_to_save)
    # One checksum covers the tensors *and* the metadata: a flipped byte in A or a hand-edited
    # alpha would both change what the adapter computes, so both must be detected.
    meta["sha256"] = _sha256(tensors, _metadata_bytes(meta))
    save_file(tensors, str(path), metadata={"lora_course": json.dumps(meta)})
    return meta


# --------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------
def read_adapter(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read and verify an adapter file: returns (tensors, metadata). Raises AdapterError if the
    file is truncated, corrupted or not a lora_course adapter. Nothing is unpickled."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no adapter file at {path!r}")
    try:
        with safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterError(f"cannot read {path!r}: the file is truncated or is not a safetensors file "
                           f"({exc}). Save the adapter again with save_adapter(model, path).") from None
    if "lora_course" not in header:
        raise AdapterError(f"{path!r} is a safetensors file but not a lora_course adapter (no 'lora_course' "
                           "metadata). A PEFT adapter folder is read with lora_course.peft_bridge instead.")
    try:
        meta = json.loads(header["lora_course"])
    except json.JSONDecodeError:
        raise AdapterError(f"{path!r}: the adapter metadata is corrupted (not valid JSON)") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise AdapterError(f"{path!r}: unsupported adapter format {meta.get('format')!r} version "
                           f"{meta.get('version')!r}; this lora_course reads {FORMAT!r} version {VERSION}")
    if _sha256(tensors, _metadata_bytes(meta)) != meta.get("sha256"):
        raise AdapterError(f"{path!r}: the tensors or metadata do not match the file's checksum, so the file "
                           "is corrupted (or was edited by hand). Save the adapter again.")
    return tensors, meta


def inspect_adapter(path: str | os.PathLike) -> list[dict]:
    """One row per tensor of a (verified) adapter file: key, shape, number of values and L2 norm.

    Use it right after saving: an adapter whose file has no LoRA tensors, or whose B matrices
    are all zero (never trained), shows up here at once."""
    tensors, _ = read_adapter(path)
    return [{"key": k, "shape": tuple(v.shape), "numel": v.numel(), "norm": v.float().norm().item()}
            for k, v in sorted(tensors.items())]


def _check_architecture(model: nn.Module, meta: dict, path: str) -> None:
    saved = meta["base_parameter_shapes"]
    current = {k: list(v.shape) for k, v in base_state(model).items()}

    def hint(key: str) -> str:
        module = key.rpartition(".")[0]
        if meta["modules_to_save"] and _matches(module, meta["modules_to_save"]):
            return (f". {module!r} is a module the adapter brings along (modules_to_save): build the model the "
                    "adapter was trained on first, e.g. make_classifier(base) for a 2-class head")
        return ""

    for key in sorted(set(saved) | set(current)):
        if key not in current:
            raise AdapterError(f"{path!r} was saved for a different architecture: its base model has "
                               f"{key!r} {tuple(saved[key])}, this model has no such parameter{hint(key)}")
        if key not in saved:
            raise AdapterError(f"{path!r} was saved for a different architecture: this model has "
                               f"{key!r} {tuple(current[key])}, the adapter's base model did not{hint(key)}")
        if saved[key] != current[key]:
            raise AdapterError(f"{path!r} was saved for a different architecture: {key!r} has shape "
                               f"{tuple(saved[key])} in the adapter's base model but {tuple(current[key])} "
                               f"here{hint(key)}")


def load_adapter(model: nn.Module, path: str | os.PathLike, *, trainable: bool = False,
                 check_base_weights: bool = True) -> dict:
    """Apply an adapter file to ``model`` (in place) and return its metadata.

    If the model has no LoRA layers yet, they are added as recorded in the file. Every check runs
    before anything is changed, so a refused file leaves the model exactly as it was.

    ``trainable=False`` (the default, like PEFT's ``from_pretrained``) freezes every parameter, for
    inference; ``trainable=True`` leaves the adapter (and its saved modules) trainable, to go on
    training. ``check_base_weights=False`` skips the base-weight fingerprint (not the shapes).
    """
    path = os.fspath(path)
    tensors, meta = read_adapter(path)
    _check_architecture(model, meta, path)
    modules_to_save = meta["modules_to_save"]
    if check_base_weights and base_fingerprint(model, exclude=modules_to_save) != meta["base_weights_sha256"]:
        raise AdapterError(f"{path!r} was saved for different base weights (same architecture, other values): "
                           "its base-weight fingerprint does not match this model. Load it into the base model "
                           "it was trained on, or pass check_base_weights=False if you really mean to.")

    # Which LoRA layers the model has now, and which the file needs.
    present = {name: layer.lora.rank for name, layer in lora_layers(model)}
    wanted = {name: spec["rank"] for name, spec in meta["layers"].items()}
    if present and present != wanted:
        diff = sorted(set(present.items()) ^ set(wanted.items()))[:3]
        raise AdapterError(f"{path!r} adapts other layers or ranks than the LoRA layers this model has "
                           f"(first differences as (layer, rank): {diff}). Call remove_lora(model) first, "
                           "or load it into a fresh base model.")

    # Every tensor must have a home of the right shape (computed before any change).
    expected = {}
    for name, spec in meta["layers"].items():
        prefix = name + "."
        expected[prefix + "lora.A"] = [spec["in_features"], spec["rank"]]
        expected[prefix + "lora.B"] = [spec["rank"], spec["out_features"]]
    model_state = model.state_dict()
    for key, value in tensors.items():
        if key in expected:
            shape = expected[key]
        elif _base_name(key, meta["layers"]) in meta["base_parameter_shapes"] and key in model_state:
            shape = list(model_state[key].shape)
        else:
            raise AdapterError(f"{path!r}: tensor {key!r} has no place in this model")
        if list(value.shape) != shape:
            raise AdapterError(f"{path!r}: tensor {key!r} has shape {tuple(value.shape)} in the file "
                               f"but {tuple(shape)} in the model")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise AdapterError(f"{path!r} is incomplete: it has no tensor {missing[0]!r}")
    for name in meta["layers"]:
        module = model.get_submodule(name)
        if not isinstance(module, (nn.Linear, LinearWithLoRA)):
            raise AdapterError(f"{path!r} adapts {name!r}, which is a {type(module).__name__} in this model, "
                               "not an nn.Linear")

    # All checks passed: now change the model.
    for name, spec in meta["layers"].items():
        module = model.get_submodule(name)
        if not isinstance(module, LinearWithLoRA):
            _set_submodule(model, name, LinearWithLoRA(module, spec["rank"], spec["alpha"], scaling=spec["scaling"]))
        else:
            module.lora.alpha, module.lora.scaling_name = spec["alpha"], spec["scaling"]
            module.lora.scaling = lora_scaling(spec["rank"], spec["alpha"], spec["scaling"])
    with torch.no_grad():
        state = model.state_dict()
        for key, value in tensors.items():
            state[key].copy_(value)
    set_adapter_trainable(model, trainable, modules_to_save)
    return meta


def set_adapter_trainable(model: nn.Module, trainable: bool, modules_to_save: Iterable[str] = ()) -> None:
    """After loading an adapter: freeze everything (``trainable=False``, for inference, like PEFT's
    ``from_pretrained``), or leave only LoRA's A and B and ``modules_to_save`` trainable."""
    if trainable:
        mark_only_lora_as_trainable(model, modules_to_save)
    else:
        for p in model.parameters():
            p.requires_grad_(False)

