"""Plain-PyTorch reference of every fastpeft op: the oracle in tests and the CPU path.

Each function computes in the dtype of its inputs (tests pass float64 tensors to get the exact
answer) and is differentiable by autograd with respect to every tensor that requires grad. The base
weight is either a dense ``(out, in)`` tensor or an :class:`~fastpeft.nf4.NF4Weight`, which is
dequantised to ``x.dtype`` (bit-exact fp32 values, then one cast).

Shapes: ``x`` is ``(..., in)``, ``weight`` ``(out, in)``, ``lora_a`` ``(r, in)``, ``lora_b`` ``(out, r)``,
``bias`` ``(out,)`` or None, ``scaling`` a Python float (``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA).
Dropout is the caller's: ``x_dropped`` is ``dropout(x)`` when dropout is active, else None (= ``x``).
Semantics follow Hugging Face PEFT (peft/tuners/lora/layer.py, dora.py; peft/tuners/ia3/layer.py).
"""

from __future__ import annotations

import ctypes
import functools
import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .nf4 import NESTED_BLOCKSIZE, NF4Weight, dequant_buffer

__all__ = [
    "base_weight",
    "lora_linear",
    "dora_weight_norm",
    "dora_base_weight",
    "dora_linear",
    "ia3_linear",
    "multi_lora_linear",
    "multi_lora_delta",
]

Weight = Union[torch.Tensor, NF4Weight]


def base_weight(weight: Weight, dtype: torch.dtype, scratch: bool = False) -> torch.Tensor:
    """The dense ``(out, in)`` base weight in ``dtype`` (dequantised when NF4).

    An NF4 weight on CPU is dequantised by bitsandbytes' own CPU kernel (C++, tens of times faster than
    the tensor code of :meth:`NF4Weight.dequantize`) where that kernel computes exactly the same values:
    fp32 / fp16 / bf16 output and every absmax block inside one row (``in_features % blocksize == 0``;
    bitsandbytes' CPU kernel indexes blocks per row and is wrong otherwise, e.g. blocksize > in_features).
    Everything else, float64 (the tests' oracle) included, is :meth:`NF4Weight.dequantize`. ``scratch``: the
    caller consumes the result before the next NF4 weight is dequantised and never keeps it, so the CPU kernel
    may write into the thread's reusable buffer (:func:`~fastpeft.nf4.dequant_buffer`) instead of allocating:
    a 4-MB allocation per call costs as much as a quarter of an M = 1 layer call."""
    if isinstance(weight, NF4Weight):
        if _bnb_cpu_dequantizes(weight, dtype):
            absmax = _bnb_cpu_absmax(weight)
            dense = _bnb_cpu_dequantize_into_buffer(weight, absmax, dtype) if scratch else None
            if dense is not None:
                return dense
            # fp32 out, then one cast: NF4Weight.dequantize's order of arithmetic
            dense = torch.ops.bitsandbytes.dequantize_4bit.default(
                weight.packed, absmax, weight.blocksize, "nf4", list(weight.shape), torch.float32)
            return dense if dtype == torch.float32 else dense.to(dtype)
        return weight.dequantize(dtype)
    return weight if weight.dtype == dtype else weight.to(dtype)


@functools.lru_cache(maxsize=None)
def _bnb_cpu_function(name: str):
    """The C function ``name`` of bitsandbytes' native library (a ctypes function), or None where bitsandbytes
    or that function is missing. Called directly, it skips the ``torch.ops`` dispatch of bitsandbytes' CPU ops
    (tens of microseconds a call: a tenth of a decode step's small layer). bitsandbytes' own handle
    (``cextension.lib``) answers a missing name with a stub that raises when called; ``_lib`` is the plain
    ctypes library, which answers None here."""
    try:
        from bitsandbytes.cextension import lib
    except (ImportError, RuntimeError):
        return None
    return getattr(getattr(lib, "_lib", None), name, None)


