"""The bridge to Hugging Face PEFT: write a lora_course adapter in PEFT's format, and read one back.

PEFT (``peft.tuners.lora.Linear``) stores the same two matrices as this course, transposed,
because it keeps them as ``nn.Linear`` layers (weight = out × in):

    course                          PEFT (on disk, adapter name stripped)
    A: (in, r)                      base_model.model.<layer>.lora_A.weight: (r, in)   = Aᵀ
    B: (r, out)                     base_model.model.<layer>.lora_B.weight: (out, r)  = Bᵀ
    s = alpha / r                   lora_alpha / r                       (lora_alpha = alpha)
    s = alpha / sqrt(r)             lora_alpha / sqrt(r), use_rslora     (lora_alpha = alpha)
    s = alpha  (raw, no PEFT flag)  lora_alpha / r with lora_alpha = alpha · r
    modules_to_save (a new head)    base_model.model.<module>.weight / .bias

    DoRA's magnitude m: (out,)      base_model.model.<layer>.lora_magnitude_vector: (out,), use_dora

so both compute h = W x + s · Bᵀ(Aᵀ x) = x Wᵀ + s · x A B (DoRA: rescaled per row by m/‖W + ΔW‖).
rsLoRA and DoRA travel both ways; PiSSA is exported after ``variants.pissa_to_lora`` (a plain
LoRA on the original base, as PEFT's ``path_initial_model_for_weight_conversion`` writes it);
VeRA and QLoRA layers are refused (PEFT stores VeRA as a VeraConfig, and a QLoRA adapter only
means the same model on the same 4-bit base). An adapter folder holds
``adapter_config.json`` (a ``LoraConfig``) and ``adapter_model.safetensors``; ``PeftModel.from_pretrained``
reads it. This module writes and reads that format without importing ``peft``, so the tests can
check it against the real package independently.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from .adapters import (_check_modules_to_save, _check_path, _fsync, _non_finite, _open_safetensors,
                       _save_safetensors, _shareable_mode, set_adapter_trainable)
from .errors import AdapterError, check_bool, check_names
from .lora import (LinearWithLoRA, _aliases, _check_alpha, _check_dropout, _check_model, _matches,
                   _rank_warning_given, _set_submodule, _unsupported_reason, lora_layers, lora_scaling)
from .variants import LinearWithDoRA, LinearWithPiSSA, LinearWithVeRA
from .quantization import LinearWithQLoRA

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel wraps a LoraModel, which wraps the user's model

#: lora_course → PEFT, for the table in notebook 09.
EQUIVALENTS = [
    ("replace_linear_with_lora(model, r, alpha, target_modules=...)",
     "get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=...))"),
    ("mark_only_lora_as_trainable(model, modules_to_save=[...])", "LoraConfig(modules_to_save=[...])"),
    ("print_trainable_parameters(model)", "peft_model.print_trainable_parameters()"),
    ("merge_lora_(model) / unmerge_lora_(model)", "peft_model.merge_adapter() / peft_model.unmerge_adapter()"),
    ("merge_and_unload(model)", "model = peft_model.merge_and_unload()"),
    ("remove_lora(model)", "model = peft_model.unload()"),
    ("with lora_disabled(model):", "with peft_model.disable_adapter():"),
    ("save_adapter(model, path, modules_to_save=[...])", "peft_model.save_pretrained(folder)"),
    ("load_adapter(model, path, trainable=False)", "PeftModel.from_pretrained(model, folder, is_trainable=False)"),
    ("lora_state_dict(model)", "get_peft_model_state_dict(peft_model)"),
    ("export_peft_adapter(model, folder, modules_to_save=[...])", "peft_model.save_pretrained(folder)"),
    ("import_peft_adapter(model, folder)", "PeftModel.from_pretrained(model, folder)"),
    ('scaling="alpha/sqrt(rank)"', "LoraConfig(use_rslora=True)"),
    ('scaling="alpha"  # raw α', "LoraConfig(lora_alpha=alpha * r)"),
    ("LinearWithLoRA(..., dropout=p)", "LoraConfig(lora_dropout=p)"),
]


#: lora_course variants → PEFT, for the table in notebook 10.
VARIANT_EQUIVALENTS = [
    ('replace_linear_with_variant(model, "rslora", r, alpha)', "LoraConfig(r=r, lora_alpha=alpha, use_rslora=True)"),
    ("loraplus_param_groups(model, lr, ratio=16)",
     "peft.optimizers.create_loraplus_optimizer(model, optimizer_cls, lr=lr, loraplus_lr_ratio=16)"),
    ('replace_linear_with_variant(model, "dora", r, alpha)', "LoraConfig(r=r, lora_alpha=alpha, use_dora=True)"),
    ('replace_linear_with_variant(model, "pissa", r, alpha)', 'LoraConfig(..., init_lora_weights="pissa")'),
    ("pissa_to_lora(model, base_model=original)",
     "peft_model.save_pretrained(folder, path_initial_model_for_weight_conversion=initial_folder)"),
    ('replace_linear_with_variant(model, "vera", r)', "VeraConfig(r=r, projection_prng_key=seed)"),
    ('replace_linear_with_variant(model, "qlora", r, alpha)',
     'BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True) + LoraConfig'),
]


def _exportable_layers(model: nn.Module) -> list[tuple[str, LinearWithLoRA]]:
    """The LoRA layers, if PEFT's LoraConfig can describe them all: plain LoRA (any scaling) or
    DoRA, not both (PEFT has one use_dora per adapter); PiSSA, VeRA and QLoRA are refused."""
    layers = list(lora_layers(model))
    for name, layer in layers:
        if isinstance(layer, LinearWithPiSSA):
            raise AdapterError(f"cannot export layer {name!r}: it is a PiSSA layer, whose base weight holds the residual "
                               "W − s·A₀B₀, so its A and B mean something only on that residual. Convert it first, "
                               "as PEFT does when saving PiSSA: plain = pissa_to_lora(model, base_model=<an unwrapped "
                               "copy of the original model>), then export_peft_adapter(plain, folder). Nothing was written.")
        if isinstance(layer, LinearWithVeRA):
            raise AdapterError(f"cannot export layer {name!r}: VeRA is not a LoRA adapter in PEFT (it is a VeraConfig with "
                               "shared projections); export_peft_adapter writes LoRA, rsLoRA and DoRA. Save it with "
                               "save_adapter instead. Nothing was written.")
        if isinstance(layer, LinearWithQLoRA):
            raise AdapterError(f"cannot export layer {name!r}: it is a QLoRA layer, trained on a 4-bit NF4 base. PEFT would "
                               "apply its A and B to whatever base it is given (an fp32 base is another model), so the "
                               "export is refused; save it with save_adapter, whose file records the quantization, or "
                               "merge_and_unload(model) for an fp32 model. Nothing was written.")
    kinds = {isinstance(layer, LinearWithDoRA) for _, layer in layers}
    if len(kinds) > 1:
        dora = next(n for n, l in layers if isinstance(l, LinearWithDoRA))
        plain = next(n for n, l in layers if not isinstance(l, LinearWithDoRA))
        raise AdapterError(f"cannot export: layer {dora!r} is DoRA but {plain!r} is plain LoRA, and PEFT has one "
                           "use_dora per adapter. Use one variant for every layer. Nothing was written.")
    return layers


# --------------------------------------------------------------------------------------------
# Scaling conventions
# --------------------------------------------------------------------------------------------
def peft_alpha(rank: int, alpha: float, scaling: str) -> tuple[float, bool]:
    """(lora_alpha, use_rslora) that give PEFT the same factor s as the course's convention."""
    lora_scaling(rank, alpha, scaling)  # validates
    rank, alpha = int(rank), _check_alpha(alpha)
    if scaling == "alpha/rank":
        return alpha, False
    if scaling == "alpha/sqrt(rank)":
        return alpha, True
    return alpha * rank, False  # raw alpha: s = alpha = (alpha·r) / r


