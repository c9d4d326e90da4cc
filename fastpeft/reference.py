"""Plain-PyTorch reference of every fastpeft op: the oracle in tests and the CPU path.

Two kinds of function. The device primitives' CPU implementations, registered as the ``cpu`` kernels of the
``torch.library`` ops in ``fastpeft.ops`` (and run on CUDA tensors under ``FASTPEFT_BACKEND=reference``):
:func:`fused_linear`, :func:`nf4_dequantize`, :func:`multi_lora_add_`, and the multi-adapter backward's
:func:`multi_lora_shrink` and :func:`multi_lora_segment_grad`. And the layers' references, PEFT's math
op for op: :func:`lora_linear`, :func:`dora_linear`, :func:`ia3_linear`, :func:`multi_lora_linear`,
:func:`multi_lora_delta`, :func:`dora_weight_norm`.

Each function computes in the dtype of its inputs (tests pass float64 tensors to get the exact
answer); the layer references are differentiable by autograd with respect to every tensor that requires grad. The
base weight is either a dense ``(out, in)`` tensor or an :class:`~fastpeft.nf4.NF4Weight`, which is
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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .nf4 import NESTED_BLOCKSIZE, NF4Weight, dequant_buffer

if TYPE_CHECKING:
    from .bank import LoraBank

__all__ = [
    "base_weight",
    "fused_linear",
    "nf4_dequantize",
    "multi_lora_add_",
    "MultiLoraGrouping",
    "lora_linear",
    "dora_weight_norm",
    "dora_base_weight",
    "dora_linear",
    "ia3_linear",
    "multi_lora_linear",
    "multi_lora_delta",
    "multi_lora_shrink",
    "multi_lora_segment_grad",
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


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without the dispatch when it is a no-op (it costs as much as a small layer's math at M = 1)."""
    return t if t.dtype == dtype else t.to(dtype)


