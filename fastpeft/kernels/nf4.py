"""NF4 decoding in Triton, bit-exact with bitsandbytes: the one decode helper every NF4 kernel uses.

``nf4_tile`` returns the fp32 values of a ``(len(rows), BLOCK_C)`` tile ``W[rows, col0 : col0 + BLOCK_C]``
of the logical ``(out, in)`` weight, in its natural orientation (columns = in-features, along which the
packed bytes are contiguous); a kernel that needs ``Wᵀ`` transposes the decoded tile in registers.
Structure (bitsandbytes' CUDA GEMV and newest fused kernel, GemLite; see /work/shared/KERNELS.md):

- packed bytes are read as one contiguous ``(rows, BLOCK_C / 2)`` uint8 tile per call (each byte once;
  the row stride ``in / 2`` is a kernel argument, so the JIT's divisibility-by-16 specialisation gives
  16-byte vector loads when ``in % 32 == 0``);
- nibbles are split with shifts and put in element order with ``tl.interleave`` (high nibble = first
  element);
- codes map to values through the 16-entry table held on chip (``tl.gather`` on a 16-element tensor
  loaded once per program; on sm_80+ that is one shared-memory read per element, no global gather);
- the absmax is resolved once per (row, 64-element block): ``code2[q[blk]] * absmax2[blk >> 8] + offset``
  with ``code2`` on chip too, in bitsandbytes' fp32 order, then ``code * absmax`` in fp32.

Layouts where a row does not start on a byte (odd ``in``) or a block straddles rows (``in`` not a
multiple of ``min(blocksize, BLOCK_C)``) take the element-wise form of the same steps (``EVEN_IN`` /
``ALIGNED`` constexprs, chosen by :func:`nf4_layout`): correct for every bitsandbytes weight, vectorised
for every model layer (their ``in`` is a multiple of 64).

Kernels that need bit-exact values must be launched with ``enable_fp_fusion=False`` so the nested
multiply and add are not contracted into one FMA (the matmul kernels accept the last-bit difference).

``nf4_dequantize`` (the launcher) writes the full ``(out, in)`` weight, into a given buffer or a new
tensor: merges, tests, and the "dequantise then cuBLAS" path for large ``M``
(``fastpeft.nf4.dequant_buffer``: one reusable buffer per device and dtype, so that path holds at most one
layer's dense weight).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..nf4 import NF4_CODE, NF4Weight
from .plan import LaunchPlan, config_for, device_arch, launch

_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_code_cache: dict = {}
# Dequantiser tile per GPU architecture. Source: a memory-bound copy; 16 x 128 elements at 4 warps is 16
# elements (one 8-byte packed load, two 16-byte bf16 stores) per thread, 1 stage (no K loop to pipeline).
DEQUANT_CONFIGS = {"default": {"BLOCK_R": 16, "BLOCK_C": 128, "num_warps": 4, "num_stages": 1}}


@triton.jit
def nf4_tables(code_ptr, nested_code_ptr, nested_offset_ptr, NESTED: tl.constexpr):
    """The on-chip tables, loaded once per program: ``(code (16,), code2 (256,), offset)`` fp32; without
    double quantisation ``code2`` and ``offset`` are stand-ins never used."""
    code = tl.load(code_ptr + tl.arange(0, 16))
    if NESTED:
        code2 = tl.load(nested_code_ptr + tl.arange(0, 256))
        offset = tl.load(nested_offset_ptr)
    else:
        code2 = tl.zeros((256,), dtype=tl.float32)
        offset = 0.0
    return code, code2, offset


@triton.jit
def _lookup(table, index):
    """``table[index]`` for an int32 ``index`` of any 2-D shape, from a 1-D on-chip ``table``."""
    flat = tl.reshape(index, [index.shape[0] * index.shape[1]])
    return tl.reshape(tl.gather(table, flat, 0), [index.shape[0], index.shape[1]])


@triton.jit
def _absmax(absmax_ptr, nested_absmax_ptr, code2, offset, block, mask, NESTED: tl.constexpr):
    """fp32 absmax of int64 ``block`` indices (2-D), 0 where masked (so masked elements decode to 0)."""
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(nested_absmax_ptr + (block >> 8), mask=mask, other=0.0)
        absmax = _lookup(code2, q) * scale  # rounded to fp32, then + offset rounded again (bitsandbytes)
        absmax = absmax + offset
    else:
        absmax = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return tl.where(mask, absmax, 0.0)


@triton.jit
def nf4_tile(
    packed_ptr, absmax_ptr, nested_absmax_ptr, code, code2, offset,
    rows, row_mask, col0, in_features, row_bytes,
    BLOCK_C: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
    EVEN_IN: tl.constexpr, ALIGNED: tl.constexpr, EVICT: tl.constexpr = "",
):
    """fp32 ``(len(rows), BLOCK_C)`` tile ``W[rows, col0 : col0 + BLOCK_C]``; 0 where ``row_mask`` is off
    or the column is ``>= in_features``. ``rows`` int64; ``col0`` a multiple of ``BLOCK_C``; ``row_bytes =
    in_features // 2``; ``code`` / ``code2`` / ``offset`` from :func:`nf4_tables`; ``EVEN_IN`` and
    ``ALIGNED`` from :func:`nf4_layout`; ``EVICT`` the packed bytes' eviction policy."""
    R: tl.constexpr = rows.shape[0]
    cols = col0 + tl.arange(0, BLOCK_C)
    mask = row_mask[:, None] & (cols < in_features)[None, :]
    if EVEN_IN:
        # one contiguous byte tile; byte j holds elements 2j (high nibble) and 2j + 1 (low nibble)
        offs_b = col0 // 2 + tl.arange(0, BLOCK_C // 2)
        byte = tl.load(packed_ptr + rows[:, None] * row_bytes + offs_b[None, :],
                       mask=row_mask[:, None] & (offs_b < row_bytes)[None, :], other=0,
                       eviction_policy=EVICT)
        idx = tl.interleave(byte >> 4, byte & 0xF).to(tl.int32)
    else:
        flat = rows[:, None] * in_features + cols[None, :]
        byte = tl.load(packed_ptr + (flat >> 1), mask=mask, other=0, eviction_policy=EVICT).to(tl.int32)
        idx = (byte >> ((1 - (flat & 1)) * 4).to(tl.int32)) & 0xF
    values = _lookup(code, idx)
    if ALIGNED:
        # every (row, block) of the tile is whole: one absmax per block, broadcast over its elements
        NB: tl.constexpr = BLOCK_C // BLOCKSIZE if BLOCK_C > BLOCKSIZE else 1
        SPAN: tl.constexpr = BLOCK_C // NB
        first = (rows * in_features + col0) // BLOCKSIZE
        offs_nb = tl.arange(0, NB)
        block = first[:, None] + offs_nb[None, :]
        block_mask = row_mask[:, None] & (col0 + offs_nb * SPAN < in_features)[None, :]
        absmax = _absmax(absmax_ptr, nested_absmax_ptr, code2, offset, block, block_mask, NESTED)
        if NB == 1:
            return values * absmax
        absmax = tl.reshape(tl.broadcast_to(absmax[:, :, None], (R, NB, SPAN)), (R, BLOCK_C))
        return values * absmax
    else:
        block = (rows[:, None] * in_features + cols[None, :]) // BLOCKSIZE
        return values * _absmax(absmax_ptr, nested_absmax_ptr, code2, offset, block, mask, NESTED)


