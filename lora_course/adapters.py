"""Saving and loading LoRA adapters as safetensors files.

An adapter file holds only the LoRA matrices A and B (plus any fully trained modules such as a
new classification head): for one task, r·(in + out) numbers per adapted layer instead of a
copy of the whole model. safetensors stores raw tensor bytes and a JSON header, so loading a file
never runs code (unlike unpickling, ``torch.load(..., weights_only=False)``).

The header's metadata records what the adapter needs to be applied correctly: the adapted layers
with their rank, alpha and scaling; the shapes of every base parameter (the architecture); a
SHA-256 fingerprint of the base weights (and one of the same weights rounded to bfloat16, so a
base that differs only in precision gets a message that says so); and one SHA-256 checksum over
the adapter's tensors and this metadata, so a file that was truncated, corrupted or edited by
hand, or saved for another base model or architecture, is refused with a clear message and
leaves the model untouched.

A checksum can be recomputed by anyone who edits a file, so the loader does not rely on it
alone: a file may hold only the A and B of layers it declares (with the shapes the model has)
and the tensors of its declared ``modules_to_save``; every other key (a base weight such as
``tok_emb.weight``), any NaN or inf, and an empty adapter are refused.

Files are written whole or not at all (a temporary file in the same folder, flushed to disk,
then renamed over the target), with ordinary permissions under the user's umask.

Variants (``variants.py``, ``quantization.py``) are saved with what they need to be rebuilt, and
each layer's entry names its variant (a plain LoRA layer has no "variant" entry, as in files
written before variants existed); the header's "variant" sums it up:

    lora / rslora  A, B; the scaling rule ("alpha/rank", or rsLoRA's "alpha/sqrt(rank)") per layer
    dora           A, B and the magnitude m (out,)
    vera           the vectors λ_d (r,) and λ_b (out,); the shared frozen projections are not
                   stored but re-drawn from their seed ("vera_projections": seed, shape, SHA-256)
    qlora          A, B, the blocksize and double quantization; the base fingerprint is taken over
                   the NF4 codes, and loading into an fp32 base quantizes its layers first
    pissa          never saved as such: its base layers hold the residual W − s·A₀B₀, not W.
                   ``variants.pissa_to_lora(model, base_model=original)`` turns it into a plain
                   LoRA of rank 2r on the original weights, which is saved like any other.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
import threading
from typing import Callable, Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .errors import AdapterError, ArgumentTypeError, check_bool, check_names
from .lora import (SCALINGS, LinearWithLoRA, _aliases, _check_model, _check_modules_exist, _matches,
                   _rank_warning_given, _set_submodule, _unsupported_reason, lora_layers, lora_scaling,
                   mark_only_lora_as_trainable)
from .quantization import VALID_BLOCKSIZES, LinearWithQLoRA, NF4Linear, quantize_nf4
from .variants import LinearWithDoRA, LinearWithPiSSA, LinearWithVeRA, vera_projections

__all__ = ["AdapterError", "FORMAT", "VERSION", "FILE_VARIANTS", "adapter_metadata", "adapter_variant",
           "base_fingerprint", "base_state", "inspect_adapter", "layer_variant", "load_adapter", "lora_state_dict",
           "read_adapter", "save_adapter", "set_adapter_trainable"]

FORMAT = "lora_course.adapter"
VERSION = 1


# --------------------------------------------------------------------------------------------
# Files: paths, whole-or-nothing writes, ordinary permissions
# --------------------------------------------------------------------------------------------
def _check_path(path, what: str = "path") -> str:
    if isinstance(path, bytes) or not isinstance(path, (str, os.PathLike)):
        raise ArgumentTypeError(f"{what} must be a file path (str or pathlib.Path), got {type(path).__name__}")
    path = os.fspath(path)
    if not path:
        raise ValueError(f"{what} is an empty string: give a file name, e.g. 'adapter.safetensors'")
    return path


_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process's umask, read without changing it where the system allows (Linux shows it
    in /proc/self/status); elsewhere set and restored at once, under a lock."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _shareable_mode(directory: bool = False) -> int:
    """The permissions a file the user creates normally gets: 0o666 (0o777 for a folder) less
    the umask. safetensors' ``save_file`` and ``tempfile`` create 0600, too private to share."""
    return (0o777 if directory else 0o666) & ~_umask()


def _check_writable_target(path: str, error=AdapterError) -> None:
    """Refuse, before anything is written, a target that is a folder or lies in a missing folder."""
    if os.path.isdir(path):
        raise error(f"cannot write {path!r}: it is a directory. Give a file name inside it, "
                    f"e.g. {os.path.join(path, 'adapter.safetensors')!r}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot write {path!r}: the folder {folder!r} does not exist. Create it first, "
                                "e.g. pathlib.Path(folder).mkdir(parents=True, exist_ok=True)")


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path: str, write: Callable[[str], None], error=AdapterError) -> None:
    """Call ``write(temporary_path)`` for a temporary file in the folder of ``path``, flush it to
    disk, give it ordinary permissions and rename it over ``path``: readers see the old file or
    the new one, never a half-written one. On any failure the temporary file is removed and
    ``path`` is left as it was; an OSError is reported as ``error`` naming the file."""
    _check_writable_target(path, error)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        os.close(fd)
    except OSError as err:
        raise error(f"cannot write {path!r}: {err.strerror or err}") from err
    try:
        write(tmp)
        _fsync(tmp)
        os.chmod(tmp, _shareable_mode())
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise error(f"cannot write {path!r}: {err.strerror or err}. Nothing was written.") from err
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (not possible everywhere)
        _fsync(folder)