def reduction_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of :func:`fused_linear`'s row reduction: fp32 accumulation, or fp64 for fp64 inputs (an fp32 sum
    would lose what the caller asked fp64 for)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def fused_linear(
    a: torch.Tensor,
    weight: Weight,
    transpose_weight: bool = False,
    in_scale: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    scale_bias: bool = False,
    lora_h: Optional[torch.Tensor] = None,
    lora_expand: Optional[torch.Tensor] = None,
    scaling: float = 1.0,
    col_scale: Optional[torch.Tensor] = None,
    reduce_rows: Optional[torch.Tensor] = None,
    store_out: bool = True,
    out_dtype: Optional[torch.dtype] = None,
) -> tuple:
    """The ``fastpeft::fused_linear`` primitive: ``(out, reduced)`` with

        z       = (a ⊙ in_scale) · op(W) + s · lora_h · lora_expand   (+ bias when ``scale_bias``)
        out     = col_scale ⊙ z                                        (+ bias when not ``scale_bias``)
        reduced = Σ_m reduce_rows ⊙ z

    ``a`` ``(M, K)``; ``op(W)`` is ``Wᵀ`` (``K = in``, ``N = out``) or ``W`` with ``transpose_weight``; ``in_scale``
    ``(K,)``; ``bias``, ``col_scale`` ``(N,)``; ``lora_h`` ``(M, r)`` with ``lora_expand`` ``(r, N)``;
    ``reduce_rows`` ``(M, N)``. ``out`` ``(M, N)`` in ``a.dtype`` (or ``out_dtype``: float32 keeps the accumulator
    unrounded), None unless ``store_out``; ``reduced`` ``(N,)`` in :func:`reduction_dtype`, None without
    ``reduce_rows``. The adapter tensors (``lora_h`` / ``lora_expand``, ``col_scale``) may be wider than ``a``
    (fp32 adapters on a bf16 model): their terms are formed in their dtype and the sum rounded once.

    Roundings, as PEFT's layers round: the bias joins the product (``F.linear(a, W, b)``, ``nn.Linear``'s and
    bitsandbytes' one rounding) unless a column scale lies between them (``col_scale`` without ``scale_bias``); the
    input scale is ``a ⊙ in_scale`` in the promoted dtype rounded to ``a.dtype`` (PEFT's IA3 ``x ⊙ l``); the LoRA
    term is added by ``addmm_(alpha=s)`` into a dense base's product of ``a.dtype`` (BLAS with ``beta = 1``), as
    PEFT's ``base + (h Bᵀ) · s`` (two roundings, then the sum) otherwise (an NF4 base, whose dequantised product is
    bitsandbytes' own, or a wider adapter dtype); then ``⊙ col_scale``, ``+ bias``, one cast to ``a.dtype``.

    Where autograd records none of this (the op's kernel, inference), an NF4 base is dequantised into the thread's
    reusable buffer and the column scale is applied in place: the same values, no ``(M, N)`` temporary. Called
    directly under autograd, autograd differentiates these torch ops."""
    nf4 = isinstance(weight, NF4Weight)
    # only the reusable buffer and the in-place scale depend on it: not asked for a dense product without a scale
    recording = (nf4 or col_scale is not None) and torch.is_grad_enabled() and (
        a.requires_grad or (bias is not None and bias.requires_grad)
        or (col_scale is not None and col_scale.requires_grad)
        or (in_scale is not None and in_scale.requires_grad) or (lora_h is not None and lora_h.requires_grad)
        or (lora_expand is not None and lora_expand.requires_grad)
        or (reduce_rows is not None and reduce_rows.requires_grad))
    w = base_weight(weight, a.dtype, scratch=not recording)
    if out_dtype is not None and out_dtype != a.dtype:
        # the products of a's values kept in out_dtype's (fp32) accumulator: W rounded to a's dtype first
        a, w = a.to(out_dtype), w.to(out_dtype)
    if in_scale is not None:
        a = _cast(a * in_scale, a.dtype)
    inner_bias = bias if scale_bias or col_scale is None else None
    if transpose_weight:
        z = a @ w if inner_bias is None else torch.addmm(inner_bias, a, w)
    else:
        z = F.linear(a, w, inner_bias)
    if lora_h is not None:
        if nf4 or lora_h.dtype != a.dtype:
            z = z + (lora_h @ lora_expand) * scaling
        else:
            z = z.addmm_(lora_h, lora_expand, alpha=scaling)
    reduced = None
    if reduce_rows is not None:
        acc = reduction_dtype(a.dtype)
        reduced = (reduce_rows.to(acc) * z.to(acc)).sum(0)
    if not store_out:
        return None, reduced
    out = z
    if col_scale is not None:
        in_place = not recording and reduce_rows is None and col_scale.dtype == z.dtype and z.dtype == a.dtype
        out = z.mul_(col_scale) if in_place else z * col_scale
        if not scale_bias and bias is not None:
            out = out + bias
    return _cast(out, a.dtype), reduced