# --------------------------------------------------------------------------------------------
# Export: lora_course -> PEFT
# --------------------------------------------------------------------------------------------
def peft_state_dict(model: nn.Module, modules_to_save: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """The model's adapter under PEFT's on-disk key names (lora_A = Aᵀ, lora_B = Bᵀ), plus the
    parameters of ``modules_to_save``. Load it into a PeftModel with ``set_peft_model_state_dict``."""
    _check_model(model)
    modules_to_save = _check_modules_to_save(model, modules_to_save)
    layers = _exportable_layers(model)
    if not layers:
        raise AdapterError("the model has no LoRA layers, so there is no adapter to export; "
                           "add them with replace_linear_with_lora(model, rank, alpha)")
    if any(layer.merged for _, layer in layers):
        raise AdapterError("the model's LoRA layers are merged: unmerge_lora_(model) before exporting")
    state = {}
    for name, layer in layers:
        state[f"{PREFIX}{name}.lora_A.weight"] = layer.lora.A.detach().T.contiguous().clone()  # (r, in)
        state[f"{PREFIX}{name}.lora_B.weight"] = layer.lora.B.detach().T.contiguous().clone()  # (out, r)
        if isinstance(layer, LinearWithDoRA):
            state[f"{PREFIX}{name}.lora_magnitude_vector"] = layer.lora.magnitude.detach().contiguous().clone()  # (out,)
    for name, module in model.named_modules():
        if name and _matches(name, modules_to_save):
            for pname, p in module.named_parameters():
                state[f"{PREFIX}{name}.{pname}"] = p.detach().contiguous().clone()
    return state


def peft_config_dict(model: nn.Module, modules_to_save: Iterable[str] = ()) -> dict:
    """A ``LoraConfig`` (as the dict PEFT writes to adapter_config.json) describing the model's LoRA layers.

    ``target_modules`` lists the adapted layers by full name. The first layer sets ``r`` and
    ``lora_alpha``; layers that differ get ``rank_pattern`` / ``alpha_pattern`` entries.
    ``use_rslora`` is set when every layer scales by alpha/sqrt(rank), ``use_dora`` when every
    layer is DoRA."""
    _check_model(model)
    modules_to_save = _check_modules_to_save(model, modules_to_save)
    layers = _exportable_layers(model)
    if not layers:
        raise AdapterError("the model has no LoRA layers, so there is no adapter to export")
    use_dora = all(isinstance(layer, LinearWithDoRA) for _, layer in layers)
    conventions = {layer.lora.scaling_name for _, layer in layers}
    use_rslora = conventions == {"alpha/sqrt(rank)"}
    specs = {}
    for name, layer in layers:
        lora = layer.lora
        if use_rslora or len(conventions) == 1:
            alpha, _ = peft_alpha(lora.rank, lora.alpha, lora.scaling_name)
        else:  # mixed conventions: give each layer the lora_alpha that makes lora_alpha / r = s
            alpha = lora.scaling * lora.rank
        specs[name] = (lora.rank, alpha)
    dropouts = {layer.dropout_p for _, layer in layers}
    if len(dropouts) > 1:
        raise AdapterError(f"PEFT has one lora_dropout per adapter, but the layers use {sorted(dropouts)}")
    first_rank, first_alpha = next(iter(specs.values()))
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "inference_mode": True,
        "r": first_rank,
        "lora_alpha": first_alpha,
        "lora_dropout": dropouts.pop(),
        "use_rslora": use_rslora,
        "target_modules": [name for name, _ in layers],
        "exclude_modules": None,
        "modules_to_save": modules_to_save or None,
        # PEFT matches these keys as regexes against the end of a module name; "^" pins the full name.
        "rank_pattern": {"^" + re.escape(n): r for n, (r, _) in specs.items() if r != first_rank},
        "alpha_pattern": {"^" + re.escape(n): a for n, (_, a) in specs.items() if a != first_alpha},
        "bias": "none",
        "lora_bias": False,
        "use_dora": use_dora,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def _write_folder(folder: Path, files: dict[str, Callable[[str], None]]) -> None:
    """Write ``files`` (name -> writer) into ``folder`` whole or not at all.

    A new folder is written as a temporary sibling folder and renamed into place at the end, so
    a failure (a full disk, a config that cannot be written) leaves nothing behind. In an existing
    folder, every file is first written completely under a temporary name, then the files are
    renamed over the old ones (the config last); other files in the folder are left alone."""
    if folder.exists() and not folder.is_dir():
        raise AdapterError(f"cannot export to {str(folder)!r}: it is a file. A PEFT adapter is a folder; give a "
                           "folder name (it is created if needed)")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise AdapterError(f"cannot create the folder {str(folder.parent)!r}: {err.strerror or err}") from err
    temporary: list[str] = []
    try:
        if not folder.exists():
            tmp_folder = tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp")
            temporary.append(tmp_folder)
            for name, write in files.items():
                path = os.path.join(tmp_folder, name)
                write(path)
                _fsync(path)
                os.chmod(path, _shareable_mode())
            os.chmod(tmp_folder, _shareable_mode(directory=True))
            os.rename(tmp_folder, folder)
            return
        written = {}
        for name, write in files.items():
            fd, path = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
            os.close(fd)
            temporary.append(path)
            write(path)
            _fsync(path)
            os.chmod(path, _shareable_mode())
            written[name] = path
        for name, path in written.items():
            os.replace(path, folder / name)
    except OSError as err:
        raise AdapterError(f"cannot write the PEFT adapter folder {str(folder)!r}: {err.strerror or err}. "
                           "Nothing was written.") from err
    finally:
        for path in temporary:
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(path)


def export_peft_adapter(model: nn.Module, folder: str | os.PathLike, modules_to_save: Iterable[str] = ()) -> Path:
    """Write the model's adapter as a PEFT adapter folder that ``PeftModel.from_pretrained`` loads.

    ``modules_to_save`` names fully trained modules (e.g. ``["out_head"]``): PEFT restores them
    from the file, which is the only way a new classification head survives the trip. Everything
    is checked before anything is written (no LoRA, merged LoRA, NaN or inf, mixed dropouts, a
    file where the folder should be), and the folder is written whole or not at all, with
    ordinary permissions under the user's umask."""
    _check_model(model)
    folder = Path(_check_path(folder, "folder"))
    modules_to_save = _check_modules_to_save(model, modules_to_save)
    state = peft_state_dict(model, modules_to_save)
    config = peft_config_dict(model, modules_to_save)
    bad = _non_finite(state)
    if bad is not None:
        raise AdapterError(f"cannot export the adapter: {bad!r} holds NaN or inf values (did training diverge?). "
                           "Nothing was written.")
    config_text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    _write_folder(folder, {
        WEIGHTS_NAME: _save_safetensors(state, {"format": "pt", "written_by": "lora_course.peft_bridge"}),
        CONFIG_NAME: lambda path: Path(path).write_text(config_text),
    })
    return folder


# --------------------------------------------------------------------------------------------
# Import: PEFT -> lora_course
# --------------------------------------------------------------------------------------------
# LoraConfig options that change what the adapter computes in ways the course's layer does not
# implement. Importing such an adapter would silently compute something else, so we refuse.
_UNSUPPORTED = {
    "lora_bias": (False, None),
    "bias": ("none", None),
    "fan_in_fan_out": (False, None),
    "layer_replication": (None,),
    "target_parameters": (None, []),
    "trainable_token_indices": (None,),
}


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's rule for rank_pattern / alpha_pattern: the first key that matches the end of the name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _check_config(config, where: str) -> dict:
    """The LoraConfig fields the import uses, each checked (PEFT's defaults where absent):
    r, lora_alpha, rank_pattern, alpha_pattern, use_rslora, use_dora, lora_dropout, modules_to_save."""
    def bad(what: str, err: Exception | None = None) -> AdapterError:
        return AdapterError(f"{where!r}: {CONFIG_NAME} has {what}; it is not a config PEFT writes")

    if not isinstance(config, dict):
        raise bad(f"a JSON {type(config).__name__} instead of an object")
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{where!r} holds a {config.get('peft_type')!r} adapter; only LORA is supported")
    for option, allowed in _UNSUPPORTED.items():
        if config.get(option, allowed[0]) not in allowed:
            raise AdapterError(f"{where!r} uses {option}={config[option]!r}, which lora_course's "
                               f"LinearWithLoRA does not implement; it supports {option}={allowed[0]!r} only")
    checked = {}
    for key in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict):
            raise bad(f"{key}={patterns!r} (not a mapping of layer patterns to values)")
        for pattern in patterns:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as err:
                raise bad(f"{key} key {pattern!r}, which is not a valid regular expression ({err})", err) from err
        checked[key] = patterns
    for key, value in [("r", config.get("r", 8)), *[("rank_pattern", v) for v in checked["rank_pattern"].values()]]:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise bad(f"{key} value {value!r}, not a positive integer rank")
    for key, value in [("lora_alpha", config.get("lora_alpha", 8)),
                       *[("alpha_pattern", v) for v in checked["alpha_pattern"].values()]]:
        try:
            _check_alpha(value)
        except ValueError as err:
            raise bad(f"{key} value {value!r}, not a finite positive number", err) from err
    for flag in ("use_rslora", "use_dora"):
        if not isinstance(config.get(flag) or False, bool):
            raise bad(f"{flag}={config[flag]!r} (not true or false)")
    checked["use_dora"] = bool(config.get("use_dora") or False)
    try:
        checked["lora_dropout"] = _check_dropout(config.get("lora_dropout") or 0.0)
    except ValueError as err:
        raise bad(f"lora_dropout={config.get('lora_dropout')!r} ({err})", err) from err
    try:
        checked["modules_to_save"] = check_names(config.get("modules_to_save"), "modules_to_save")
    except ValueError as err:
        raise bad(f"modules_to_save={config.get('modules_to_save')!r}", err) from err
    return checked