def _save_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Callable[[str], None]:
    def write(tmp: str) -> None:
        try:
            save_file(tensors, tmp, metadata=metadata)
        except SafetensorError as err:  # e.g. the disk is full: report it as an OSError, named
            raise OSError(str(err)) from err
    return write


def _non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The first key (sorted) whose tensor holds NaN or inf, or None."""
    for key in sorted(tensors):
        t = tensors[key]
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return key
    return None


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
    _check_model(model)
    if any(layer.merged for _, layer in lora_layers(model)):
        raise AdapterError("the model has merged LoRA layers, so its weights are not the base weights "
                           "(W + ΔW is stored in them); call unmerge_lora_(model) first")
    wrappers = _wrapper_names(model)
    return {_base_name(k, wrappers): v for k, v in model.state_dict().items() if not _is_lora_key(k)}


def _sha256(tensors: dict[str, torch.Tensor], extra: bytes = b"", dtype: torch.dtype | None = None) -> str:
    """SHA-256 over names, shapes, dtypes and raw bytes of the tensors (sorted by name), then
    ``extra``. With ``dtype``, floating-point tensors are first rounded to that dtype."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        t = t.contiguous()
        digest.update(f"{key}:{tuple(t.shape)}:{t.dtype}".encode())
        # reshape(-1): a 0-d tensor cannot be viewed as bytes directly.
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    digest.update(extra)
    return digest.hexdigest()


def _metadata_bytes(meta: dict) -> bytes:
    """The metadata in a canonical form (sorted keys), without the checksum it is covered by."""
    return json.dumps({k: v for k, v in meta.items() if k != "sha256"}, sort_keys=True).encode()


def _check_modules_to_save(model: nn.Module, modules_to_save) -> list[str]:
    """``modules_to_save`` as a list (a str is one name), each a module of the model."""
    return _check_modules_exist(model, modules_to_save, error=AdapterError)


def _fingerprint_state(model: nn.Module, exclude: list[str], state: dict | None = None) -> dict[str, torch.Tensor]:
    state = base_state(model) if state is None else state
    return {k: v for k, v in state.items() if not (exclude and _matches(k.rpartition(".")[0], exclude))}


def base_fingerprint(model: nn.Module, exclude: Iterable[str] = ()) -> str:
    """SHA-256 over the base weights, leaving out modules the adapter itself replaces."""
    return _sha256(_fingerprint_state(model, check_names(exclude, "exclude")))


def _bf16_fingerprint(model: nn.Module, exclude: list[str], state: dict | None = None) -> str:
    """The same fingerprint over the base weights rounded to bfloat16: equal for a base model
    and its bfloat16 copy, so a refusal can say "only the precision differs"."""
    return _sha256(_fingerprint_state(model, exclude, state), dtype=torch.bfloat16)


# --------------------------------------------------------------------------------------------
# Variants: what each layer is, and what its file entry must say
# --------------------------------------------------------------------------------------------
#: The layer variants an adapter file holds. PiSSA is saved as plain LoRA (``pissa_to_lora``).
FILE_VARIANTS = ("lora", "dora", "vera", "qlora")


def layer_variant(layer: LinearWithLoRA) -> str:
    """"lora" (rsLoRA included: it is LoRA with another scaling), "dora", "vera", "qlora" or "pissa"."""
    for cls, name in ((LinearWithPiSSA, "pissa"), (LinearWithDoRA, "dora"), (LinearWithVeRA, "vera"),
                      (LinearWithQLoRA, "qlora")):
        if isinstance(layer, cls):
            return name
    return "lora"


def _spec_variant(spec: dict) -> str:
    return spec.get("variant", "lora")  # files written before variants existed hold plain LoRA


def _summary_variant(specs: Iterable[dict]) -> str:
    """The adapter's variant in one word: "lora", "rslora" (LoRA with alpha/sqrt(rank) on every
    layer), "dora", "vera", "qlora", or "mixed" when layers differ."""
    kinds = {"rslora" if _spec_variant(spec) == "lora" and spec.get("scaling") == "alpha/sqrt(rank)"
             else _spec_variant(spec) for spec in specs}
    return kinds.pop() if len(kinds) == 1 else "mixed"


def adapter_variant(model: nn.Module) -> str:
    """The variant a file saved from ``model`` would record (see ``_summary_variant``)."""
    _check_model(model)
    return _summary_variant(_layer_spec(name, layer) for name, layer in lora_layers(model))