def nf4_dequantize(weight: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    """The ``fastpeft::nf4_dequantize`` primitive: the dense ``(out, in)`` weight in ``dtype``, a tensor of its
    own, bit-exact with bitsandbytes' ``dequantize_4bit`` (:func:`base_weight`)."""
    return base_weight(weight, dtype)


# Multi-LoRA's CPU grouping: gather each row's adapter factors and bmm (instead of one matmul pair per adapter) when
# the batch has at most this many rows per adapter it names (the gathered copies then stay within that multiple of
# the used adapters' own size). CPU, tiny Llama (python -m bench.check_cpu --cases multi_lora_decode): 16 adapters
# over 16 rows, decode and prefill, ~2-5x faster than the loop.
GATHER_MAX_ROWS_PER_ADAPTER = 4


@dataclass(frozen=True)
class MultiLoraGrouping:
    """How :func:`multi_lora_add_` groups a batch's tokens by adapter (host-side, built once per batch layout).

    ``groups``: per adapter ``k`` the batch names, ``(k, rows, weights)``: ``rows`` the tokens using it
    (None for every token, a ``slice`` when contiguous, else int64 indices, ascending), ``weights`` fp32 ``(n, 1)``
    summed over the token's slots naming ``k``, or None when all are 1. ``gather``: for the batched path (one slot,
    the tokens in rows of ``T`` consecutive tokens that share an adapter, few rows per adapter)
    ``(T, rows, ids, weights, key)``: ``rows`` int64 of the rows with an adapter (None: every row), ``ids``
    int64 their adapter, ``weights`` fp32 ``(n,)`` or None; else None."""

    groups: tuple
    gather: Optional[tuple]
    # per layer and row layout (keyed by the bank's lora_a, held so its id stays its own, and the rows' adapters):
    # the gathered, transposed factors and per-row coefficients of the batched path, built at the first call
    # and reused by the next ones; shared by the groupings of one batch (prefill and decode steps)
    gathered: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def build(cls, slot_ids: torch.Tensor, slot_weights: torch.Tensor,
              gathered: Optional[dict] = None) -> "MultiLoraGrouping":
        """From ``slot_ids`` int ``(M, S)`` (``-1``: empty slot) and fp32 ``slot_weights`` ``(M, S)``; ``gathered``:
        the dict of gathered factors to share (a new one when None)."""
        ids = slot_ids.long()
        groups = []
        for k in torch.unique(ids[ids >= 0]).tolist():
            weight_k = torch.where(ids == k, slot_weights, 0).sum(-1)
            rows = weight_k.nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            weights = weight_k[rows]
            weights = None if bool((weights == 1).all()) else weights[:, None]
            start, n = int(rows[0]), rows.numel()
            if n == ids.shape[0]:
                rows = None  # every token (decode with one adapter): no slicing at each layer call
            elif int(rows[-1]) - start + 1 == n:
                rows = slice(start, start + n)
            groups.append((k, rows, weights))
        return cls(tuple(groups), _gather_rows(ids, slot_weights, len(groups)), {} if gathered is None else gathered)


def _gather_rows(ids: torch.Tensor, slot_weights: torch.Tensor, n_adapters: int) -> Optional[tuple]:
    """``MultiLoraGrouping.gather`` for int64 ``ids`` ``(M, S)`` (with the rows' adapters and weights appended as a
    hashable key of the gathered factors), or None. ``T`` is the gcd of the lengths of the
    runs of equal (adapter, weight) in token order: every block of ``T`` tokens then lies inside one run
    (a prefill row's tokens share its adapter; decode has ``T = 1``)."""
    if ids.shape[1] != 1 or n_adapters < 2:
        return None
    ids, weights = ids[:, 0], slot_weights[:, 0]
    change = ((ids[1:] != ids[:-1]) | (weights[1:] != weights[:-1])).nonzero().squeeze(1) + 1
    bounds = [0, *change.tolist(), ids.shape[0]]
    tokens_per_row = math.gcd(*(b - a for a, b in zip(bounds[:-1], bounds[1:])))
    ids, weights = ids[::tokens_per_row], weights[::tokens_per_row]
    if ids.shape[0] > GATHER_MAX_ROWS_PER_ADAPTER * n_adapters:
        return None
    rows = ((ids >= 0) & (weights != 0)).nonzero().squeeze(1)
    weights = weights[rows]
    key = (tuple(ids.tolist()), tuple(weights.tolist()))
    return (tokens_per_row, None if rows.numel() == ids.shape[0] else rows, ids[rows],
            None if bool((weights == 1).all()) else weights, key)


def multi_lora_add_(y: torch.Tensor, x: torch.Tensor, bank: "LoraBank", slot_ids: torch.Tensor,
                    slot_weights: torch.Tensor, grouping: Optional[MultiLoraGrouping] = None) -> torch.Tensor:
    """The ``fastpeft::multi_lora_add_`` primitive: ``y += Σ_j w[:, j] · s_k · (x A_kᵀ) B_kᵀ`` per token in place,
    ``k = slot_ids[t, j]`` (``-1``: empty slot), ``w = slot_weights``, for ``x`` ``(M, in)``, ``y`` ``(M, out)``
    and the adapters of ``bank`` (a :class:`~fastpeft.bank.LoraBank`); returns ``y``. The per-token math of
    :func:`multi_lora_delta`, grouped by adapter as ``grouping`` (:class:`MultiLoraGrouping` of ``slot_ids`` and
    ``slot_weights``, built here when None) says: the tokens of each adapter as a slice when they are contiguous
    (prefill: a row's tokens are), so the LoRA term is one in-place ``addmm_`` on a view; and, when the batch's rows
    are spread over many adapters with a single slot each (decode steps, and prefill of rows with distinct
    adapters), one batched pair of ``bmm`` over per-row gathered adapter factors (gathered once per batch and
    layer, reused by every step) instead of a loop over adapters. Reads only each adapter's own ``ranks[k]``
    columns of the zero-padded bank (padding is never read, so never turns inf into NaN).

    A bank in another dtype than ``y`` (fp32 adapters on a bf16 / fp16 model) is used as PEFT's
    ``_mixed_batch_forward`` uses it: ``x`` cast to the bank's dtype, ``(x Aᵀ) Bᵀ · s`` in that dtype, the
    term cast to ``y``'s dtype, then added. So is a bank whose scalings do not fuse (``bank.scalings_fuse``:
    NaN, inf, 0, fp16 factors): ``s`` after the product, never folded into ``B`` or a BLAS alpha."""
    if grouping is None:
        grouping = MultiLoraGrouping.build(slot_ids, slot_weights)
    lora_a, lora_b, ranks = bank.lora_a, bank.lora_b, bank.rank_list
    cast = lora_a.dtype != y.dtype
    peft_order = cast or not bank.scalings_fuse
    used_ranks = {ranks[k] for k, _, _ in grouping.groups}
    if grouping.gather is not None and len(used_ranks) == 1:
        rank = used_ranks.pop()
        if rank == 0:
            return y
        tokens_per_row, rows, ids, weights, key = grouping.gather
        key = (id(lora_a), peft_order, key)
        cached = grouping.gathered.get(key)
        if cached is None or cached[0] is not lora_a:
            # (n, in, r) and (n, r, out), contiguous: bmm of one-row matrices runs an order of magnitude faster
            # in this orientation than as (r, in) @ (in, 1) on CPU; the row's s_k · w folded into its B once
            # (kept apart in fp32, applied after the product as PEFT does, in PEFT's order: the fp32 product of a
            # half-precision term rounded once is PEFT's half-precision multiply by a Python float)
            a_t = lora_a.index_select(0, ids)[:, :rank].transpose(1, 2).contiguous()
            coef = bank.scalings.index_select(0, ids)
            coef = (coef if weights is None else coef * weights).view(-1, 1, 1)
            b_t = lora_b.index_select(0, ids)[:, :, :rank].transpose(1, 2).contiguous()
            cached = grouping.gathered[key] = ((lora_a, a_t, b_t, coef) if peft_order
                                               else (lora_a, a_t, b_t.mul_(coef.to(lora_b.dtype)), None))
        _, a_t, b_t, coef = cached
        x_rows = x.view(-1, tokens_per_row, x.shape[-1])  # splitting the token dim: a view at any strides
        y_rows = y.view(-1, tokens_per_row, y.shape[-1])
        if rows is not None:
            x_rows = x_rows.index_select(0, rows)
        if peft_order:
            term = (torch.bmm(torch.bmm(x_rows.to(lora_a.dtype), a_t), b_t) * coef).to(y.dtype)
            if rows is None:
                y_rows.add_(term)
            else:
                y_rows.index_add_(0, rows, term)
        elif rows is None:
            y_rows.baddbmm_(torch.bmm(x_rows, a_t), b_t)
        else:
            y_rows.index_add_(0, rows, torch.bmm(torch.bmm(x_rows, a_t), b_t))
        return y
    for k, rows, weights in grouping.groups:
        if ranks[k] == 0:  # the adapter does not touch this layer
            continue
        a_t, b_t, scaling = bank.adapter_factors(k)
        scattered = rows is not None and not isinstance(rows, slice)
        x_k = x if rows is None else x.index_select(0, rows) if scattered else x[rows]
        h = (x_k.to(a_t.dtype) if cast else x_k) @ a_t
        if weights is not None:
            h = h * weights.to(h.dtype)
        y_k = y if rows is None or scattered else y[rows]
        if peft_order:
            term = ((h @ b_t) * scaling).to(y.dtype)
            if scattered:
                y.index_add_(0, rows, term)
            else:
                y_k.add_(term)
        elif scattered:
            y.index_add_(0, rows, h @ b_t, alpha=scaling)
        else:
            y_k.addmm_(h, b_t, alpha=scaling)
    return y


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


# ---------------------------------------------------------------------------------------------------------------------
# Multi-adapter training: the backward's primitives. Per adapter k over its own tokens (one slot per token, weight w_t):
# h = x A_kᵀ, g = dy B_k (both multi_lora_shrink), dB_k = s_k Σ w_t dy_tᵀ h_t and dA_k = s_k Σ w_t g_tᵀ x_t
# (multi_lora_segment_grad), dx += w_t s_k g_t A_k (multi_lora_add_ over the bank's transposed()).

def _adapter_rows(slot_ids: torch.Tensor) -> list:
    """``[(k, rows)]``: each adapter ``k`` that slot 0 of ``slot_ids`` ``(M, S)`` names, with its tokens (int64,
    ascending)."""
    ids = slot_ids[:, 0].long()
    return [(k, (ids == k).nonzero().squeeze(1)) for k in torch.unique(ids[ids >= 0]).tolist()]


def multi_lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, ranks: Sequence[int],
                      slot_ids: torch.Tensor) -> torch.Tensor:
    """The ``fastpeft::multi_lora_shrink`` primitive: ``h`` ``(M, R)`` in ``lora_a``'s dtype with
    ``h[t, :r_k] = x[t] A_k[:r_k]ᵀ`` for ``k = slot_ids[t, 0]``, zeros in the other columns and in rows without an
    adapter (``-1``). ``x`` ``(M, in)``, ``lora_a`` ``(N, R, in)`` (any strides: a transposed bank's ``B_kᵀ`` too),
    ``ranks`` the N ranks. Unscaled (no ``s_k``, no slot weight): the backward applies both where it consumes ``h``.
    ``x`` is cast to the bank's dtype first (PEFT's ``lora_A(x.to(lora_A.weight.dtype))``). Only each adapter's own
    ``ranks[k]`` rows of ``lora_a`` are read."""
    ranks = ranks.tolist() if isinstance(ranks, torch.Tensor) else list(ranks)
    h = torch.zeros(x.shape[0], lora_a.shape[1], dtype=lora_a.dtype, device=x.device)
    for k, rows in _adapter_rows(slot_ids):
        rank = ranks[k]
        if rank:
            h[rows, :rank] = _cast(x.index_select(0, rows), lora_a.dtype) @ lora_a[k, :rank].t()
    return h