@triton.jit
def _nf4_dequant_kernel(
    packed_ptr, absmax_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr, nested_offset_ptr, out_ptr,
    out_features, in_features, row_bytes, stride_om,
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, EVEN_IN: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    col0 = tl.program_id(1) * BLOCK_C
    row_mask = rows < out_features
    code, code2, offset = nf4_tables(code_ptr, nested_code_ptr, nested_offset_ptr, NESTED)
    w = nf4_tile(packed_ptr, absmax_ptr, nested_absmax_ptr, code, code2, offset,
                 rows, row_mask, col0, in_features, row_bytes,
                 BLOCK_C, BLOCKSIZE, NESTED, EVEN_IN, ALIGNED, "evict_first")
    cols = col0 + tl.arange(0, BLOCK_C)
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], w.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & (cols < in_features)[None, :])


def nf4_layout(in_features: int, blocksize: int, block_c: int) -> dict:
    """The ``EVEN_IN`` / ``ALIGNED`` constexprs of :func:`nf4_tile` for tiles of ``block_c`` columns:
    rows start on a byte (``in`` even), and no absmax block straddles two rows of a tile."""
    return {"EVEN_IN": in_features % 2 == 0, "ALIGNED": in_features % min(blocksize, block_c) == 0}


def nf4_code(device: torch.device) -> torch.Tensor:
    """The 16 NF4 code values on ``device`` (cached; created on first use, never at import)."""
    device = torch.device(device)
    if device not in _code_cache:
        _code_cache[device] = NF4_CODE.to(device)
    return _code_cache[device]


