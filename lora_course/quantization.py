"""QLoRA's 4-bit base: NF4, double quantization, and a frozen NF4 linear with LoRA on top.

QLoRA (Dettmers et al., 2023, arXiv:2305.14314) fine-tunes a model whose frozen weights are
stored in 4 bits. Three ideas (paper §3):

1. **NF4 (4-bit NormalFloat)**: 16 code values placed at quantiles of a normal distribution, since
   pretrained weights are roughly normal. A weight is cut into blocks of 64 numbers; each block
   stores its absolute maximum ``absmax`` (the scale) and, per number, the 4-bit index of the code
   value nearest to ``w / absmax``. Dequantizing is ``code[index] * absmax``.
2. **Double quantization**: the fp32 scales themselves cost 32/64 = 0.5 bit per weight. Quantize
   them too: subtract their mean, then store them in 8 bits in groups of 256, each group with one
   fp32 scale. That costs 8/64 + 32/(64·256) = 0.127 bit per weight.
3. **Paged optimizers**: see ``PAGED_OPTIMIZERS`` below (explained, not built).

The LoRA matrices stay in full precision. Only the frozen base is 4-bit; it is dequantized to fp32
in every forward pass (``NF4Linear``), and gradients flow through it to x but never into it.

Storage per weight: fp32 32 bits, bf16 16, NF4 4 + 32/64 = 4.5 (7.11× smaller than fp32),
NF4 + double quant ≈ 4.127 (7.75×), not the 8× that "4 bits" suggests.

Everything here reproduces bitsandbytes' CPU implementation bit for bit at blocksize 64
(``tests/test_quantization.py`` checks packed bytes, scales and dequantized values against
``bitsandbytes.functional.quantize_4bit`` / ``dequantize_4bit``). bitsandbytes' CUDA kernels round
values that sit almost exactly between two codes differently, so GPU codes can differ in rare
near-ties.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .errors import LoRAStateError
from .lora import LinearWithLoRA

#: Why paged optimizers are explained here and not built.
PAGED_OPTIMIZERS = (
    "Paged optimizers (QLoRA §3, bitsandbytes PagedAdamW / PagedAdamW8bit / PagedAdamW32bit) allocate "
    "the optimizer state in CUDA unified memory. When a long sequence makes activations spike, the "
    "GPU driver evicts state pages to CPU RAM and pages them back when the optimizer step needs them, "
    "so training survives memory spikes instead of crashing with out-of-memory. Nothing changes in "
    "the arithmetic: the update is AdamW's. On a CPU there is no separate device memory to page "
    "from, so there is nothing to demonstrate; the course trains with torch.optim.AdamW."
)

# --------------------------------------------------------------------------------------------
# The NF4 code (16 values) and the 8-bit dynamic code (256 values) for the scales
# --------------------------------------------------------------------------------------------
#: bitsandbytes' outermost quantile: the largest code sits at Φ⁻¹(0.9677083) ≈ 1.848 σ before
#: normalisation, a value tuned to minimise the error on real weights.
NF4_OFFSET = 0.9677083

#: The 16 NF4 values as published (hard-coded in bitsandbytes ``functional.get_4bit_type``).
NF4_PUBLISHED = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


def nf4_code(offset: float = NF4_OFFSET) -> torch.Tensor:
    """Derive the 16 NF4 values from the normal quantile function Φ⁻¹ (QLoRA §3, "NormalFloat").

    NF4 is asymmetric so that it has an exact zero: 8 positive levels at the quantiles of 8 equal
    steps from ``offset`` down to 0.5, 7 negative levels from 7 steps, and 0; then everything is
    divided by the largest value so the code spans [-1, 1]. The probabilities are float32 and the
    quantiles float64, as in bitsandbytes' ``create_normal_map`` (which uses scipy): the result
    equals the published table exactly.
    """
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())  # 8 values > 0
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())  # 7 values < 0
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).float().sort().values
    return values / values.max()  # (16,), sorted: the 4-bit index is the position in this table


NF4_CODE = nf4_code()
#: The 15 midpoints between neighbouring NF4 values: a number goes to the code on its side.
NF4_MIDPOINTS = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2


def dynamic_code() -> torch.Tensor:
    """bitsandbytes' signed 8-bit "dynamic" code (``create_dynamic_map(signed=True)``), 256 values.

    Dettmers' dynamic tree quantization (arXiv:1511.04561): a number is ± 10^(-e) × a fraction, so
    small magnitudes get as much relative precision as large ones. For e = 6, 5, ..., 0 the
    fraction takes 2^(6-e) values (the midpoints of an even grid on [0.1, 1]), each with both
    signs: 2·(1 + 2 + ... + 64) = 254 values, plus 0 and 1.0. The QLoRA paper calls the format
    of the quantized scales "8-bit floats"; this is the code bitsandbytes actually uses.
    """
    values = []
    for i in range(7):  # decade 10^(i-6)
        edges = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        fractions = (edges[:-1] + edges[1:]) / 2.0
        values += (10 ** (i - 6) * fractions).tolist()
        values += (-(10 ** (i - 6)) * fractions).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)  # (256,)


DYNAMIC_CODE = dynamic_code()

#: The block sizes bitsandbytes accepts for 4-bit quantization.
VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
#: QLoRA's choice for the weights, and the group size for the quantized scales.
BLOCKSIZE, SCALE_BLOCKSIZE = 64, 256


def _check_blocksize(numel: int, blocksize) -> None:
    if isinstance(blocksize, bool) or blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {VALID_BLOCKSIZES} (as in bitsandbytes), got {blocksize!r}. "
                         "QLoRA uses 64.")
    if numel % blocksize:
        fitting = [b for b in VALID_BLOCKSIZES if numel % b == 0]
        fix = (f"use a blocksize that divides it ({', '.join(map(str, fitting))})" if fitting else
               "no valid blocksize divides it, so leave this layer in full precision (exclude_modules=[...])")
        raise ValueError(
            f"blocksize {blocksize} does not divide the weight's {numel} numbers ({numel} = "
            f"{numel // blocksize}·{blocksize} + {numel % blocksize}); every block must be full here: {fix}."
        )


# --------------------------------------------------------------------------------------------
# Blockwise 8-bit quantization of the scales (double quantization)
# --------------------------------------------------------------------------------------------
def _grid_to_code_table(code: torch.Tensor) -> torch.Tensor:
    """For each of 65,536 evenly spaced points in [-1, 1], the index of the nearest code value.

    bitsandbytes' CPU kernel does not search the 256 codes for every number: it rounds the
    number to the nearest of these grid points and reads the answer from this table. That is
    the nearest code except for numbers within half a grid step (1.5e-5) of a midpoint between
    two codes, which can land on the other side. We build the same table so our 8-bit codes
    match bitsandbytes exactly.
    """
    grid = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32)) / 65535.0
    midpoints = 0.5 * (code[:-1] + code[1:])
    return torch.searchsorted(midpoints, grid, side="left").to(torch.uint8)  # (65536,)


_DYNAMIC_TABLE = _grid_to_code_table(DYNAMIC_CODE)


def quantize_blockwise_8bit(x: torch.Tensor, blocksize: int = SCALE_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit absmax quantization of a 1-D fp32 tensor with the dynamic code, in blocks.

    Returns ``(codes, scales)``: codes (n,) uint8, scales (ceil(n / blocksize),) fp32. The last
    block may be partial (there is rarely a multiple of 256 scales).
    """
    x = x.reshape(-1).float()
    n = x.numel()
    blocks = -(-n // blocksize)
    padded = F.pad(x, (0, blocks * blocksize - n)).view(blocks, blocksize)  # zeros never raise an absmax
    scales = padded.abs().amax(dim=1)  # (blocks,)
    inverse = torch.where(scales > 0, 1.0 / scales, torch.zeros_like(scales))  # an all-zero block: no 0·∞
    normed = (padded * inverse[:, None]).clamp(-1.0, 1.0)
    grid_index = ((normed + 1.0) * 0.5 * 65535.0 + 0.5).to(torch.int64)  # nearest grid point
    codes = _DYNAMIC_TABLE.to(x.device)[grid_index]
    codes = torch.where(scales[:, None] == 0, torch.zeros_like(codes), codes)  # bitsandbytes writes code 0
    return codes.reshape(-1)[:n], scales


def dequantize_blockwise_8bit(codes: torch.Tensor, scales: torch.Tensor,
                              blocksize: int = SCALE_BLOCKSIZE) -> torch.Tensor:
    """Inverse of ``quantize_blockwise_8bit``: ``code[c] * scale`` in fp32, shape (n,)."""
    n = codes.numel()
    values = DYNAMIC_CODE.to(codes.device)[codes.long()]
    return values * scales.repeat_interleave(blocksize)[:n]


# --------------------------------------------------------------------------------------------
# Blockwise NF4
# --------------------------------------------------------------------------------------------
@dataclass
class NF4Tensor:
    """A weight stored as blockwise NF4 (what bitsandbytes' ``QuantState`` holds, flattened).

    Fields (n numbers, b = n / blocksize blocks):
        packed:  (n/2,) uint8, two 4-bit codes per byte, the first number in the high nibble.
        absmax:  (b,) fp32 block scales; ``None`` with double quantization, which stores instead
        absmax_codes (b,) uint8, absmax_scales (ceil(b/256),) fp32 and absmax_offset () fp32.
    """

    packed: torch.Tensor
    shape: tuple[int, ...]
    blocksize: int
    absmax: torch.Tensor | None = None
    absmax_codes: torch.Tensor | None = None
    absmax_scales: torch.Tensor | None = None
    absmax_offset: torch.Tensor | None = None

    @property
    def double_quant(self) -> bool:
        return self.absmax is None

    def scales(self) -> torch.Tensor:
        """The fp32 block scales, (b,): stored, or rebuilt from their 8-bit codes."""
        if not self.double_quant:
            return self.absmax
        return dequantize_blockwise_8bit(self.absmax_codes, self.absmax_scales) + self.absmax_offset

    def nbytes(self) -> int:
        """Bytes of the stored tensors (the two code tables are shared constants, not counted)."""
        parts = [self.packed, self.absmax, self.absmax_codes, self.absmax_scales, self.absmax_offset]
        return sum(t.numel() * t.element_size() for t in parts if t is not None)


def quantize_nf4(weight: torch.Tensor, blocksize: int = BLOCKSIZE, double_quant: bool = False) -> NF4Tensor:
    """Quantize a weight to blockwise NF4 (and, with ``double_quant``, its scales to 8 bits).

    Per block of ``blocksize`` numbers (taken in row-major order, so a block of 64 is part of
    one row of a 64-wide matrix):  absmax = max |w|,  index = nearest NF4 value to w / absmax.
    """
    _check_blocksize(weight.numel(), blocksize)
    blocks = weight.detach().reshape(-1, blocksize).float()  # (b, blocksize)
    absmax = blocks.abs().amax(dim=1)  # (b,)
    normed = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1.0, 1.0)  # in [-1, 1]
    index = torch.bucketize(normed, NF4_MIDPOINTS.to(normed.device)).reshape(-1).to(torch.uint8)
    packed = (index[0::2] << 4) | index[1::2]  # (n/2,): high nibble first
    q = NF4Tensor(packed=packed, shape=tuple(weight.shape), blocksize=blocksize)
    if not double_quant:
        q.absmax = absmax
    else:
        # QLoRA §3 "Double Quantization": the scales are positive, so centre them before the
        # symmetric 8-bit code; one fp32 offset is stored for the whole weight.
        q.absmax_offset = absmax.mean()
        q.absmax_codes, q.absmax_scales = quantize_blockwise_8bit(absmax - q.absmax_offset)
    return q


