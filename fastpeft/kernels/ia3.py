"""IA3 in Triton: a matmul with an input scale in its prologue, an output scale in its epilogue and an
optional fused reduction over rows, for a dense or packed NF4 weight.

Math (``W`` the ``(out, in)`` base weight, ``op(W)`` ``Wᵀ`` or ``W``)::

    z   = (a ⊙ in_scale) · op(W) + b          a (M, K), in_scale (K,), b (N,)
    out = out_scale ⊙ z                        out_scale (N,)      (STORE_OUT)
    red += Σ_m  reduce_rows[m, :] ⊙ z[m, :]    red (N,) fp32       (HAS_REDUCE, before out_scale)

Every IA3 pass is one launch of this kernel (``l`` the IA3 vector):

- feed-forward forward ``y = (x ⊙ l) Wᵀ + b``: ``in_scale = l``;
- feed-forward backward: ``a = dy``, ``op(W) = W``, ``out_scale = l`` gives ``dx = (dy W) ⊙ l`` and
  ``reduce_rows = x`` gives ``dl = Σ_t x ⊙ (dy W)`` in the same pass;
- output forward ``y = (x Wᵀ + b) ⊙ l``: ``out_scale = l``;
- output backward: ``dx = (dy ⊙ l) W`` is ``a = dy``, ``in_scale = l``; ``dl = Σ_t dy ⊙ (x Wᵀ + b)`` is a
  second launch with ``reduce_rows = dy`` and no output written (``x Wᵀ + b`` is recomputed, never stored).

Design: an NF4 weight is decoded tile by tile with ``fastpeft.kernels.nf4.nf4_tile`` (vector loads of
the packed rows, fp32 values, one cast to the input dtype as ``dequantize_4bit`` does) and never
materialised, except at large ``M`` where the plan dequantises into the reusable buffer and runs cuBLAS
(``fastpeft.kernels.nf4_dispatch``, as for QLoRA); a dense weight is read through its strides (the
element ``(k, n)`` of ``op(W)`` at ``n * stride_wn + k * stride_wk``). The prologue scale is applied in fp32 and
rounded once to the input dtype (as PEFT's ``(x * l).to(dtype)``): to the ``a`` tile over a dense weight, to the
activations before the launch over an NF4 one. The row reduction is accumulated per tile in fp32 and added with
``atomic_add`` into an fp32 ``(N,)`` buffer, so its summation order (not its value) varies from run to run.
fp32 ``tl.dot`` uses ``input_precision="ieee"`` to match PyTorch's fp32 matmul (tf32 would be a GPU
tuning choice to measure, not a default).

Limits: block sizes are not timed on a GPU (``DENSE_CONFIGS`` / ``NF4_CONFIGS`` say where each comes from:
GemLite's table, the static check's registers and loads); no split-K / GEMV variant for decode — tiles of
16 rows waste most of ``tl.dot`` when ``M`` is 1; a dense weight at large ``M`` still runs this kernel (the
IA3 scales would need their own passes around cuBLAS).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..nf4 import NF4Weight, dequant_buffer
from .checks import DTYPES, check_activations, check_vector, product_dims
from .nf4 import (nf4_dequantize, nf4_group_scales, nf4_kernel_args, nf4_layout, nf4_row_nested, nf4_step_tile,
                  nf4_tables, packed_word_aligned)
from .nf4_dispatch import nf4_path
from .plan import LaunchPlan, config_for, device_arch, launch

# Tile, warps, stages per GPU architecture, for a dense and an NF4 weight. BLOCK_K = 64 = the NF4 block;
# BLOCK_M 16 for M <= 16 (tl.dot's minimum), else 32. Source: GemLite's small-M table for the shape, not timed
# on a GPU; large M on NF4 goes to cuBLAS (fastpeft.kernels.nf4_dispatch).
# sm_90: SWAP_AB computes the (BLOCK_N x BLOCK_M) transposed tile, weight rows as the MMA's M (as the NF4
# split-K GEMM does), so a 64-column tile runs on wgmma (64-row warpgroup tiles) at any M; 1 stage keeps
# the registers and shared memory at or below the un-swapped mma.sync tile (check-kernels, sm_90a: 64 regs,
# 13 KB at M = 512). On sm_80 the swap saves nothing (registers up or down by launch), so it stays off.
# NF4: the split-K GEMM's main loop (fastpeft.kernels.nf4_matmul.SPLITK_CONFIGS): 128 weight rows per tile so
# the activation tile loads once per 128 rows, GROUP 4 steps per pass with their absmax loaded once, packed
# rows as 32-bit words in the forward, 1 stage (check-kernels: <= 1 global memory instruction per 16 weight
# elements, <= 128 registers); the transposed products (dx, feed-forward dl) take 2 steps per pass (at 4: 168
# registers on sm_80, 19% occupancy; at 2: 128); 32-token tiles 64 rows, 2 steps (as the split-K GEMM's).
DENSE_CONFIGS = {
    "default": {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP": 1, "num_warps": 4, "num_stages": 2},
    (9, 0): {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP": 1, "num_warps": 4, "num_stages": 1,
             "SWAP_AB": True},
}
_NF4_TILES = {16: {"BLOCK_N": 128, "GROUP_FWD": 4, "GROUP_DX": 2, "WORDS_FWD": True, "WORDS_DX": False},
              32: {"BLOCK_N": 64, "GROUP_FWD": 2, "GROUP_DX": 2, "WORDS_FWD": False, "WORDS_DX": False}}
NF4_CONFIGS = {
    "default": {"TILES": _NF4_TILES, "BLOCK_M": 32, "BLOCK_K": 64, "num_warps": 4, "num_stages": 1},
    # sm_89: ptxas caps the 4-step forward at 96 registers and spills (16 B, row-reduction launches at M = 1)
    (8, 9): {"TILES": {**_NF4_TILES, 16: {**_NF4_TILES[16], "GROUP_FWD": 2}}, "BLOCK_M": 32, "BLOCK_K": 64,
             "num_warps": 4, "num_stages": 1},
    (9, 0): {"TILES": _NF4_TILES, "BLOCK_M": 32, "BLOCK_K": 64, "num_warps": 4, "num_stages": 1, "SWAP_AB": True},
}


@triton.jit
def _ia3_matmul_kernel(
    a_ptr, w_ptr, absmax_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr,
    in_scale_ptr, bias_ptr, out_scale_ptr, reduce_rows_ptr, out_ptr, reduced_ptr,
    nested_offset_ptr, M, N, K, in_features, row_bytes, row_blocks,
    stride_am, stride_ak, stride_wn, stride_wk, stride_rm, stride_rn, stride_om, stride_on,
    IS_NF4: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, EVEN_IN: tl.constexpr,
    ALIGNED: tl.constexpr, GROUPED: tl.constexpr, ROW_NESTED: tl.constexpr, ROW_IN_NESTED: tl.constexpr,
    WORDS: tl.constexpr,
    TRANSPOSE: tl.constexpr, HAS_IN_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_OUT_SCALE: tl.constexpr,
    HAS_REDUCE: tl.constexpr, STORE_OUT: tl.constexpr, SWAP_AB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    n_start = tl.program_id(1) * BLOCK_N
    offs_n = n_start.to(tl.int64) + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    if IS_NF4:
        code, code2, offset = nf4_tables(code_ptr, nested_code_ptr, nested_offset_ptr, NESTED)
    GROUP_K: tl.constexpr = GROUP * BLOCK_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    row_nested = None  # the forward's W rows' nested absmax, loaded once (fastpeft.kernels.nf4.nf4_row_nested)
    if IS_NF4 and NESTED and ROW_IN_NESTED and not TRANSPOSE:
        row_nested = nf4_row_nested(nested_absmax_ptr, offs_n, n_mask, row_blocks)
    # GROUP steps of BLOCK_K per pass: an NF4 weight's absmax loads once per group
    for k_group in range(0, K, GROUP_K):
        scales = a_ptr  # stands in when no group scales are loaded
        if IS_NF4 and GROUPED:
            scales = nf4_group_scales(absmax_ptr, nested_absmax_ptr, code2, offset, k_group, K, offs_n, n_mask,
                                      n_start, row_blocks, TRANSPOSE, False, GROUP, BLOCK_K, BLOCK_N, BLOCKSIZE,
                                      NESTED, ROW_NESTED, row_nested)
        for step in tl.static_range(GROUP):
            k_start = k_group + step * BLOCK_K
            offs_k = k_start + tl.arange(0, BLOCK_K).to(tl.int64)
            k_mask = offs_k < K
            a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
                        mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            if HAS_IN_SCALE:  # a dense weight's (an NF4 weight's is applied before the launch)
                in_scale = tl.load(in_scale_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
                a = (a.to(tl.float32) * in_scale[None, :]).to(a_ptr.dtype.element_ty)
            if IS_NF4:  # tiles of W in its own orientation (packed rows contiguous), as fastpeft.kernels.nf4_matmul
                if TRANSPOSE:
                    w = nf4_step_tile(w_ptr, absmax_ptr, nested_absmax_ptr, code, code2, offset, scales, step,
                                      offs_k, k_mask, n_start, in_features, row_bytes, BLOCK_N, BLOCKSIZE, NESTED,
                                      EVEN_IN, ALIGNED, GROUPED, WORDS, "")
                else:
                    w = tl.trans(nf4_step_tile(w_ptr, absmax_ptr, nested_absmax_ptr, code, code2, offset, scales,
                                               step, offs_n, n_mask, k_start, in_features, row_bytes, BLOCK_K,
                                               BLOCKSIZE, NESTED, EVEN_IN, ALIGNED, GROUPED, WORDS, ""))
            else:
                w = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                            mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            if SWAP_AB:  # (out-features x tokens) tiles: the weight is wgmma's 64-row operand, see DENSE_CONFIGS
                acc_t += tl.dot(tl.trans(w.to(a_ptr.dtype.element_ty)), tl.trans(a), input_precision="ieee")
            else:
                acc += tl.dot(a, w.to(a_ptr.dtype.element_ty), input_precision="ieee")
    if SWAP_AB:
        acc = tl.trans(acc_t)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_REDUCE:
        rows = tl.load(reduce_rows_ptr + offs_m[:, None] * stride_rm + offs_n[None, :] * stride_rn,
                       mask=m_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)
        tl.atomic_add(reduced_ptr + offs_n, tl.sum(rows * acc, axis=0), mask=n_mask)
    if STORE_OUT:
        if HAS_OUT_SCALE:
            acc = acc * tl.load(out_scale_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
                 acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def plan_ia3_matmul(
    m: int, n: int, *, is_nf4: bool, blocksize: int = 64, nested: bool = False, has_in_scale: bool = False,
    has_bias: bool = False, has_out_scale: bool = False, has_reduce: bool = False, store_out: bool = True,
    transpose_weight: bool = False, in_features: int = 64, fp32: bool = False, arch: tuple | None = None,
    sm_count: int | None = None, packed_words: bool = True,
) -> LaunchPlan:
    """The launch of an ``(m, K) · (K, n)`` IA3 product (dense or NF4 weight of ``in_features`` columns) with
    the given prologue / epilogue flags: one program per ``BLOCK_M x BLOCK_N`` output tile, or, for an NF4
    weight at the ``M`` where ``fastpeft.kernels.nf4_dispatch`` picks cuBLAS, ``path="torch"``
    (``variant="cublas"``: dequantise into the reusable buffer, cuBLAS, the scales in place). An NF4 weight's
    input scale is applied to the ``(m, K)`` activations before the kernel (``runtime["prescale"]``: a pass
    over at most a few dozen rows beside the weight read), so its main loop loads only weights and
    activations; a dense weight's in the kernel's prologue. ``packed_words``: the NF4 weight's packed bytes start
    4-byte aligned (rows of whole words read as words)."""
    if is_nf4 and nf4_path(m, n, fp32, arch, sm_count) == "cublas":
        return LaunchPlan(op="ia3_matmul", variant="cublas", path="torch")
    config = config_for(NF4_CONFIGS if is_nf4 else DENSE_CONFIGS, arch)
    block_m = min(config["BLOCK_M"], max(16, triton.next_power_of_2(m)))
    tile = config["TILES"][block_m] if is_nf4 else config
    block_n, block_k = tile["BLOCK_N"], config["BLOCK_K"]
    group = tile["GROUP_DX" if transpose_weight else "GROUP_FWD"] if is_nf4 else config["GROUP"]
    if is_nf4:
        layout = nf4_layout(in_features, blocksize, block_n if transpose_weight else block_k,
                            block_n if transpose_weight else group * block_k,
                            packed_words and tile["WORDS_DX" if transpose_weight else "WORDS_FWD"])
    else:
        layout = {"EVEN_IN": False, "ALIGNED": False, "GROUPED": False, "ROW_NESTED": False,
                  "ROW_IN_NESTED": False, "WORDS": False}
    return LaunchPlan(
        op="ia3_matmul", variant="nf4" if is_nf4 else "dense", kernel=_ia3_matmul_kernel,
        grid=(triton.cdiv(m, block_m), triton.cdiv(n, block_n)),
        constexprs={"IS_NF4": is_nf4, "BLOCKSIZE": blocksize, "NESTED": nested, **layout,
                    "TRANSPOSE": transpose_weight, "HAS_IN_SCALE": has_in_scale and not is_nf4,
                    "HAS_BIAS": has_bias, "HAS_OUT_SCALE": has_out_scale, "HAS_REDUCE": has_reduce,
                    "STORE_OUT": store_out, "SWAP_AB": config.get("SWAP_AB", False), "BLOCK_M": block_m,
                    "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP": group},
        num_warps=config["num_warps"], num_stages=config["num_stages"],
        runtime={"prescale": has_in_scale and is_nf4},
    )


def _scaled_input(a: torch.Tensor, in_scale: torch.Tensor) -> torch.Tensor:
    """``a ⊙ in_scale`` in fp32, rounded once to ``a``'s dtype: the kernel's prologue arithmetic."""
    return (a.float() * in_scale.float()).to(a.dtype)


def _cublas_ia3_matmul(a, weight: NF4Weight, transpose_weight, in_scale, bias, out_scale, reduce_rows, out, reduced):
    """Large ``M`` on NF4: dequantise into the reusable per-stream buffer, then cuBLAS; the input scale is applied in
    fp32 and rounded once (as the kernel), the row reduction and output scale in fp32."""
    w = nf4_dequantize(weight, a.dtype, out=dequant_buffer(weight, a.dtype))
    w = w if transpose_weight else w.t()
    if in_scale is not None:
        a = _scaled_input(a, in_scale)
    z = a @ w if bias is None else torch.addmm(bias, a, w)
    if reduced is not None:
        reduced.add_((reduce_rows.float() * z.float()).sum(0))
    if out is not None:
        out.copy_(z if out_scale is None else z.float() * out_scale.float())
    return out, reduced


def ia3_matmul(
    a: torch.Tensor,
    weight,
    *,
    transpose_weight: bool = False,
    in_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out_scale: torch.Tensor | None = None,
    reduce_rows: torch.Tensor | None = None,
    store_out: bool = True,
):
    """``out = out_scale ⊙ ((a ⊙ in_scale) · op(W) + bias)`` and ``Σ_m reduce_rows ⊙ ((a ⊙ in_scale) · op(W) + bias)``.

    ``a``: 2-D ``(M, K)`` float (any strides); ``weight`` a dense ``(out, in)`` tensor (any strides) or an
    :class:`NF4Weight`; ``op(W)`` is ``Wᵀ`` (``K = in``, ``N = out``) or ``W`` with ``transpose_weight``.
    ``in_scale`` ``(K,)``, ``bias`` / ``out_scale`` ``(N,)`` contiguous; ``reduce_rows`` ``(M, N)`` (any
    strides). ``a``, a dense weight and ``bias`` share one dtype. Returns ``(out, reduced)``: ``out``
    ``(M, N)`` in ``a.dtype`` (None unless ``store_out``), ``reduced`` ``(N,)`` fp32 (None unless
    ``reduce_rows``).
    """
    check_activations(a)
    is_nf4 = isinstance(weight, NF4Weight)
    if not is_nf4:
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise TypeError(f"weight must be a 2-D tensor or an NF4Weight, got {type(weight).__name__}")
        if weight.dtype != a.dtype:
            raise TypeError(f"weight dtype {weight.dtype} must equal a's dtype {a.dtype}")
    m, k, n = product_dims(a, weight, transpose_weight)
    in_features = weight.shape[1]
    check_vector("in_scale", in_scale, k, a)
    check_vector("bias", bias, n, a)
    check_vector("out_scale", out_scale, n, a)
    if bias is not None and bias.dtype != a.dtype:
        raise TypeError(f"bias dtype {bias.dtype} must equal a's dtype {a.dtype}")
    if reduce_rows is not None:
        if tuple(reduce_rows.shape) != (m, n) or reduce_rows.dtype not in DTYPES or reduce_rows.device != a.device:
            raise ValueError(f"reduce_rows must be a float ({m}, {n}) tensor on {a.device}, got "
                             f"{tuple(reduce_rows.shape)} {reduce_rows.dtype} {reduce_rows.device}")
    if not store_out and reduce_rows is None:
        raise ValueError("nothing to compute: store_out=False and no reduce_rows")
    if k == 0:
        raise ValueError("the weight has no columns to reduce over")
    out = torch.empty((m, n), dtype=a.dtype, device=a.device) if store_out else None
    reduced = torch.zeros(n, dtype=torch.float32, device=a.device) if reduce_rows is not None else None
    if m == 0 or n == 0:
        return out, reduced

    if is_nf4:
        packed, absmax, code, nested_code, nested_absmax, nested_offset = nf4_kernel_args(weight)
        blocksize, nested = weight.blocksize, weight.is_nested
        stride_wn, stride_wk = 0, 0  # unused: NF4 tiles are addressed by packed rows (row_bytes)
    else:
        # the five NF4 pointers are never read (IS_NF4=False)
        packed, absmax, code, nested_code, nested_absmax, nested_offset = (weight,) * 6
        blocksize, nested = 64, False
        stride_wn, stride_wk = (weight.stride(1), weight.stride(0)) if transpose_weight else weight.stride()
    placeholder = a  # never read: the matching HAS_* flag is False
    target = out if out is not None else placeholder
    rows = reduce_rows if reduce_rows is not None else placeholder
    plan = plan_ia3_matmul(
        m, n, is_nf4=is_nf4, blocksize=blocksize, nested=nested, has_in_scale=in_scale is not None,
        has_bias=bias is not None, has_out_scale=out_scale is not None, has_reduce=reduce_rows is not None,
        store_out=store_out, transpose_weight=transpose_weight, in_features=in_features,
        fp32=a.dtype == torch.float32, arch=device_arch(a.device),
        packed_words=not is_nf4 or packed_word_aligned(weight),
    )
    if plan.path == "torch":
        return _cublas_ia3_matmul(a, weight, transpose_weight, in_scale, bias, out_scale, reduce_rows, out, reduced)
    if plan.runtime["prescale"]:
        a = _scaled_input(a, in_scale)
    launch(plan, a, packed, absmax, code, nested_code, nested_absmax,
           in_scale if in_scale is not None else placeholder, bias if bias is not None else placeholder,
           out_scale if out_scale is not None else placeholder, rows, target,
           reduced if reduced is not None else placeholder,
           nested_offset, m, n, k, in_features, in_features // 2, in_features // blocksize,
           a.stride(0), a.stride(1), stride_wn, stride_wk, rows.stride(0), rows.stride(1),
           target.stride(0), target.stride(1))
    return out, reduced
