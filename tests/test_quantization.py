"""NF4, double quantization and the QLoRA layer, held bit for bit against bitsandbytes' CPU code.

bitsandbytes is pinned in requirements.txt. Without it this file fails at import, on purpose:
the reference implementation is what these tests are about, so they must not skip in CI.
"""
import copy
import math

import pytest
import torch
from torch import nn

try:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF
except ImportError as exc:  # fail, do not skip
    raise ImportError("tests/test_quantization.py checks NF4 against bitsandbytes, which is not installed: "
                      "run `pip install -r requirements.txt`") from exc

from lora_course.lora import LoRALayer, mark_only_lora_as_trainable, merge_and_unload, merge_lora_, remove_lora
from lora_course.quantization import (DYNAMIC_CODE, NF4_CODE, NF4_PUBLISHED, PAGED_OPTIMIZERS, VALID_BLOCKSIZES,
                                      LinearWithQLoRA, NF4Linear, bits_per_parameter, dequantize_blockwise_8bit,
                                      dequantize_nf4, merge_into_4bit_error, nf4_code, nf4_error,
                                      quantize_blockwise_8bit, quantize_nf4, storage_bytes)
from lora_course.variants import pissa_quantization_error


def gaussian(rows=256, cols=192, std=0.02, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * std


def decaying_spectrum(n=128, seed=0, power=0.6):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    s = torch.arange(1, n + 1, dtype=torch.float32) ** -power
    return (u * s) @ v.T * 0.05


def bnb_quantize(w, blocksize=64, double_quant=False):
    return bnbF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)


# --------------------------------------------------------------------------------------------
# The code tables
# --------------------------------------------------------------------------------------------
def test_nf4_table_derived_from_the_normal_quantile_equals_the_published_values():
    derived = nf4_code()
    published = torch.tensor(NF4_PUBLISHED)
    assert derived.shape == (16,) and derived.dtype == torch.float32
    assert (derived - published).abs().max() <= 1e-7
    assert torch.equal(derived, published)  # in fact bit for bit
    assert torch.equal(NF4_CODE, bnbF.get_4bit_type("nf4", device="cpu"))
    assert derived[7] == 0 and derived[0] == -1 and derived[-1] == 1  # an exact zero, asymmetric: 7 below, 8 above


def test_nf4_table_is_not_the_naive_quantile_grid():
    """The tutorial formula Φ⁻¹((i + 0.5)/16) has no zero and another range: it is not NF4."""
    naive = torch.special.ndtri((torch.arange(16, dtype=torch.float64) + 0.5) / 16).float()
    naive = naive / naive.abs().max()
    assert (naive == 0).sum() == 0 and (naive - NF4_CODE).abs().max() > 0.04  # 0.042 at the 4th value


def test_dynamic_8bit_code_equals_bitsandbytes():
    assert torch.equal(DYNAMIC_CODE, bnbF.create_dynamic_map(signed=True))
    assert DYNAMIC_CODE.shape == (256,) and DYNAMIC_CODE[-1] == 1.0


# --------------------------------------------------------------------------------------------
# Quantize and dequantize, bit for bit
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(64, 64), (256, 192), (16, 64), (3, 128), (1, 64)])  # (1, 64): one block
@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_matches_bitsandbytes_bit_for_bit_at_blocksize_64(shape, double_quant):
    w = gaussian(*shape, seed=shape[0])
    if shape[0] > 1:
        w[0, :64] = 0  # an all-zero block
    packed, state = bnb_quantize(w, 64, double_quant)
    q = quantize_nf4(w, 64, double_quant)
    assert q.packed.dtype == torch.uint8 and torch.equal(q.packed, packed.flatten())
    if double_quant:
        assert torch.equal(q.absmax_codes, state.absmax)
        assert torch.equal(q.absmax_scales, state.state2.absmax)
        assert torch.equal(q.absmax_offset, state.offset)
    else:
        assert torch.equal(q.absmax, state.absmax)
    restored = dequantize_nf4(q)
    assert restored.dtype == torch.float32 and restored.shape == w.shape
    assert torch.equal(restored, bnbF.dequantize_4bit(packed, state))


