"""The course's error and warning types, and the small argument checks that raise them.

Every public function of ``lora_course`` checks its arguments with these helpers *before* it
changes anything, so a refused call leaves models and files exactly as they were. The errors
subclass ``ValueError`` / ``TypeError`` / ``RuntimeError``, so ``except ValueError`` keeps
working; an error raised by a dependency (safetensors, json, torch) is wrapped in one of them with
``raise ... from err``, so the original stays visible in the traceback.

Numbers: wherever a Python number is accepted, so is a NumPy scalar (``np.int64(4)``,
``np.float32(8.0)``): ``numbers.Integral`` / ``numbers.Real`` include them. ``True`` and
``False`` are not numbers here, even though Python's ``bool`` is an ``int``.
"""
from __future__ import annotations

import math
import numbers


class AdapterError(ValueError):
    """An adapter file cannot be applied to this model (wrong model, wrong shapes, bad file)."""


class CheckpointError(ValueError):
    """A model checkpoint cannot be read, written or loaded into this model."""


class UnsupportedLayerError(ValueError):
    """A layer that LoRA cannot adapt correctly (its weight is read outside ``forward``, it is
    tied to another module's weight, or the same module sits under two names)."""


class NonFiniteError(ValueError):
    """A tensor holds NaN or inf where only finite numbers make sense (an adapter, a merged
    weight, a checkpoint): refused when saving, loading and merging, like PEFT's ``safe_merge``."""


class LoRAStateError(RuntimeError):
    """The operation does not fit the LoRA layers' current state (merged, disabled)."""


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type (a str where a number or a list is expected, ...).

    Both a ``TypeError`` and a ``ValueError`` (as NumPy's ``AxisError`` is both a ``ValueError``
    and an ``IndexError``), so code that catches either keeps working."""


class RankAboveMatrixRankWarning(UserWarning):
    """A LoRA rank above min(in_features, out_features): A·B cannot have a rank above that, so
    the extra columns of A and rows of B only add parameters. Allowed (appendix E and PEFT do
    it on a 2-class head), but worth knowing."""


def check_int(value, name: str, *, minimum: int | None = None, hint: str = "") -> int:
    """``value`` as a Python int (NumPy integers accepted, bools and floats refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ArgumentTypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__}){_hint(hint)}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}{_hint(hint)}")
    return value


def check_number(value, name: str, *, minimum: float | None = None, positive: bool = False,
                 below: float | None = None, allow_inf: bool = False, hint: str = ""):
    """``value`` as a finite Python number: an int stays an int, anything else becomes a float
    (NumPy scalars accepted, bools refused). ``positive`` means > 0, ``minimum`` means >=,
    ``below`` means < (an upper bound that is excluded)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"{name} must be a number, got {value!r} ({type(value).__name__}){_hint(hint)}")
    value = int(value) if isinstance(value, numbers.Integral) else float(value)
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise ValueError(f"{name} must be a finite number, got {value!r}{_hint(hint)}")
    if positive and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}{_hint(hint)}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}{_hint(hint)}")
    if below is not None and not value < below:
        raise ValueError(f"{name} must be < {below}, got {value!r}{_hint(hint)}")
    return value


def check_bool(value, name: str) -> bool:
    """``value`` as a Python bool (``np.bool_`` accepted; 0, 1 and strings refused)."""
    if type(value).__name__ == "bool_" or isinstance(value, bool):
        return bool(value)
    raise ArgumentTypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")


def check_str(value, name: str) -> str:
    if not isinstance(value, str):
        raise ArgumentTypeError(f"{name} must be a str, got {value!r} ({type(value).__name__})")
    return value


def check_names(value, name: str, *, allow_none: bool = True) -> list[str]:
    """A list of module names. A single string means that one name (``"out_head"`` is
    ``["out_head"]``, never its characters); ``None`` means no names."""
    if value is None:
        if allow_none:
            return []
        raise ArgumentTypeError(f"{name} must be a name or a list of names, got None")
    if isinstance(value, str):
        return [value]
    try:
        names = list(value)
    except TypeError:
        raise ArgumentTypeError(f"{name} must be a name or a list of names (str), got {value!r} "
                        f"({type(value).__name__})") from None
    for item in names:
        if not isinstance(item, str) or not item:
            raise ArgumentTypeError(f"{name} must hold non-empty module names (str), got {item!r} in {value!r}")
    return names


def _hint(hint: str) -> str:
    return f". {hint}" if hint else ""