def dequantize_nf4(q: NF4Tensor) -> torch.Tensor:
    """Back to fp32: ``NF4_CODE[index] * absmax`` per block, in the weight's shape."""
    index = torch.stack([q.packed >> 4, q.packed & 0xF], dim=1).reshape(-1).long()  # (n,)
    values = NF4_CODE.to(q.packed.device)[index].view(-1, q.blocksize)
    return (values * q.scales()[:, None]).reshape(q.shape)


def nf4_error(weight: torch.Tensor, blocksize: int = BLOCKSIZE, double_quant: bool = False) -> float:
    """Relative quantization error ‖W − deq(quant(W))‖_F / ‖W‖_F (≈ 0.092 for Gaussian weights at 64)."""
    weight = weight.detach().float()
    restored = dequantize_nf4(quantize_nf4(weight, blocksize, double_quant))
    return (torch.linalg.norm(weight - restored) / torch.linalg.norm(weight)).item()


# --------------------------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------------------------
FORMATS = ("fp32", "bf16", "nf4", "nf4+dq")


def storage_bytes(numel: int, fmt: str, blocksize: int = BLOCKSIZE) -> int:
    """Exact bytes to store ``numel`` weights in a format (what ``NF4Tensor.nbytes`` counts).

    nf4:    n/2 code bytes + 4 bytes per block scale.
    nf4+dq: n/2 + 1 byte per block scale + 4 bytes per group of 256 scales + a 4-byte offset.
    """
    if fmt == "fp32":
        return 4 * numel
    if fmt == "bf16":
        return 2 * numel
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: choose one of {', '.join(map(repr, FORMATS))}")
    _check_blocksize(numel, blocksize)
    blocks = numel // blocksize
    if fmt == "nf4":
        return numel // 2 + 4 * blocks
    return numel // 2 + blocks + 4 * -(-blocks // SCALE_BLOCKSIZE) + 4


