"""NF4 GEMM with a fused LoRA epilogue: the QLoRA forward and its input gradient, in one Triton kernel.

Math (``W`` the logical ``(out_features, in_features)`` NF4 weight, ``s`` the LoRA scaling)::

    transpose_weight=False (forward):   y  = c ⊙ (a · Wᵀ + s · h · E) + b     a (M, in),  y (M, out)
    transpose_weight=True  (dx):        dx = c ⊙ (a · W  + s · h · E) + b     a (M, out), dx (M, in)

``h`` is the small ``(M, r)`` LoRA intermediate and ``E`` the ``(r, N)`` expand matrix: ``h = drop(x) Aᵀ``
and ``E = Bᵀ`` in the forward; ``h = dy B`` and ``E = A`` for ``dx``. The bias ``b`` and the per-column
scale ``c`` (``HAS_COL_SCALE``; for DoRA's ``m / ‖W + sBA‖``, IA3's output scale) are optional, as is
the whole LoRA term (``HAS_LORA``). Everything is accumulated in fp32 and the output is written once.

Design: ``W`` is read as packed NF4 (double-quantised absmax included) through the decode helpers of
``fastpeft.kernels.nf4``, tile by tile, never materialised: tiles are always taken in ``W``'s own
orientation (rows = out-features, columns = in-features, along which the packed bytes are contiguous), so
both directions read bytes as wide vectors: the forward decodes a ``(BLOCK_N, BLOCK_K)`` tile and transposes
it in registers, ``dx`` decodes ``(BLOCK_K, BLOCK_N)`` tiles along the packed rows. Values are dequantised
in fp32 and cast once to the input dtype before the product, as ``dequantize_4bit`` then ``matmul`` would
do, so the kernel reproduces "dequantise, then cuBLAS" up to accumulation order.

The K loop takes ``GROUP`` steps of ``BLOCK_K`` per pass (unrolled): at the start of a pass the absmax bytes
of all its steps load at once per weight row (``nf4_group_scales``; the nested absmax once per row too when
a row holds whole groups of blocks, which never cross a nested block of 256), so a step's loads are its
packed bytes (128-bit) and its activation tile. The GEMV's dx loads dy for the whole pass once, and its
step ``s`` takes the pass's W rows ``t * GROUP + s``: a thread's few rows per step are adjacent across the
steps, so its dy values are one vector load. Every NF4 main loop is then at most one global memory
instruction per 16 weight elements (``fastpeft check-kernels``).

What runs is a plan (:func:`plan_nf4_lora_matmul`; the variant from ``fastpeft.kernels.nf4_dispatch.nf4_path``:
rules on ``M`` and the number of SM waves the output fills, per GPU architecture, each table entry citing its
source):

- ``gemv`` (decode, ``M = 1``): GemLite's split-K GEMV shape: each program takes ``BLOCK_N`` outputs and a
  short slice of ``K`` (``CHUNKS`` steps of ``BLOCK_K``), multiplies in fp32 and reduces with ``tl.sum``
  (``tl.dot`` needs 16 rows), and ``atomic_add``s its partial into a zeroed fp32 ``(M, N)`` workspace;
  weights are loaded ``evict_first`` (streamed once), activations ``evict_last`` (reused by every program).
  It also runs a few rows when a threshold override asks (one activation row at a time, not tuned).
- ``splitk`` (``1 < M <=`` the arch's threshold): ``tl.dot`` tiles of ``BLOCK_M`` (16/32/64) x 128 with
  ``BLOCK_K = 64`` (one NF4 block per step), ``K`` split in whole passes so the grid fills the GPU,
  fp32 atomics into the workspace as above (GemLite's tuned small-M table). The tile is computed
  transposed ("swap AB", the ``swap_ab`` path of vLLM's sm90 CUTLASS FP8 GEMMs for small M): ``accᵀ (BLOCK_N, BLOCK_M) +=
  op(W)ᵀ-tile · aᵀ``, so the 128 weight rows are the MMA's M and the few tokens its N. Hopper's wgmma
  needs 64-row warpgroup tiles: un-swapped, a 16-token tile can only run ``mma.sync`` (HMMA) on sm_90;
  swapped it runs wgmma (HGMMA) from two rows. The LoRA epilogue product is swapped the same way.
- ``cublas`` (large ``M``: prefill, training): ``W`` is dequantised into the reusable per-stream buffer
  (``fastpeft.nf4.dequant_buffer``) and the product is cuBLAS ``addmm``; the LoRA term is added
  in place with ``addmm_`` (``B A`` never formed), then the column scale and bias in place (bitsandbytes
  0.50 and Unsloth: cuBLAS's wgmma path beats any mma.sync kernel there).

In the split variants split 0 adds the LoRA term and bias, every split scales its own partial by the column
scale (it distributes over the sum), and the launcher casts the workspace into ``out`` (a pass over
``M x N``, small for those ``M``); the summation order then varies from run to run in the last bits.

fp32: ``tl.dot`` uses ``input_precision="ieee"`` so fp32 results match PyTorch's fp32 matmul instead of
tf32's 10-bit mantissa (the reference contract; a tf32 variant is a GPU tuning question). The kernel is
launched with fp-fusion on: a nested absmax may then differ from bitsandbytes' in its last bit (FMA),
far below any matmul's rounding; bit-exact dequantisation is ``fastpeft.kernels.nf4``'s job (and the
``cublas`` path's, which dequantises with it).

Limits: tile shapes are taken from the anchors' published tables and the static check, not timed on a GPU
(``fastpeft tune`` measures the per-GPU crossovers between the variants, not the tiles). The dense-weight
LoRA path is cuBLAS in ``fastpeft/ops/lora.py`` and needs no kernel.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..nf4 import NF4Weight, dequant_buffer
from .checks import DTYPES, check_activations, check_vector, product_dims
from .nf4 import (nf4_dequantize, nf4_group_scales, nf4_kernel_args, nf4_layout, nf4_row_nested, nf4_step_tile,
                  nf4_tables, packed_word_aligned, take_column)
from .nf4_dispatch import nf4_path
from .plan import LaunchPlan, config_for, device_arch, launch

# Tiles, warps and stages per variant and GPU architecture (``fastpeft.kernels.plan.config_for``); every number
# measured with check-kernels' static sm_80 / sm_89 / sm_90a compiles (registers, spills, loads; nothing timed),
# for bf16, fp16 and bf16 + fp32 adapters.
# The main loop takes GROUP steps of BLOCK_K per pass: the absmax blocks of the GROUP steps load once per row
# (and the nested absmax once per row and group), so a 64-code step costs two 128-bit packed loads and one
# activation load, which puts every loop at <= 1 global memory instruction per 16 weight elements.
# GEMV (M = 1): GemLite's M=1 kernel, "BLOCK_N columns x chunks of BLOCK_K", tl.sum, fp32 atomics. Our packed
# rows run along in-features, so the forward tile is (BLOCK_N W rows) x (BLOCK_K in-features): 32 x 256 at 4
# warps is 64 codes per thread per step, CHUNKS steps per program; dx tiles are (BLOCK_K W rows) x (BLOCK_N
# in-features), 32 x 256 (GROUP 4 or 16-row steps: 21 / 19 instructions per element against 14).
# WORDS: packed rows read as 32-bit words (8 codes each) instead of bytes: Triton holds a loaded byte per
# register, a word keeps 8 codes in one (split-K forward: 168 -> 128 registers on sm_80); the GEMVs and the
# split-K dx take bytes (words raise their registers: 96 -> 200 on sm_90a, or spill).
GEMV_CONFIGS = {"default": {
    "fwd": {"BLOCK_N": 32, "BLOCK_K": 256, "CHUNKS": 4, "GROUP": 2, "WORDS": False},
    "dx": {"BLOCK_N": 256, "BLOCK_K": 32, "CHUNKS": 8, "GROUP": 2, "WORDS": False},
    "MAX_BLOCK_R": 16, "num_warps": 4, "num_stages": 1}}
# SPLITK: GemLite's tuned H100 small-M table: BLOCK_K 64 (= the NF4 block), BLOCK_M 16/32/64 (M rounded up),
# SPLIT_K 8-16 (here: as many as fill TARGET_PROGRAMS, capped at MAX_SPLIT_K), 4 warps, 1 stage (with 2, sm_80's
# shared memory, 41 KB, held occupancy to 19%). TILES per BLOCK_M: at 16 tokens BLOCK_N 128 rather than
# GemLite's 64, so that the activation tile (16 x 64) loads once per 128 weight rows (at 64 rows it costs as
# many loads as the packed weights and the loop needs 2 per 32 elements), GROUP 4; 32 and 64 tokens take 64
# weight rows and GROUP 2, or 1 in the 64-token forward (with 128 rows and GROUP 4 their accumulators took
# 168-255 registers: 17-19% occupancy, spills on sm_89; the 64-token forward at GROUP 2: 228 registers, its dx
# 168, and a forward row's nested absmax loads once per program where the row lies in one nested block, so
# GROUP 1 keeps its weight loads at 1 per 16 elements). From 32 tokens the activation tile alone is 1 load per
# 32 weight elements and more (BLOCK_M / (8 BLOCK_N) with 16-byte loads): those tiles cannot reach 1 global
# memory instruction per 16 weight elements whatever the rest.
_WIDE_TILES = {32: {"BLOCK_N": 64, "GROUP_FWD": 2, "GROUP_DX": 2, "WORDS_FWD": False, "WORDS_DX": False},
               64: {"BLOCK_N": 64, "GROUP_FWD": 1, "GROUP_DX": 2, "WORDS_FWD": False, "WORDS_DX": False}}
SPLITK_CONFIGS = {
    "default": {"TILES": {16: {"BLOCK_N": 128, "GROUP_FWD": 4, "GROUP_DX": 4, "WORDS_FWD": True, "WORDS_DX": False},
                          **_WIDE_TILES},
                "BLOCK_K": 64, "MAX_BLOCK_R": 16, "TARGET_PROGRAMS": 264, "MAX_SPLIT_K": 16, "num_warps": 4,
                "num_stages": 1},
    (8, 9): {"TILES": {16: {"BLOCK_N": 128, "GROUP_FWD": 4, "GROUP_DX": 4, "WORDS_FWD": True, "WORDS_DX": False},
                       **_WIDE_TILES},
             "BLOCK_K": 64, "MAX_BLOCK_R": 16, "TARGET_PROGRAMS": 284, "MAX_SPLIT_K": 16, "num_warps": 4,
             "num_stages": 1},
}


@triton.jit
def _nf4_lora_matmul_kernel(
    a_ptr, packed_ptr, absmax_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr,
    bias_ptr, h_ptr, expand_ptr, col_scale_ptr, out_ptr,
    nested_offset_ptr, scaling,
    M, N, K, rank, k_per_split, in_features, row_bytes, row_blocks,
    stride_am, stride_ak, stride_hm, stride_hr, stride_er, stride_en, stride_om, stride_on,
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, EVEN_IN: tl.constexpr, ALIGNED: tl.constexpr,
    GROUPED: tl.constexpr, ROW_NESTED: tl.constexpr, ROW_IN_NESTED: tl.constexpr, WORDS: tl.constexpr,
    TRANSPOSE: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, HAS_COL_SCALE: tl.constexpr, USE_DOT: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP: tl.constexpr, EVICT_W: tl.constexpr, EVICT_A: tl.constexpr,
):
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    n_start = tl.program_id(1) * BLOCK_N
    offs_n = n_start.to(tl.int64) + tl.arange(0, BLOCK_N)
    split = tl.program_id(2)
    m_mask = offs_m < M
    n_mask = offs_n < N
    # k_per_split is a multiple of GROUP * BLOCK_K; written so, the compiler knows every step's packed-byte
    # offset is 16-byte aligned (128-bit loads) and every group starts on a multiple of its absmax blocks
    GROUP_K: tl.constexpr = GROUP * BLOCK_K
    TILE_C: tl.constexpr = BLOCK_N if TRANSPOSE else BLOCK_K  # columns of the weight tile of a step
    k_begin = split * (k_per_split // GROUP_K) * GROUP_K
    k_end = tl.minimum(k_begin + k_per_split, K)
    code, code2, offset = nf4_tables(code_ptr, nested_code_ptr, nested_offset_ptr, NESTED)
    # the epilogue terms (LoRA, bias) are added by split 0 only; every split scales its own partial sum
    # by the column scale, which distributes over the sum
    first_split = split == 0
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    # the forward's W rows are the program's own, the same at every step: their nested absmax loads once
    row_nested = None
    if NESTED and ROW_IN_NESTED and not TRANSPOSE:
        row_nested = nf4_row_nested(nested_absmax_ptr, offs_n, n_mask, row_blocks)
    for k_group in range(k_begin, k_end, GROUP_K):
        # the scales of the group's GROUP steps, one load of absmax bytes (and of nested absmax) per row; the
        # GEMV's dx steps take the group's rows strided (see below)
        scales = code  # stands in when not GROUPED (each step then loads its own)
        if GROUPED:
            scales = nf4_group_scales(absmax_ptr, nested_absmax_ptr, code2, offset, k_group, k_end, offs_n, n_mask,
                                      n_start, row_blocks, TRANSPOSE, TRANSPOSE and not USE_DOT, GROUP, BLOCK_K,
                                      BLOCK_N, BLOCKSIZE, NESTED, ROW_NESTED, row_nested)
        if TRANSPOSE and not USE_DOT:
            # the GEMV's dy for the whole group, one load. Its step s takes the group's W rows t * GROUP + s
            # (t < BLOCK_K): the few rows a thread decodes per step are then GROUP apart in each step and
            # adjacent across the steps, so its dy values of the group are contiguous (one vector load)
            offs_gk = k_group + tl.arange(0, GROUP_K).to(tl.int64)
            a_group = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_gk[None, :] * stride_ak,
                              mask=m_mask[:, None] & (offs_gk < k_end)[None, :], other=0.0, eviction_policy=EVICT_A)
            a_group = tl.reshape(a_group, (BLOCK_M * BLOCK_K, GROUP))
        for step in tl.static_range(GROUP):
            k_start = k_group + step * BLOCK_K
            if TRANSPOSE and not USE_DOT:
                offs_k = k_group + step + tl.arange(0, BLOCK_K).to(tl.int64) * GROUP
            else:
                offs_k = k_start + tl.arange(0, BLOCK_K).to(tl.int64)
            k_mask = offs_k < k_end
            if TRANSPOSE:  # dx: the (BLOCK_K, BLOCK_N) tile of W itself, along its packed rows
                rows, row_mask, col0 = offs_k, k_mask, n_start
            else:  # forward: the (BLOCK_N, BLOCK_K) tile of W, transposed in registers below
                rows, row_mask, col0 = offs_n, n_mask, k_start
            if TRANSPOSE and not USE_DOT:
                a = tl.reshape(take_column(a_group, step), (BLOCK_M, BLOCK_K))
            else:  # the activation tile of the step, one load for every row
                a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
                            mask=m_mask[:, None] & k_mask[None, :], other=0.0, eviction_policy=EVICT_A)
            if not USE_DOT and BLOCK_M == 1:
                # the activations broadcast over the weight tile before it is decoded: then the layout
                # conversion's barriers come first and each decoded value is consumed at once (measured on
                # sm_90a: 162 -> 96 registers; decoding first keeps the whole tile live across them)
                a_row = tl.reshape(a.to(tl.float32), (BLOCK_K,))
                if TRANSPOSE:
                    a_tile = tl.broadcast_to(a_row[:, None], (BLOCK_K, BLOCK_N))
                else:
                    a_tile = tl.broadcast_to(a_row[None, :], (BLOCK_N, BLOCK_K))
            w = nf4_step_tile(packed_ptr, absmax_ptr, nested_absmax_ptr, code, code2, offset, scales, step, rows,
                              row_mask, col0, in_features, row_bytes, TILE_C, BLOCKSIZE, NESTED, EVEN_IN, ALIGNED,
                              GROUPED, WORDS, EVICT_W)
            w = w.to(a_ptr.dtype.element_ty)  # one rounding to the input dtype, as dequantize_4bit does
            if USE_DOT:
                # swap AB: (out-features x tokens) = op(W)ᵀ aᵀ, so the weight tile is the MMA's row operand
                # (64 rows: one Hopper warpgroup's wgmma tile) and the few tokens its N (see SPLITK_CONFIGS)
                if TRANSPOSE:
                    acc_t += tl.dot(tl.trans(w), tl.trans(a), input_precision="ieee")
                else:
                    acc_t += tl.dot(w, tl.trans(a), input_precision="ieee")
            elif BLOCK_M == 1:  # GEMV (decode): reduced along K in the tile's own layout
                acc += tl.reshape(tl.sum(w.to(tl.float32) * a_tile, axis=0 if TRANSPOSE else 1), (1, BLOCK_N))
            else:  # GEMV over a few rows (a planning override): one activation row at a time
                w = w.to(tl.float32)
                a = a.to(tl.float32)
                for row in tl.static_range(BLOCK_M):
                    a_row = tl.sum(tl.where((tl.arange(0, BLOCK_M) == row)[:, None], a, 0.0), axis=0)
                    if TRANSPOSE:
                        part = tl.sum(w * a_row[:, None], axis=0)
                    else:
                        part = tl.sum(w * a_row[None, :], axis=1)
                    acc += tl.where((tl.arange(0, BLOCK_M) == row)[:, None], part[None, :], 0.0)
    if HAS_LORA:
        lora = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        lora_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for r_start in range(0, tl.where(first_split, rank, 0), BLOCK_R):
            offs_r = r_start + tl.arange(0, BLOCK_R)
            r_mask = offs_r < rank
            h = tl.load(h_ptr + offs_m[:, None] * stride_hm + offs_r[None, :] * stride_hr,
                        mask=m_mask[:, None] & r_mask[None, :], other=0.0)
            e = tl.load(expand_ptr + offs_r[:, None] * stride_er + offs_n[None, :] * stride_en,
                        mask=r_mask[:, None] & n_mask[None, :], other=0.0)
            if USE_DOT:  # swapped as the main loop
                lora_t += tl.dot(tl.trans(e.to(h.dtype)), tl.trans(h), input_precision="ieee")
            else:
                lora += tl.sum(h.to(tl.float32)[:, :, None] * e.to(tl.float32)[None, :, :], axis=1)
        if USE_DOT:
            acc_t += scaling * lora_t
        else:
            acc += scaling * lora
    if USE_DOT:
        acc = tl.trans(acc_t)
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


def plan_nf4_lora_matmul(
    m: int, n: int, k: int, rank: int = 0, *, blocksize: int = 64, nested: bool = False, has_bias: bool = False,
    has_col_scale: bool = False, transpose_weight: bool = False, in_features: Optional[int] = None,
    fp32: bool = False, arch: tuple | None = None, sm_count: Optional[int] = None, packed_words: bool = True,
) -> LaunchPlan:
    """The launch of an ``(m, k) · (k, n)`` NF4 product with a rank-``rank`` LoRA epilogue (0: none).

    ``variant`` (``fastpeft.kernels.nf4_dispatch.nf4_path``): ``"gemv"`` (broadcast multiply-sum, split-K),
    ``"splitk"`` (``tl.dot`` tiles, split-K) or ``"cublas"`` (``path="torch"``: dequantise into the
    reusable buffer, then cuBLAS). ``constexprs["SPLIT_K"] > 1`` means the launcher accumulates into a
    zeroed fp32 workspace; ``runtime["k_per_split"]``: the K slice length. ``in_features``: the weight's
    (default: ``k``, or ``n`` with ``transpose_weight``), for the decode layout. ``fp32``: the inputs are
    fp32 (no tensor cores: the Triton range is shorter). ``packed_words``: the packed bytes start 4-byte
    aligned (then rows of whole words are read as words).
    """
    variant = nf4_path(m, n, fp32, arch, sm_count)
    if variant == "cublas":
        return LaunchPlan(op="nf4_lora_matmul", variant="cublas", path="torch")
    in_features = in_features if in_features is not None else (n if transpose_weight else k)
    if variant == "gemv":
        config = config_for(GEMV_CONFIGS, arch)
        block_m = triton.next_power_of_2(m)
        tile = config["dx" if transpose_weight else "fwd"]
        block_n, block_k, group, words = tile["BLOCK_N"], tile["BLOCK_K"], tile["GROUP"], tile["WORDS"]
        block_r = min(config["MAX_BLOCK_R"], triton.next_power_of_2(max(rank, 1)))
        k_per_split = tile["CHUNKS"] * block_k
        evict_w, evict_a = "evict_first", "evict_last"  # weights streamed once, activations reused
    else:
        config = config_for(SPLITK_CONFIGS, arch)
        block_m = min(64, max(16, triton.next_power_of_2(m)))
        tile = config["TILES"][block_m]
        block_n, block_k = tile["BLOCK_N"], config["BLOCK_K"]
        group = tile["GROUP_DX" if transpose_weight else "GROUP_FWD"]
        words = tile["WORDS_DX" if transpose_weight else "WORDS_FWD"]
        block_r = min(config["MAX_BLOCK_R"], max(16, triton.next_power_of_2(max(rank, 1))))
        tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
        k_groups = triton.cdiv(k, group * block_k)
        split_k = max(1, min(k_groups, config["MAX_SPLIT_K"], config["TARGET_PROGRAMS"] // tiles))
        k_per_split = triton.cdiv(k_groups, split_k) * group * block_k
        evict_w, evict_a = "", ""
    split_k = triton.cdiv(k, k_per_split)  # no empty splits
    # a group: GROUP steps whose absmax blocks load at once (per row: the group's columns in the forward, the
    # tile's columns in dx)
    layout = nf4_layout(in_features, blocksize, block_n if transpose_weight else block_k,
                        block_n if transpose_weight else group * block_k, words and packed_words)
    return LaunchPlan(
        op="nf4_lora_matmul", variant=variant, kernel=_nf4_lora_matmul_kernel,
        grid=(triton.cdiv(m, block_m), triton.cdiv(n, block_n), split_k),
        constexprs={"BLOCKSIZE": blocksize, "NESTED": nested, **layout, "TRANSPOSE": transpose_weight,
                    "HAS_BIAS": has_bias, "HAS_LORA": rank > 0, "HAS_COL_SCALE": has_col_scale,
                    "USE_DOT": variant == "splitk", "SPLIT_K": split_k, "BLOCK_M": block_m, "BLOCK_N": block_n,
                    "BLOCK_K": block_k, "BLOCK_R": block_r, "GROUP": group, "EVICT_W": evict_w, "EVICT_A": evict_a},
        num_warps=config["num_warps"], num_stages=config["num_stages"], runtime={"k_per_split": k_per_split},
    )


def mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` accumulated and returned in fp32; bf16/fp16 inputs stay on tensor cores on CUDA."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()  # CPU has no mixed-dtype mm; the inputs are exact in fp32


def _cublas_lora_matmul(a, weight: NF4Weight, transpose_weight, bias, lora_h, lora_expand, scaling, col_scale, out):
    """Large ``M``: dequantise into the reusable per-stream buffer, cuBLAS ``a · op(W)``, the LoRA term added in place
    (``addmm_``: ``B A`` never formed), then the column scale and the bias in place."""
    w = nf4_dequantize(weight, a.dtype, out=dequant_buffer(weight, a.dtype))
    w = w if transpose_weight else w.t()
    # adapter terms wider than out (fp32 h / B / scale with bf16 a): accumulate in fp32, round once at the end
    wide = out.dtype != torch.float32 and any(t is not None and t.dtype != out.dtype for t in (lora_h, col_scale))
    acc = torch.empty(out.shape, dtype=torch.float32, device=out.device) if wide else out
    if acc.dtype == a.dtype:
        torch.mm(a, w, out=acc)
    else:
        acc.copy_(mm_fp32(a, w))
    if lora_h is not None:
        acc.addmm_(lora_h.to(acc.dtype), lora_expand.to(acc.dtype), alpha=scaling)
    if col_scale is not None:
        acc.mul_(col_scale.to(acc.dtype))
    if bias is not None:
        acc.add_(bias)
    if acc is not out:
        out.copy_(acc)
    return out


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
    ``bias`` shares ``a``'s dtype; ``lora_h`` and ``lora_expand`` share one float dtype (the adapter's, e.g.
    fp32 with bf16 ``a``) and ``col_scale`` is any float: all terms meet in the fp32 accumulator and are
    rounded once. Returns ``out`` (a new ``(M, N)`` tensor of ``a.dtype`` unless given; a given one may also
    be float32, to keep the fp32 accumulation).
    """
    if not isinstance(weight, NF4Weight):
        raise TypeError(f"weight must be an NF4Weight, got {type(weight).__name__}")
    check_activations(a)
    m, k, n = product_dims(a, weight, transpose_weight)
    in_features = weight.shape[1]
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
        # the LoRA term may be in a wider adapter dtype than a (fp32 factors on a bf16 model): both tiles are
        # loaded in it and the product accumulates in fp32
        if lora_h.dtype not in DTYPES or lora_expand.dtype != lora_h.dtype:
            raise TypeError(f"lora_h dtype {lora_h.dtype} and lora_expand dtype {lora_expand.dtype} must be one "
                            f"dtype of {DTYPES}")
        for name, t in (("lora_h", lora_h), ("lora_expand", lora_expand)):
            if t.device != a.device:
                raise ValueError(f"{name} is on {t.device}, a is on {a.device}")
    check_vector("bias", bias, n, a)
    if bias is not None and bias.dtype != a.dtype:
        raise TypeError(f"bias dtype {bias.dtype} must equal a's dtype {a.dtype}")
    check_vector("col_scale", col_scale, n, a)
    if out is None:
        out = torch.empty((m, n), dtype=a.dtype, device=a.device)
    elif tuple(out.shape) != (m, n) or out.dtype not in (a.dtype, torch.float32) or out.device != a.device:
        raise ValueError(f"out must be ({m}, {n}) {a.dtype} or float32 on {a.device}, got {tuple(out.shape)} "
                         f"{out.dtype} {out.device}")
    if m == 0 or n == 0:
        return out
    if k == 0:
        raise ValueError("the weight has no columns to reduce over")

    plan = plan_nf4_lora_matmul(m, n, k, rank, blocksize=weight.blocksize, nested=weight.is_nested,
                                has_bias=bias is not None, has_col_scale=col_scale is not None,
                                transpose_weight=transpose_weight, in_features=in_features,
                                fp32=a.dtype == torch.float32, arch=device_arch(a.device),
                                packed_words=packed_word_aligned(weight))
    if plan.path == "torch":
        return _cublas_lora_matmul(a, weight, transpose_weight, bias, lora_h, lora_expand, scaling, col_scale, out)
    placeholder = a  # never read: the matching HAS_* flag is False
    h = lora_h if lora_h is not None else placeholder
    expand = lora_expand if lora_expand is not None else placeholder
    packed, absmax, code, nested_code, nested_absmax, nested_offset = nf4_kernel_args(weight)
    target = out if plan.constexprs["SPLIT_K"] == 1 else torch.zeros((m, n), dtype=torch.float32, device=a.device)
    launch(plan, a, packed, absmax, code, nested_code, nested_absmax,
           bias if bias is not None else placeholder, h, expand,
           col_scale if col_scale is not None else placeholder, target,
           nested_offset, float(scaling),
           m, n, k, rank, plan.runtime["k_per_split"], in_features, in_features // 2, in_features // weight.blocksize,
           a.stride(0), a.stride(1), h.stride(0), h.stride(1),
           expand.stride(0), expand.stride(1), target.stride(0), target.stride(1))
    if target is not out:
        out.copy_(target)
    return out
