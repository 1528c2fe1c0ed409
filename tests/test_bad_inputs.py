"""Bad inputs to every public function of the LoRA code, the adapters, PEFT bridge, accounting,
low-rank tools, planted-rank experiment, exercises, lab widgets, checkpoints and training loop.

Each case asserts three things: the exception type (a course error or a built-in, never a raw
SafetensorError / JSONDecodeError / KeyError / IndexError / ZeroDivisionError), a fragment of the
message that says what is wrong, and that nothing changed: every model involved is compared bit
for bit (state_dict tensors, module types by name, requires_grad flags, training flags, LoRA's
merged / enabled / rank / alpha / scaling), and the test's folder by file names, bytes and modes.

References are independent of the code under test: hand-computed counts, PyTorch's own
nn.MultiheadAttention, files crafted here with safetensors directly (checksums recomputed, as
someone editing a file would), and os.stat for permissions.
"""
from __future__ import annotations

import json
import math
import os
import stat
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lora_course import accounting, adapters, exercises, gpt, lowrank, peft_bridge, planted, training, widgets
from lora_course.adapters import _metadata_bytes, _sha256
from lora_course.data import CONTEXT_LENGTH, TOKENIZER, Split, classification_splits
from lora_course.errors import (AdapterError, ArgumentTypeError, CheckpointError, LoRAStateError, NonFiniteError,
                                RankAboveMatrixRankWarning, UnsupportedLayerError)
from lora_course.gpt import GPTConfig, GPTModel
from lora_course.lora import (LinearWithLoRA, LoRALayer, lora_disabled, lora_layers, lora_scaling,
                              mark_only_lora_as_trainable, merge_and_unload, merge_lora_, remove_lora,
                              replace_linear_with_lora, set_lora_enabled, unmerge_lora_)
from lora_course.training import EncodedSplit

CFG = GPTConfig(vocab_size=len(TOKENIZER), context_length=CONTEXT_LENGTH, emb_dim=16, n_heads=2, n_layers=2)
TARGETS = ["W_query", "W_value"]


# ------------------------------------------------------------------------------------------------
# Tiny models
# ------------------------------------------------------------------------------------------------
def randomize_b(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora.B"):
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def lora_mlp():
    model = mlp()
    replace_linear_with_lora(model, 2, 4, seed=0)
    return randomize_b(model)


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPTModel(CFG).eval()


def clf(seed=0):
    return training.make_classifier(tiny_gpt(seed))


def lora_clf(seed=0):
    model = clf(seed)
    replace_linear_with_lora(model, 2, 4, target_modules=TARGETS, seed=0)
    mark_only_lora_as_trainable(model, ["out_head"])
    return randomize_b(model).eval()


def merged(model):
    merge_lora_(model)
    return model


def with_nan(model, key_end="lora.B"):
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if n.endswith(key_end))[0, 0] = float("nan")
    return model


def mha_model():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.att = nn.MultiheadAttention(8, 2, batch_first=True)
            self.ff = nn.Linear(8, 8)

    torch.manual_seed(0)
    return Block()


def tied_lm():
    model = tiny_gpt()
    model.out_head.weight = model.tok_emb.weight  # a tied LM head, as in GPT-2
    return model


def shared_model():
    torch.manual_seed(0)
    layer = nn.Linear(4, 4)
    model = nn.Sequential()
    model.add_module("first", layer)
    model.add_module("second", layer)  # the same module under two names
    return model


_SPLITS = {}


def splits():
    if not _SPLITS:
        _SPLITS.update(classification_splits("spam", n_train=16, n_val=8, n_test=2))
    return _SPLITS


def encoded(which="train"):
    return EncodedSplit.from_split(splits()[which])


# ------------------------------------------------------------------------------------------------
# Snapshots: what "nothing changed" means
# ------------------------------------------------------------------------------------------------
def snapshot_model(model: nn.Module) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "types": [(n, type(m).__name__) for n, m in model.named_modules(remove_duplicate=False)],
        "training": [(n, m.training) for n, m in model.named_modules(remove_duplicate=False)],
        "grad": [(n, p.requires_grad) for n, p in model.named_parameters(remove_duplicate=False)],
        "lora": [(n, m.merged, m.enabled, m.lora.rank, m.lora.alpha, m.lora.scaling_name, m.lora.scaling)
                 for n, m in model.named_modules() if isinstance(m, LinearWithLoRA)],
    }