def bits_per_parameter(fmt: str, blocksize: int = BLOCKSIZE) -> float:
    """Bits per weight for a large matrix: 32, 16, 4 + 32/bs, or 4 + 8/bs + 32/(256·bs)."""
    per_weight = {"fp32": 32.0, "bf16": 16.0, "nf4": 4 + 32 / blocksize,
                  "nf4+dq": 4 + 8 / blocksize + 32 / (SCALE_BLOCKSIZE * blocksize)}
    if fmt not in per_weight:
        raise ValueError(f"unknown format {fmt!r}: choose one of {', '.join(map(repr, FORMATS))}")
    return per_weight[fmt]


# --------------------------------------------------------------------------------------------
# The layers
# --------------------------------------------------------------------------------------------
class NF4Linear(nn.Module):
    """A frozen ``nn.Linear`` stored in NF4: ``y = x · deq(W)ᵀ + bias``, dequantized every call.

    The weight is not a parameter (4-bit codes cannot take a gradient step); the packed codes and
    scales are buffers, so they move with ``.to(device)`` and appear in ``state_dict()``. The bias
    stays fp32 and frozen. ``weight`` returns the dequantized fp32 matrix (out × in).
    """

    def __init__(self, linear: nn.Linear, blocksize: int = BLOCKSIZE, double_quant: bool = True):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"NF4Linear quantizes torch.nn.Linear layers only, got {type(linear).__name__}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.blocksize, self.double_quant = blocksize, double_quant
        self._store(quantize_nf4(linear.weight, blocksize, double_quant))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float().clone(),
                                                                  requires_grad=False)

    def _store(self, q: NF4Tensor) -> None:
        for name in ("packed", "absmax", "absmax_codes", "absmax_scales", "absmax_offset"):
            self.register_buffer(name, getattr(q, name))

    def quantized(self) -> NF4Tensor:
        return NF4Tensor(self.packed, (self.out_features, self.in_features), self.blocksize, self.absmax,
                         self.absmax_codes, self.absmax_scales, self.absmax_offset)

    @property
    def weight(self) -> torch.Tensor:
        return dequantize_nf4(self.quantized())  # (out, in), fp32

    @torch.no_grad()
    def requantize_(self, weight: torch.Tensor) -> None:
        """Store a new (out × in) weight in NF4, replacing the old codes."""
        self._store(quantize_nf4(weight, self.blocksize, self.double_quant))

    def nbytes(self) -> int:
        return self.quantized().nbytes()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"blocksize={self.blocksize}, double_quant={self.double_quant}")