#: bitsandbytes 0.50.2's CPU kernel dequantizes blocks of 512 and 1024 wrongly: its own round trip
#: is 1.8-2.6x worse there than at 256 or 2048, while its quantization (codes and absmax) is
#: right. At those sizes the course's dequantization is held against the by-hand formula and
#: bitsandbytes' codes instead; the strict xfail below turns red the day the kernel is fixed.
BNB_CPU_DEQUANT_BROKEN = (512, 1024)


def _by_hand(q, absmax):
    """NF4_CODE[code] * absmax of its block, written out independently of dequantize_nf4."""
    codes = []
    for byte in q.packed.tolist():
        codes += [byte >> 4, byte & 0xF]
    values = NF4_CODE[torch.tensor(codes)].view(-1, q.blocksize) * absmax[:, None]
    return values.reshape(q.shape)


@pytest.mark.parametrize("blocksize", VALID_BLOCKSIZES)
def test_nf4_matches_bitsandbytes_at_every_blocksize(blocksize):
    w = gaussian(64, 256, seed=blocksize)
    for double_quant in (False, True):
        packed, state = bnb_quantize(w, blocksize, double_quant)
        q = quantize_nf4(w, blocksize, double_quant)
        assert torch.equal(q.packed, packed.flatten())   # the same 4-bit codes as bitsandbytes
        if double_quant:
            assert torch.equal(q.absmax_codes, state.absmax)
        else:
            assert torch.equal(q.absmax, state.absmax)   # and the same block scales
            assert torch.equal(dequantize_nf4(q), _by_hand(q, state.absmax))
        if blocksize not in BNB_CPU_DEQUANT_BROKEN:
            assert torch.equal(dequantize_nf4(q), bnbF.dequantize_4bit(packed, state))


@pytest.mark.xfail(strict=True, reason="bitsandbytes 0.50.2 CPU dequantize_4bit is wrong at blocksize 512 and 1024")
@pytest.mark.parametrize("blocksize", BNB_CPU_DEQUANT_BROKEN)
def test_bitsandbytes_cpu_dequantization_at_512_and_1024(blocksize):
    w = gaussian(64, 256, seed=blocksize)
    packed, state = bnb_quantize(w, blocksize, False)
    assert torch.equal(dequantize_nf4(quantize_nf4(w, blocksize, False)), bnbF.dequantize_4bit(packed, state))


def test_high_nibble_holds_the_first_number():
    w = torch.zeros(64)
    w[0], w[1] = -1.0, 1.0  # codes 0 and 15
    assert quantize_nf4(w).packed[0].item() == 0x0F


@pytest.mark.parametrize("n", [256, 1000, 5, 0])  # full groups, a partial last group, one tiny group, all zero
def test_blockwise_8bit_matches_bitsandbytes(n):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)) if n else torch.zeros(300)
    codes, scales = quantize_blockwise_8bit(x)
    theirs, state = bnbF.quantize_blockwise(x, blocksize=256)
    assert torch.equal(codes, theirs) and torch.equal(scales, state.absmax)
    assert torch.equal(dequantize_blockwise_8bit(codes, scales), bnbF.dequantize_blockwise(theirs, state))


# --------------------------------------------------------------------------------------------
# What it stores and what it costs
# --------------------------------------------------------------------------------------------
def bnb_nbytes(packed, state):
    parts = [packed, state.absmax] + ([state.state2.absmax, state.offset] if state.nested else [])
    return sum(t.numel() * t.element_size() for t in parts)