def assert_model_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot_model(model)
    for key in ("types", "training", "grad", "lora"):
        assert after[key] == before[key], key
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert after["state"][k].dtype == v.dtype and same_bits(after["state"][k], v), k


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit, NaN included (torch.equal says NaN != NaN)."""
    return a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def snapshot_folder(folder: Path) -> dict:
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            st = path.stat()
            out[str(path.relative_to(folder))] = (stat.S_IMODE(st.st_mode),
                                                  None if path.is_dir() else path.read_bytes())
    return out


# ------------------------------------------------------------------------------------------------
# Files, crafted as an editor of the file would (checksums recomputed)
# ------------------------------------------------------------------------------------------------
class Files:
    def __init__(self, folder: Path):
        self.folder = folder

    def adapter(self, name="a.safetensors", model=None, modules_to_save=("out_head",)):
        path = self.folder / name
        if not path.exists():
            adapters.save_adapter(model if model is not None else lora_clf(), path, list(modules_to_save))
        return path

    def crafted_adapter(self, name, edit):
        tensors, meta = adapters.read_adapter(self.adapter())
        edit(tensors, meta)
        meta["sha256"] = _sha256(tensors, _metadata_bytes(meta))  # a valid checksum for the edited file
        path = self.folder / name
        save_file(tensors, str(path), metadata={"lora_course": json.dumps(meta)})
        return path

    def raw_adapter_header(self, name, header_value):
        tensors, _ = adapters.read_adapter(self.adapter())
        path = self.folder / name
        save_file(tensors, str(path), metadata={"lora_course": header_value})
        return path

    def peft(self, name="peft", model=None, modules_to_save=("out_head",)):
        path = self.folder / name
        if not path.exists():
            peft_bridge.export_peft_adapter(model if model is not None else lora_clf(), path, list(modules_to_save))
        return path

    def crafted_peft(self, name, edit_config=None, edit_tensors=None):
        config, tensors = peft_bridge.read_peft_adapter(self.peft())
        folder = self.folder / name
        folder.mkdir()
        if edit_config:
            edit_config(config)
        if edit_tensors:
            edit_tensors(tensors)
        save_file(tensors, str(folder / peft_bridge.WEIGHTS_NAME))
        (folder / peft_bridge.CONFIG_NAME).write_text(json.dumps(config) if not isinstance(config, str) else config)
        return folder

    def checkpoint(self, name="gpt.safetensors", state_edit=None, meta=None):
        path = self.folder / name
        model = tiny_gpt()
        state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
        if state_edit:
            state_edit(state)
        header = {"config": json.dumps(CFG.__dict__)} if meta is None else meta
        save_file(state, str(path), metadata=header)
        return path

    def text(self, name, content: bytes):
        path = self.folder / name
        path.write_bytes(content)
        return path

    def folder_named(self, name):
        path = self.folder / name
        path.mkdir(exist_ok=True)
        return path


def nan_b(tensors):
    key = next(k for k in sorted(tensors) if k.endswith("lora.B") or k.endswith("lora_B.weight"))
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = float("nan")


def set_layer_field(field, value, index=-1):
    def edit(tensors, meta):
        name = sorted(meta["layers"])[index]
        meta["layers"][name][field] = value
    return edit


# ------------------------------------------------------------------------------------------------
# The cases: (prepare(files) -> context dict, call(context), exception type, message fragment).
# Every nn.Module in the context is snapshotted before the call; so is the whole folder.
# ------------------------------------------------------------------------------------------------
def case(id, prepare, call, exc, match):
    return pytest.param(prepare, call, exc, match, id=id)


M = lambda build: (lambda f: {"m": build()})  # noqa: E731  a context holding one model


def _partly_disabled():
    model = lora_mlp()
    list(lora_layers(model))[-1][1].enabled = False  # the last layer only
    return model


def _partly_merged():
    model = lora_mlp()
    list(lora_layers(model))[-1][1].merge_()  # the last layer only
    return model


def _manually_tied():
    model = tied_lm()
    model.out_head = LinearWithLoRA(model.out_head, 2, 2)  # bypassing replace_linear_with_lora's check
    return randomize_b(model)


def _bf16_classifier():
    return clf().to(torch.bfloat16)


def _model_with_lora_head():
    model = clf()
    with pytest.warns(RankAboveMatrixRankWarning):
        replace_linear_with_lora(model, 4, 4, target_modules=["out_head"])
    return model


LORA_CASES = [
    case("lora_scaling-bad-name", M(mlp), lambda c: lora_scaling(2, 2, None), ValueError, "unknown scaling None"),
    case("lora_scaling-rank-float", M(mlp), lambda c: lora_scaling(2.0, 2), ValueError, "rank must be a positive integer"),
    case("LoRALayer-zero-in", M(mlp), lambda c: LoRALayer(0, 4, 2, 2), ValueError, "in_dim must be an integer >= 1"),
    case("LoRALayer-float-out", M(mlp), lambda c: LoRALayer(4, 4.0, 2, 2), ArgumentTypeError, "out_dim must be an integer"),
    case("LoRALayer-alpha-nan", M(mlp), lambda c: LoRALayer(4, 4, 2, float("nan")), ValueError, "alpha must be a finite"),
    case("LinearWithLoRA-dropout-negative", M(mlp), lambda c: LinearWithLoRA(c["m"][0], 2, 2, dropout=-0.1),
         ValueError, r"dropout must be >= 0.*\[0, 1\)"),
    case("LinearWithLoRA-dropout-nan", M(mlp), lambda c: LinearWithLoRA(c["m"][0], 2, 2, dropout=float("nan")),
         ValueError, "dropout must be a finite number"),
    case("LinearWithLoRA-dropout-one", M(mlp), lambda c: LinearWithLoRA(c["m"][0], 2, 2, dropout=1.0),
         ValueError, "dropout must be < 1"),
    case("LinearWithLoRA-dropout-str", M(mlp), lambda c: LinearWithLoRA(c["m"][0], 2, 2, dropout="0.1"),
         ArgumentTypeError, "dropout must be a number"),
    case("LinearWithLoRA-mha-out_proj", M(mha_model), lambda c: LinearWithLoRA(c["m"].att.out_proj, 2, 2),
         UnsupportedLayerError, "reads out_proj.weight directly"),
    case("LinearWithLoRA-int-weight", M(mlp),
         lambda c: LinearWithLoRA(_int_linear(), 2, 2),
         ArgumentTypeError, "floating-point weight"),
    case("replace-not-a-module", M(mlp), lambda c: replace_linear_with_lora("model", 2, 2), ArgumentTypeError,
         "model must be a torch.nn.Module"),
    case("replace-dropout-nan", M(mlp), lambda c: replace_linear_with_lora(c["m"], 2, 2, dropout=float("nan")),
         ValueError, "dropout must be a finite number"),
    case("replace-target-not-str", M(mlp), lambda c: replace_linear_with_lora(c["m"], 2, 2, target_modules=[0]),
         ArgumentTypeError, "target_modules must hold non-empty module names"),
    case("replace-target-empty", M(mlp), lambda c: replace_linear_with_lora(c["m"], 2, 2, target_modules=[]),
         ValueError, "target_modules is an empty list"),
    case("replace-target-bad-regex", M(mlp), lambda c: replace_linear_with_lora(c["m"], 2, 2, target_modules="(["),
         ValueError, "not a valid regular expression"),
    case("replace-exclude-all-matched", M(mlp),
         lambda c: replace_linear_with_lora(c["m"], 2, 2, target_modules=["0"], exclude_modules=["0"]),
         ValueError, "all of them excluded"),
    case("replace-seed-str", M(mlp), lambda c: replace_linear_with_lora(c["m"], 2, 2, seed="0"), ArgumentTypeError,
         "seed must be an integer"),
    case("replace-other-rank-on-wrapped", M(lora_mlp), lambda c: replace_linear_with_lora(c["m"], 8, 4),
         ValueError, r"layer '0' already has LoRA of rank 2 .*remove_lora\(model\) first"),
    case("replace-partly-wrapped-other-rank", M(lambda: _half_wrapped()),
         lambda c: replace_linear_with_lora(c["m"], 4, 4), ValueError, "already has LoRA of rank 2"),
    case("replace-mha", M(mha_model), lambda c: replace_linear_with_lora(c["m"], 2, 2), UnsupportedLayerError,
         r"'att.out_proj'.*never calls out_proj\(x\).*exclude_modules=\['att.out_proj'\]"),
    case("replace-tied-head", M(tied_lm), lambda c: replace_linear_with_lora(c["m"], 2, 2, target_modules=["out_head"]),
         UnsupportedLayerError, r"same Parameter as 'tok_emb.weight' \(tied weights.*untie"),
    case("replace-shared-module", M(shared_model), lambda c: replace_linear_with_lora(c["m"], 2, 2),
         UnsupportedLayerError, r"also used as 'second' \(a shared module"),
    case("replace-shared-module-second-name", M(shared_model),
         lambda c: replace_linear_with_lora(c["m"], 2, 2, target_modules=["second"]), UnsupportedLayerError,
         "shared module"),
    case("replace-the-model-is-a-linear", lambda f: {"m": nn.Linear(4, 4)},
         lambda c: replace_linear_with_lora(c["m"], 2, 2), TypeError, "wrap it directly"),
    case("lora_layers-not-a-module", M(mlp), lambda c: lora_layers(None), ArgumentTypeError, "torch.nn.Module"),
    case("mark-no-lora", M(mlp), lambda c: mark_only_lora_as_trainable(c["m"]), ValueError, "has no LoRA layers"),
    case("mark-unknown-module", M(lora_mlp), lambda c: mark_only_lora_as_trainable(c["m"], ["head"]), ValueError,
         "no module named 'head'"),
    case("mark-unknown-module-as-str", M(lora_mlp), lambda c: mark_only_lora_as_trainable(c["m"], "head"), ValueError,
         "no module named 'head'"),
    case("mark-non-str-name", M(lora_mlp), lambda c: mark_only_lora_as_trainable(c["m"], [2]), ArgumentTypeError,
         "module names"),
    case("merge-no-lora", M(mlp), lambda c: merge_lora_(c["m"]), ValueError, "cannot merge: the model has no LoRA"),
    case("merge-last-layer-disabled", M(_partly_disabled), lambda c: merge_lora_(c["m"]), LoRAStateError,
         r"cannot merge '2': its LoRA branch is disabled"),
    case("merge-nan", M(lambda: with_nan(lora_mlp())), lambda c: merge_lora_(c["m"]), NonFiniteError,
         "NaN or inf"),
    case("merge-tied", M(_manually_tied), lambda c: merge_lora_(c["m"]), UnsupportedLayerError,
         "same Parameter as 'tok_emb.weight'"),
    case("layer-merge-disabled", M(_partly_disabled), lambda c: list(lora_layers(c["m"]))[-1][1].merge_(),
         LoRAStateError, "disabled"),
    case("unmerge-no-lora", M(mlp), lambda c: unmerge_lora_(c["m"]), ValueError, "no LoRA layers"),
    case("merge_and_unload-disabled", M(_partly_disabled), lambda c: merge_and_unload(c["m"]), LoRAStateError,
         "disabled"),
    case("merge_and_unload-nan", M(lambda: with_nan(lora_mlp())), lambda c: merge_and_unload(c["m"]),
         NonFiniteError, "NaN or inf"),
    case("merge_and_unload-not-a-module", M(mlp), lambda c: merge_and_unload([1]), ArgumentTypeError, "nn.Module"),
    case("remove-not-a-module", M(mlp), lambda c: remove_lora("x"), ArgumentTypeError, "nn.Module"),
    case("enable-not-bool", M(lora_mlp), lambda c: set_lora_enabled(c["m"], "no"), ArgumentTypeError,
         "enabled must be True or False"),
    case("enable-int", M(lora_mlp), lambda c: set_lora_enabled(c["m"], 0), ArgumentTypeError, "True or False"),
    case("disable-partly-merged", M(_partly_merged), lambda c: set_lora_enabled(c["m"], False), LoRAStateError,
         r"merged into the weights of '2'"),
    case("lora_disabled-no-lora", M(mlp), lambda c: lora_disabled(c["m"]).__enter__(), ValueError, "no LoRA layers"),
    case("lora_disabled-merged", M(_partly_merged), lambda c: lora_disabled(c["m"]).__enter__(), LoRAStateError,
         "unmerge_lora_"),
]


def _int_linear():
    layer = nn.Linear(4, 4)
    layer.weight = nn.Parameter(torch.ones(4, 4, dtype=torch.int64), requires_grad=False)
    return layer


def _half_wrapped():
    model = mlp()
    replace_linear_with_lora(model, 2, 4, target_modules=["2"])
    return model


def _edit_add_base_weight(tensors, meta):
    tensors["tok_emb.weight"] = torch.zeros(CFG.vocab_size, CFG.emb_dim)


def _edit_in_features(tensors, meta):
    name = sorted(meta["layers"])[-1]
    meta["layers"][name]["in_features"] = 1
    tensors[f"{name}.lora.A"] = tensors[f"{name}.lora.A"][:1].clone()  # a (1, r) A, as broadcasting would accept


def _edit_empty(tensors, meta):
    tensors.clear()
    meta["layers"] = {}
    meta["modules_to_save"] = []


def _edit_unknown_lora_key(tensors, meta):
    tensors["trf_blocks.0.att.W_key.lora.A"] = torch.zeros(CFG.emb_dim, 2)


ADAPTER_CASES = [
    case("save-no-lora", lambda f: {"m": clf()}, lambda c: adapters.save_adapter(c["m"], c["dir"] / "x.safetensors"),
         AdapterError, "no LoRA layers"),
    case("save-merged", lambda f: {"m": merged(lora_clf())}, lambda c: adapters.save_adapter(c["m"], c["dir"] / "x"),
         AdapterError, "merged"),
    case("save-nan-over-good-file", lambda f: {"m": with_nan(lora_clf()), "p": f.adapter()},
         lambda c: adapters.save_adapter(c["m"], c["p"], ["out_head"]), AdapterError, "NaN or inf values"),
    case("save-missing-folder", lambda f: {"m": lora_clf()},
         lambda c: adapters.save_adapter(c["m"], c["dir"] / "missing" / "a.safetensors"), FileNotFoundError,
         "does not exist. Create it first"),
    case("save-to-a-directory", lambda f: {"m": lora_clf(), "p": f.folder_named("sub")},
         lambda c: adapters.save_adapter(c["m"], c["p"]), AdapterError, "is a directory"),
    case("save-path-not-a-path", lambda f: {"m": lora_clf()}, lambda c: adapters.save_adapter(c["m"], 5),
         ArgumentTypeError, "file path"),
    case("save-unknown-module-as-str", lambda f: {"m": lora_clf()},
         lambda c: adapters.save_adapter(c["m"], c["dir"] / "x.safetensors", "head"), AdapterError,
         "no module named 'head'"),
    case("lora_state_dict-not-a-module", M(mlp), lambda c: adapters.lora_state_dict(3), ArgumentTypeError, "nn.Module"),
    case("adapter_metadata-unknown-module", M(lora_clf), lambda c: adapters.adapter_metadata(c["m"], ["nope"]),
         AdapterError, "no module named 'nope'"),
    case("base_state-merged", lambda f: {"m": merged(lora_clf())}, lambda c: adapters.base_state(c["m"]),
         AdapterError, "unmerge_lora_"),
    case("fingerprint-exclude-not-names", M(clf), lambda c: adapters.base_fingerprint(c["m"], exclude=[1]),
         ArgumentTypeError, "module names"),
    case("read-missing", lambda f: {}, lambda c: adapters.read_adapter(c["dir"] / "nope.safetensors"),
         FileNotFoundError, "no adapter file"),
    case("read-directory", lambda f: {"p": f.folder_named("sub")}, lambda c: adapters.read_adapter(c["p"]),
         AdapterError, "is a directory, not adapter file"),
    case("read-garbage", lambda f: {"p": f.text("g.safetensors", b"not a file")},
         lambda c: adapters.read_adapter(c["p"]), AdapterError, "truncated or is not a safetensors file"),
    case("read-metadata-not-json", lambda f: {"p": f.raw_adapter_header("j.safetensors", "{not json")},
         lambda c: adapters.read_adapter(c["p"]), AdapterError, "not valid JSON"),
    case("read-metadata-a-list", lambda f: {"p": f.raw_adapter_header("l.safetensors", "[1, 2]")},
         lambda c: adapters.read_adapter(c["p"]), AdapterError, "a JSON list, not an object"),
    case("read-metadata-missing-layers",
         lambda f: {"p": f.crafted_adapter("ml.safetensors", lambda t, m: m.pop("layers"))},
         lambda c: adapters.read_adapter(c["p"]), AdapterError, "malformed .it has no 'layers'"),
    case("read-rank-str", lambda f: {"p": f.crafted_adapter("r.safetensors", set_layer_field("rank", "2"))},
         lambda c: adapters.read_adapter(c["p"]), AdapterError, "rank='2', not a positive integer"),
    case("read-alpha-negative", lambda f: {"p": f.crafted_adapter("al.safetensors", set_layer_field("alpha", -1))},
         lambda c: adapters.read_adapter(c["p"]), AdapterError, "alpha must be a finite positive number"),
    case("read-empty-adapter", lambda f: {"p": f.crafted_adapter("e.safetensors", _edit_empty)},
         lambda c: adapters.read_adapter(c["p"]), AdapterError, "empty adapter"),
    case("read-nan", lambda f: {"p": f.crafted_adapter("n.safetensors", lambda t, m: nan_b(t))},
         lambda c: adapters.inspect_adapter(c["p"]), AdapterError, "NaN or inf"),
    case("read-undeclared-lora-key", lambda f: {"p": f.crafted_adapter("u.safetensors", _edit_unknown_lora_key)},
         lambda c: adapters.read_adapter(c["p"]), AdapterError, "of no layer the adapter declares"),
    case("load-overwrites-tok_emb", lambda f: {"m": clf(), "p": f.crafted_adapter("o.safetensors", _edit_add_base_weight)},
         lambda c: adapters.load_adapter(c["m"], c["p"]), AdapterError,
         r"'tok_emb.weight' is not part of the adapter.*never other base weights"),
    case("load-in-features-lie", lambda f: {"m": clf(), "p": f.crafted_adapter("i.safetensors", _edit_in_features)},
         lambda c: adapters.load_adapter(c["m"], c["p"]), AdapterError, r"as a 1 -> 16 layer, but it is 16 -> 16"),
    case("load-bad-alpha-last-layer", lambda f: {"m": clf(), "p": f.crafted_adapter("b.safetensors",
                                                                                 set_layer_field("alpha", 0))},
         lambda c: adapters.load_adapter(c["m"], c["p"]), AdapterError, "alpha must be a finite positive"),
    case("load-directory", lambda f: {"m": clf(), "p": f.folder_named("sub")},
         lambda c: adapters.load_adapter(c["m"], c["p"]), AdapterError, "is a directory"),
    case("load-into-merged", lambda f: {"m": merged(lora_clf()), "p": f.adapter()},
         lambda c: adapters.load_adapter(c["m"], c["p"]), AdapterError, r"merged into its weights.*unmerge_lora_"),
    case("load-bf16-base", lambda f: {"m": _bf16_classifier(), "p": f.adapter()},
         lambda c: adapters.load_adapter(c["m"], c["p"]), AdapterError,
         r"in another precision: this model holds them in bfloat16.*only the dtype differs"),
    case("load-other-base", lambda f: {"m": clf(seed=1), "p": f.adapter()},
         lambda c: adapters.load_adapter(c["m"], c["p"]), AdapterError, "different base weights"),
    case("load-trainable-not-bool", lambda f: {"m": clf(), "p": f.adapter()},
         lambda c: adapters.load_adapter(c["m"], c["p"], trainable="yes"), ArgumentTypeError, "trainable must be"),
    case("load-other-rank-present", lambda f: {"m": _rank4_clf(), "p": f.adapter()},
         lambda c: adapters.load_adapter(c["m"], c["p"]), AdapterError, "other layers or ranks"),
    case("load-not-a-module", lambda f: {"p": f.adapter()}, lambda c: adapters.load_adapter("m", c["p"]),
         ArgumentTypeError, "nn.Module"),
    case("set_adapter_trainable-not-bool", M(lora_clf), lambda c: adapters.set_adapter_trainable(c["m"], 1),
         ArgumentTypeError, "True or False"),
    case("set_adapter_trainable-unknown-module", M(lora_clf),
         lambda c: adapters.set_adapter_trainable(c["m"], True, ["nope"]), ValueError, "no module named 'nope'"),
]


def _rank4_clf():
    model = clf()
    replace_linear_with_lora(model, 4, 4, target_modules=TARGETS)
    return model


def _peft_config_edit(key, value):
    return lambda config: config.__setitem__(key, value)


def _peft_add_base_weight(tensors):
    tensors["base_model.model.tok_emb.weight"] = torch.zeros(CFG.vocab_size, CFG.emb_dim)


def _peft_bad_last_shape(tensors):
    key = sorted(k for k in tensors if k.endswith("lora_A.weight"))[-1]
    tensors[key] = torch.zeros(2, 5)


PEFT_CASES = [
    case("peft_alpha-bad-rank", M(mlp), lambda c: peft_bridge.peft_alpha(0, 1, "alpha/rank"), ValueError,
         "rank must be a positive integer"),
    case("peft_alpha-bad-scaling", M(mlp), lambda c: peft_bridge.peft_alpha(2, 2, "x"), ValueError, "unknown scaling"),
    case("peft_state_dict-no-lora", M(mlp), lambda c: peft_bridge.peft_state_dict(c["m"]), AdapterError, "no LoRA"),
    case("peft_state_dict-merged", lambda f: {"m": merged(lora_clf())}, lambda c: peft_bridge.peft_state_dict(c["m"]),
         AdapterError, "merged"),
    case("peft_config_dict-unknown-module", M(lora_clf), lambda c: peft_bridge.peft_config_dict(c["m"], ["nope"]),
         AdapterError, "no module named 'nope'"),
    case("export-nan", lambda f: {"m": with_nan(lora_clf())},
         lambda c: peft_bridge.export_peft_adapter(c["m"], c["dir"] / "out"), AdapterError, "NaN or inf"),
    case("export-nan-over-existing", lambda f: {"m": with_nan(lora_clf()), "p": f.peft()},
         lambda c: peft_bridge.export_peft_adapter(c["m"], c["p"]), AdapterError, "NaN or inf"),
    case("export-to-a-file", lambda f: {"m": lora_clf(), "p": f.text("file", b"x")},
         lambda c: peft_bridge.export_peft_adapter(c["m"], c["p"]), AdapterError, "it is a file"),
    case("export-not-a-path", M(lora_clf), lambda c: peft_bridge.export_peft_adapter(c["m"], None), ArgumentTypeError,
         "folder must be a file path"),
    case("read_peft-a-file", lambda f: {"p": f.adapter()}, lambda c: peft_bridge.read_peft_adapter(c["p"]),
         AdapterError, "is a file; a PEFT adapter is a folder"),
    case("read_peft-missing", lambda f: {}, lambda c: peft_bridge.read_peft_adapter(c["dir"] / "nope"),
         FileNotFoundError, "adapter_config.json"),
    case("read_peft-config-not-json", lambda f: {"p": f.crafted_peft("j", edit_config=None)} | _break_config(f, "j"),
         lambda c: peft_bridge.read_peft_adapter(c["p"]), AdapterError, "is not valid JSON"),
    case("read_peft-r-str", lambda f: {"p": f.crafted_peft("r", _peft_config_edit("r", "8"))},
         lambda c: peft_bridge.read_peft_adapter(c["p"]), AdapterError, "r value '8', not a positive integer"),
    case("read_peft-dropout", lambda f: {"p": f.crafted_peft("d", _peft_config_edit("lora_dropout", 1.5))},
         lambda c: peft_bridge.read_peft_adapter(c["p"]), AdapterError, "lora_dropout=1.5"),
    case("read_peft-bad-pattern", lambda f: {"p": f.crafted_peft("p", _peft_config_edit("alpha_pattern", {"([": 2}))},
         lambda c: peft_bridge.read_peft_adapter(c["p"]), AdapterError, "not a valid regular expression"),
    case("read_peft-nan", lambda f: {"p": f.crafted_peft("n", edit_tensors=nan_b)},
         lambda c: peft_bridge.read_peft_adapter(c["p"]), AdapterError, "NaN or inf"),
    case("import-overwrites-tok_emb", lambda f: {"m": clf(), "p": f.crafted_peft("o", edit_tensors=_peft_add_base_weight)},
         lambda c: peft_bridge.import_peft_adapter(c["m"], c["p"]), AdapterError,
         r"'base_model.model.tok_emb.weight' is not part of the adapter"),
    case("import-bad-last-layer", lambda f: {"m": clf(), "p": f.crafted_peft("s", edit_tensors=_peft_bad_last_shape)},
         lambda c: peft_bridge.import_peft_adapter(c["m"], c["p"]), AdapterError, "do not fit an nn.Linear"),
    case("import-trainable-unknown-module",
         lambda f: {"m": clf(), "p": f.crafted_peft("t", _peft_config_edit("modules_to_save", ["nohead"]))},
         lambda c: peft_bridge.import_peft_adapter(c["m"], c["p"], trainable=True), AdapterError,
         "no module named 'nohead'"),
    case("import-into-merged", lambda f: {"m": merged(lora_clf()), "p": f.peft()},
         lambda c: peft_bridge.import_peft_adapter(c["m"], c["p"]), AdapterError, "merged"),
    case("import-trainable-not-bool", lambda f: {"m": clf(), "p": f.peft()},
         lambda c: peft_bridge.import_peft_adapter(c["m"], c["p"], trainable=None), ArgumentTypeError, "trainable"),
    case("import-into-mha", lambda f: {"m": mha_model(), "p": _mha_peft(f)},
         lambda c: peft_bridge.import_peft_adapter(c["m"], c["p"]), AdapterError, "reads out_proj.weight directly"),
]


def _break_config(files, name):
    (files.folder / name / peft_bridge.CONFIG_NAME).write_text("{not json")
    return {}


def _mha_peft(files):
    folder = files.folder / "mha"
    folder.mkdir()
    tensors = {"base_model.model.att.out_proj.lora_A.weight": torch.zeros(2, 8),
               "base_model.model.att.out_proj.lora_B.weight": torch.zeros(8, 2)}
    save_file(tensors, str(folder / peft_bridge.WEIGHTS_NAME))
    (folder / peft_bridge.CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    return folder


ACCOUNTING_CASES = [
    case("count-negative-in", M(mlp), lambda c: accounting.lora_parameter_count(-64, 64, 4), ValueError,
         "in_features must be an integer >= 1"),
    case("count-float-out", M(mlp), lambda c: accounting.lora_parameter_count(64, 64.0, 4), ArgumentTypeError,
         "out_features must be an integer"),
    case("count-zero-rank", M(mlp), lambda c: accounting.lora_parameter_count(64, 64, 0), ValueError,
         "rank must be a positive integer"),
    case("memory-negative", M(mlp), lambda c: accounting.training_memory_bytes(-1, 10), ValueError, "trainable must be"),
    case("memory-more-than-total", M(mlp), lambda c: accounting.training_memory_bytes(11, 10), ValueError,
         "0 <= trainable <= total"),
    case("memory-zero-bytes", M(mlp), lambda c: accounting.training_memory_bytes(1, 10, 0), ValueError,
         "bytes_per_value must be an integer >= 1"),
    case("summary-no-parameters", lambda f: {"m": nn.Sequential()},
         lambda c: accounting.trainable_parameters_summary(c["m"]), ValueError, "no parameters"),
    case("total-not-a-module", M(mlp), lambda c: accounting.total_parameters("x"), ArgumentTypeError, "nn.Module"),
    case("trainable-not-a-module", M(mlp), lambda c: accounting.trainable_parameters(None), ArgumentTypeError,
         "nn.Module"),
    case("expected-not-a-module", M(mlp), lambda c: accounting.expected_lora_parameters(1), ArgumentTypeError,
         "nn.Module"),
    case("print-no-parameters", lambda f: {"m": nn.Sequential()},
         lambda c: accounting.print_trainable_parameters(c["m"]), ValueError, "no parameters"),
]

SQUARE = torch.tensor([[3.0, 0.0], [0.0, 1.0]])

LOWRANK_CASES = [
    case("svd-vector", M(mlp), lambda c: lowrank.singular_values(torch.zeros(3)), ValueError, "2-D torch.Tensor"),
    case("svd-nan", M(mlp), lambda c: lowrank.singular_values(torch.full((2, 2), float("nan"))), ValueError, "NaN"),
    case("svd-empty", M(mlp), lambda c: lowrank.singular_values(torch.zeros(0, 3)), ValueError, "empty"),
    case("svd-complex", M(mlp), lambda c: lowrank.singular_values(torch.zeros(2, 2, dtype=torch.complex64)),
         ArgumentTypeError, "real matrix"),
    case("factors-rank-too-big", M(mlp), lambda c: lowrank.low_rank_factors(SQUARE, 3), ValueError,
         r"between 0 and min\(2, 2\) = 2"),
    case("truncated-rank-float", M(mlp), lambda c: lowrank.truncated_svd(SQUARE, 1.0), ValueError, "integer"),
    case("eckart-negative-sigma", M(mlp), lambda c: lowrank.eckart_young_error(torch.tensor([3.0, -1.0]), 1),
         ValueError, "negative value"),
    case("eckart-unsorted", M(mlp), lambda c: lowrank.eckart_young_error([1.0, 3.0], 1), ValueError,
         "descending order"),
    case("eckart-str", M(mlp), lambda c: lowrank.eckart_young_error("3 2 1", 1), ArgumentTypeError, "got a str"),
    case("energy-negative", M(mlp), lambda c: lowrank.energy_captured(torch.tensor([1.0, -0.5]), 1), ValueError,
         "negative"),
    case("relative-errors-int", M(mlp), lambda c: lowrank.relative_errors(SQUARE, 3), ArgumentTypeError,
         "list of ranks"),
    case("relative-errors-bad-rank", M(mlp), lambda c: lowrank.relative_errors(SQUARE, [1, 5]), ValueError,
         "between 0 and 2"),
    case("rank_for_error-str", M(mlp), lambda c: lowrank.rank_for_error(SQUARE, "0.1"), ValueError,
         "tolerance must be a relative error"),
    case("spectrum-negative", M(mlp), lambda c: lowrank.matrix_with_spectrum([1.0, -1.0], 3, 3), ValueError,
         "negative"),
    case("spectrum-zero-size", M(mlp), lambda c: lowrank.matrix_with_spectrum([1.0], 0, 3), ValueError,
         "n must be an integer >= 1"),
    case("random-float-size", M(mlp), lambda c: lowrank.random_matrix(2.5, 3), ArgumentTypeError, "n must be an integer"),
    case("decaying-half-life", M(mlp), lambda c: lowrank.decaying_matrix(3, 3, half_life=0), ValueError,
         "half_life must be > 0"),
    case("approximate-zeros", M(mlp), lambda c: lowrank.approximate(torch.zeros(2, 2), 1), ValueError, "all zeros"),
    case("show-title", M(mlp), lambda c: lowrank.show_rank_approximation(SQUARE, 1, title=3), ArgumentTypeError,
         "title must be a str"),
    case("slider-rank-40", M(mlp), lambda c: lowrank.rank_slider(SQUARE, rank=40), ValueError,
         "between 0 and min"),
]

PLANTED_CASES = [
    case("orthonormal-too-many", M(mlp), lambda c: planted.random_orthonormal(3, 4, torch.Generator()), ValueError,
         "cannot have 4 orthonormal columns"),
    case("orthonormal-no-generator", M(mlp), lambda c: planted.random_orthonormal(4, 3, 0), ArgumentTypeError,
         "torch.Generator"),
    case("planted-nan", M(mlp), lambda c: planted.planted_update(4, 4, (float("nan"),)), ValueError,
         "positive numbers"),
    case("planted-str", M(mlp), lambda c: planted.planted_update(4, 4, "ab"), ValueError, "positive numbers"),
    case("planted-zero-dim", M(mlp), lambda c: planted.planted_update(0, 4), ValueError, "out_dim must be"),
    case("eckart-negative-rank", M(mlp), lambda c: planted.eckart_young_error(torch.eye(3), -1), ValueError,
         "non-negative integer"),
    case("eckart-float-rank", M(mlp), lambda c: planted.eckart_young_error(torch.eye(3), 1.5), ValueError,
         "non-negative integer"),
    case("whitened-too-few", M(mlp), lambda c: planted.whitened_inputs(3, 6), ValueError, "at least as many"),
    case("fit-wrong-delta", lambda f: {"m": nn.Linear(4, 3)},
         lambda c: planted.fit_lora_to_teacher(c["m"], torch.zeros(4, 3), 1), ValueError, r"shape \(out, in\) = \(3, 4\)"),
    case("fit-zero-steps", lambda f: {"m": nn.Linear(4, 3)},
         lambda c: planted.fit_lora_to_teacher(c["m"], torch.zeros(3, 4), 1, steps=0), ValueError, "steps must be"),
    case("fit-few-inputs", lambda f: {"m": nn.Linear(4, 3)},
         lambda c: planted.fit_lora_to_teacher(c["m"], torch.zeros(3, 4), 1, n_inputs=2), ValueError,
         "n_inputs must be at least"),
    case("fit-not-linear", lambda f: {"m": nn.Conv1d(4, 3, 1)},
         lambda c: planted.fit_lora_to_teacher(c["m"], torch.zeros(3, 4), 1), ArgumentTypeError, "plain torch.nn.Linear"),
    case("experiment-ranks-str", M(mlp), lambda c: planted.planted_rank_experiment(ranks="12"), ArgumentTypeError,
         "list of ranks"),
    case("experiment-rank-zero", M(mlp), lambda c: planted.planted_rank_experiment(ranks=[0]), ValueError,
         "each rank must be an integer >= 1"),
    case("experiment-no-ranks", M(mlp), lambda c: planted.planted_rank_experiment(ranks=[]), ValueError, "empty"),
    case("entropy-zeros", M(mlp), lambda c: planted.entropy_effective_rank([0.0, 0.0]), ValueError, "all zero"),
    case("entropy-negative", M(mlp), lambda c: planted.entropy_effective_rank([1.0, -1.0]), ValueError, "negative"),
    case("energy-rank-fraction", M(mlp), lambda c: planted.energy_rank([2.0, 1.0], 1.5), ValueError, r"\(0, 1\]"),
    case("energy-rank-fraction-zero", M(mlp), lambda c: planted.energy_rank([2.0, 1.0], 0), ValueError, "> 0"),
    case("full-spectra-unknown-layer", lambda f: {"a": mlp(), "b": mlp()},
         lambda c: planted.full_update_spectra(c["a"], c["b"], ["nope"]), ValueError, "no layer 'nope'"),
    case("full-spectra-other-shape", lambda f: {"a": mlp(), "b": nn.Sequential(nn.Linear(8, 17))},
         lambda c: planted.full_update_spectra(c["a"], c["b"], "0"), ValueError, "not the same layer"),
    case("lora-spectra-no-lora", M(mlp), lambda c: planted.lora_update_spectra(c["m"]), ValueError, "no LoRA layers"),
    case("lora-spectra-unknown", M(lora_mlp), lambda c: planted.lora_update_spectra(c["m"], ["1"]), ValueError,
         "'1' is not a LoRA layer"),
    case("plot-spectra-not-spectra", M(mlp), lambda c: planted.plot_spectra("x", []), ArgumentTypeError,
         "list of UpdateSpectrum"),
    case("plot-planted-empty", M(mlp), lambda c: planted.plot_planted([]), ArgumentTypeError, "non-empty list"),
]

GPT_CASES = [
    case("save_gpt-not-gpt", M(mlp), lambda c: gpt.save_gpt(c["m"], c["dir"] / "m.safetensors"), ArgumentTypeError,
         "lora_course GPTModel"),
    case("save_gpt-nan-over-existing", lambda f: {"m": with_nan(tiny_gpt(), "tok_emb.weight"), "p": f.checkpoint()},
         lambda c: gpt.save_gpt(c["m"], c["p"]), CheckpointError, "NaN or inf"),
    case("save_gpt-missing-folder", lambda f: {"m": tiny_gpt()},
         lambda c: gpt.save_gpt(c["m"], c["dir"] / "no" / "m.safetensors"), FileNotFoundError, "does not exist"),
    case("save_gpt-directory", lambda f: {"m": tiny_gpt(), "p": f.folder_named("sub")},
         lambda c: gpt.save_gpt(c["m"], c["p"]), CheckpointError, "is a directory"),
    case("save_gpt-extra-not-json", lambda f: {"m": tiny_gpt()},
         lambda c: gpt.save_gpt(c["m"], c["dir"] / "m.safetensors", extra={"x": object()}), CheckpointError,
         "JSON values"),
    case("save_gpt-extra-nan", lambda f: {"m": tiny_gpt()},
         lambda c: gpt.save_gpt(c["m"], c["dir"] / "m.safetensors", extra={"loss": float("nan")}), CheckpointError,
         "finite JSON"),
    case("save_gpt-extra-config-key", lambda f: {"m": tiny_gpt()},
         lambda c: gpt.save_gpt(c["m"], c["dir"] / "m.safetensors", extra={"config": 1}), CheckpointError, "'config'"),
    case("load_gpt-directory", lambda f: {"p": f.folder_named("sub")}, lambda c: gpt.load_gpt(c["p"]),
         CheckpointError, "is a directory"),
    case("load_gpt-garbage", lambda f: {"p": f.text("g.safetensors", b"garbage!")}, lambda c: gpt.load_gpt(c["p"]),
         CheckpointError, "truncated or is not a safetensors file"),
    case("load_gpt-nan", lambda f: {"p": f.checkpoint("n.safetensors", lambda s: s["tok_emb.weight"].fill_(float("nan")))},
         lambda c: gpt.load_gpt(c["p"]), CheckpointError, "NaN or inf"),
    case("load_gpt-config-not-json", lambda f: {"p": f.checkpoint("j.safetensors", meta={"config": "{"})},
         lambda c: gpt.load_gpt(c["p"]), CheckpointError, "not valid JSON"),
    case("load_gpt-config-unknown-field", lambda f: {"p": f.checkpoint("u.safetensors",
                                                                       meta={"config": json.dumps({"vocab": 3})})},
         lambda c: gpt.load_gpt(c["p"]), CheckpointError, "does not build a GPTModel"),
    case("load_gpt-no-config", lambda f: {"p": f.checkpoint("c.safetensors", meta={})}, lambda c: gpt.load_gpt(c["p"]),
         CheckpointError, "not a lora_course GPT checkpoint"),
    case("load_checked-nan", lambda f: {"m": tiny_gpt()},
         lambda c: gpt.load_checked_state(c["m"], {k: torch.full_like(v, float("nan")) for k, v in
                                                   tiny_gpt().state_dict().items()}), CheckpointError, "NaN or inf"),
    case("load_checked-not-a-dict", lambda f: {"m": tiny_gpt()}, lambda c: gpt.load_checked_state(c["m"], [1]),
         TypeError, "a state_dict"),
    case("load_checked-other-shape", lambda f: {"m": mlp()},
         lambda c: gpt.load_checked_state(c["m"], {**mlp().state_dict(), "0.weight": torch.zeros(3, 3)}),
         CheckpointError, "different architecture"),
]


def _texts_str():
    return Split("hi sam , are you free tonight ?", torch.tensor([0]))


def _mismatched():
    s = splits()["train"]
    return Split(s.texts, s.labels[:10])


def _enc(ids=None, lengths=None, labels=None):
    e = encoded()
    return EncodedSplit(e.ids if ids is None else ids, e.lengths if lengths is None else lengths,
                        e.labels if labels is None else labels)


def _train(c, train=None, val=None, **kwargs):
    kwargs.setdefault("progress", False)
    return training.train_classifier(c["m"], train if train is not None else encoded(),
                                     val if val is not None else encoded("val"), **kwargs)


def _frozen_lora_clf_merged():
    model = lora_clf()
    merge_lora_(model)
    return model


TRAINING_CASES = [
    case("seed-negative", M(mlp), lambda c: training.seed_everything(-1), ValueError, "seed must be an integer >= 0"),
    case("seed-float", M(mlp), lambda c: training.seed_everything(1.5), ArgumentTypeError, "seed must be an integer"),
    case("make-0-classes", M(tiny_gpt), lambda c: training.make_classifier(c["m"], num_classes=0), ValueError,
         "at least 2 classes"),
    case("make-1-class", M(tiny_gpt), lambda c: training.make_classifier(c["m"], num_classes=1), ValueError,
         "num_classes must be an integer >= 2"),
    case("make-float-classes", M(tiny_gpt), lambda c: training.make_classifier(c["m"], num_classes=2.0),
         ArgumentTypeError, "num_classes must be an integer"),
    case("make-no-head", M(mlp), lambda c: training.make_classifier(c["m"]), ArgumentTypeError, "out_head"),
    case("split-str-texts", M(clf), lambda c: EncodedSplit.from_split(_texts_str()), ArgumentTypeError,
         "a list of texts, got one str"),
    case("split-64-texts-10-labels", M(clf), lambda c: _train(c, train=_mismatched()), ValueError,
         "16 texts but 10 labels"),
    case("encoded-float-ids", M(clf), lambda c: _enc(ids=encoded().ids.float()), ArgumentTypeError,
         "must hold integers"),
    case("encoded-1d-ids", M(clf), lambda c: _enc(ids=encoded().ids[:, 0]), ValueError, r"shape \(N, T\)"),
    case("encoded-zero-length", M(clf), lambda c: _enc(lengths=torch.zeros_like(encoded().lengths)), ValueError,
         "lengths must be between 1 and"),
    case("encoded-other-count", M(clf), lambda c: _enc(labels=encoded().labels[:3]), ValueError, "one row per text"),
    case("logits-float-ids", M(clf), lambda c: training.classification_logits(c["m"], torch.zeros(2, 4), torch.ones(2)),
         ArgumentTypeError, "integer token ids"),
    case("evaluate-batch-0", M(clf), lambda c: training.evaluate(c["m"], encoded("val"), batch_size=0), ValueError,
         "batch_size must be an integer >= 1"),
    case("evaluate-empty", M(clf), lambda c: training.evaluate(c["m"], Split([], torch.tensor([], dtype=torch.long))),
         ValueError, "split is empty"),
    case("evaluate-label-out-of-range", M(clf), lambda c: training.evaluate(c["m"], _enc(labels=encoded().labels + 2)),
         ValueError, "head has 2 outputs"),
    case("evaluate-not-a-split", M(clf), lambda c: training.evaluate(c["m"], ["a", "b"]), ArgumentTypeError,
         "expected a Split"),
    case("train-steps-0", M(clf), lambda c: _train(c, steps=0), ValueError, "steps must be an integer >= 1"),
    case("train-steps-negative", M(clf), lambda c: _train(c, steps=-5), ValueError, "steps must be"),
    case("train-batch-0", M(clf), lambda c: _train(c, batch_size=0), ValueError, "batch_size must be"),
    case("train-eval-every-0", M(clf), lambda c: _train(c, eval_every=0), ValueError, "eval_every must be"),
    case("train-lr-0", M(clf), lambda c: _train(c, lr=0), ValueError, "lr must be > 0"),
    case("train-lr-nan", M(clf), lambda c: _train(c, lr=float("nan")), ValueError, "lr must be a finite number"),
    case("train-lr-str", M(clf), lambda c: _train(c, lr="1e-3"), ArgumentTypeError, "lr must be a number"),
    case("train-weight-decay-negative", M(clf), lambda c: _train(c, weight_decay=-1), ValueError, "weight_decay"),
    case("train-empty-train", M(clf), lambda c: _train(c, train=Split([], torch.tensor([], dtype=torch.long))),
         ValueError, "training split is empty"),
    case("train-empty-val", M(clf), lambda c: _train(c, val=Split([], torch.tensor([], dtype=torch.long))),
         ValueError, "validation split is empty"),
    case("train-labels-out-of-range", M(clf), lambda c: _train(c, train=_enc(labels=encoded().labels + 5)),
         ValueError, r"label \d+, but the model's head has 2 outputs"),
    case("train-token-ids-beyond-vocab", M(clf), lambda c: _train(c, train=_enc(ids=encoded().ids + 10_000)),
         ValueError, "vocabulary has"),
    case("train-merged-lora", M(_frozen_lora_clf_merged), lambda c: _train(c), LoRAStateError,
         r"merged .*unmerge_lora_\(model\) before training"),
    case("train-name-not-str", M(clf), lambda c: _train(c, name=3), ArgumentTypeError, "name must be a str"),
    case("train-progress-not-bool", M(clf), lambda c: _train(c, progress="yes"), ArgumentTypeError, "progress"),
    case("lm-loss-str", M(tiny_gpt), lambda c: training.language_model_loss(c["m"], "thanks for the pizza"),
         ArgumentTypeError, "got one str"),
    case("lm-loss-empty", M(tiny_gpt), lambda c: training.language_model_loss(c["m"], []), ValueError, "texts is empty"),
    case("lm-loss-batch-0", M(tiny_gpt), lambda c: training.language_model_loss(c["m"], ["hi"], batch_size=0),
         ValueError, "batch_size"),
    case("lm-loss-bad-head", M(tiny_gpt), lambda c: training.language_model_loss(c["m"], ["hi"], lm_head=3),
         ArgumentTypeError, "lm_head must be"),
]

def grid():
    return widgets.AlphaRankGrid([1], [1.0], {"alpha/rank": np.array([[0.5]])}, 0.8, 1)


WIDGET_CASES = [
    case("lab-steps-0", M(tiny_gpt), lambda c: widgets.RankAlphaLab(c["m"], steps=0), ValueError, "steps must be"),
    case("lab-not-a-model", M(tiny_gpt), lambda c: widgets.RankAlphaLab("gpt"), ArgumentTypeError, "base must be"),
    case("lab-task-not-str", M(tiny_gpt), lambda c: widgets.RankAlphaLab(c["m"], task=1), ArgumentTypeError, "task"),
    case("lab-full-lr-0", M(tiny_gpt), lambda c: widgets.RankAlphaLab(c["m"], full_lr=0), ValueError, "full_lr"),
    case("run-targets-list", lambda f: {"lab": None}, lambda c: c["lab"].run(2, 4, targets=["W_query"]), ValueError,
         "unknown targets"),
    case("run-rank-0", lambda f: {"lab": None}, lambda c: c["lab"].run(0, 4), ValueError, "rank must be a positive"),
    case("run-lr-negative", lambda f: {"lab": None}, lambda c: c["lab"].run(2, 4, lr=-1), ValueError, "lr must be > 0"),
    case("ui-rank-40", lambda f: {"lab": None}, lambda c: c["lab"].ui(rank=40), ValueError,
         r"rank slider goes from 1 to 16, got rank 40.*lab.show\(rank=40"),
    case("ui-alpha-off-slider", lambda f: {"lab": None}, lambda c: c["lab"].ui(alpha=3), ValueError,
         "alpha slider offers"),
    case("ui-lr-off-slider", lambda f: {"lab": None}, lambda c: c["lab"].ui(lr=5e-3), ValueError,
         "learning-rate slider offers"),
    case("ui-targets", lambda f: {"lab": None}, lambda c: c["lab"].ui(targets="all"), ValueError, "unknown targets"),
    case("grid-no-ranks", lambda f: {"lab": None}, lambda c: widgets.alpha_rank_grid(c["lab"], ranks=[]), ValueError,
         "ranks must be a non-empty list"),
    case("grid-bad-rank-before-training", lambda f: {"lab": None},
         lambda c: widgets.alpha_rank_grid(c["lab"], ranks=[1, 0]), ValueError, "rank must be a positive integer"),
    case("grid-not-a-lab", M(mlp), lambda c: widgets.alpha_rank_grid("lab"), ArgumentTypeError, "RankAlphaLab"),
    case("grid-best-alpha-unknown", M(mlp), lambda c: grid().best_alpha("alpha"), ValueError, "has no scaling 'alpha'"),
    case("grid-onset-unknown", M(mlp), lambda c: grid().onset_alpha(None), ValueError, "has no scaling None"),
    case("grid-octaves-which", M(mlp), lambda c: grid().octaves_moved("alpha/rank", which="x"), ValueError,
         "'onset' or 'best'"),
    case("heatmaps-unknown-scaling", M(mlp), lambda c: widgets.plot_alpha_rank_heatmaps(grid(), ["alpha"]),
         ValueError, "has no scaling"),
    case("heatmaps-not-a-grid", M(mlp), lambda c: widgets.plot_alpha_rank_heatmaps({}), ArgumentTypeError,
         "AlphaRankGrid"),
    case("heatmap-ui-not-a-grid", M(mlp), lambda c: widgets.heatmap_ui([]), ArgumentTypeError, "AlphaRankGrid"),
    case("figure_png-not-a-figure", M(mlp), lambda c: widgets.figure_png("fig"), ArgumentTypeError, "Figure"),
    case("smoothed-window-0", M(mlp), lambda c: widgets.LabRun("x", 0, [1.0], 0, 0, 0).smoothed_loss(0), ValueError,
         "window"),
    case("lab-plot-not-a-run", lambda f: {"lab": None}, lambda c: c["lab"].plot("run"), ArgumentTypeError, "LabRun"),
]

EXERCISE_CASES = [
    case("budget-rank-0", M(mlp), lambda c: exercises.check_target_modules_for_budget(["W_query"], rank=0), ValueError,
         "rank must be"),
    case("budget-factory-not-callable", M(mlp),
         lambda c: exercises.check_target_modules_for_budget(["W_query"], model_factory=3), TypeError, "model_factory"),
    case("best-budget-not-gpt", M(mlp), lambda c: exercises.best_budget_choices(c["m"], 2, 100), TypeError,
         "course GPT"),
    case("rank-choice-negative-spectrum", M(mlp),
         lambda c: exercises.check_rank_choice(1, singular_values=(1.0, -2.0)), ValueError, ">= 0"),
]

ALL_CASES = (LORA_CASES + ADAPTER_CASES + PEFT_CASES + ACCOUNTING_CASES + LOWRANK_CASES + PLANTED_CASES + GPT_CASES
             + TRAINING_CASES + WIDGET_CASES + EXERCISE_CASES)


@pytest.fixture(scope="module")
def lab():
    return widgets.RankAlphaLab(clf(), steps=1, batch_size=4, n_val=8)


@pytest.fixture(autouse=True)
def _quiet_figures():
    import matplotlib.pyplot as plt

    yield
    plt.close("all")


@pytest.mark.parametrize("prepare, call, exc, match", ALL_CASES)
def test_bad_input_is_refused_and_changes_nothing(tmp_path, lab, prepare, call, exc, match):
    context = prepare(Files(tmp_path))
    context["dir"] = tmp_path
    if "lab" in context:
        context["lab"] = lab
        lab_cache = (dict(lab.cache), dict(lab._full_runs))
    models = {k: v for k, v in context.items() if isinstance(v, nn.Module)}
    before = {k: snapshot_model(v) for k, v in models.items()}
    files_before = snapshot_folder(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RankAboveMatrixRankWarning)
        with pytest.raises(exc, match=match) as info:
            call(context)
    # A course error or a built-in one, never a dependency's own type.
    assert type(info.value).__module__ in ("builtins", "lora_course.errors"), type(info.value)
    for key, model in models.items():
        assert_model_unchanged(model, before[key])
    assert snapshot_folder(tmp_path) == files_before
    if "lab" in context:
        assert (dict(lab.cache), dict(lab._full_runs)) == lab_cache  # nothing trained


def test_every_case_id_is_unique():
    ids = [p.id for p in ALL_CASES]
    assert len(ids) == len(set(ids))


# ------------------------------------------------------------------------------------------------
# Valid input that used to be refused or misread
# ------------------------------------------------------------------------------------------------
def test_numpy_scalars_are_accepted_everywhere_a_number_is(tmp_path):
    reference, model = lora_mlp(), mlp()
    report = replace_linear_with_lora(model, np.int64(2), np.float32(4.0), dropout=np.float64(0.0), seed=np.int64(0))
    assert report.wrapped == ["0", "2"]
    assert all(type(layer.lora.rank) is int for _, layer in lora_layers(model))
    assert lora_scaling(np.int64(4), np.float32(8.0)) == 2.0
    assert accounting.lora_parameter_count(np.int64(64), np.int64(64), np.int64(4)) == 512
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    adapters.save_adapter(randomize_b(model), tmp_path / "np.safetensors")  # metadata is plain JSON
    assert lowrank.low_rank_factors(SQUARE, np.int64(1))[0].shape == (2, 1)
    assert lowrank.rank_for_error(SQUARE, np.float32(0.5)) == 1
    assert planted.eckart_young_error(torch.eye(3), np.int64(1)) == pytest.approx(math.sqrt(2))
    history = training.train_classifier(clf(), encoded(), encoded("val"), steps=np.int64(2), lr=np.float32(1e-3),
                                        batch_size=np.int64(4), eval_every=np.int64(2), progress=False)
    assert history.eval_steps == [2] and type(history.lr) is float


def test_exercise_checkers_accept_numpy_and_report_dtype_problems():
    assert exercises.check_rank_choice(np.int64(2))                       # the right answer as a NumPy integer
    assert exercises.check_rank_choice(torch.tensor(2))
    assert not exercises.check_rank_choice(2.0) and "whole number" in exercises.check_rank_choice(2.0).message
    assert exercises.check_lora_parameter_count(lambda i, o, r: np.int64(r * (i + o)))
    wrong = exercises.check_lora_parameter_count(lambda i, o, r: torch.tensor([r * i, r * o]))
    assert wrong.status == exercises.INCORRECT and "return an int" in wrong.message
    # Merging: a float64 result is judged on its math; an integer one is reported, not a crash.
    right64 = exercises.check_merge(lambda W, A, B, s: W.double() + s * (A.double() @ B.double()).T)
    assert right64 and "float64" in right64.message
    integer = exercises.check_merge(lambda W, A, B, s: (W + s * (A @ B).T).long())
    assert integer.status == exercises.INCORRECT and "torch.int64" in integer.message

    class Float64LoRA(nn.Module):
        def __init__(self, i, o, r, a):
            super().__init__()
            self.A = nn.Parameter(torch.randn(i, r, dtype=torch.float64))
            self.B = nn.Parameter(torch.zeros(r, o, dtype=torch.float64))
            self.s = a / r

        def forward(self, x):
            return self.s * (x @ self.A @ self.B)

    assert exercises.check_lora_layer(Float64LoRA)

    class ReturnsList(Float64LoRA):
        def forward(self, x):
            return [1, 2]

    result = exercises.check_lora_layer(ReturnsList)
    assert result.status == exercises.INCORRECT and "must return a tensor" in result.message

    class IntegerA(nn.Module):
        def __init__(self, i, o, r, a):
            super().__init__()
            self.A = nn.Parameter(torch.ones(i, r, dtype=torch.int64), requires_grad=False)
            self.B = nn.Parameter(torch.zeros(r, o, dtype=torch.int64), requires_grad=False)

    result = exercises.check_lora_layer(IntegerA)
    assert result.status == exercises.INCORRECT and "floating-point" in result.message

    def factory():
        torch.manual_seed(0)
        return GPTModel(GPTConfig(vocab_size=10, emb_dim=32, n_heads=2, n_layers=2))

    bad = exercises.check_target_modules_for_budget([5], model_factory=factory, rank=4, budget=2_000)
    assert bad.status == exercises.INCORRECT and "module names" in bad.message
    assert exercises.check_alpha_for_new_rank(5).status == exercises.INCORRECT
    assert exercises.check_embedding_lora(5).status == exercises.INCORRECT        # not a class: says what raised


def test_modules_to_save_string_means_one_name(tmp_path):
    model = lora_clf()
    assert mark_only_lora_as_trainable(model, "out_head") == mark_only_lora_as_trainable(model, ["out_head"])
    meta = adapters.save_adapter(model, tmp_path / "a.safetensors", modules_to_save="out_head")
    assert meta["modules_to_save"] == ["out_head"]
    peft_bridge.export_peft_adapter(model, tmp_path / "peft", modules_to_save="out_head")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["modules_to_save"] == ["out_head"]


def test_lab_ui_accepts_numpy_values_of_its_controls(lab):
    rank, alpha, lr = widgets.LabUI._check_settings(lab, np.int64(2), np.float32(8.0), "alpha/rank",
                                                    widgets.DEFAULT_TARGETS, np.float32(3e-3))
    assert (rank, alpha, lr) == (2, 8, 3e-3) and type(rank) is int


# ------------------------------------------------------------------------------------------------
# Multi-layer operations are all or nothing (beyond the table: the failing layer is the last one)
# ------------------------------------------------------------------------------------------------
def test_merge_and_unload_agrees_with_merge_lora_on_disabled_adapters():
    for operation in (merge_lora_, merge_and_unload):
        model = _partly_disabled()
        before = snapshot_model(model)
        with pytest.raises(LoRAStateError, match="disabled"):
            operation(model)
        assert_model_unchanged(model, before)


def test_lora_disabled_restores_the_state_each_layer_had():
    model = _partly_disabled()
    before = snapshot_model(model)
    with lora_disabled(model):
        assert not any(layer.enabled for _, layer in lora_layers(model))
    assert_model_unchanged(model, before)  # the last layer is still off, the others on


def test_tied_head_merge_and_unload_keeps_the_embedding():
    model = _manually_tied()
    embedding = model.tok_emb.weight.detach().clone()
    merge_and_unload(model)  # gives the head its own weight W + ΔW
    assert torch.equal(model.tok_emb.weight, embedding)
    assert model.out_head.weight is not model.tok_emb.weight


def test_mha_out_proj_really_ignores_a_wrapper():
    # Why replace_linear_with_lora refuses it: PyTorch's attention never calls out_proj(x).
    model = mha_model()
    x = torch.randn(1, 3, 8)
    expected = model.att(x, x, x, need_weights=False)[0]
    model.att.out_proj.forward = lambda _: (_ for _ in ()).throw(AssertionError("called"))  # would raise if called
    torch.testing.assert_close(model.att(x, x, x, need_weights=False)[0], expected)


# ------------------------------------------------------------------------------------------------
# Files: whole or nothing, ordinary permissions
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_shared_files_get_ordinary_permissions(tmp_path, umask_022):
    model = lora_clf()
    adapters.save_adapter(model, tmp_path / "a.safetensors", ["out_head"])
    peft_bridge.export_peft_adapter(model, tmp_path / "peft", ["out_head"])
    gpt.save_gpt(tiny_gpt(), tmp_path / "m.safetensors")
    modes = {name: mode for name, (mode, _) in snapshot_folder(tmp_path).items()}
    assert modes == {"a.safetensors": 0o644, "m.safetensors": 0o644, "peft": 0o755,
                     "peft/adapter_config.json": 0o644, "peft/adapter_model.safetensors": 0o644}
    os.umask(0o077)
    adapters.save_adapter(model, tmp_path / "private.safetensors")
    assert stat.S_IMODE(os.stat(tmp_path / "private.safetensors").st_mode) == 0o600


def _failing_writer(*args, **kwargs):
    path = args[1] if len(args) > 1 else kwargs["filename"]
    Path(path).write_bytes(b"half a file")  # something was written, then the disk filled up
    raise OSError(28, "No space left on device")


def test_failed_writes_leave_files_as_they_were(tmp_path, monkeypatch):
    model = lora_clf()
    good = tmp_path / "a.safetensors"
    adapters.save_adapter(model, good, ["out_head"])
    peft_bridge.export_peft_adapter(model, tmp_path / "peft", ["out_head"])
    gpt.save_gpt(tiny_gpt(), tmp_path / "m.safetensors")
    before = snapshot_folder(tmp_path)
    monkeypatch.setattr(adapters, "save_file", _failing_writer)
    with pytest.raises(AdapterError, match=r"No space left on device. Nothing was written"):
        adapters.save_adapter(randomize_b(model, seed=5), good, ["out_head"])
    with pytest.raises(AdapterError, match="No space left"):
        peft_bridge.export_peft_adapter(model, tmp_path / "peft", ["out_head"])
    with pytest.raises(AdapterError, match="No space left"):
        peft_bridge.export_peft_adapter(model, tmp_path / "new_peft", ["out_head"])
    with pytest.raises(CheckpointError, match="No space left"):
        gpt.save_gpt(tiny_gpt(seed=3), tmp_path / "m.safetensors")
    assert snapshot_folder(tmp_path) == before  # no temporary file left behind either


def test_failed_config_write_leaves_no_half_written_peft_folder(tmp_path, monkeypatch):
    model = lora_clf()

    def fail(self, *args, **kwargs):
        raise OSError(13, "Permission denied")

    monkeypatch.setattr(Path, "write_text", fail)
    with pytest.raises(AdapterError, match="Permission denied"):
        peft_bridge.export_peft_adapter(model, tmp_path / "peft", ["out_head"])
    assert list(tmp_path.iterdir()) == []  # the weights were not left behind without their config


def test_unwritable_folder_is_reported_with_the_file_name(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")  # what a read-only folder gives (even checked as root)

    monkeypatch.setattr(adapters.tempfile, "mkstemp", refuse)
    with pytest.raises(AdapterError, match=r"cannot write .*a.safetensors.*Permission denied"):
        adapters.save_adapter(lora_clf(), tmp_path / "a.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_adapter_files_from_before_the_bf16_fingerprint_still_load(tmp_path):
    files = Files(tmp_path)
    old = files.crafted_adapter("old.safetensors", lambda t, m: m.pop("base_weights_bf16_sha256"))
    model, reference = clf(), lora_clf()
    adapters.load_adapter(model, old)
    x = encoded("val").ids[:2]
    assert torch.equal(model(x), reference(x))
    with pytest.raises(AdapterError, match="different base weights"):  # without it, a bf16 base is "different"
        adapters.load_adapter(_bf16_classifier(), old)