def _pissa_refusal(name: str) -> AdapterError:
    return AdapterError(
        f"cannot save layer {name!r}: it is a PiSSA layer, whose base weight holds the residual W − s·A₀B₀ and "
        "not the original W, so its A and B mean something only on that residual (and its base fingerprint would "
        "match no model you have). Convert it into a plain LoRA on the original weights first: "
        "plain = pissa_to_lora(model, base_model=<an unwrapped copy of the model PiSSA started from>), then "
        "save_adapter(plain, path). Nothing was written.")


def _layer_spec(name: str, layer: LinearWithLoRA) -> dict:
    """The file entry of one adapted layer. A plain LoRA layer's entry has exactly the five keys
    files had before variants existed; a variant adds "variant" and what it needs to be rebuilt."""
    kind = layer_variant(layer)
    if kind == "pissa":
        raise _pissa_refusal(name)
    spec = {"rank": layer.lora.rank, "alpha": layer.lora.alpha, "scaling": layer.lora.scaling_name,
            "in_features": layer.in_features, "out_features": layer.out_features}
    if kind != "lora":
        spec["variant"] = kind
    if kind == "vera":
        spec["d_initial"] = layer.lora.d_initial
    if kind == "qlora":
        spec["blocksize"], spec["double_quant"] = layer.linear.blocksize, bool(layer.linear.double_quant)
    return spec


def _vera_info(model: nn.Module) -> dict | None:
    """What a file needs to re-draw the VeRA layers' shared frozen projections: seed, shape and a
    SHA-256 of the projections (checked when they are drawn again). None without VeRA layers."""
    layers = [(name, layer.lora) for name, layer in lora_layers(model) if isinstance(layer, LinearWithVeRA)]
    if not layers:
        return None
    first_name, first = layers[0]
    for name, branch in layers[1:]:
        if branch.A.shape != first.A.shape or not (torch.equal(branch.A, first.A) and torch.equal(branch.B, first.B)):
            raise AdapterError(f"cannot save: the VeRA layers {first_name!r} and {name!r} use different projections, "
                               "but VeRA shares one frozen pair A, B across all layers (build them with one call of "
                               "replace_linear_with_variant(model, 'vera', ...))")
    if first.projection_seed is None:
        raise AdapterError(f"cannot save the VeRA layer {first_name!r}: its shared projections were not drawn with a "
                           "known seed, so a file could not rebuild them. Build the layers with "
                           "replace_linear_with_variant(model, 'vera', r, seed=...). Nothing was written.")
    (in_max, rank), out_max = first.A.shape, first.B.shape[1]
    a, b = vera_projections(in_max, out_max, rank, seed=first.projection_seed)
    if not (torch.equal(a.to(first.A), first.A) and torch.equal(b.to(first.B), first.B)):
        raise AdapterError(f"cannot save the VeRA layer {first_name!r}: its projections are not the ones "
                           f"vera_projections({in_max}, {out_max}, {rank}, seed={first.projection_seed}) draws "
                           "(were they changed by hand?), so a file could not rebuild them")
    return {"seed": first.projection_seed, "in_max": in_max, "out_max": out_max, "rank": rank,
            "sha256": _sha256({"A": a, "B": b})}


def _check_saveable(model: nn.Module) -> None:
    """Refuse, before anything else, a model whose adapter a file cannot hold faithfully."""
    for name, layer in lora_layers(model):
        if isinstance(layer, LinearWithPiSSA):
            raise _pissa_refusal(name)


def lora_state_dict(model: nn.Module, modules_to_save: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """Only the adapter's tensors: every LoRA A and B, plus the parameters of ``modules_to_save``."""
    _check_model(model)
    modules_to_save = _check_modules_to_save(model, modules_to_save)
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
    """The metadata ``save_adapter`` writes (without its checksum)."""
    _check_model(model)
    modules_to_save = _check_modules_to_save(model, modules_to_save)
    layers = {name: _layer_spec(name, layer) for name, layer in lora_layers(model)}
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "variant": _summary_variant(layers.values()),
        "layers": layers,
        "modules_to_save": modules_to_save,
        "base_parameter_shapes": {k: list(v.shape) for k, v in base_state(model).items()},
        "base_weights_sha256": base_fingerprint(model, exclude=modules_to_save),
        "base_weights_bf16_sha256": _bf16_fingerprint(model, modules_to_save),
    }
    vera = _vera_info(model)
    if vera is not None:
        meta["vera_projections"] = vera
    return meta