class LinearWithQLoRA(LinearWithLoRA):
    """QLoRA: ``h = x · deq(W₄)ᵀ + s · dropout(x) A B``, W₄ in NF4, A and B in full precision.

    It is a ``LinearWithLoRA`` whose ``linear`` is an ``NF4Linear``, so the course's functions
    (``mark_only_lora_as_trainable``, ``lora_disabled``, ``merge_and_unload`` ...) work on it.
    ``merge_`` folds ΔW into the 4-bit base (dequantize, add, requantize): that adds a second
    rounding error (``merge_into_4bit_error`` measures it) and cannot be undone exactly, so
    ``unmerge_`` refuses. ``merged_linear`` / ``merge_and_unload`` give an fp32 layer
    deq(W₄) + ΔW instead, with no new rounding.
    """

    variant = "qlora"

    def __init__(self, linear: nn.Linear, rank: int, alpha: float, scaling: str = "alpha/rank",
                 dropout: float = 0.0, blocksize: int = BLOCKSIZE, double_quant: bool = True):
        if isinstance(linear, nn.Linear):
            _check_blocksize(linear.weight.numel(), blocksize)  # before anything is built
        super().__init__(linear, rank, alpha, scaling=scaling, dropout=dropout)  # checks type and rank
        self.linear = NF4Linear(linear, blocksize, double_quant)
        self.lora.to(device=self.linear.packed.device, dtype=torch.float32)

    @torch.no_grad()
    def merge_(self) -> None:
        if self.merged:
            return
        self._check_mergeable()  # enabled, and W + ΔW finite
        self.linear.requantize_(self.linear.weight + self.lora.delta_weight())
        self.merged = True

    def unmerge_(self) -> None:
        if not self.merged:
            return
        raise LoRAStateError(
            "a LoRA branch merged into a 4-bit base cannot be unmerged: requantizing W + ΔW rounded "
            "it to the NF4 grid, so subtracting ΔW does not give the old base back. Keep an unmerged "
            "copy of the model (copy.deepcopy before merge_lora_), or merge into fp32 with "
            "merge_and_unload(model), which leaves nothing to undo."
        )