def _bnb_cpu_absmax(weight: NF4Weight) -> torch.Tensor:
    """The fp32 per-block absmax of a CPU NF4 weight (contiguous), by bitsandbytes' C++ where double-quantised:
    ``code2[q] * absmax2`` there, then ``+ offset`` (the arithmetic of :meth:`NF4Weight.absmax_fp32`)."""
    if not weight.is_nested:
        return weight.absmax.float().contiguous()
    # locals keep any converted copy alive through the C call (a pointer does not)
    codes, code2, absmax2 = (weight.absmax.contiguous(), weight.nested_code.contiguous(),
                             weight.nested_absmax.float().contiguous())
    kernel = _bnb_cpu_function("cdequantize_blockwise_cpu_fp32")
    if kernel is None:
        import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes)

        absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(codes, absmax2, code2, NESTED_BLOCKSIZE,
                                                                     torch.float32)
    else:
        absmax = torch.empty(codes.shape, dtype=torch.float32)
        kernel(_ptr(code2), _ptr(codes), _ptr(absmax2), _ptr(absmax), ctypes.c_longlong(NESTED_BLOCKSIZE),
               ctypes.c_longlong(codes.numel()))
    return absmax.add_(weight.nested_offset)


def _ptr(tensor: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(tensor.data_ptr())


def _bnb_cpu_dequantize_into_buffer(weight: NF4Weight, absmax: torch.Tensor, dtype: torch.dtype):
    """Run the C++ function behind bitsandbytes' CPU ``dequantize_4bit`` (NF4, fp32 / bf16 / fp16: fp32
    products rounded once, the values of fp32-then-cast) into the thread's reusable buffer of ``dtype`` and
    return it (the op itself has no CPU ``out=`` variant); None, nothing written, where that function is
    missing (another bitsandbytes build) or would not be the one the op runs (blocksize >= 2048 and odd
    widths take fallbacks there)."""
    rows, cols = weight.shape
    if weight.blocksize >= 2048 or cols % 2:
        return None
    kernel = _bnb_cpu_function(_NF4_CPU_DEQUANTIZERS[dtype])
    if kernel is None:
        return None
    out = dequant_buffer(weight, dtype)
    kernel(_ptr(weight.packed), _ptr(absmax), _ptr(out), ctypes.c_longlong(weight.blocksize),
           ctypes.c_longlong(rows), ctypes.c_longlong(cols))
    return out


_NF4_CPU_DEQUANTIZERS = {torch.float32: "cdequantize_blockwise_cpu_nf4_fp32",
                         torch.bfloat16: "cdequantize_blockwise_cpu_nf4_bf16",
                         torch.float16: "cdequantize_blockwise_cpu_nf4_fp16"}


def _bnb_cpu_dequantizes(weight: NF4Weight, dtype: torch.dtype) -> bool:
    """Whether bitsandbytes' CPU 4-bit dequantiser gives exactly ``weight.dequantize(dtype)`` here."""
    return (weight.device.type == "cpu" and dtype in _NF4_CPU_DEQUANTIZERS
            and weight.in_features % weight.blocksize == 0 and _bnb_importable())


@functools.lru_cache(maxsize=None)
def _bnb_importable() -> bool:
    try:
        import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes)
    except ImportError:
        return False
    return True


