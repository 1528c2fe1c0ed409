"""LoRA variants from scratch: rsLoRA, LoRA+, DoRA, PiSSA and VeRA (QLoRA is in quantization.py).

Each variant changes one thing about plain LoRA (``lora.py``: h = x Wᵀ + s · x A B, A: in×r,
B: r×out, ΔW = s·(A·B)ᵀ in nn.Linear's out × in layout):

    rsLoRA   the scale:       s = α/√r instead of α/r                       (Kalajdzievski 2023)
    LoRA+    the optimizer:   B learns ``ratio`` times faster than A         (Hayou et al. 2024)
    DoRA     the weight:      W' = m ⊙ (W + ΔW) / ‖W + ΔW‖ per output row    (Liu et al. 2024)
    PiSSA    the init:        A, B = top-r singular directions of W, base = the rest (Meng et al. 2024)
    VeRA     the parameters:  one frozen random A, B shared by all layers; train two vectors
                                                                              (Kopiczko et al. 2024)
    QLoRA    the base:        stored in 4-bit NF4 (quantization.py)         (Dettmers et al. 2023)

Every variant layer is a ``LinearWithLoRA`` whose ``lora`` branch is a ``LoRALayer`` subclass, so
``mark_only_lora_as_trainable`` (which keeps every parameter of a LoRALayer trainable: DoRA's
magnitude and VeRA's vectors included), ``merge_lora_``, ``merge_and_unload``, ``lora_disabled``
and ``lora_layers`` work on all of them. ``replace_linear_with_variant`` builds any of them on a
model, all or nothing. Layouts are the course's; the tests copy weights to and from PEFT, whose
``lora_A.weight`` is Aᵀ (r × in) and ``lora_B.weight`` is Bᵀ (out × r).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

from .errors import ArgumentTypeError, NonFiniteError, UnsupportedLayerError, check_int
from .lora import (LinearWithLoRA, LoRALayer, LoRAReport, _aliases, _all_finite, _attention_linear_reason,
                   _check_alpha, _check_dropout, _check_model, _check_patterns, _check_rank, _check_same_settings,
                   _linear_names, _matches, _rank_warning_given, _set_submodule, _unsupported_reason,
                   _warn_if_rank_above_matrix_rank, lora_layers, lora_scaling)
from .quantization import BLOCKSIZE, LinearWithQLoRA, _check_blocksize, dequantize_nf4, nf4_error, quantize_nf4


# --------------------------------------------------------------------------------------------
# rsLoRA (arXiv:2312.03732): s = α/√r
# --------------------------------------------------------------------------------------------
# rsLoRA (§3) asks how s must depend on r so that, as r grows, the adapter's output and its
# gradients neither blow up nor vanish during training ("rank-stabilized"). The answer is
# s ∝ 1/√r: a sum of r independent terms grows like √r, and 1/√r cancels exactly that. With
# s = α/r they shrink like 1/√r instead, so a larger rank learns more slowly ("slows learning and
# stunts performance") and extra rank buys little. With α/√r a larger rank can trade compute for
# quality at no inference cost. PEFT: LoraConfig(use_rslora=True); here scaling="alpha/sqrt(rank)".
def scaling_by_rank(ranks, alpha: float) -> list[dict]:
    """s under α/r and under α/√r for each rank: the ratio grows like √r."""
    return [{"rank": r, "alpha/rank": lora_scaling(r, alpha, "alpha/rank"),
             "alpha/sqrt(rank)": lora_scaling(r, alpha, "alpha/sqrt(rank)")} for r in ranks]


# --------------------------------------------------------------------------------------------
# LoRA+ (arXiv:2402.12354): B at lr·ratio, A at lr
# --------------------------------------------------------------------------------------------
def _up_projection_ids(model: nn.Module) -> set[int]:
    """ids of the course's B matrices (the parameter ``B`` of each LoRALayer)."""
    return {id(p) for m in model.modules() if isinstance(m, LoRALayer)
            for n, p in m.named_parameters(recurse=False) if n == "B"}


def _no_weight_decay_names(model: nn.Module) -> set[str]:
    """transformers' rule, used by PEFT: no decay for parameters inside an nn.LayerNorm or with
    "bias" in their name. (The course GPT's own LayerNorm class is *not* nn.LayerNorm, so its
    scale and shift count as decayed, exactly as PEFT sees them.)"""
    names = {n for n, _ in model.named_parameters() if "bias" in n}
    for module_name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm):
            names |= {f"{module_name}.{n}" if module_name else n for n, _ in module.named_parameters()}
    return names