def test_bytes_and_bits_per_parameter():
    w = gaussian(768, 768)
    n = w.numel()
    for fmt, dq in (("nf4", False), ("nf4+dq", True)):
        assert quantize_nf4(w, 64, dq).nbytes() == storage_bytes(n, fmt) == bnb_nbytes(*bnb_quantize(w, 64, dq))
    assert storage_bytes(n, "fp32") == 4 * n and storage_bytes(n, "bf16") == 2 * n
    assert 8 * storage_bytes(n, "nf4") / n == 4.5
    assert 8 * storage_bytes(n, "nf4+dq") / n == pytest.approx(4.127, abs=1e-3)
    assert storage_bytes(n, "fp32") / storage_bytes(n, "nf4") == pytest.approx(7.11, abs=0.01)
    assert storage_bytes(n, "fp32") / storage_bytes(n, "nf4+dq") == pytest.approx(7.75, abs=0.01)
    assert bits_per_parameter("nf4") == 4.5 and bits_per_parameter("nf4+dq") == pytest.approx(4.127, abs=1e-3)
    assert bits_per_parameter("nf4", blocksize=32) == 5.0


def test_relative_error_of_gaussian_weights_is_about_0092_at_blocksize_64():
    w = gaussian(768, 768)
    packed, state = bnb_quantize(w)
    reference = (torch.linalg.norm(w - bnbF.dequantize_4bit(packed, state)) / torch.linalg.norm(w)).item()
    assert nf4_error(w) == pytest.approx(reference, rel=1e-6)
    assert 0.090 < nf4_error(w) < 0.094
    assert nf4_error(w, double_quant=True) == pytest.approx(nf4_error(w), abs=2e-4)  # dq costs almost nothing
    assert nf4_error(w, blocksize=32) < nf4_error(w) < nf4_error(w, blocksize=256)


def test_pissa_residual_quantizes_with_less_error_on_a_decaying_spectrum():
    w = decaying_spectrum()
    errors = pissa_quantization_error(w, rank=16)
    u, s, vh = torch.linalg.svd(w.double())  # reference: top-16 part in float64, residual through bitsandbytes
    principal = ((u[:, :16] * s[:16]) @ vh[:16]).float()
    packed, state = bnb_quantize(w - principal)
    reference = torch.linalg.norm(w - (bnbF.dequantize_4bit(packed, state) + principal)) / torch.linalg.norm(w)
    assert errors["residual"] == pytest.approx(reference.item(), rel=1e-3)
    assert errors["W0"] == pytest.approx(nf4_error(w))
    assert errors["residual"] < 0.8 * errors["W0"]
    gaussian_errors = pissa_quantization_error(gaussian(768, 768), rank=16)  # i.i.d. noise: barely helps
    assert 0.9 * gaussian_errors["W0"] < gaussian_errors["residual"] < gaussian_errors["W0"]


# --------------------------------------------------------------------------------------------
# The layers
# --------------------------------------------------------------------------------------------
def linear(seed=0, in_dim=128, out_dim=64):
    torch.manual_seed(seed)
    return nn.Linear(in_dim, out_dim)


def bnb_linear4bit(lin):
    layer = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=True, compute_dtype=torch.float32,
                              quant_type="nf4", compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True, blocksize=64)
    layer.bias = nn.Parameter(lin.bias.data.clone())
    return layer.to("cpu")


def test_nf4_linear_equals_bitsandbytes_linear4bit():
    lin = linear()
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(1))
    ours = NF4Linear(lin)
    torch.testing.assert_close(ours(x), bnb_linear4bit(lin)(x), rtol=0, atol=0)
    assert not list(p for p in ours.parameters() if p.requires_grad)  # frozen by construction
    assert ours.nbytes() == storage_bytes(lin.weight.numel(), "nf4+dq")
    assert set(ours.state_dict()) == {"packed", "absmax_codes", "absmax_scales", "absmax_offset", "bias"}


def test_qlora_layer_is_nf4_base_plus_full_precision_lora():
    lin = linear()
    torch.manual_seed(0)
    layer = LinearWithQLoRA(copy.deepcopy(lin), rank=4, alpha=8)
    with torch.no_grad():
        layer.lora.B.normal_()
    packed, state = bnb_quantize(lin.weight, 64, True)
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(1))
    expected = x @ bnbF.dequantize_4bit(packed, state).T + lin.bias + 2.0 * (x @ layer.lora.A @ layer.lora.B)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert layer.lora.A.dtype == torch.float32
    model = nn.Sequential(layer)
    mark_only_lora_as_trainable(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"0.lora.A", "0.lora.B"}