def lora_linear(
    x: torch.Tensor,
    weight: Weight,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    x_dropped: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """LoRA / QLoRA: ``y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ``; returns ``(..., out)`` in ``x.dtype``. As PEFT,
    the LoRA branch runs in ``lora_a``'s dtype (fp32 adapters on a bf16 model), the sum in the promoted one."""
    x_lora = (x if x_dropped is None else x_dropped).to(lora_a.dtype)
    base = F.linear(x, base_weight(weight, x.dtype), bias)
    return (base + scaling * F.linear(F.linear(x_lora, lora_a), lora_b)).to(x.dtype)


def dora_weight_norm(
    weight: Weight, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, dtype: Optional[torch.dtype] = None,
    scratch: bool = False,
) -> torch.Tensor:
    """DoRA's per-output-row norm ``‖W + s·B A‖₂`` as ``(out,)``, detached (no gradient flows through it,
    as in PEFT and the DoRA paper §4.3). Computed in ``dtype`` (default: ``lora_a.dtype``) over the base as
    PEFT's DoRA reads it (:func:`dora_base_weight`: an NF4 base rounded to its stored dtype first).

    ``scratch`` (the CPU path): in fp32, ``W + s·B A`` is one ``addmm`` into the thread's reusable buffer
    (:func:`~fastpeft.nf4.dequant_buffer`, where an NF4 base is dequantised anyway) instead of three fresh
    ``(out, in)`` tensors: half the time of a small layer's norm. The same direct form, the product's sum
    rounded to fp32 before the scaled add (it may be fused into one rounding: a last-bit difference). Half
    precision keeps PEFT's three roundings."""
    dtype = lora_a.dtype if dtype is None else dtype
    with torch.no_grad():
        if scratch and dtype == torch.float32:
            # the weight into the buffer (the weight is the caller's): an NF4 one dequantised there where its
            # stored dtype is fp32, else dequantised (into its own dtype's buffer) and copied
            stored = base_weight(weight, weight.dtype, scratch=True) if isinstance(weight, NF4Weight) else weight
            merged = (stored if stored.dtype == dtype and stored is not weight
                      else dequant_buffer(weight, dtype).copy_(stored))
            merged.addmm_(lora_b.to(dtype), lora_a.to(dtype), alpha=scaling)
        else:
            merged = dora_base_weight(weight, dtype) + scaling * (lora_b.to(dtype) @ lora_a.to(dtype))
        return torch.linalg.vector_norm(merged, ord=2, dim=1)


def dora_base_weight(weight: Weight, dtype: torch.dtype) -> torch.Tensor:
    """The dense base in ``dtype`` as PEFT's DoRA reads it for its norm and, with dropout, for ``x' Wᵀ``
    (``dequantize_module_weight(base).to(dtype)``): bitsandbytes dequantises an NF4 base to its stored dtype,
    so that rounding comes first (a bf16-stored base under fp32 adapters is bf16 values widened)."""
    if isinstance(weight, NF4Weight):
        return base_weight(weight, weight.dtype).to(dtype)
    return base_weight(weight, dtype)


def dora_linear(
    x: torch.Tensor,
    weight: Weight,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    magnitude: torch.Tensor,
    x_dropped: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """DoRA with PEFT's exact semantics; ``magnitude`` is ``(out,)``.

    ``y = x Wᵀ + b + (m/n − 1) ⊙ (x' Wᵀ) + (m/n) ⊙ s·(x' Aᵀ) Bᵀ`` with ``x' = drop(x)`` (or ``x``),
    ``n = ‖W + s·B A‖₂`` per output row, detached; in PEFT's order: the base output first, ``x Wᵀ`` without
    dropout taken from it (``base − b``), DoRA's term added last.
    """
    adapter_dtype = lora_a.dtype  # as PEFT: the adapter part in the adapter's dtype, one cast at the end
    x_lora = (x if x_dropped is None else x_dropped).to(adapter_dtype)
    norm = dora_weight_norm(weight, lora_a, lora_b, scaling, dtype=torch.promote_types(adapter_dtype, magnitude.dtype))
    mag_norm_scale = magnitude / norm
    base = F.linear(x, base_weight(weight, x.dtype), None if bias is None else bias.to(x.dtype))
    if x_dropped is None:  # PEFT reuses the base layer's output
        base_result = base if bias is None else base - bias
    else:
        base_result = F.linear(x_lora, dora_base_weight(weight, adapter_dtype))
    lora = F.linear(F.linear(x_lora, lora_a), lora_b)
    # PEFT's order, (c · lora) · s: where an entry overflows or meets 0 · inf depends on it
    return (base + ((mag_norm_scale - 1) * base_result + mag_norm_scale * lora * scaling)).to(x.dtype)


def ia3_linear(
    x: torch.Tensor,
    weight: Weight,
    bias: Optional[torch.Tensor],
    ia3_scale: torch.Tensor,
    is_feedforward: bool,
) -> torch.Tensor:
    """IA3. ``is_feedforward``: ``y = (x ⊙ l) Wᵀ + b`` with ``l`` ``(in,)``; otherwise
    ``y = (x Wᵀ + b) ⊙ l`` with ``l`` ``(out,)`` (PEFT's rule: the bias is scaled too)."""
    w = base_weight(weight, x.dtype)
    if is_feedforward:
        return F.linear(x * ia3_scale, w, bias)
    return F.linear(x, w, bias) * ia3_scale


def multi_lora_linear(
    x: torch.Tensor,
    weight: Weight,
    bias: Optional[torch.Tensor],
    lora_as: Sequence[torch.Tensor],
    lora_bs: Sequence[torch.Tensor],
    scalings: Sequence[float],
    adapter_ids: torch.Tensor,
) -> torch.Tensor:
    """Multi-LoRA over one base: token ``t`` uses adapter ``k = adapter_ids[t]`` (``-1``: base only).

    ``x`` is ``(..., in)`` and ``adapter_ids`` int ``x.shape[:-1]`` (one id per token). Adapter ``k`` has
    ``lora_as[k]`` ``(r_k, in)``, ``lora_bs[k]`` ``(out, r_k)`` and ``scalings[k]``; ranks may differ. As
    PEFT, each term is computed in its adapter's dtype (fp32 adapters on a bf16 model), then cast to ``x``'s.
    """
    if not (len(lora_as) == len(lora_bs) == len(scalings)):
        raise ValueError(f"got {len(lora_as)} lora_as, {len(lora_bs)} lora_bs, {len(scalings)} scalings")
    if adapter_ids.shape != x.shape[:-1]:
        raise ValueError(f"adapter_ids shape {tuple(adapter_ids.shape)} must be x.shape[:-1] = {tuple(x.shape[:-1])}")
    n = len(lora_as)
    if adapter_ids.numel() and (int(adapter_ids.min()) < -1 or int(adapter_ids.max()) >= n):
        raise ValueError(f"adapter ids must be in [-1, {n - 1}], got range [{int(adapter_ids.min())}, {int(adapter_ids.max())}]")
    y = F.linear(x, base_weight(weight, x.dtype), bias)
    for k in range(n):
        rows = adapter_ids == k
        if rows.any():
            delta = scalings[k] * F.linear(F.linear(x.to(lora_as[k].dtype), lora_as[k]), lora_bs[k])
            y = torch.where(rows.unsqueeze(-1), y + delta.to(y.dtype), y)
    return y


def multi_lora_delta(
    x: torch.Tensor,
    lora_as: Sequence[torch.Tensor],
    lora_bs: Sequence[torch.Tensor],
    scalings: Sequence[float],
    adapter_ids: torch.Tensor,
    adapter_weights: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The LoRA part of a multi-LoRA layer with weighted combinations: ``(..., out)`` in ``x.dtype``,
    ``Σ_j w[t, j] · s_k · (x[t] A_kᵀ) B_kᵀ`` with ``k = adapter_ids[t, j]`` (``-1``: empty slot), each
    adapter's term computed in its own dtype (``x`` cast to it, as PEFT does) and cast to ``x.dtype``.

    ``adapter_ids`` is int ``x.shape[:-1] + (S,)`` (S slots per token) and ``adapter_weights`` float
    of the same shape (None: all 1). With ``S = 1`` and no weights, ``multi_lora_linear`` is
    ``F.linear(x, W, b) + multi_lora_delta(x, ..., adapter_ids[..., None])``. ``out``: a 2-D ``(M, out)``
    tensor (``x`` then 2-D too) the terms are added to in place and which is returned, instead of a new
    zero tensor (the inference path: no temporary, no extra pass).
    """
    if adapter_ids.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"adapter_ids shape {tuple(adapter_ids.shape)} must be x.shape[:-1] + (slots,)")
    if adapter_weights is None:
        adapter_weights = torch.ones(adapter_ids.shape, dtype=x.dtype, device=x.device)
    n = len(lora_as)
    if adapter_ids.numel() and (int(adapter_ids.min()) < -1 or int(adapter_ids.max()) >= n):
        raise ValueError(f"adapter ids must be in [-1, {n - 1}], got range [{int(adapter_ids.min())}, {int(adapter_ids.max())}]")
    out_features = lora_bs[0].shape[0] if n else 0
    x2d = x.reshape(-1, x.shape[-1])
    ids = adapter_ids.reshape(x2d.shape[0], adapter_ids.shape[-1])  # not -1: M may be 0
    weights = adapter_weights.reshape(ids.shape).to(x.dtype)
    if out is not None and (x.dim() != 2 or tuple(out.shape) != (x.shape[0], out_features)):
        raise ValueError(f"out needs a 2-D x (M, in) and is (M, {out_features}); got x {tuple(x.shape)}, out "
                         f"{tuple(out.shape)}")
    delta = x.new_zeros(x2d.shape[0], out_features) if out is None else out
    for k in torch.unique(ids[ids >= 0]).tolist():  # only the adapters the batch names
        # per token, the summed weight of every slot naming adapter k; only those tokens are computed
        weight_k = torch.where(ids == k, weights, 0).sum(-1)
        rows = weight_k.nonzero().squeeze(1)
        x_k = x2d.index_select(0, rows).to(lora_as[k].dtype)
        lora = scalings[k] * F.linear(F.linear(x_k, lora_as[k]), lora_bs[k])
        delta.index_add_(0, rows, (weight_k[rows].unsqueeze(-1).to(lora.dtype) * lora).to(delta.dtype))
    return delta if out is not None else delta.view(*x.shape[:-1], out_features)


# --- DiffPruning: a stored sparse delta -----------------------------------------------------------------------


def sparse_delta_linear(
    x: torch.Tensor,
    weight: Weight,
    bias: Optional[torch.Tensor],
    delta_dense: torch.Tensor,
) -> torch.Tensor:
    """DiffPruning's served layer ``y = x Wᵀ + b + x δᵀ`` as ``(..., out)`` in ``x.dtype``; ``delta_dense`` is the
    dense ``(out, in)`` ``δ`` (``SparseDelta.to_dense()``, zeros off its pattern). The base product runs in
    ``x.dtype`` (``b`` cast to it); ``x δᵀ`` in the promoted dtype of ``x`` and ``δ``, the sum formed there and
    cast once to ``x.dtype``. Differentiable in ``x``, ``b`` and ``δ``."""
    base = F.linear(x, base_weight(weight, x.dtype), None if bias is None else bias.to(x.dtype))
    term_dtype = torch.promote_types(x.dtype, delta_dense.dtype)
    return (base + F.linear(x.to(term_dtype), delta_dense.to(term_dtype))).to(x.dtype)


def multi_sparse_delta_linear(
    x: torch.Tensor,
    weight: Weight,
    bias: Optional[torch.Tensor],
    deltas_dense: Sequence[torch.Tensor],
    delta_ids: torch.Tensor,
) -> torch.Tensor:
    """Several DiffPruning deltas over one base, one per token: token ``t`` uses ``δ_k``, ``k = delta_ids[t]``
    (``-1``: the base alone). ``x`` ``(..., in)``, ``delta_ids`` int ``x.shape[:-1]``, ``deltas_dense[k]`` the dense
    ``(out, in)`` ``δ_k``; each token's row is :func:`sparse_delta_linear` with its own delta."""
    if delta_ids.shape != x.shape[:-1]:
        raise ValueError(f"delta_ids shape {tuple(delta_ids.shape)} must be x.shape[:-1] = {tuple(x.shape[:-1])}")
    n = len(deltas_dense)
    if delta_ids.numel() and (int(delta_ids.min()) < -1 or int(delta_ids.max()) >= n):
        raise ValueError(f"delta ids must be in [-1, {n - 1}], got range [{int(delta_ids.min())}, {int(delta_ids.max())}]")
    y = F.linear(x, base_weight(weight, x.dtype), None if bias is None else bias.to(x.dtype))
    for k in range(n):
        rows = (delta_ids == k).unsqueeze(-1)
        if rows.any():
            y = torch.where(rows, sparse_delta_linear(x, weight, bias, deltas_dense[k]), y)
    return y


# ---------------------------------------------------------------------------------------------- DiffPruning: training
# Hard-concrete gates (Louizos, Welling, Kingma 2018) as DiffPruning uses them (Guo, Rush, Kim 2021): a gate
# ``z ∈ [0, 1]`` per diff entry with log-odds ``log_alpha``, temperature ``beta`` and stretch interval
# ``(gamma, zeta)``, ``gamma < 0 < 1 < zeta``; then magnitude projection of the trained diff to a target density.

__all__ += ["hard_concrete_sample", "hard_concrete_eval", "expected_l0", "projection_count", "magnitude_projection"]


def hard_concrete_sample(log_alpha: torch.Tensor, u: torch.Tensor, beta: float, gamma: float,
                         zeta: float) -> torch.Tensor:
    """The training gate for uniform noise ``u`` (same shape as ``log_alpha``, values in ``(0, 1)``):
    ``s = σ((log u − log(1 − u) + log_alpha) / beta)``, ``z = min(1, max(0, s (zeta − gamma) + gamma))``."""
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / beta)
    return torch.clamp(s * (zeta - gamma) + gamma, 0.0, 1.0)


def hard_concrete_eval(log_alpha: torch.Tensor, gamma: float, zeta: float) -> torch.Tensor:
    """The deterministic (evaluation) gate: ``min(1, max(0, σ(log_alpha) (zeta − gamma) + gamma))``."""
    return torch.clamp(torch.sigmoid(log_alpha) * (zeta - gamma) + gamma, 0.0, 1.0)


def expected_l0(log_alpha: torch.Tensor, beta: float, gamma: float, zeta: float,
                group_log_alpha: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The expected number of nonzero gates, a 0-d tensor: ``Σ σ(log_alpha − beta · log(−gamma / zeta))``, the
    probability of each gate being nonzero summed. With ``group_log_alpha`` (broadcastable to ``log_alpha``: each
    entry's group gate, structured DiffPruning) an entry is nonzero when both its gate and its group's are, and
    the sum is of the products of the two probabilities."""
    shift = beta * math.log(-gamma / zeta)
    nonzero = torch.sigmoid(log_alpha - shift)
    if group_log_alpha is not None:
        nonzero = nonzero * torch.sigmoid(group_log_alpha - shift)
    return nonzero.sum()


def projection_count(numel: int, sparsity: float) -> int:
    """How many of ``numel`` diff entries a projection to ``sparsity`` keeps: ``sparsity · numel`` rounded to the
    nearest integer, halves up, and at least 1. ``sparsity`` is the paper's target sparsity rate, the fraction of
    the diff's entries that stay nonzero, in ``(0, 1]`` (0.005: 0.5 % of the entries)."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 < sparsity <= 1.0:
        raise ValueError(f"sparsity must be a number in (0, 1] (the fraction of diff entries kept), got {sparsity!r}")
    if numel <= 0:
        raise ValueError(f"nothing to project: the diff has {numel} entries")
    return max(1, min(numel, math.floor(sparsity * numel + 0.5)))


def magnitude_projection(delta: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The boolean mask (``delta``'s shape) of the ``projection_count(delta.numel(), sparsity)`` entries of largest
    ``|delta|``: exactly that many are True. Ties are broken by position, the lower row-major index kept first, so
    the mask is a function of the values alone. NaN entries raise ``ValueError``."""
    count = projection_count(delta.numel(), sparsity)
    flat = delta.detach().reshape(-1)
    if torch.isnan(flat).any():
        raise ValueError("the diff has NaN entries: no magnitude projection of it is defined")
    # a stable descending sort keeps equal magnitudes in index order
    order = torch.sort(flat.abs(), descending=True, stable=True).indices[:count]
    mask = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
    mask[order] = True
    return mask.view(delta.shape)