def loraplus_param_groups(model: nn.Module, lr: float, ratio: float = 16.0, *, lr_embedding: float = 1e-6,
                          weight_decay: float = 0.0) -> list[dict]:
    """The four optimizer groups of PEFT's ``create_loraplus_optimizer``, in its order.

    Trainable parameters only. "B" = the course's ``lora.B`` (or a PEFT ``lora_B``) **and every
    1-D parameter** (biases, norms, DoRA's magnitude, VeRA's vectors: PEFT's rule) at lr·ratio,
    split into decayed and not decayed; everything else ("A", a trained head) at lr. PEFT's
    "embedding" group (LoRA on nn.Embedding, lr_embedding) stays empty: the course adapts
    Linear layers only. ``weight_decay`` is PEFT's ``loraplus_weight_decay``.
    """
    for name, value in (("lr", lr), ("ratio", ratio), ("lr_embedding", lr_embedding)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a positive number, got {value!r} (the paper's ratio is 16)")
    up, no_decay = _up_projection_ids(model), _no_weight_decay_names(model)
    group_a, group_b, group_b_no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in up or "lora_B" in name or p.ndim == 1:
            (group_b_no_decay if name in no_decay else group_b).append(p)
        else:
            group_a.append(p)
    if not (group_a or group_b or group_b_no_decay):
        raise ValueError("the model has no trainable parameters; add LoRA and call mark_only_lora_as_trainable first")
    return [
        {"params": group_a, "weight_decay": weight_decay, "lr": lr},
        {"params": [], "weight_decay": weight_decay, "lr": lr_embedding},
        {"params": group_b, "weight_decay": weight_decay, "lr": lr * ratio},
        {"params": group_b_no_decay, "weight_decay": 0.0, "lr": lr * ratio},
    ]


def create_loraplus_optimizer(model: nn.Module, optimizer_cls=torch.optim.AdamW, *, lr: float, ratio: float = 16.0,
                              lr_embedding: float = 1e-6, weight_decay: float = 0.0, **kwargs) -> torch.optim.Optimizer:
    """``optimizer_cls`` over ``loraplus_param_groups`` (extra kwargs, e.g. betas, go to the optimizer).

    PEFT's pitfall: there, ``weight_decay=`` in kwargs is silently overridden by every group; the
    decay knob is ``loraplus_weight_decay``. Here it is ``weight_decay``."""
    groups = loraplus_param_groups(model, lr, ratio, lr_embedding=lr_embedding, weight_decay=weight_decay)
    return optimizer_cls(groups, lr=lr, **kwargs)


# --------------------------------------------------------------------------------------------
# Building a wrapper around a variant's branch
# --------------------------------------------------------------------------------------------
def _check_linear(linear) -> None:
    """The checks of ``LinearWithLoRA.__init__`` (it is bypassed below, see ``_init_wrapper``)."""
    if isinstance(linear, LinearWithLoRA):
        raise ValueError("this layer already has a LoRA branch (it is a LinearWithLoRA); "
                         "wrap the original nn.Linear, or reuse the existing wrapper")
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"LoRA variants wrap torch.nn.Linear layers only, got {type(linear).__name__}. "
                        "Pick a Linear submodule (model.named_modules() lists them).")
    reason = _attention_linear_reason(linear)
    if reason:
        raise UnsupportedLayerError(f"cannot add a LoRA variant to this layer: {reason}")
    if not linear.weight.is_floating_point():
        raise ArgumentTypeError(f"LoRA variants need a floating-point weight, got {linear.weight.dtype}")


def _init_wrapper(wrapper: LinearWithLoRA, linear: nn.Linear, branch: LoRALayer, dropout: float) -> None:
    """What ``LinearWithLoRA.__init__`` does, with a variant's branch instead of a new LoRALayer
    (LinearWithLoRA always builds a plain LoRALayer, whose random A we must not draw twice)."""
    dropout = _check_dropout(dropout)
    nn.Module.__init__(wrapper)
    wrapper.linear = linear
    wrapper.lora = branch.to(device=linear.weight.device, dtype=linear.weight.dtype)
    wrapper.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
    wrapper.merged = False
    wrapper.enabled = True


# --------------------------------------------------------------------------------------------
# DoRA (arXiv:2402.09353): W' = m ⊙ (W + ΔW) / ‖W + ΔW‖, one norm per output row
# --------------------------------------------------------------------------------------------
class DoRALayer(LoRALayer):
    """LoRA's A and B (the direction update) plus a trainable magnitude m, one per output row.

    m starts at the row norms of W (so W' = W at step 0, as B = 0). Row i of an nn.Linear weight
    (out × in) is the weight vector of output i: the paper's "column-wise" norm for its in × out
    layout is this per-row norm, taken over the input dimension.
    """

    def __init__(self, base_weight: torch.Tensor, rank: int, alpha: float, scaling: str = "alpha/rank"):
        out_dim, in_dim = base_weight.shape
        super().__init__(in_dim, out_dim, rank, alpha, scaling)  # A random, B = 0
        self.magnitude = nn.Parameter(torch.linalg.norm(base_weight.detach().float(), dim=1))  # (out,)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", magnitude=(out,)"


def _zero_rows(weight: torch.Tensor) -> list[int]:
    return torch.nonzero(torch.linalg.norm(weight.detach().float(), dim=1) == 0).flatten().tolist()


def _zero_norm_error(rows: list[int], where: str) -> ValueError:
    return ValueError(
        f"DoRA needs every output row of the weight to have a nonzero norm, but {where} has {len(rows)} "
        f"row(s) of norm 0 (rows {rows[:8]}{' ...' if len(rows) > 8 else ''}). A zero row has no direction "
        "to normalise (0/0). Leave this layer out (exclude_modules=[...]) or use plain LoRA for it."
    )


class LinearWithDoRA(LinearWithLoRA):
    """DoRA: ``h = m/‖W + ΔW‖ ⊙ (x Wᵀ + s · x A B) + bias``, the norm per output row.

    The norm is detached from the autograd graph (paper §4.3): it reflects the current ΔW but
    passes no gradient, which saves memory and, the paper reports, does not hurt accuracy. So m
    and (through x·A·B) A and B get gradients, the norm does not. With dropout (PEFT's placement)
    the frozen x Wᵀ sees x and the rest sees x̃ = dropout(x):
        h = x Wᵀ + bias + (m/‖W + ΔW‖ − 1) ⊙ x̃ Wᵀ + m/‖W + ΔW‖ ⊙ s · x̃ A B.
    PEFT: LoraConfig(use_dora=True); m is ``lora_magnitude_vector``.
    """

    variant = "dora"

    def __init__(self, linear: nn.Linear, rank: int, alpha: float, scaling: str = "alpha/rank", dropout: float = 0.0):
        _check_linear(linear)
        rows = _zero_rows(linear.weight)
        if rows:
            raise _zero_norm_error(rows, "this layer")
        _init_wrapper(self, linear, DoRALayer(linear.weight, rank, alpha, scaling), dropout)

    def weight_norm(self) -> torch.Tensor:
        """‖W + ΔW‖ per output row, (out,), detached (paper §4.3)."""
        return torch.linalg.norm(self.linear.weight + self.lora.delta_weight(), dim=1).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self.enabled:
            return self.linear(x)
        scale = self.lora.magnitude / self.weight_norm()  # (out,): m / ‖W + ΔW‖
        base = self.linear(x)  # x Wᵀ + bias, on the undropped x
        if isinstance(self.dropout, nn.Identity) or not self.training:
            x_tilde = x
            base_no_bias = base if self.linear.bias is None else base - self.linear.bias
        else:
            x_tilde = self.dropout(x)
            base_no_bias = F.linear(x_tilde, self.linear.weight)
        return base + (scale - 1) * base_no_bias + scale * self.lora(x_tilde)

    @torch.no_grad()
    def _merged_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        combined = self.linear.weight + self.lora.delta_weight()  # (out, in)
        norm = torch.linalg.norm(combined, dim=1)
        rows = torch.nonzero(norm == 0).flatten().tolist()
        if rows:
            raise _zero_norm_error(rows, "W + ΔW")
        return (self.lora.magnitude / norm)[:, None] * combined, norm

    def _check_mergeable(self, where: str = "this layer") -> None:
        """LinearWithLoRA's checks (enabled, finite W + ΔW), then DoRA's own: no zero row in
        W + ΔW and a finite merged weight. ``merge_lora_`` runs this on every layer first."""
        super()._check_mergeable(where)
        if not _all_finite(self._merged_weight()[0]):
            raise NonFiniteError(f"cannot merge {where}: m ⊙ (W + ΔW)/‖W + ΔW‖ would hold NaN or inf values "
                                 "(is the magnitude vector finite?). Nothing was merged.")

    @torch.no_grad()
    def merge_(self) -> None:
        """W ← m/‖W + ΔW‖ ⊙ (W + ΔW). Keeps the norm to undo it exactly (as PEFT does)."""
        if self.merged:
            return
        self._check_mergeable()
        merged, self._norm_at_merge = self._merged_weight()
        self.linear.weight.copy_(merged.to(self.linear.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge_(self) -> None:
        """W ← W' · ‖W + ΔW‖/m − ΔW (the old W up to float rounding)."""
        if not self.merged:
            return
        scale = self.lora.magnitude / self._norm_at_merge
        self.linear.weight.copy_(self.linear.weight / scale[:, None] - self.lora.delta_weight())
        self.merged = False

    def merged_linear(self) -> nn.Linear:
        if not self.merged:
            self._check_mergeable()
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.linear.weight if self.merged else self._merged_weight()[0])
            if self.bias is not None:
                out.bias.copy_(self.linear.bias)
        return out


# --------------------------------------------------------------------------------------------
# PiSSA (arXiv:2404.02948): A, B from the top-r singular directions, the base holds the rest
# --------------------------------------------------------------------------------------------
def pissa_factors(weight: torch.Tensor, rank: int, scaling_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with s·(A·B)ᵀ = U_r S_r V_rᵀ, the best rank-r part of W (out × in) (paper §3).

    With W = U S Vᵀ (torch.linalg.svd): A = V_r √(S_r/s) (in × r), B = √(S_r/s) U_rᵀ (r × out),
    PEFT's convention transposed (its lora_A = √(S_r/s) V_rᵀ, lora_B = U_r √(S_r/s)). Splitting
    √S evenly makes A and B the same size, so both start learning at the same pace.
    """
    _check_rank(rank, weight.shape[1], weight.shape[0])
    u, s, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    tolerance = s.max() * max(weight.shape) * torch.finfo(torch.float32).eps  # numpy's matrix_rank rule
    matrix_rank = int((s > tolerance).sum())
    if rank > matrix_rank:
        raise ValueError(
            f"PiSSA rank {rank} is above the rank of this weight ({matrix_rank} nonzero singular values of "
            f"{min(weight.shape)}): the extra directions would have singular value 0, so they start A and B at "
            f"zero and carry nothing. Use rank <= {matrix_rank}."
        )
    root = torch.sqrt(s[:rank] / scaling_factor)  # (r,)
    return vh[:rank].T * root, root[:, None] * u[:, :rank].T  # (in, r), (r, out)


class PiSSALayer(LoRALayer):
    """A LoRA branch initialised from the SVD; it remembers its initial A and B (buffers), which
    ``pissa_to_lora`` needs to turn the trained adapter into a plain LoRA on the original W."""

    def __init__(self, base_weight: torch.Tensor, rank: int, alpha: float, scaling: str = "alpha/rank"):
        out_dim, in_dim = base_weight.shape
        super().__init__(in_dim, out_dim, rank, alpha, scaling)  # calls reset_parameters (below)
        a, b = pissa_factors(base_weight, rank, self.scaling)
        with torch.no_grad():
            self.A.copy_(a)
            self.B.copy_(b)
        self.register_buffer("A_init", a.clone())  # (in, r)
        self.register_buffer("B_init", b.clone())  # (r, out)

    def reset_parameters(self) -> None:
        """No random draw: A and B come from the SVD of the base weight (set in __init__)."""


class LinearWithPiSSA(LinearWithLoRA):
    """PiSSA: the same forward as LoRA, ``h = x W_resᵀ + s · x A B``, with W_res = W − s(A₀B₀)ᵀ.

    At step 0 the output equals the base model's (W_res + s(A₀B₀)ᵀ = W up to rounding), but A
    and B now hold W's principal directions, so training moves the most important part of W
    and not a random subspace. **The wrapped nn.Linear's weight is replaced by the residual**
    (as in PEFT, ``init_lora_weights="pissa"``): keep a copy of the base model if you need it,
    and save with ``pissa_to_lora`` (a plain LoRA adapter on the original W).
    """

    variant = "pissa"

    def __init__(self, linear: nn.Linear, rank: int, alpha: float, scaling: str = "alpha/rank", dropout: float = 0.0):
        _check_linear(linear)
        branch = PiSSALayer(linear.weight, rank, alpha, scaling)  # validates before W is touched
        _init_wrapper(self, linear, branch, dropout)
        with torch.no_grad():
            linear.weight.sub_(branch.delta_weight().to(linear.weight.dtype))  # W_res = W − s(A₀B₀)ᵀ


def _plain_lora_alpha(rank: int, alpha: float, scaling: str) -> float:
    """The alpha that gives a rank-2r LoRA the same s as the rank-r one (PEFT doubles lora_alpha)."""
    return {"alpha/rank": 2 * alpha, "alpha/sqrt(rank)": math.sqrt(2) * alpha, "alpha": alpha}[scaling]


@torch.no_grad()
def pissa_to_lora(model: nn.Module, base_model: nn.Module | None = None) -> nn.Module:
    """Turn a trained PiSSA model into a plain LoRA adapter on the **original** base weights.

    W_res + s·(A·B)ᵀ = W + ΔW  with  ΔW = s·(A·B − A₀·B₀)ᵀ, a rank-2r product:
        A_plain = [A | A₀] (in × 2r),   B_plain = [B ; −B₀] (2r × out),   same s
    (PEFT's ``save_pretrained(path_initial_model_for_weight_conversion=...)``).

    With ``base_model`` (an unwrapped copy of the model PiSSA started from): its Linear layers get
    LinearWithLoRA branches with these factors, and it is returned; ``model`` is left as it is.
    Without it, ``model`` itself is converted: each base weight is rebuilt as W_res + s(A₀B₀)ᵀ
    (the original up to float rounding). Everything is checked before anything changes.
    Other trained modules (a new head) are not adapters: copy or save them yourself.
    """
    layers = [(name, layer) for name, layer in lora_layers(model) if isinstance(layer, LinearWithPiSSA)]
    if not layers:
        raise ValueError("the model has no PiSSA layers; "
                         "build them with replace_linear_with_variant(model, 'pissa', ...)")
    target = model if base_model is None else base_model
    for name, layer in layers:
        rank, (in_dim, out_dim) = layer.lora.rank, (layer.in_features, layer.out_features)
        if layer.merged:
            raise ValueError(f"layer {name!r} is merged: unmerge_lora_(model) before converting")
        if 2 * rank > min(in_dim, out_dim):
            raise ValueError(f"layer {name!r}: the plain LoRA would need rank 2·{rank} = {2 * rank}, above "
                             f"min(in, out) = {min(in_dim, out_dim)}; PiSSA ranks up to {min(in_dim, out_dim) // 2} "
                             "convert. Merge instead (merge_and_unload(model)) to keep the trained weights.")
        if base_model is not None:
            try:
                original = base_model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"base_model has no layer {name!r}: it is not the model PiSSA started from") from None
            if not isinstance(original, nn.Linear) or original.weight.shape != layer.weight.shape:
                raise ValueError(f"base_model's {name!r} is a {type(original).__name__}, not an nn.Linear of shape "
                                 f"{tuple(layer.weight.shape)}: pass an unwrapped copy of the original model")
            rebuilt = layer.linear.weight + layer.lora.scaling * (layer.lora.A_init @ layer.lora.B_init).T
            if not torch.allclose(original.weight, rebuilt, rtol=1e-4, atol=1e-5):
                raise ValueError(f"base_model's {name!r} does not hold the weight PiSSA started from "
                                 "(W_res + s·A₀B₀ differs from it): pass the original, untrained base model")
    for name, layer in layers:
        lora = layer.lora
        if base_model is None:
            linear = layer.merged_linear()  # a fresh nn.Linear, to hold W
            linear.weight.copy_(layer.linear.weight + lora.scaling * (lora.A_init @ lora.B_init).T)
        else:
            linear = base_model.get_submodule(name)
        dropout = layer.dropout.p if isinstance(layer.dropout, nn.Dropout) else 0.0
        plain = LinearWithLoRA(linear, 2 * lora.rank, _plain_lora_alpha(lora.rank, lora.alpha, lora.scaling_name),
                               scaling=lora.scaling_name, dropout=dropout)
        plain.lora.A.copy_(torch.cat([lora.A, lora.A_init], dim=1))  # (in, 2r)
        plain.lora.B.copy_(torch.cat([lora.B, -lora.B_init], dim=0))  # (2r, out)
        plain.lora.requires_grad_(lora.A.requires_grad)
        _set_submodule(target, name, plain)
    return target


# --------------------------------------------------------------------------------------------
# VeRA (arXiv:2310.11454): shared frozen random A and B, trainable vectors d and b
# --------------------------------------------------------------------------------------------
def vera_projections(in_max: int, out_max: int, rank: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared frozen pair, drawn like PEFT's VeraModel (``projection_prng_key=seed``).

    PEFT draws A (r × in_max), then B (out_max × r), from one generator, each Kaiming-uniform
    with its own fan-in (in_max, then r): U(±√3·√2/√fan_in). We return them in the course's
    layout: A (in_max × r), B (r × out_max).
    """
    _check_rank(rank)
    generator = torch.Generator().manual_seed(seed)

    def kaiming_uniform(shape):
        bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(shape[1]))
        return torch.empty(shape).uniform_(-bound, bound, generator=generator)

    a, b = kaiming_uniform((rank, in_max)), kaiming_uniform((out_max, rank))
    return a.T.contiguous(), b.T.contiguous()


class VeRALayer(LoRALayer):
    """VeRA's branch: ``x ↦ λ_b ⊙ ((λ_d ⊙ (x · A[:in])) · B[:, :out])``.

    A (in_max × r) and B (r × out_max) are the shared frozen projections (buffers, the same
    tensors in every layer, sliced to this layer's size). Only λ_d (r,) and λ_b (out,) train:
    λ_d starts at ``d_initial`` (0.1), λ_b at 0, so the model is unchanged at step 0 and only λ_b
    gets a gradient at first (the B = 0 story of LoRA). There is no α: the vectors carry the
    scale. The rank can exceed the layer's width (PEFT's default is 256). The projections are
    not saved in state_dict (PEFT's ``save_projection=False``): they are re-drawn from the seed.
    """

    def __init__(self, in_dim: int, out_dim: int, shared_a: torch.Tensor, shared_b: torch.Tensor,
                 d_initial: float = 0.1):
        nn.Module.__init__(self)  # not LoRALayer.__init__: there is no trainable A or B here
        rank = shared_a.shape[1]
        _check_rank(rank)
        if shared_a.shape[0] < in_dim or shared_b.shape[1] < out_dim or shared_b.shape[0] != rank:
            raise ValueError(f"shared projections A {tuple(shared_a.shape)} and B {tuple(shared_b.shape)} do not "
                             f"cover a layer {in_dim} -> {out_dim}: "
                             "build them with vera_projections(in_max, out_max, r)")
        self.in_dim, self.out_dim, self.rank, self.d_initial = in_dim, out_dim, rank, float(d_initial)
        self.alpha, self.scaling_name, self.scaling = None, "vera", 1.0
        self.projection_seed: int | None = None  # set when A, B come from vera_projections(..., seed)
        self.register_buffer("A", shared_a, persistent=False)  # (in_max, r), frozen, shared
        self.register_buffer("B", shared_b, persistent=False)  # (r, out_max), frozen, shared
        self.lambda_d = nn.Parameter(torch.full((rank,), float(d_initial)))  # (r,)
        self.lambda_b = nn.Parameter(torch.zeros(out_dim))  # (out,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (..., in) @ (in, r) -> ⊙ λ_d -> (..., r) @ (r, out) -> ⊙ λ_b
        return self.lambda_b * (((x @ self.A[: self.in_dim]) * self.lambda_d) @ self.B[:, : self.out_dim])

    def delta_weight(self) -> torch.Tensor:
        """ΔW (out × in) = (A·diag(λ_d)·B·diag(λ_b))ᵀ."""
        return (((self.A[: self.in_dim] * self.lambda_d) @ self.B[:, : self.out_dim]) * self.lambda_b).T

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.lambda_d.fill_(self.d_initial)
            self.lambda_b.zero_()

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, out_dim={self.out_dim}, rank={self.rank} (shared), trainable=λ_d, λ_b"


class LinearWithVeRA(LinearWithLoRA):
    """VeRA: ``h = x Wᵀ + λ_b ⊙ ((λ_d ⊙ (dropout(x) · A)) · B)``; PEFT: VeraConfig."""

    variant = "vera"

    def __init__(self, linear: nn.Linear, shared_a: torch.Tensor, shared_b: torch.Tensor,
                 d_initial: float = 0.1, dropout: float = 0.0):
        _check_linear(linear)
        branch = VeRALayer(linear.in_features, linear.out_features, shared_a, shared_b, d_initial)
        _init_wrapper(self, linear, branch, dropout)


# --------------------------------------------------------------------------------------------
# Model surgery: any variant, all or nothing
# --------------------------------------------------------------------------------------------
VARIANTS = ("lora", "rslora", "dora", "pissa", "vera", "qlora")


def _targets(model: nn.Module, target, candidates: list[str]) -> list[str]:
    """The Linear names a (checked) target spec selects, with ``lora.py``'s matching rule. A target
    that names only modules of another type (a LayerNorm, a block) is an error, not skipped."""
    if target is None:
        return candidates
    patterns = [target] if isinstance(target, str) else [[p] for p in target]  # a regex, or names one by one
    for pattern in patterns:
        if not any(_matches(n, pattern) for n in candidates):
            others = [f"{n} ({type(m).__name__})" for n, m in model.named_modules() if n and _matches(n, pattern)]
            if others:
                raise TypeError(f"target {pattern if isinstance(pattern, str) else pattern[0]!r} names "
                                f"{', '.join(others[:4])}, not an nn.Linear; LoRA variants adapt Linear layers "
                                f"only. This model's Linear layers: {', '.join(candidates)}")
    return [n for n in candidates if _matches(n, target)]


_LAYER_CLASS = {"lora": LinearWithLoRA, "rslora": LinearWithLoRA, "dora": LinearWithDoRA,
                "pissa": LinearWithPiSSA, "vera": LinearWithVeRA, "qlora": LinearWithQLoRA}


def _check_already_wrapped(name: str, layer: LinearWithLoRA, variant: str, rank, alpha, scaling, dropout) -> None:
    """Re-running with the same variant and settings is a no-op; anything else is an error."""
    kind = getattr(layer, "variant", "lora")
    if type(layer) is not _LAYER_CLASS[variant]:
        raise ValueError(f"layer {name!r} already has a {kind} branch ({type(layer).__name__}); you asked for "
                         f"{variant}. A layer keeps its first branch: remove_lora(model) first (or "
                         "merge_and_unload(model) to keep what it learned), then wrap again.")
    if variant == "vera":
        if (layer.lora.rank, layer.dropout_p) != (rank, dropout):
            raise ValueError(f"layer {name!r} already has VeRA of rank {layer.lora.rank} "
                             f"(dropout {layer.dropout_p:g}); "
                             f"you asked for rank {rank} (dropout {dropout:g}). Call remove_lora(model) first.")
    else:
        _check_same_settings(name, layer, rank, alpha, scaling, dropout)


def replace_linear_with_variant(model: nn.Module, variant: str, rank: int, alpha: float | None = None, *,
                                scaling: str | None = None, target_modules=None, exclude_modules=None,
                                dropout: float = 0.0, seed: int | None = None, blocksize: int = BLOCKSIZE,
                                double_quant: bool = True, d_initial: float = 0.1) -> LoRAReport:
    """Wrap Linear layers of ``model`` with one LoRA variant, in place (like ``replace_linear_with_lora``).

    variant: "lora" | "rslora" (scaling α/√r) | "dora" | "pissa" | "vera" | "qlora".
    ``alpha`` is required except for VeRA, which has none. ``scaling`` picks the convention
    (default α/r; rsLoRA forces α/√r; ``variant="dora", scaling="alpha/sqrt(rank)"`` is DoRA with
    rsLoRA's scale, like PEFT's use_dora + use_rslora). ``blocksize`` / ``double_quant`` are for
    QLoRA, ``d_initial`` for VeRA. ``seed`` draws the random A of lora/rslora/dora/qlora from its
    own stream (the same A for each of them at the same seed) and is VeRA's projection key
    (default 0, as PEFT). Freeze with ``mark_only_lora_as_trainable(model, modules_to_save=[...])``.

    All or nothing: every selected layer is checked before any is wrapped (the checks of
    ``replace_linear_with_lora``, plus a zero row for DoRA, the matrix rank for PiSSA, the
    blocksize for QLoRA), so an error leaves the model as it was. A rank above min(in, out) is
    warned about, as in lora.py, except for PiSSA, which cannot use it. A layer that already has
    the same variant with the same settings is left alone (re-running a cell is safe).
    """
    _check_model(model)
    if not isinstance(variant, str) or variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: choose one of {', '.join(map(repr, VARIANTS))}")
    rank = _check_rank(rank)
    if variant == "vera":
        # experiments.build_model passes every spec's scaling, whose default is "alpha/rank": that
        # default says nothing about VeRA and is accepted; any other value is a mistake.
        if alpha is not None or scaling not in (None, "alpha/rank"):
            raise ValueError("VeRA has no alpha or scaling (its trainable vectors carry the scale); leave them out")
        scaling = None
    else:
        if alpha is None:
            raise ValueError(f"variant {variant!r} needs alpha (e.g. alpha = rank for s = 1)")
        alpha = _check_alpha(alpha)
        if variant == "rslora":
            if scaling not in (None, "alpha/sqrt(rank)"):
                raise ValueError(f"rsLoRA is the scaling 'alpha/sqrt(rank)'; got scaling={scaling!r}")
            scaling = "alpha/sqrt(rank)"
        scaling = "alpha/rank" if scaling is None else scaling
        lora_scaling(rank, alpha, scaling)  # validates the name
    dropout = _check_dropout(dropout)
    if seed is not None:
        seed = check_int(seed, "seed", hint="use an integer such as 0, or None for the default")
    target = _check_patterns(target_modules, "target_modules")
    exclude = _check_patterns(exclude_modules, "exclude_modules")
    candidates = _linear_names(model)
    if "" in candidates:
        raise TypeError("the model itself is a single nn.Linear: "
                        "wrap it directly (e.g. LinearWithDoRA(model, r, alpha))")

    # 1. Check every selected layer; nothing is changed yet.
    aliases = _aliases(model)
    report, plan = LoRAReport(), []
    for name in _targets(model, target, candidates):
        module = model.get_submodule(name)
        if _matches(name, exclude):
            report.excluded.append(name)
            continue
        if isinstance(module, LinearWithLoRA):
            _check_already_wrapped(name, module, variant, rank, alpha, scaling, dropout)
            report.already_wrapped.append(name)
            continue
        reason = _unsupported_reason(model, name, module, aliases)
        if reason:
            raise UnsupportedLayerError(reason)
        try:
            _check_linear(module)
            if variant == "dora" and _zero_rows(module.weight):
                raise _zero_norm_error(_zero_rows(module.weight), "this layer")
            if variant == "pissa":
                pissa_factors(module.weight, rank, lora_scaling(rank, alpha, scaling))
            if variant == "qlora":
                _check_blocksize(module.weight.numel(), blocksize)
        except ValueError as exc:
            raise type(exc)(f"layer {name!r}: {exc}") from None
        plan.append((name, module))
    if target is not None and not plan and not report.already_wrapped:
        raise ValueError(f"target_modules={target_modules!r} matched no nn.Linear layer of this model"
                         f"{' (all excluded)' if report.excluded else ''}. Its Linear layers are: "
                         f"{', '.join(candidates) or '(none)'}. Names match exactly or as a dotted suffix "
                         "(e.g. 'W_query'); a single string is a regex for the full name.")

    # 2. Warn about ranks that add only parameters, build every wrapper, then put them in place.
    if variant != "vera":
        for name, module in plan:
            _warn_if_rank_above_matrix_rank(rank, module.in_features, module.out_features, f"layer {name!r}")
    if variant == "vera" and plan:
        shared_a, shared_b = vera_projections(max(m.in_features for _, m in plan), max(m.out_features for _, m in plan),
                                              rank, seed=0 if seed is None else seed)
        shared_a, shared_b = (t.to(plan[0][1].weight.device) for t in (shared_a, shared_b))
    wrappers = []
    with torch.random.fork_rng(devices=[], enabled=seed is not None), _rank_warning_given():
        if seed is not None:
            torch.manual_seed(seed)
        for name, module in plan:
            if variant == "vera":
                layer = LinearWithVeRA(module, shared_a, shared_b, d_initial=d_initial, dropout=dropout)
                layer.lora.projection_seed = 0 if seed is None else seed  # adapter files re-draw A, B from it
            elif variant == "qlora":
                layer = LinearWithQLoRA(module, rank, alpha, scaling=scaling, dropout=dropout,
                                        blocksize=blocksize, double_quant=double_quant)
            else:  # lora, rslora, dora, pissa (PiSSA rewrites the base weight: every check has passed)
                layer = _LAYER_CLASS[variant](module, rank, alpha, scaling=scaling, dropout=dropout)
            wrappers.append((name, layer))
    for name, layer in wrappers:
        _set_submodule(model, name, layer)
        report.wrapped.append(name)
    return report


# --------------------------------------------------------------------------------------------
# Measurements the notebook needs
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def effective_weight(layer: LinearWithLoRA) -> torch.Tensor:
    """The (out × in) weight the layer computes with, as a merge would produce it, fp32:
    W + ΔW for LoRA and VeRA, W_res + ΔW for PiSSA, deq(W₄) + ΔW for QLoRA, m ⊙ (W+ΔW)/‖W+ΔW‖ for DoRA."""
    if isinstance(layer, nn.Linear):
        return layer.weight.detach().float().clone()
    if not isinstance(layer, LinearWithLoRA):
        raise TypeError(f"effective_weight takes an nn.Linear or a LoRA layer, got {type(layer).__name__}")
    return layer.merged_linear().weight.detach().float()


@torch.no_grad()
def magnitude_direction_change(initial: torch.Tensor, weights) -> tuple[list[float], list[float]]:
    """DoRA's weight-decomposition analysis (paper §3, eq. 3-4) for a history of weights.

    Split each (out × in) weight into row norms m (magnitude) and row directions. Against the
    initial weight W₀:
        ΔM_t = mean over rows |m_t − m_0|,      ΔD_t = mean over rows (1 − cos(W_t row, W₀ row)).
    Full fine-tuning in the paper shows a negative slope of ΔM against ΔD, LoRA a positive one.
    Returns (ΔM list, ΔD list), one value per weight in ``weights``.
    """
    w0 = initial.detach().float()
    m0 = torch.linalg.norm(w0, dim=1)
    if (m0 == 0).any():
        raise _zero_norm_error(torch.nonzero(m0 == 0).flatten().tolist(), "the initial weight")
    delta_m, delta_d = [], []
    for w in weights:
        w = w.detach().float()
        if w.shape != w0.shape:
            raise ValueError(f"every weight must have the initial weight's shape {tuple(w0.shape)}, "
                             f"got {tuple(w.shape)}")
        delta_m.append((torch.linalg.norm(w, dim=1) - m0).abs().mean().item())
        delta_d.append((1 - F.cosine_similarity(w, w0, dim=1)).mean().item())
    return delta_m, delta_d


def magnitude_direction_slope(delta_m, delta_d) -> dict:
    """The paper's summary of a ΔM-against-ΔD scatter (Fig. 2): the least-squares slope of ΔM on
    ΔD and their Pearson correlation. Positive: magnitude and direction change together (the
    paper's LoRA); negative: one grows while the other shrinks (the paper's full FT and DoRA)."""
    m, d = torch.tensor(list(delta_m), dtype=torch.float64), torch.tensor(list(delta_d), dtype=torch.float64)
    if m.shape != d.shape or m.numel() < 3:
        raise ValueError(f"give the same number (at least 3) of ΔM and ΔD values, got {m.numel()} and {d.numel()}")
    dm, dd = m - m.mean(), d - d.mean()
    if float((dd * dd).sum()) == 0 or float((dm * dm).sum()) == 0:
        raise ValueError("ΔM or ΔD is constant over the checkpoints: there is no slope to fit")
    slope = float((dm * dd).sum() / (dd * dd).sum())
    corr = float((dm * dd).sum() / torch.sqrt((dm * dm).sum() * (dd * dd).sum()))
    return {"slope": slope, "corr": corr}


class WeightRecorder:
    """Records the effective weight (``effective_weight``) of some layers of ``model`` before
    training and after every ``every``-th optimizer step, for DoRA's analysis.

        recorder = WeightRecorder(model, ["trf_blocks.0.att.W_query"], every=25)
        with recorder:
            train_classifier(model, ...)
        recorder.weights["trf_blocks.0.att.W_query"]   # [W at step 0, at step 25, ...]

    It uses torch's global optimizer hook (``register_optimizer_step_post_hook``), so the training
    loop needs no change; steps of optimizers that hold none of the model's parameters are ignored.
    """

    def __init__(self, model: nn.Module, names, every: int):
        self.model, self.names = model, list(names)
        self.every = check_int(every, "every", minimum=1)
        for name in self.names:
            layer = model.get_submodule(name)
            if not isinstance(layer, (nn.Linear, LinearWithLoRA)):
                raise TypeError(f"{name!r} is a {type(layer).__name__}; record nn.Linear or LoRA layers")
        self.weights = {name: [effective_weight(model.get_submodule(name))] for name in self.names}
        self.steps, self._count, self._handle = [0], 0, None
        self._ids = {id(p) for p in model.parameters()}

    def _hook(self, optimizer, args, kwargs) -> None:
        if not any(id(p) in self._ids for group in optimizer.param_groups for p in group["params"]):
            return
        self._count += 1
        if self._count % self.every == 0:
            self.steps.append(self._count)
            for name in self.names:
                self.weights[name].append(effective_weight(self.model.get_submodule(name)))

    def __enter__(self) -> "WeightRecorder":
        self._handle = register_optimizer_step_post_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


def steps_to_target(losses, target: float, window: int = 20) -> int | None:
    """The first step (1-based) at which the running mean of the last ``window`` training losses is
    at or below ``target``; None if it never gets there. The mean smooths batch-to-batch noise."""
    losses = [float(v) for v in losses]
    window = check_int(window, "window", minimum=1)
    total = 0.0
    for step, value in enumerate(losses, 1):
        total += value
        if step > window:
            total -= losses[step - 1 - window]
        if step >= window and total / window <= target:
            return step
    return None


@torch.no_grad()
def pissa_quantization_error(weight: torch.Tensor, rank: int, blocksize: int = BLOCKSIZE,
                             double_quant: bool = False) -> dict:
    """NF4 error of W against QPiSSA's: the top-r part kept in full precision, only the residual
    quantized (PiSSA §4, "QPiSSA"). Both relative to ‖W‖_F:
        "W0":       ‖W − deq(Q(W))‖ / ‖W‖                       (QLoRA)
        "residual": ‖W − (deq(Q(W_res)) + U_r S_r V_rᵀ)‖ / ‖W‖  (QPiSSA)
    On weights with a decaying spectrum the second is much smaller; on i.i.d. noise barely.
    """
    w = weight.detach().float()
    a, b = pissa_factors(w, rank, 1.0)
    principal = (a @ b).T  # (out, in): U_r S_r V_rᵀ
    residual_restored = dequantize_nf4(quantize_nf4(w - principal, blocksize, double_quant)) + principal
    return {"W0": nf4_error(w, blocksize, double_quant),
            "residual": (torch.linalg.norm(w - residual_restored) / torch.linalg.norm(w)).item()}


# --------------------------------------------------------------------------------------------
# The rest of the family, one paragraph each (for the notebook's table)
# --------------------------------------------------------------------------------------------
VARIANT_NOTES = (
    {"name": "VeRA", "paper": "Kopiczko et al., ICLR 2024, arXiv:2310.11454",
     "peft": "VeraConfig(r=256, d_initial=0.1, projection_prng_key=0)", "built_here": "LinearWithVeRA",
     "idea": "One pair of random matrices A and B is drawn once, frozen and shared by every adapted layer; "
             "each layer trains only two vectors that scale them, λ_d (r) and λ_b (out). That is about "
             "10x fewer trainable parameters than LoRA, and it usually needs a higher learning rate."},
    {"name": "AdaLoRA", "paper": "Zhang et al., ICLR 2023, arXiv:2303.10512",
     "peft": "AdaLoraConfig(init_r=12, target_r=8, total_step=..., ...); "
             "call model.update_and_allocate(step) every step",
     "built_here": None,
     "idea": "Writes ΔW as P Λ Q, like an SVD, with a penalty that keeps P and Q orthogonal. During training it "
             "scores how important each singular value is and prunes the weak ones on a schedule, so the rank "
             "budget moves to the layers that need it. It is the slowest of the family to train."},
    {"name": "LoftQ", "paper": "Li et al., 2023, arXiv:2310.08659",
     "peft": "LoraConfig(init_lora_weights='loftq', loftq_config=LoftQConfig(loftq_bits=4))", "built_here": None,
     "idea": "An initialisation for a quantized base. It alternates Q ← quantize(W − A·B) with (A, B) ← the "
             "rank-r SVD of W − Q, so that Q + A·B starts closer to W than Q alone. QLoRA ignores that error. "
             "PEFT's version needs bitsandbytes on a CUDA or XPU device."},
    {"name": "OLoRA", "paper": "Büyükakyüz, 2024, arXiv:2406.01775", "peft": "LoraConfig(init_lora_weights='olora')",
     "built_here": None,
     "idea": "PiSSA's idea with a QR decomposition in place of the SVD: A and B come from the first r columns "
             "of Q and rows of R, and the base keeps the rest. It is cheaper than an SVD. The adapter starts "
             "on an orthonormal basis of W's leading columns."},
    {"name": "LoRA-FA", "paper": "Zhang et al., 2023, arXiv:2308.03303",
     "peft": "peft.optimizers.create_lorafa_optimizer(model, r, lora_alpha, lr)", "built_here": None,
     "idea": "Freezes A after its random init and trains only B. Then backpropagation never needs the layer's "
             "full-width input for ∂A, which saves activation memory. PEFT also projects B's gradient to make "
             "up for the frozen A."},
    {"name": "LoRA-GA", "paper": "Wang, Yu, Li, 2024, arXiv:2407.05000",
     "peft": "preprocess_loraga(model, lora_config, train_step); LoraConfig(init_lora_weights='lora_ga')",
     "built_here": None,
     "idea": "Estimates the full fine-tuning gradient on a few batches and initialises A and B from its SVD, "
             "subtracting their product from the base. LoRA's first step then follows full fine-tuning's "
             "first step. The paper reports 2-4x faster convergence."},
)
