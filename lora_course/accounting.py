"""Counting parameters and the memory that training needs.

The closed form for LoRA: an adapted matrix W of shape (out × in) gets A (in × r) and B (r × out),
so it trains r·(in + out) numbers instead of in·out. For a square 4096 × 4096 matrix and r = 8
that is 65,536 instead of 16,777,216: 256 times fewer.
"""
from __future__ import annotations

from torch import nn

from .errors import check_int
from .lora import _check_model, _check_rank, lora_layers


def total_parameters(model: nn.Module) -> int:
    """Every parameter of the model, trainable or frozen."""
    return sum(p.numel() for p in _check_model(model).parameters())


def trainable_parameters(model: nn.Module) -> int:
    """Parameters with ``requires_grad=True``: the ones an optimizer updates."""
    return sum(p.numel() for p in _check_model(model).parameters() if p.requires_grad)


def trainable_parameters_summary(model: nn.Module) -> str:
    """One line in the format of PEFT's ``print_trainable_parameters``."""
    trainable, total = trainable_parameters(model), total_parameters(model)
    if total == 0:
        raise ValueError("the model has no parameters, so there is nothing to count (trainable% would be 0 / 0)")
    return (f"trainable params: {trainable:,} || all params: {total:,} || "
            f"trainable%: {100 * trainable / total:.4f}")


def print_trainable_parameters(model: nn.Module) -> None:
    print(trainable_parameters_summary(model))


def lora_parameter_count(in_features: int, out_features: int, rank: int) -> int:
    """Closed form for one adapted matrix: A has in·r numbers, B has r·out: r·(in + out).

    Also for a rank above min(in, out), as PEFT counts it: the extra columns still hold
    parameters, though A·B cannot have rank above min(in, out)."""
    in_features = check_int(in_features, "in_features", minimum=1)
    out_features = check_int(out_features, "out_features", minimum=1)
    return _check_rank(rank) * (in_features + out_features)


def expected_lora_parameters(model: nn.Module) -> int:
    """Sum of r·(in + out) over every LoRA layer in the model: what the formula predicts."""
    return sum(lora_parameter_count(layer.in_features, layer.out_features, layer.lora.rank)
               for _, layer in lora_layers(model))


def training_memory_bytes(trainable: int, total: int, bytes_per_value: int = 4) -> dict[str, int]:
    """Bytes for weights, gradients and AdamW states when ``trainable`` of ``total`` parameters
    train (activations not included: they depend on batch and sequence length, not on LoRA).

    A trainable parameter costs its weight, its gradient and Adam's two moment estimates m and
    v: 4 values, 16 bytes in float32. A frozen one costs only its weight: no gradient, no
    optimizer state. That is where LoRA's memory saving comes from.
    """
    trainable = check_int(trainable, "trainable", minimum=0)
    total = check_int(total, "total", minimum=0)
    bytes_per_value = check_int(bytes_per_value, "bytes_per_value", minimum=1,
                                hint="4 for float32, 2 for bfloat16 / float16")
    if not 0 <= trainable <= total:
        raise ValueError(f"need 0 <= trainable <= total, got trainable={trainable}, total={total}")
    return {
        "weights": total * bytes_per_value,
        "gradients": trainable * bytes_per_value,
        "optimizer_states": 2 * trainable * bytes_per_value,
    }