def read_peft_adapter(folder: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a PEFT LoRA adapter folder: returns (config dict, tensors). Raises AdapterError with a
    clear message if the folder is not a LoRA adapter, is unreadable, uses an option the course
    does not implement (bias training, Conv1D layout, ...), or holds NaN or inf."""
    folder = Path(_check_path(folder, "folder"))
    if folder.is_file():
        raise AdapterError(f"{str(folder)!r} is a file; a PEFT adapter is a folder holding {CONFIG_NAME} and "
                           f"{WEIGHTS_NAME} (a lora_course adapter file is read with load_adapter)")
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not config_path.is_file() or not weights_path.exists():
        raise FileNotFoundError(f"{str(folder)!r} is not a PEFT adapter folder: it needs {CONFIG_NAME} and "
                                f"{WEIGHTS_NAME} (the .bin format is not read: it is a pickle)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{str(config_path)!r} is not valid JSON ({exc})") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise AdapterError(f"cannot read {str(config_path)!r}: {getattr(exc, 'strerror', None) or exc}") from exc
    _check_config(config, str(folder))
    _, tensors = _open_safetensors(str(weights_path), "PEFT weights file")
    for key, value in sorted(tensors.items()):
        if not value.is_floating_point():
            raise AdapterError(f"{str(weights_path)!r}: tensor {key!r} holds {value.dtype} values, not floating-point "
                               "numbers")
    bad = _non_finite(tensors)
    if bad is not None:
        raise AdapterError(f"{str(weights_path)!r}: tensor {bad!r} holds NaN or inf values, which would break the "
                           "model. Refused (the model is unchanged).")
    return config, tensors


def import_peft_adapter(model: nn.Module, folder: str | os.PathLike, *, trainable: bool = False) -> dict:
    """Apply a PEFT LoRA adapter folder to a lora_course model (in place); returns the config.

    The adapted layers are read from the file's keys; each gets a ``LinearWithLoRA`` (with
    ``use_dora``, a ``LinearWithDoRA`` whose magnitude is ``lora_magnitude_vector``) with
    A = lora_Aᵀ, B = lora_Bᵀ and PEFT's scaling (``alpha/rank``, or ``alpha/sqrt(rank)`` with
    ``use_rslora``). ``modules_to_save`` tensors (a head) are copied into the model; the file may
    hold no other base weight. Every check runs before the model is changed, so a refused adapter
    leaves it exactly as it was (a model whose LoRA is merged is refused: unmerge it first). Like
    PEFT, the result is frozen unless ``trainable=True``.
    """
    _check_model(model)
    trainable = check_bool(trainable, "trainable")
    config, tensors = read_peft_adapter(folder)
    where = str(folder)
    options = _check_config(config, where)
    merged = [name for name, layer in lora_layers(model) if layer.merged]
    if merged:
        raise AdapterError(f"cannot import {where!r}: the model's LoRA is merged into its weights ({merged[0]!r}, "
                           f"{len(merged)} layer(s)); call unmerge_lora_(model) first")
    modules_to_save = _check_modules_to_save(model, options["modules_to_save"])
    layers: dict[str, dict] = {}
    saved: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if not key.startswith(PREFIX):
            raise AdapterError(f"{where!r}: tensor {key!r} does not start with {PREFIX!r}, so it is not in PEFT's format")
        name = key[len(PREFIX):]
        match = re.fullmatch(r"(.+)\.lora_([AB])\.weight", name)
        magnitude = re.fullmatch(r"(.+)\.lora_magnitude_vector(\.weight)?", name)
        if match:
            layers.setdefault(match.group(1), {})[match.group(2)] = value
        elif magnitude:
            if not options["use_dora"]:
                raise AdapterError(f"{where!r}: {key!r} is a DoRA magnitude, but the config has use_dora=false")
            layers.setdefault(magnitude.group(1), {})["m"] = value
        elif "lora_" in name:
            raise AdapterError(f"{where!r}: {key!r} is a kind of LoRA tensor lora_course does not support "
                               "(only Linear layers: lora_A.weight and lora_B.weight)")
        elif not (modules_to_save and _matches(name.rpartition(".")[0], modules_to_save)):
            raise AdapterError(f"{where!r}: tensor {key!r} is not part of the adapter: besides lora_A and lora_B, a "
                               f"PEFT adapter may hold only the modules its config lists in modules_to_save "
                               f"({modules_to_save or 'none'}), never other base weights")
        else:
            saved[name] = value
    if not layers:
        raise AdapterError(f"{where!r} has no lora_A / lora_B tensors: the adapter is empty")

    # Check every layer before touching the model.
    present = {name: layer.lora.rank for name, layer in lora_layers(model)}
    aliases = _aliases(model)
    plan = {}
    for name, pair in sorted(layers.items()):
        if not {"A", "B"} <= set(pair):
            raise AdapterError(f"{where!r}: layer {name!r} has " +
                               (f"lora_{'A' if 'A' in pair else 'B'} but not the other" if set(pair) & {"A", "B"}
                                else "a DoRA magnitude but no lora_A / lora_B"))
        if options["use_dora"] and "m" not in pair:
            raise AdapterError(f"{where!r}: the config has use_dora=true, but layer {name!r} has no lora_magnitude_vector")
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise AdapterError(f"{where!r} adapts {name!r}, which this model does not have "
                               "(an adapter for a different architecture)") from None
        if not isinstance(module, (nn.Linear, LinearWithLoRA)):
            raise AdapterError(f"{where!r} adapts {name!r}, a {type(module).__name__} here, not an nn.Linear")
        a, b = pair["A"], pair["B"]  # (r, in), (out, r)
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0] or \
                (a.shape[1], b.shape[0]) != (module.in_features, module.out_features):
            raise AdapterError(f"{where!r}: layer {name!r} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, "
                               f"which do not fit an nn.Linear({module.in_features}, {module.out_features})")
        rank = a.shape[0]
        expected_rank = _pattern_value(options["rank_pattern"], name, config.get("r", 8))
        if rank != expected_rank:
            raise AdapterError(f"{where!r}: layer {name!r} has rank {rank} in the weights but {expected_rank} in the config")
        alpha = _pattern_value(options["alpha_pattern"], name, config.get("lora_alpha", 8))
        if "m" in pair and (pair["m"].ndim != 1 or pair["m"].shape[0] != module.out_features):
            raise AdapterError(f"{where!r}: layer {name!r} has a DoRA magnitude of shape {tuple(pair['m'].shape)}, "
                               f"not ({module.out_features},)")
        if isinstance(module, LinearWithLoRA):
            kind = "DoRA" if isinstance(module, LinearWithDoRA) else type(module).__name__
            if type(module) is not (LinearWithDoRA if options["use_dora"] else LinearWithLoRA):
                raise AdapterError(f"{where!r} is a {'DoRA' if options['use_dora'] else 'plain LoRA'} adapter, but layer "
                                   f"{name!r} of this model already has a {kind} branch. Call remove_lora(model) first, "
                                   "or load it into a fresh model.")
            if module.lora.rank != rank:
                raise AdapterError(f"{where!r}: layer {name!r} already has LoRA of rank {module.lora.rank}, the "
                                   f"adapter has rank {rank}. Call remove_lora(model) first.")
        else:
            reason = _unsupported_reason(model, name, module, aliases)
            if reason:
                raise AdapterError(f"{where!r}: {reason}")
        plan[name] = (module, rank, alpha)
    if present and set(present) != set(plan):
        raise AdapterError(f"{where!r} adapts other layers than the LoRA layers this model has; "
                           "call remove_lora(model) first, or load it into a fresh model")
    model_state = model.state_dict()
    for key, value in saved.items():
        if key not in model_state:
            raise AdapterError(f"{where!r}: tensor {key!r} (modules_to_save) has no place in this model")
        if model_state[key].shape != value.shape:
            raise AdapterError(f"{where!r}: {key!r} has shape {tuple(value.shape)} in the adapter but "
                               f"{tuple(model_state[key].shape)} in this model (build the model with the same head)")

    # Build everything that can fail before changing the model.
    scaling = "alpha/sqrt(rank)" if config.get("use_rslora") else "alpha/rank"
    targets = {}
    with _rank_warning_given():
        for name, (module, rank, alpha) in plan.items():
            if isinstance(module, LinearWithLoRA):
                targets[name] = (module, False, _check_alpha(alpha), lora_scaling(rank, alpha, scaling))
            else:
                layer_class = LinearWithDoRA if options["use_dora"] else LinearWithLoRA
                try:
                    wrapper = layer_class(module, rank, alpha, scaling=scaling, dropout=options["lora_dropout"])
                except ValueError as err:  # e.g. DoRA on a weight with a zero row
                    raise AdapterError(f"{where!r}: cannot build layer {name!r}: {err}") from None
                targets[name] = (wrapper, True, wrapper.lora.alpha, wrapper.lora.scaling)

    # All checks passed: change the model.
    with torch.no_grad():
        for name, (module, is_new, alpha, s) in targets.items():
            if is_new:
                _set_submodule(model, name, module)
            else:
                module.lora.alpha, module.lora.scaling_name, module.lora.scaling = alpha, scaling, s
            module.lora.A.copy_(layers[name]["A"].T)
            module.lora.B.copy_(layers[name]["B"].T)
            if "m" in layers[name]:
                module.lora.magnitude.copy_(layers[name]["m"])
        state = model.state_dict()
        for key, value in saved.items():
            state[key].copy_(value)
    set_adapter_trainable(model, trainable, modules_to_save)
    return config