def save_adapter(model: nn.Module, path: str | os.PathLike, modules_to_save: Iterable[str] = ()) -> dict:
    """Write the adapter of ``model`` to ``path`` (a .safetensors file). Returns its metadata.

    ``modules_to_save`` names fully trained modules (e.g. ``["out_head"]``, or ``"out_head"``)
    whose weights must travel with the adapter: without them a reloaded classifier gets a random
    head. Variants are saved with what they need (module docstring). Refused before anything is
    written: a model without LoRA or with merged LoRA, a PiSSA model (convert it with
    ``variants.pissa_to_lora`` first), NaN or inf in the adapter, a missing folder, a folder as
    ``path``. The file is written whole or not
    at all, with ordinary permissions (0o666 less the umask).
    """
    _check_model(model)
    path = _check_path(path)
    _check_saveable(model)
    modules_to_save = _check_modules_to_save(model, modules_to_save)
    tensors = {k: v.contiguous() for k, v in lora_state_dict(model, modules_to_save).items()}
    bad = _non_finite(tensors)
    if bad is not None:
        raise AdapterError(f"cannot save the adapter: {bad!r} holds NaN or inf values (did training diverge? try a "
                           "smaller learning rate). A file with non-finite values would break every model it is "
                           "loaded into, so nothing was written.")
    meta = adapter_metadata(model, modules_to_save)
    # One checksum covers the tensors *and* the metadata: a flipped byte in A or a hand-edited
    # alpha would both change what the adapter computes, so both must be detected.
    meta["sha256"] = _sha256(tensors, _metadata_bytes(meta))
    _check_writable_target(path)
    _write_atomically(path, _save_safetensors(tensors, {"lora_course": json.dumps(meta)}))
    return meta


# --------------------------------------------------------------------------------------------
# Read and verify
# --------------------------------------------------------------------------------------------
def _open_safetensors(path: str, what: str, error=AdapterError, again: str = "") -> tuple[dict, dict]:
    """(header metadata, tensors) of a safetensors file, every failure reported as ``error``
    naming the file. Nothing is unpickled."""
    if os.path.isdir(path):
        raise error(f"{path!r} is a directory, not {what}" + (f". {again}" if again else ""))
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {what} at {path!r}")
    try:
        with safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except OSError as exc:
        raise error(f"cannot read {path!r}: {exc.strerror or exc}") from exc
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise error(f"cannot read {path!r}: the file is truncated or is not a safetensors file ({exc})"
                    + (f". {again}" if again else "")) from exc
    return header, tensors