MULTI_LORA_GRADS = ("lora_a", "lora_b")


def multi_lora_segment_grad(left: torch.Tensor, right: torch.Tensor, ranks: Sequence[int], scalings: torch.Tensor,
                            slot_ids: torch.Tensor, slot_weights: torch.Tensor, which: str) -> torch.Tensor:
    """The ``fastpeft::multi_lora_segment_grad`` primitive: ``out[k] = s_k · Σ_{t: slot_ids[t, 0] = k} w_t ·
    left[t]ᵀ right[t]`` for ``left`` ``(M, P)``, ``right`` ``(M, Q)``, ``w = slot_weights[:, 0]``: ``(N, P, Q)``
    (``N = len(ranks)``) in the promoted dtype of ``left`` and ``right``, accumulated in fp32 (fp64 for fp64 inputs)
    and rounded once. ``which`` names the factor whose gradient it is, and so the rank axis: ``"lora_b"``
    (``left = dy`` ``(M, out)``, ``right = h`` ``(M, R)``: ``dB``, the rank on Q) or ``"lora_a"`` (``left = g``
    ``(M, R)``, ``right = x`` ``(M, in)``: ``dA``, the rank on P). Entries at or beyond an adapter's rank, and
    adapters without tokens, are exact zeros; the rank operand's columns beyond ``ranks[k]`` are never read."""
    if which not in MULTI_LORA_GRADS:
        raise ValueError(f"which must be one of {MULTI_LORA_GRADS}, got {which!r}")
    ranks = ranks.tolist() if isinstance(ranks, torch.Tensor) else list(ranks)
    dtype = torch.promote_types(left.dtype, right.dtype)
    compute = reduction_dtype(dtype)
    out = torch.zeros(len(ranks), left.shape[1], right.shape[1], dtype=dtype, device=left.device)
    weights = slot_weights[:, 0]
    for k, rows in _adapter_rows(slot_ids):
        rank = ranks[k]
        if rank == 0:
            continue
        left_k = left.index_select(0, rows).to(compute) * weights.index_select(0, rows).to(compute)[:, None]
        right_k = right.index_select(0, rows).to(compute)
        if which == "lora_a":
            out[k, :rank] = (left_k[:, :rank].t() @ right_k * float(scalings[k])).to(dtype)
        else:
            out[k, :, :rank] = (left_k.t() @ right_k[:, :rank] * float(scalings[k])).to(dtype)
    return out