def test_merge_into_4bit_requantizes_and_reports_its_cost():
    torch.manual_seed(0)
    layer = LinearWithQLoRA(linear(), rank=4, alpha=8)
    with torch.no_grad():
        layer.lora.B.normal_(std=0.05)
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(1))
    exact = layer.linear.weight + layer.lora.delta_weight()
    packed, state = bnb_quantize(exact.detach(), 64, True)
    reference = bnbF.dequantize_4bit(packed, state)
    cost = merge_into_4bit_error(layer, x)
    assert cost["weight"] == pytest.approx((torch.linalg.norm(reference - exact) / torch.linalg.norm(exact)).item(),
                                           rel=1e-5)
    assert 0.01 < cost["weight"] < 0.12 and 0 < cost["output"] < 0.2
    unmerged = layer(x)
    merge_lora_(nn.Sequential(layer))
    assert torch.equal(layer.linear.weight, reference)  # the requantized W + ΔW, as bitsandbytes would store it
    torch.testing.assert_close(layer(x), x @ reference.T + layer.linear.bias)
    assert (layer(x) - unmerged).abs().max() > 0  # merging into 4 bits is not free


def test_unmerging_a_4bit_merge_is_refused_and_changes_nothing():
    model = nn.Sequential(LinearWithQLoRA(linear(), rank=4, alpha=8))
    merge_lora_(model)
    packed = model[0].linear.packed.clone()
    with pytest.raises(RuntimeError, match="cannot be unmerged"):
        model[0].unmerge_()
    with pytest.raises(RuntimeError, match="cannot be unmerged"):
        remove_lora(model)
    assert model[0].merged and torch.equal(model[0].linear.packed, packed)
    with pytest.raises(ValueError, match="already merged"):
        merge_into_4bit_error(model[0])


def test_merge_and_unload_gives_an_fp32_layer_with_no_new_rounding():
    torch.manual_seed(0)
    model = nn.Sequential(LinearWithQLoRA(linear(), rank=4, alpha=8))
    with torch.no_grad():
        model[0].lora.B.normal_(std=0.05)
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(1))
    before = model(x)
    merge_and_unload(model)
    assert type(model[0]) is nn.Linear
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("blocksize,fragment", [(48, "must be one of"), (0, "must be one of"), (True, "must be one of"),
                                                (128, r"does not divide the weight's 192 numbers.*divides it \(32, 64\)")])
def test_bad_blocksizes_are_refused(blocksize, fragment):
    w = gaussian(3, 64)  # 192 numbers: divisible by 64, not by 128
    with pytest.raises(ValueError, match=fragment):
        quantize_nf4(w, blocksize)
    lin = nn.Linear(64, 3)
    state = copy.deepcopy(lin.state_dict())
    with pytest.raises(ValueError, match=fragment):
        LinearWithQLoRA(lin, 2, 4, blocksize=blocksize)
    assert all(torch.equal(v, lin.state_dict()[k]) for k, v in state.items())


def test_non_linear_layers_and_unknown_formats_are_refused():
    with pytest.raises(TypeError, match="got Embedding"):
        NF4Linear(nn.Embedding(8, 8))
    with pytest.raises(TypeError, match="got Embedding"):
        LinearWithQLoRA(nn.Embedding(8, 64), 2, 4)
    with pytest.raises(ValueError, match="unknown format 'int3'"):
        storage_bytes(64, "int3")
    with pytest.raises(TypeError, match="LinearWithQLoRA"):
        merge_into_4bit_error(nn.Linear(64, 64))
    with pytest.raises(ValueError, match="no valid blocksize divides it"):
        quantize_nf4(torch.zeros(10, 3), 32)


def test_paged_optimizers_are_explained():
    assert "unified memory" in PAGED_OPTIMIZERS and "CPU" in PAGED_OPTIMIZERS
    assert isinstance(LoRALayer, type) and math.isfinite(bits_per_parameter("bf16"))