@torch.no_grad()
def merge_into_4bit_error(layer: LinearWithQLoRA, x: torch.Tensor | None = None) -> dict:
    """What merging into the 4-bit base costs, measured without changing ``layer``.

    Returns ``{"weight": ...}``, the relative Frobenius error of the requantized weight against
    the exact merge deq(W₄) + ΔW: the rounding the merge adds on top of the base's own. With
    inputs ``x`` (…, in) also ``"output"``: the relative error of the outputs, merged against unmerged.
    """
    if not isinstance(layer, LinearWithQLoRA):
        raise TypeError(f"merge_into_4bit_error measures a LinearWithQLoRA layer, got {type(layer).__name__}")
    if layer.merged:
        raise ValueError("this layer is already merged into its 4-bit base; measure before merging")
    exact = layer.linear.weight + layer.lora.delta_weight()
    rounded = dequantize_nf4(quantize_nf4(exact, layer.linear.blocksize, layer.linear.double_quant))
    result = {"weight": (torch.linalg.norm(rounded - exact) / torch.linalg.norm(exact)).item()}
    if x is not None:
        bias = layer.linear.bias
        unmerged, merged = F.linear(x, exact, bias), F.linear(x, rounded, bias)
        result["output"] = (torch.linalg.norm(merged - unmerged) / torch.linalg.norm(unmerged)).item()
    return result