def nf4_kernel_args(weight: NF4Weight) -> tuple:
    """``(packed, absmax, code, nested_code, nested_absmax, nested_offset)`` as the NF4
    kernels take them (all tensors); for a non-nested weight the nested pointers repeat
    ``absmax`` (never read, ``NESTED=False``)."""
    if weight.is_nested:
        return (weight.packed, weight.absmax, nf4_code(weight.device), weight.nested_code,
                weight.nested_absmax, weight.nested_offset)
    return (weight.packed, weight.absmax, nf4_code(weight.device), weight.absmax, weight.absmax, weight.absmax)


def plan_nf4_dequantize(out_features: int, in_features: int, blocksize: int, nested: bool,
                        arch: tuple | None = None) -> LaunchPlan:
    """The launch that dequantises an ``(out_features, in_features)`` NF4 weight (``blocksize``,
    double-quantised if ``nested``) in 2-D tiles. fp fusion is off: the nested absmax must round as
    bitsandbytes' separate multiply and add do."""
    config = config_for(DEQUANT_CONFIGS, arch)
    block_r, block_c = config["BLOCK_R"], config["BLOCK_C"]
    return LaunchPlan(
        op="nf4_dequantize", variant="tiles", kernel=_nf4_dequant_kernel,
        grid=(triton.cdiv(out_features, block_r), triton.cdiv(in_features, block_c)),
        constexprs={"BLOCKSIZE": blocksize, "NESTED": nested,
                    **nf4_layout(in_features, blocksize, block_c), "BLOCK_R": block_r, "BLOCK_C": block_c},
        num_warps=config["num_warps"], num_stages=config["num_stages"], options={"enable_fp_fusion": False},
    )


def nf4_dequantize(weight: NF4Weight, dtype: torch.dtype = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantise ``weight`` with Triton into ``out`` (a contiguous ``(out, in)`` tensor of ``dtype``, e.g.
    :func:`fastpeft.nf4.dequant_buffer`) or a new one; returns it."""
    dtype = weight.dtype if dtype is None else dtype
    if not isinstance(weight, NF4Weight):
        raise TypeError(f"expected an NF4Weight, got {type(weight).__name__}")
    if dtype not in _OUT_DTYPES:
        raise TypeError(f"NF4 dequantisation produces one of {_OUT_DTYPES}, not {dtype}")
    if out is None:
        out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    elif out.shape != weight.shape or out.dtype != dtype or out.device != weight.device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {tuple(weight.shape)} {dtype} tensor on {weight.device}, got "
                         f"{tuple(out.shape)} {out.dtype} {out.device}")
    out_features, in_features = weight.shape
    if out.numel() == 0:
        return out
    plan = plan_nf4_dequantize(out_features, in_features, weight.blocksize, weight.is_nested,
                               device_arch(weight.device))
    launch(plan, *nf4_kernel_args(weight), out, out_features, in_features, in_features // 2, out.stride(0))
    return out