def _is_int(value, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _check_metadata(meta, path: str) -> None:
    """The metadata's structure: what every later step relies on, checked once."""
    def bad(what: str) -> AdapterError:
        return AdapterError(f"{path!r}: the adapter metadata is malformed ({what}). Save the adapter again "
                            "with save_adapter(model, path).")

    for key, kind in (("layers", dict), ("modules_to_save", list), ("base_parameter_shapes", dict),
                      ("base_weights_sha256", str)):
        if key not in meta:
            raise bad(f"it has no {key!r}")
        if not isinstance(meta[key], kind):
            raise bad(f"{key!r} is a {type(meta[key]).__name__}, not a {kind.__name__}")
    if not meta["layers"]:
        raise AdapterError(f"{path!r} is an empty adapter: it adapts no layer, so loading it would change "
                           "nothing but freeze the model. Check the model had LoRA layers when it was saved "
                           "(inspect_adapter(path) lists what a file holds).")
    for name, spec in meta["layers"].items():
        if not isinstance(spec, dict):
            raise bad(f"layer {name!r} is described by a {type(spec).__name__}")
        for key in ("rank", "in_features", "out_features"):
            if not _is_int(spec.get(key), 1):
                raise bad(f"layer {name!r} has {key}={spec.get(key)!r}, not a positive integer")
        kind = _spec_variant(spec)
        if kind == "pissa":
            raise AdapterError(f"{path!r} says layer {name!r} is a PiSSA layer, but PiSSA adapters are stored as plain "
                               "LoRA on the original weights (variants.pissa_to_lora); this file was not written by "
                               "save_adapter")
        if kind not in FILE_VARIANTS:
            raise AdapterError(f"{path!r}: layer {name!r} is a {kind!r} adapter, which this lora_course cannot load "
                               f"(it reads {', '.join(FILE_VARIANTS)})")
        if kind == "vera":
            _check_vera_spec(meta, name, spec, bad)
            continue
        if spec.get("scaling") not in SCALINGS:
            raise bad(f"layer {name!r} has scaling={spec.get('scaling')!r}; known: {', '.join(SCALINGS)}")
        try:
            lora_scaling(spec["rank"], spec.get("alpha"), spec["scaling"])
        except ValueError as err:
            raise bad(f"layer {name!r}: {err}") from err
        if kind == "qlora" and (spec.get("blocksize") not in VALID_BLOCKSIZES or isinstance(spec.get("blocksize"), bool)
                                or not isinstance(spec.get("double_quant"), bool)):
            raise bad(f"QLoRA layer {name!r} has blocksize={spec.get('blocksize')!r}, "
                      f"double_quant={spec.get('double_quant')!r}")
    if "variant" in meta and meta["variant"] != _summary_variant(meta["layers"].values()):
        raise bad(f"it calls the adapter {meta['variant']!r} but its layers make it "
                  f"{_summary_variant(meta['layers'].values())!r}")
    if not all(isinstance(m, str) and m for m in meta["modules_to_save"]):
        raise bad("modules_to_save must be a list of module names")
    for key, shape in meta["base_parameter_shapes"].items():
        if not isinstance(shape, list) or not all(_is_int(n) for n in shape):
            raise bad(f"the shape of {key!r} is {shape!r}, not a list of sizes")
    if not isinstance(meta.get("base_weights_bf16_sha256", ""), str):
        raise bad("base_weights_bf16_sha256 is not a string")


def _check_vera_spec(meta: dict, name: str, spec: dict, bad) -> None:
    """A VeRA layer: no alpha, scaling "vera", a d_initial, and the header's shared projections
    (seed, shape, SHA-256) covering the layer."""
    if spec.get("alpha") is not None or spec.get("scaling") != "vera":
        raise bad(f"VeRA layer {name!r} has alpha={spec.get('alpha')!r}, scaling={spec.get('scaling')!r} "
                  "(VeRA has no alpha; its scaling is 'vera')")
    d_initial = spec.get("d_initial")
    if isinstance(d_initial, bool) or not isinstance(d_initial, (int, float)) or not math.isfinite(d_initial):
        raise bad(f"VeRA layer {name!r} has d_initial={d_initial!r}, not a finite number")
    info = meta.get("vera_projections")
    if not isinstance(info, dict) or not all(_is_int(info.get(k), 1) for k in ("in_max", "out_max", "rank")) \
            or not _is_int(info.get("seed"), 0) or not isinstance(info.get("sha256"), str):
        raise bad("it has VeRA layers but no valid 'vera_projections' (seed, in_max, out_max, rank, sha256)")
    if info["rank"] != spec["rank"] or info["in_max"] < spec["in_features"] or info["out_max"] < spec["out_features"]:
        raise bad(f"VeRA layer {name!r} ({spec['in_features']} -> {spec['out_features']}, rank {spec['rank']}) does "
                  f"not fit the shared projections ({info['in_max']} x {info['rank']}, {info['rank']} x {info['out_max']})")


def _expected_tensors(meta: dict) -> dict[str, list[int]]:
    """The key and shape every LoRA tensor of the file must have, from its declared layers:
    A (in, r) and B (r, out); DoRA adds its magnitude (out,); VeRA has only λ_d (r,) and λ_b (out,)."""
    expected = {}
    for name, spec in meta["layers"].items():
        kind = _spec_variant(spec)
        if kind == "vera":
            expected[f"{name}.lora.lambda_d"] = [spec["rank"]]
            expected[f"{name}.lora.lambda_b"] = [spec["out_features"]]
            continue
        expected[f"{name}.lora.A"] = [spec["in_features"], spec["rank"]]   # (in, r)
        expected[f"{name}.lora.B"] = [spec["rank"], spec["out_features"]]  # (r, out)
        if kind == "dora":
            expected[f"{name}.lora.magnitude"] = [spec["out_features"]]    # m, one per output row
    return expected


def _check_tensors(tensors: dict[str, torch.Tensor], meta: dict, path: str) -> None:
    """Only what the metadata declares: the A and B of each declared layer with its shapes, and
    the tensors of the declared modules_to_save (with their base shapes). No NaN or inf."""
    expected = _expected_tensors(meta)
    saved, shapes = meta["modules_to_save"], meta["base_parameter_shapes"]
    for key, value in sorted(tensors.items()):
        if _is_lora_key(key):
            if key not in expected:
                raise AdapterError(f"{path!r}: tensor {key!r} is a LoRA tensor of no layer the adapter declares "
                                   f"(it declares {len(meta['layers'])}: {', '.join(list(meta['layers'])[:3])}, ...)")
            shape = expected[key]
            if not value.is_floating_point():
                raise AdapterError(f"{path!r}: tensor {key!r} holds {value.dtype} values, not floating-point numbers")
        else:
            base = _base_name(key, meta["layers"])
            owner = base.rpartition(".")[0]
            if not (saved and _matches(owner, saved)):
                raise AdapterError(
                    f"{path!r}: tensor {key!r} is not part of the adapter: an adapter file may hold only LoRA's A and B "
                    f"and the modules it declares in modules_to_save ({saved or 'none'}), never other base weights. "
                    "The file was edited or built by other code; refusing it leaves the model as it was.")
            if base not in shapes:
                raise AdapterError(f"{path!r}: tensor {key!r} (modules_to_save) is not a parameter of the adapter's "
                                   "base model")
            shape = shapes[base]
        if list(value.shape) != shape:
            raise AdapterError(f"{path!r}: tensor {key!r} has shape {tuple(value.shape)} in the file, but the adapter "
                               f"declares {tuple(shape)}")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise AdapterError(f"{path!r} is incomplete: it has no tensor {missing[0]!r}")
    bad = _non_finite(tensors)
    if bad is not None:
        raise AdapterError(f"{path!r}: tensor {bad!r} holds NaN or inf values, which would break the model. "
                           "Refused (the model is unchanged); retrain or save the adapter again.")


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read and verify an adapter file: returns (tensors, metadata). Raises AdapterError if the
    file is a folder, truncated, corrupted, not a lora_course adapter, empty, or holds tensors it
    does not declare or that are not finite. Nothing is unpickled."""
    path = _check_path(path)
    header, tensors = _open_safetensors(path, "adapter file",
                                        again="Save the adapter again with save_adapter(model, path).")
    if "lora_course" not in header:
        raise AdapterError(f"{path!r} is a safetensors file but not a lora_course adapter (no 'lora_course' "
                           "metadata). A PEFT adapter folder is read with lora_course.peft_bridge instead.")
    try:
        meta = json.loads(header["lora_course"])
    except json.JSONDecodeError as err:
        raise AdapterError(f"{path!r}: the adapter metadata is corrupted (not valid JSON: {err})") from err
    if not isinstance(meta, dict):
        raise AdapterError(f"{path!r}: the adapter metadata is corrupted (a JSON {type(meta).__name__}, not an object)")
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise AdapterError(f"{path!r}: unsupported adapter format {meta.get('format')!r} version "
                           f"{meta.get('version')!r}; this lora_course reads {FORMAT!r} version {VERSION}")
    if _sha256(tensors, _metadata_bytes(meta)) != meta.get("sha256"):
        raise AdapterError(f"{path!r}: the tensors or metadata do not match the file's checksum, so the file "
                           "is corrupted (or was edited by hand). Save the adapter again.")
    _check_metadata(meta, path)
    _check_tensors(tensors, meta, path)
    return tensors, meta


def inspect_adapter(path: str | os.PathLike) -> list[dict]:
    """One row per tensor of a (verified) adapter file: key, shape, number of values and L2 norm.

    Use it right after saving: an adapter whose file has no LoRA tensors, or whose B matrices
    are all zero (never trained), shows up here at once."""
    tensors, _ = read_adapter(path)
    return [{"key": k, "shape": tuple(v.shape), "numel": v.numel(), "norm": v.float().norm().item()}
            for k, v in sorted(tensors.items())]


# --------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------
def _state_as_saved(model: nn.Module, meta: dict, path: str) -> dict[str, torch.Tensor]:
    """``base_state(model)`` as the adapter's base model had it. A QLoRA file was saved from a base
    whose adapted layers were stored in NF4: those layers, when still plain nn.Linear here, are
    replaced by their NF4 codes and scales (quantization is deterministic), so the shapes and the
    fingerprint can be compared. Nothing in the model changes."""
    state = base_state(model)
    for name, spec in meta["layers"].items():
        if _spec_variant(spec) != "qlora":
            continue
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue  # reported by the architecture check
        if type(module) is nn.Linear and f"{name}.weight" in state:
            try:
                quantized = NF4Linear(module, spec["blocksize"], spec["double_quant"])
            except ValueError as err:
                raise AdapterError(f"{path!r} is a QLoRA adapter, but layer {name!r} of this model cannot be "
                                   f"quantized as it was: {err}") from None
            del state[f"{name}.weight"]
            state.update({f"{name}.{k}": v for k, v in quantized.state_dict().items()})
    return state


def _check_variants(model: nn.Module, meta: dict, path: str) -> None:
    """Refuse a PiSSA model, and a layer that already has a branch of another variant (or, for
    QLoRA, another blocksize; for VeRA, other projections) than the file's."""
    for name, layer in lora_layers(model):
        if isinstance(layer, LinearWithPiSSA):
            raise AdapterError(f"cannot load {path!r} into this model: its layer {name!r} is a PiSSA layer, whose base "
                               "weight holds a residual, not the original weights. Load the adapter into the original "
                               "base model (a PiSSA adapter is saved via pissa_to_lora as plain LoRA on it).")
    for name, spec in meta["layers"].items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue  # reported by the architecture check
        if not isinstance(module, LinearWithLoRA):
            continue
        kind, here = _spec_variant(spec), layer_variant(module)
        if kind != here:
            raise AdapterError(f"{path!r} holds a {kind} adapter, but layer {name!r} of this model already has a {here} "
                               f"branch ({type(module).__name__}). Load it into a fresh base model, or call "
                               "remove_lora(model) first. The model is unchanged.")
        if kind == "qlora" and (module.linear.blocksize, bool(module.linear.double_quant)) != \
                (spec["blocksize"], spec["double_quant"]):
            raise AdapterError(f"{path!r} was trained on a base quantized with blocksize {spec['blocksize']}, double "
                               f"quantization {spec['double_quant']}, but layer {name!r} of this model uses blocksize "
                               f"{module.linear.blocksize}, double quantization {module.linear.double_quant}")
        if kind == "vera":
            info = meta["vera_projections"]
            branch = module.lora
            if list(branch.A.shape) != [info["in_max"], info["rank"]] or list(branch.B.shape) != \
                    [info["rank"], info["out_max"]] or _sha256({"A": branch.A.float(), "B": branch.B.float()}) != info["sha256"]:
                raise AdapterError(f"{path!r} was trained with other VeRA projections (seed {info['seed']}) than layer "
                                   f"{name!r} of this model has: λ_d and λ_b scale those exact random matrices. Load it "
                                   "into a fresh base model.")


def _vera_projections_for(meta: dict, path: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The file's shared VeRA projections, drawn again from their seed and checked by SHA-256."""
    info = meta.get("vera_projections")
    if not any(_spec_variant(spec) == "vera" for spec in meta["layers"].values()):
        return None
    a, b = vera_projections(info["in_max"], info["out_max"], info["rank"], seed=info["seed"])
    if _sha256({"A": a, "B": b}) != info["sha256"]:
        raise AdapterError(f"{path!r}: the VeRA projections drawn again from seed {info['seed']} do not match the ones "
                           "the adapter was trained with (another torch version draws other random numbers?). "
                           "Refused: λ_d and λ_b would scale other matrices.")
    return a, b


def _new_wrapper(module: nn.Linear, name: str, spec: dict, shared, path: str) -> LinearWithLoRA:
    """The branch a file's layer spec describes, built around ``module`` (which is not changed)."""
    kind = _spec_variant(spec)
    try:
        if kind == "dora":
            return LinearWithDoRA(module, spec["rank"], spec["alpha"], scaling=spec["scaling"])
        if kind == "qlora":
            return LinearWithQLoRA(module, spec["rank"], spec["alpha"], scaling=spec["scaling"],
                                   blocksize=spec["blocksize"], double_quant=spec["double_quant"])
        if kind == "vera":
            a, b = (t.to(device=module.weight.device, dtype=module.weight.dtype) for t in shared)
            layer = LinearWithVeRA(module, a, b, d_initial=spec["d_initial"])
            layer.lora.projection_seed = None  # set by load_adapter once every layer is built
            return layer
        return LinearWithLoRA(module, spec["rank"], spec["alpha"], scaling=spec["scaling"])
    except ValueError as err:
        raise AdapterError(f"{path!r}: cannot build the {kind} layer {name!r} on this model: {err}") from None


def _check_architecture(model: nn.Module, meta: dict, path: str, state: dict | None = None) -> None:
    saved = meta["base_parameter_shapes"]
    current = {k: list(v.shape) for k, v in (base_state(model) if state is None else state).items()}

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


def _check_base_weights(model: nn.Module, meta: dict, tensors: dict[str, torch.Tensor], path: str,
                        state: dict | None = None) -> None:
    exclude = meta["modules_to_save"]
    if _sha256(_fingerprint_state(model, exclude, state)) == meta["base_weights_sha256"]:
        return
    bf16 = meta.get("base_weights_bf16_sha256")
    if bf16 and _bf16_fingerprint(model, exclude, state) == bf16:
        here = sorted({str(v.dtype).replace("torch.", "") for v in base_state(model).values() if v.is_floating_point()})
        saved = sorted({str(v.dtype).replace("torch.", "") for v in tensors.values() if v.is_floating_point()})
        raise AdapterError(
            f"{path!r} was saved for these base weights in another precision: this model holds them in "
            f"{', '.join(here)} (the adapter's tensors are {', '.join(saved)}), and the weights agree only once both "
            "are rounded to bfloat16, so only the dtype differs. Load the adapter into the base model in the dtype "
            "it was trained in and cast afterwards (model.to(torch.bfloat16)), or pass check_base_weights=False to "
            "load it into this model as it is.")
    raise AdapterError(f"{path!r} was saved for different base weights (same architecture, other values): "
                       "its base-weight fingerprint does not match this model. Load it into the base model "
                       "it was trained on, or pass check_base_weights=False if you really mean to.")


def _plan_layers(model: nn.Module, meta: dict, path: str) -> dict[str, nn.Module]:
    """The modules the adapter's layers go into, every one checked; nothing is changed."""
    present = {name: layer.lora.rank for name, layer in lora_layers(model)}
    wanted = {name: spec["rank"] for name, spec in meta["layers"].items()}
    if present and present != wanted:
        diff = sorted(set(present.items()) ^ set(wanted.items()))[:3]
        raise AdapterError(f"{path!r} adapts other layers or ranks than the LoRA layers this model has "
                           f"(first differences as (layer, rank): {diff}). Call remove_lora(model) first, "
                           "or load it into a fresh base model.")
    aliases = _aliases(model)
    modules = {}
    for name, spec in meta["layers"].items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise AdapterError(f"{path!r} adapts {name!r}, which this model does not have "
                               "(an adapter for a different architecture)") from None
        if not isinstance(module, (nn.Linear, LinearWithLoRA)):
            raise AdapterError(f"{path!r} adapts {name!r}, which is a {type(module).__name__} in this model, "
                               "not an nn.Linear")
        if (module.in_features, module.out_features) != (spec["in_features"], spec["out_features"]):
            raise AdapterError(f"{path!r} adapts {name!r} as a {spec['in_features']} -> {spec['out_features']} layer, "
                               f"but it is {module.in_features} -> {module.out_features} in this model")
        if not isinstance(module, LinearWithLoRA):
            reason = _unsupported_reason(model, name, module, aliases)
            if reason:
                raise AdapterError(f"{path!r}: {reason}")
        modules[name] = module
    return modules


def _target_key(key: str, meta: dict, wrapped_now: bool) -> str:
    """The model's current state-dict key for a file key (the layer may not be wrapped yet)."""
    return key if wrapped_now else _base_name(key, meta["layers"])


def load_adapter(model: nn.Module, path: str | os.PathLike, *, trainable: bool = False,
                 check_base_weights: bool = True) -> dict:
    """Apply an adapter file to ``model`` (in place) and return its metadata.

    If the model has no LoRA layers yet, they are added as recorded in the file (a DoRA, VeRA or
    QLoRA file builds DoRA, VeRA or QLoRA layers; a layer that already has a branch must be of the
    file's variant). Every check runs
    before anything is changed, so a refused file leaves the model exactly as it was (weights,
    layers, requires_grad flags). Refused: a model whose LoRA is merged (unmerge first), a file
    for another architecture or other base weights, and any file ``read_adapter`` refuses.

    ``trainable=False`` (the default, like PEFT's ``from_pretrained``) freezes every parameter, for
    inference; ``trainable=True`` leaves the adapter (and its saved modules) trainable, to go on
    training. ``check_base_weights=False`` skips the base-weight fingerprint (not the shapes).
    """
    _check_model(model)
    path = _check_path(path)
    trainable = check_bool(trainable, "trainable")
    check_base_weights = check_bool(check_base_weights, "check_base_weights")
    tensors, meta = read_adapter(path)
    merged = [name for name, layer in lora_layers(model) if layer.merged]
    if merged:
        raise AdapterError(f"cannot load {path!r}: the model's LoRA is merged into its weights ({merged[0]!r}, "
                           f"{len(merged)} layer(s)), so the base weights are not what the adapter expects. "
                           "Call unmerge_lora_(model) first.")
    _check_variants(model, meta, path)
    state_as_saved = _state_as_saved(model, meta, path)
    _check_architecture(model, meta, path, state_as_saved)
    modules_to_save = _check_modules_to_save(model, meta["modules_to_save"])
    if check_base_weights:
        _check_base_weights(model, meta, tensors, path, state_as_saved)
    modules = _plan_layers(model, meta, path)

    # Every tensor must have a home of the right shape in the model (computed before any change).
    wrapped_now = bool(list(lora_layers(model)))
    model_state = model.state_dict()
    for key, value in tensors.items():
        if _is_lora_key(key):
            continue  # shapes checked against the metadata, and the metadata against the model
        target = _target_key(key, meta, wrapped_now)
        if target not in model_state or list(model_state[target].shape) != list(value.shape):
            raise AdapterError(f"{path!r}: tensor {key!r} has no place of shape {tuple(value.shape)} in this model")

    # Build everything that can fail (new wrappers and scalings) before changing the model.
    new_wrappers, new_scalings = {}, {}
    shared = _vera_projections_for(meta, path)
    with _rank_warning_given():
        for name, spec in meta["layers"].items():
            module = modules[name]
            if isinstance(module, LinearWithLoRA):
                if _spec_variant(spec) != "vera":  # VeRA has no scaling to set
                    new_scalings[name] = lora_scaling(spec["rank"], spec["alpha"], spec["scaling"])
            else:
                new_wrappers[name] = _new_wrapper(module, name, spec, shared, path)

    # All checks passed: now change the model.
    for name, wrapper in new_wrappers.items():
        if isinstance(wrapper, LinearWithVeRA):
            wrapper.lora.projection_seed = meta["vera_projections"]["seed"]
        _set_submodule(model, name, wrapper)
    for name, scaling in new_scalings.items():
        lora, spec = modules[name].lora, meta["layers"][name]
        lora.alpha, lora.scaling_name, lora.scaling = spec["alpha"], spec["scaling"], scaling
    with torch.no_grad():
        state = model.state_dict()
        for key, value in tensors.items():
            state[key].copy_(value)
    set_adapter_trainable(model, trainable, modules_to_save)
    return meta


def set_adapter_trainable(model: nn.Module, trainable: bool, modules_to_save: Iterable[str] = ()) -> None:
    """After loading an adapter: freeze everything (``trainable=False``, for inference, like PEFT's
    ``from_pretrained``), or leave only LoRA's A and B and ``modules_to_save`` trainable."""
    _check_model(model)
    if check_bool(trainable, "trainable"):
        mark_only_lora_as_trainable(model, modules_to_save)
    else:
        check_names(modules_to_save, "modules_to_save")
        for p in model.parameters():
            p.requires_grad_(False)
