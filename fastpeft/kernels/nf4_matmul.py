"""NF4 GEMM with a fused LoRA epilogue: the QLoRA forward and its input gradient, in one Triton kernel.

Math (``W`` the logical ``(out_features, in_features)`` NF4 weight, ``s`` the LoRA scaling)::

    transpose_weight=False (forward):   y  = c ⊙ (a · Wᵀ + s · h · E) + b     a (M, in),  y (M, out)
    transpose_weight=True  (dx):        dx = c ⊙ (a · W  + s · h · E) + b     a (M, out), dx (M, in)

``h`` is the small ``(M, r)`` LoRA intermediate and ``E`` the ``(r, N)`` expand matrix: ``h = drop(x) Aᵀ``
and ``E = Bᵀ`` in the forward; ``h = dy B`` and ``E = A`` for ``dx``. The bias ``b`` and the per-column
scale ``c`` (``HAS_COL_SCALE``; for DoRA's ``m / ‖W + sBA‖``, IA3's output scale) are optional, as is
the whole LoRA term (``HAS_LORA``). Everything is accumulated in fp32 and the output is written once.

Design: ``W`` is read as packed NF4 (double-quantised absmax included) through
``fastpeft.kernels.nf4.nf4_dequant_values`` tile by tile and never materialised. One kernel serves both
directions: the weight element ``(n, k)`` of the product is at flat NF4 index
``n * stride_wn + k * stride_wk``, i.e. ``(in, 1)`` for ``Wᵀ`` and ``(1, in)`` for ``W``. Values are
dequantised in fp32 and cast once to the input dtype before the product, as ``dequantize_4bit`` then
``matmul`` would do, so the kernel reproduces "dequantise, then cuBLAS" up to accumulation order.

Two variants, picked by ``M`` in the launcher (``GEMV_MAX_M``):

- GEMM (``M > 16``): ``BLOCK_M x BLOCK_N`` output tiles, ``tl.dot`` over ``BLOCK_K`` slices; the LoRA
  epilogue is one more ``tl.dot`` of an ``(BLOCK_M, BLOCK_R)`` slice of ``h`` with ``E``.
- GEMV (decode, ``M <= 16``): ``tl.dot`` needs 16 rows, so the product is a broadcast multiply-sum over
  ``M`` rounded up to a power of two; each program reads its ``BLOCK_N`` columns of packed bytes once
  for all ``M`` rows, so the weight traffic is the packed bytes. Split-K: when the output has too few
  tiles to fill the GPU, ``K`` is cut into ``SPLIT_K`` slices; each program ``atomic_add``s its fp32
  partial into a zeroed ``(M, N)`` fp32 workspace (split 0 also adds the LoRA term and the bias), and
  the launcher casts the workspace into ``out`` (a pass over ``M x N``, small for decode). The
  summation order then varies from run to run in the last bits.

fp32: ``tl.dot`` uses ``input_precision="ieee"`` so fp32 results match PyTorch's fp32 matmul instead of
tf32's 10-bit mantissa (the reference contract; a tf32 variant is a GPU tuning question). The kernel is
launched with fp-fusion on: a nested absmax may then differ from bitsandbytes' in its last bit (FMA),
far below any matmul's rounding; bit-exact dequantisation is ``fastpeft.kernels.nf4``'s job.

Limits / not done (no GPU in this task): block sizes and the split-K target are untuned; there is no
autotune and no "dequantise tile-wise then cuBLAS" branch for large ``M`` — each needs a GPU measurement before it is worth keeping. The dense-weight LoRA path is cuBLAS in
``fastpeft/ops/lora.py`` and needs no kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..nf4 import NF4Weight
from .nf4 import nf4_dequant_values, nf4_kernel_args
from .plan import LaunchPlan, config_for, device_arch, launch

# Tiles, warps and stages per variant and GPU architecture. Source: untuned, no GPU (chosen for tl.dot's
# 16-minimum and moderate register use; warps and stages are Triton's defaults).
# GEMV: BLOCK_K is the largest K slice that keeps the (BLOCK_M, BLOCK_K, BLOCK_N) broadcast product within
# MAX_PRODUCT elements (64 fp32 per thread at 4 warps); K is split so that about TARGET_PROGRAMS programs
# run (a guess at two waves of an H100's 132 SMs), never below one BLOCK_K per split.
GEMM_CONFIGS = {"default": {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32, "MAX_BLOCK_R": 64,
                            "num_warps": 4, "num_stages": 3}}
GEMV_CONFIGS = {"default": {"BLOCK_N": 32, "BLOCK_K": 64, "MAX_PRODUCT": 8192, "TARGET_PROGRAMS": 256,
                            "MAX_BLOCK_R": 16, "num_warps": 4, "num_stages": 3}}
GEMV_MAX_M = 16  # M at or below which the GEMV runs (tl.dot needs 16 rows)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _nf4_lora_matmul_kernel(
    a_ptr, packed_ptr, absmax_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr,
    bias_ptr, h_ptr, expand_ptr, col_scale_ptr, out_ptr,
    nested_offset_ptr, scaling,
    M, N, K, rank, k_per_split,
    stride_am, stride_ak, stride_wn, stride_wk, stride_hm, stride_hr, stride_er, stride_en,
    stride_om, stride_on,
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, HAS_COL_SCALE: tl.constexpr, USE_DOT: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(2)
    m_mask = offs_m < M
    n_mask = offs_n < N
    k_begin = split.to(tl.int64) * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    # the epilogue terms (LoRA, bias) are added by split 0 only; every split scales its own partial sum
    # by the column scale, which distributes over the sum
    first_split = split == 0
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(k_begin, k_end, BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K).to(tl.int64)
        k_mask = offs_k < k_end
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & n_mask[None, :]
        w = nf4_dequant_values(
            packed_ptr, absmax_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr, nested_offset_ptr,
            offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk, w_mask, BLOCKSIZE, NESTED,
        ).to(a_ptr.dtype.element_ty)  # one rounding to the input dtype, as dequantize_4bit does
        if USE_DOT:
            acc += tl.dot(a, w, input_precision="ieee")
        else:
            acc += tl.sum(a.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
    if HAS_LORA:
        lora = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r_start in range(0, tl.where(first_split, rank, 0), BLOCK_R):
            offs_r = r_start + tl.arange(0, BLOCK_R)
            r_mask = offs_r < rank
            h = tl.load(h_ptr + offs_m[:, None] * stride_hm + offs_r[None, :] * stride_hr,
                        mask=m_mask[:, None] & r_mask[None, :], other=0.0)
            e = tl.load(expand_ptr + offs_r[:, None] * stride_er + offs_n[None, :] * stride_en,
                        mask=r_mask[:, None] & n_mask[None, :], other=0.0)
            if USE_DOT:
                lora += tl.dot(h, e, input_precision="ieee")
            else:
                lora += tl.sum(h.to(tl.float32)[:, :, None] * e.to(tl.float32)[None, :, :], axis=1)
        acc += scaling * lora
    if HAS_COL_SCALE:
        acc = acc * tl.load(col_scale_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc += tl.where(first_split, bias, 0.0)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    if SPLIT_K > 1:  # out is a zeroed fp32 workspace
        tl.atomic_add(out_ptrs, acc, mask=m_mask[:, None] & n_mask[None, :])
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _check_vector(name: str, t, length: int, a: torch.Tensor):
    if t is None:
        return
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != length:
        raise ValueError(f"{name} must be a 1-D tensor of {length} elements, got {tuple(getattr(t, 'shape', ()))}")
    if t.dtype not in _DTYPES:
        raise TypeError(f"{name} dtype must be one of {_DTYPES}, got {t.dtype}")
    if t.device != a.device:
        raise ValueError(f"{name} is on {t.device}, a is on {a.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def plan_nf4_lora_matmul(
    m: int, n: int, k: int, rank: int = 0, *, blocksize: int = 64, nested: bool = False, has_bias: bool = False,
    has_col_scale: bool = False, arch: tuple | None = None,
) -> LaunchPlan:
    """The launch of an ``(m, k) · (k, n)`` NF4 product with a rank-``rank`` LoRA epilogue (0: none).

    ``variant`` is ``"gemm"`` (``m > GEMV_MAX_M``: ``tl.dot`` tiles) or ``"gemv"`` (broadcast
    multiply-sum, split-K when the output has too few tiles: ``constexprs["SPLIT_K"] > 1`` means the
    launcher accumulates into a zeroed fp32 workspace). ``runtime["k_per_split"]``: the K slice length.
    """
    if m > GEMV_MAX_M:
        config = config_for(GEMM_CONFIGS, arch)
        block_m, block_n, block_k = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
        block_r = min(config["MAX_BLOCK_R"], max(16, triton.next_power_of_2(max(rank, 1))))
    else:
        config = config_for(GEMV_CONFIGS, arch)
        block_m, block_n = triton.next_power_of_2(m), config["BLOCK_N"]
        # the broadcast product is a (BLOCK_M, BLOCK_K, BLOCK_N) register tile: keep it bounded as M grows
        block_k = min(config["BLOCK_K"], max(16, config["MAX_PRODUCT"] // (block_m * block_n)))
        block_r = min(config["MAX_BLOCK_R"], triton.next_power_of_2(max(rank, 1)))
    use_dot = m > GEMV_MAX_M
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    k_blocks = triton.cdiv(k, block_k)
    split_k = 1 if use_dot else max(1, min(k_blocks, config["TARGET_PROGRAMS"] // tiles))
    k_per_split = triton.cdiv(k_blocks, split_k) * block_k
    split_k = triton.cdiv(k, k_per_split)  # no empty splits
    return LaunchPlan(
        op="nf4_lora_matmul", variant="gemm" if use_dot else "gemv", kernel=_nf4_lora_matmul_kernel,
        grid=(triton.cdiv(m, block_m), triton.cdiv(n, block_n), split_k),
        constexprs={"BLOCKSIZE": blocksize, "NESTED": nested, "HAS_BIAS": has_bias, "HAS_LORA": rank > 0,
                    "HAS_COL_SCALE": has_col_scale, "USE_DOT": use_dot, "SPLIT_K": split_k, "BLOCK_M": block_m,
                    "BLOCK_N": block_n, "BLOCK_K": block_k, "BLOCK_R": block_r},
        num_warps=config["num_warps"], num_stages=config["num_stages"], runtime={"k_per_split": k_per_split},
    )


def nf4_lora_matmul(
    a: torch.Tensor,
    weight: NF4Weight,
    *,
    transpose_weight: bool = False,
    bias: torch.Tensor | None = None,
    lora_h: torch.Tensor | None = None,
    lora_expand: torch.Tensor | None = None,
    scaling: float = 1.0,
    col_scale: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``c ⊙ (a · op(W) + s · lora_h · lora_expand) + bias`` with ``W`` read as packed NF4.

    ``a``: 2-D ``(M, K)`` float (any strides); ``op(W)`` is ``Wᵀ`` (``K = in``, ``N = out``) or, with
    ``transpose_weight=True``, ``W`` (``K = out``, ``N = in``). ``lora_h`` ``(M, r)`` and ``lora_expand``
    ``(r, N)`` (any strides) come together or not at all; ``bias`` and ``col_scale`` are ``(N,)``.
    Tensors share ``a``'s dtype except ``col_scale`` (any float). Returns ``out`` (a new ``(M, N)`` tensor
    of ``a.dtype`` unless given).
    """
    if not isinstance(weight, NF4Weight):
        raise TypeError(f"weight must be an NF4Weight, got {type(weight).__name__}")
    if not isinstance(a, torch.Tensor) or a.dim() != 2:
        raise ValueError(f"a must be a 2-D tensor, got shape {tuple(getattr(a, 'shape', ()))}")
    if a.dtype not in _DTYPES:
        raise TypeError(f"a dtype must be one of {_DTYPES}, got {a.dtype}")
    if a.device != weight.device:
        raise ValueError(f"a is on {a.device}, the NF4 weight on {weight.device}")
    out_features, in_features = weight.shape
    k, n = (out_features, in_features) if transpose_weight else (in_features, out_features)
    m = a.shape[0]
    if a.shape[1] != k:
        raise ValueError(
            f"a has {a.shape[1]} columns; the {'W' if transpose_weight else 'Wᵀ'} product with a "
            f"{tuple(weight.shape)} weight needs {k}"
        )
    if (lora_h is None) != (lora_expand is None):
        raise ValueError("lora_h and lora_expand must be given together")
    rank = 0
    if lora_h is not None:
        if lora_h.dim() != 2 or lora_expand.dim() != 2:
            raise ValueError(f"lora_h and lora_expand must be 2-D, got {tuple(lora_h.shape)} and {tuple(lora_expand.shape)}")
        rank = lora_h.shape[1]
        if lora_h.shape[0] != m or tuple(lora_expand.shape) != (rank, n) or rank == 0:
            raise ValueError(
                f"lora_h {tuple(lora_h.shape)} and lora_expand {tuple(lora_expand.shape)} must be (M, r) = ({m}, r) "
                f"and (r, N) = (r, {n}) with r >= 1"
            )
        for name, t in (("lora_h", lora_h), ("lora_expand", lora_expand)):
            if t.dtype != a.dtype:
                raise TypeError(f"{name} dtype {t.dtype} must equal a's dtype {a.dtype}")
            if t.device != a.device:
                raise ValueError(f"{name} is on {t.device}, a is on {a.device}")
    _check_vector("bias", bias, n, a)
    if bias is not None and bias.dtype != a.dtype:
        raise TypeError(f"bias dtype {bias.dtype} must equal a's dtype {a.dtype}")
    _check_vector("col_scale", col_scale, n, a)
    if out is None:
        out = torch.empty((m, n), dtype=a.dtype, device=a.device)
    elif tuple(out.shape) != (m, n) or out.dtype != a.dtype or out.device != a.device:
        raise ValueError(f"out must be ({m}, {n}) {a.dtype} on {a.device}, got {tuple(out.shape)} {out.dtype} {out.device}")
    if m == 0 or n == 0:
        return out
    if k == 0:
        raise ValueError("the weight has no columns to reduce over")

    plan = plan_nf4_lora_matmul(m, n, k, rank, blocksize=weight.blocksize, nested=weight.is_nested,
                                has_bias=bias is not None, has_col_scale=col_scale is not None,
                                arch=device_arch(a.device))
    stride_wn, stride_wk = (1, in_features) if transpose_weight else (in_features, 1)
    placeholder = a  # never read: the matching HAS_* flag is False
    h = lora_h if lora_h is not None else placeholder
    expand = lora_expand if lora_expand is not None else placeholder
    packed, absmax, code, nested_code, nested_absmax, nested_offset = nf4_kernel_args(weight)
    target = out if plan.constexprs["SPLIT_K"] == 1 else torch.zeros((m, n), dtype=torch.float32, device=a.device)
    launch(plan, a, packed, absmax, code, nested_code, nested_absmax,
           bias if bias is not None else placeholder, h, expand,
           col_scale if col_scale is not None else placeholder, target,
           nested_offset, float(scaling),
           m, n, k, rank, plan.runtime["k_per_split"],
           a.stride(0), a.stride(1), stride_wn, stride_wk, h.stride(0), h.stride(1),
           expand.stride(0), expand.stride(1), target.stride(0), target.stride(1))
    if target is not out:
        out.copy_(target)
    return out
