"""NF4 decoding in Triton, bit-exact with bitsandbytes: the decode helpers every NF4 kernel uses.

``nf4_tile`` returns the fp32 values of a ``(len(rows), BLOCK_C)`` tile ``W[rows, col0 : col0 + BLOCK_C]``
of the logical ``(out, in)`` weight, in its natural orientation (columns = in-features, along which the
packed bytes are contiguous); a kernel that needs ``Wᵀ`` transposes the decoded tile in registers. The
K loops of the matmul kernels and of the dequantiser take ``GROUP`` tiles per pass: ``nf4_group_scales``
loads the absmax of all of them at once and ``nf4_step_tile`` decodes one with its share (``nf4_codes``
times ``nf4_scale``), so a tile costs its packed bytes alone.
Structure (as in bitsandbytes' CUDA GEMV and newest fused kernel, and GemLite):

- packed bytes are read as one contiguous ``(rows, BLOCK_C / 2)`` uint8 tile per call (each byte once;
  the row stride ``in / 2`` is a kernel argument, so the JIT's divisibility-by-16 specialisation gives
  16-byte vector loads when ``in % 32 == 0``), or as 32-bit words (``WORDS``: Triton holds a loaded byte
  per register, a word keeps 8 codes in one; the kernel's configuration says which it measured better);
- nibbles are split with shifts and put in element order with ``tl.interleave`` (high nibble = first
  element);
- codes map to values through the 16-entry table held on chip (``tl.gather`` on a 16-element tensor
  loaded once per program; on sm_80+ that is one shared-memory read per element, no global gather);
- the absmax is resolved once per (row, 64-element block): ``code2[q[blk]] * absmax2[blk >> 8] + offset``
  with ``code2`` on chip too, in bitsandbytes' fp32 order, then ``code * absmax`` in fp32; for a group
  of blocks inside one nested block (``ROW_NESTED``) the nested absmax is loaded once per row, and where a
  whole row lies in one (``ROW_IN_NESTED``: ``in / blocksize`` divides 256) a forward loads it once per
  program, before its loop (:func:`nf4_row_nested`).

Layouts where a row does not start on a byte (odd ``in``) or a block straddles rows (``in`` not a
multiple of ``min(blocksize, BLOCK_C)``) take the element-wise form of the same steps (``EVEN_IN`` /
``ALIGNED`` constexprs, chosen by :func:`nf4_layout`): correct for every bitsandbytes weight, vectorised
for every model layer (their ``in`` is a multiple of 64).

Kernels that need bit-exact values must be launched with ``enable_fp_fusion=False`` so the nested
multiply and add are not contracted into one FMA (the matmul kernels accept the last-bit difference).

``nf4_dequantize`` (the launcher) writes the full ``(out, in)`` weight, into a given buffer or a new
tensor: merges, tests, and the "dequantise then cuBLAS" path for large ``M``
(``fastpeft.nf4.dequant_buffer``: one reusable buffer per thread, stream and dtype, so that path holds at most one
layer's dense weight).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..nf4 import NF4_CODE, NF4Weight
from .checks import DTYPES
from .plan import LaunchPlan, config_for, device_arch, launch

_code_cache: dict = {}
# Dequantiser tiles per GPU architecture. Source: a memory-bound copy; a program takes 16 rows x GROUPS groups
# of GROUP tiles of 256 columns, the tables loaded once and a group's absmax once per row; a tile is 32 codes
# per thread at 4 warps (one 16-byte packed load, four 16-byte bf16 stores), 1 stage (check-kernels).
DEQUANT_CONFIGS = {"default": {"BLOCK_R": 16, "BLOCK_C": 256, "GROUP": 4, "GROUPS": 2, "WORDS": False,
                               "num_warps": 4, "num_stages": 1}}


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
def nf4_codes(packed_ptr, code, rows, row_mask, col0, in_features, row_bytes,
              BLOCK_C: tl.constexpr, EVEN_IN: tl.constexpr, EVICT: tl.constexpr, WORDS: tl.constexpr):
    """fp32 NF4 code values, not yet scaled, of the ``(len(rows), BLOCK_C)`` tile ``W[rows, col0 : col0 +
    BLOCK_C]``. ``WORDS``: the packed rows as 32-bit words (8 codes each: rows of whole words, a 4-byte aligned
    weight), unpacked with shifts, so a 16-byte load stays in 4 registers; ``EVEN_IN``: one contiguous byte
    tile (each byte once, vector loads, but Triton holds one byte per register); else element-wise. ``EVICT``:
    the packed loads' eviction policy (``""``: the default). Like every helper here it has no default value:
    Triton 3.3-3.6 fails to compile a string ``tl.constexpr`` left at its default."""
    if WORDS:
        # little-endian: byte j of a word holds elements 2j (high nibble) and 2j + 1 (low nibble)
        offs_w = col0 // 8 + tl.arange(0, BLOCK_C // 8)
        row_words = row_bytes // 4
        word = tl.load(packed_ptr.to(tl.pointer_type(tl.int32)) + rows[:, None] * row_words + offs_w[None, :],
                       mask=row_mask[:, None] & (offs_w < row_words)[None, :], other=0, eviction_policy=EVICT)
        element = tl.arange(0, 8)
        shift = (element // 2) * 8 + (1 - element % 2) * 4
        idx = (word[:, :, None] >> shift[None, None, :]) & 0xF
        idx = tl.reshape(idx, (rows.shape[0], BLOCK_C))
    elif EVEN_IN:
        # byte j of a row holds elements 2j (high nibble) and 2j + 1 (low nibble)
        offs_b = col0 // 2 + tl.arange(0, BLOCK_C // 2)
        byte = tl.load(packed_ptr + rows[:, None] * row_bytes + offs_b[None, :],
                       mask=row_mask[:, None] & (offs_b < row_bytes)[None, :], other=0,
                       eviction_policy=EVICT)
        idx = tl.interleave(byte >> 4, byte & 0xF).to(tl.int32)
    else:
        cols = col0 + tl.arange(0, BLOCK_C)
        flat = rows[:, None] * in_features + cols[None, :]
        mask = row_mask[:, None] & (cols < in_features)[None, :]
        byte = tl.load(packed_ptr + (flat >> 1), mask=mask, other=0, eviction_policy=EVICT).to(tl.int32)
        idx = (byte >> ((1 - (flat & 1)) * 4).to(tl.int32)) & 0xF
    return _lookup(code, idx)


@triton.jit
def nf4_scales(absmax_ptr, nested_absmax_ptr, code2, offset, rows, row_mask, block0, row_blocks,
               NB: tl.constexpr, NESTED: tl.constexpr, ROW_NESTED: tl.constexpr, row_nested=None):
    """fp32 absmax ``(len(rows), NB)`` of the blocks ``block0 .. block0 + NB`` of each row (0 where masked or
    past the row), for weights whose rows hold whole blocks (``row_blocks = in_features // blocksize``).

    One load per row of the ``NB`` contiguous absmax bytes (vectorised when ``row_blocks`` and ``block0`` are
    multiples of ``NB``, which the JIT sees through their divisibility). ``ROW_NESTED``: the ``NB`` blocks of
    a row share one nested absmax (``row_blocks`` and ``block0`` multiples of ``NB``, which divides the nested
    blocksize 256, so no group of blocks crosses a nested block), loaded once per row, or given: ``row_nested``,
    each row's own (:func:`nf4_row_nested`)."""
    blocks = block0 + tl.arange(0, NB)
    first = rows * row_blocks + block0
    mask = row_mask[:, None] & (blocks < row_blocks)[None, :]
    block = first[:, None] + tl.arange(0, NB)[None, :]
    # _absmax's arithmetic written out: routed through it (the nested scale passed in), ptxas capped the sm_89
    # DoRA-norm split-K launch at 96 registers and spilled 8 B (check-kernels)
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        if row_nested is not None:
            scale = row_nested[:, None]
        elif ROW_NESTED:
            scale = tl.load(nested_absmax_ptr + (first >> 8), mask=row_mask, other=0.0)[:, None]
        else:
            scale = tl.load(nested_absmax_ptr + (block >> 8), mask=mask, other=0.0)
        absmax = _lookup(code2, q) * scale  # rounded to fp32, then + offset rounded again (bitsandbytes)
        absmax = absmax + offset
    else:
        absmax = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return tl.where(mask, absmax, 0.0)


@triton.jit
def nf4_scale(values, absmax):
    """``values`` ``(R, C)`` times the absmax ``(R, NB)`` of its ``NB`` equal column spans (one per block)."""
    R: tl.constexpr = values.shape[0]
    C: tl.constexpr = values.shape[1]
    NB: tl.constexpr = absmax.shape[1]
    if NB == 1:
        return values * absmax
    return values * tl.reshape(tl.broadcast_to(absmax[:, :, None], (R, NB, C // NB)), (R, C))


@triton.jit
def _split_half(t, bit: tl.constexpr):
    """The entries of ``t`` ``(X, G)`` whose column index has its lowest bit ``bit``: ``(X, G // 2)``."""
    even, odd = tl.split(tl.reshape(t, (t.shape[0], t.shape[1] // 2, 2)))
    if bit:
        return odd
    else:
        return even


@triton.jit
def take_column(t, column: tl.constexpr):
    """Column ``column`` (a compile-time index) of ``t`` ``(X, G)``, ``G`` a power of two up to 8, as ``(X,)``:
    register moves (``tl.split``), no reduction across threads."""
    G: tl.constexpr = t.shape[1]
    if G >= 2:
        t = _split_half(t, column % 2)
    if G >= 4:
        t = _split_half(t, (column // 2) % 2)
    if G >= 8:
        t = _split_half(t, (column // 4) % 2)
    return tl.reshape(t, (t.shape[0],))


@triton.jit
def nf4_group_scales(absmax_ptr, nested_absmax_ptr, code2, offset, k_group, k_end, offs_n, n_mask, n_start,
                     row_blocks, TRANSPOSE: tl.constexpr, STRIDED: tl.constexpr, GROUP: tl.constexpr,
                     BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
                     ROW_NESTED: tl.constexpr, row_nested=None):
    """The absmax of the ``GROUP`` steps of a K-loop group starting at ``k_group``, loaded at once, as
    ``(R * NB, GROUP)``: column ``s`` (:func:`take_column`), reshaped ``(R, NB)``, scales step ``s``'s tile.

    Forward (``TRANSPOSE`` False): the tiles are ``W[offs_n, k : k + BLOCK_K]``, ``R = BLOCK_N`` rows of
    ``NB = BLOCK_K // BLOCKSIZE`` blocks each, the group's ``GROUP * BLOCK_K`` columns in one load per row.
    dx: the tiles are ``W[rows, n_start : n_start + BLOCK_N]`` over the group's ``GROUP * BLOCK_K`` W rows,
    ``R = BLOCK_K``, ``NB = BLOCK_N // BLOCKSIZE``; step ``s`` holds the group's rows ``s * BLOCK_K + t``, or
    ``t * GROUP + s`` with ``STRIDED``. ``row_nested``: the forward's rows' nested absmax (:func:`nf4_row_nested`)."""
    GROUP_K: tl.constexpr = GROUP * BLOCK_K
    if TRANSPOSE:
        NB: tl.constexpr = BLOCK_N // BLOCKSIZE
        g_rows = k_group + tl.arange(0, GROUP_K).to(tl.int64)
        scales = nf4_scales(absmax_ptr, nested_absmax_ptr, code2, offset, g_rows, g_rows < k_end,
                            n_start // BLOCKSIZE, row_blocks, NB, NESTED, ROW_NESTED)
        if STRIDED:
            scales = tl.permute(tl.reshape(scales, (BLOCK_K, GROUP, NB)), (0, 2, 1))
        else:
            scales = tl.permute(tl.reshape(scales, (GROUP, BLOCK_K, NB)), (1, 2, 0))
        return tl.reshape(scales, (BLOCK_K * NB, GROUP))
    else:
        NB: tl.constexpr = BLOCK_K // BLOCKSIZE
        scales = nf4_scales(absmax_ptr, nested_absmax_ptr, code2, offset, offs_n, n_mask,
                            k_group // BLOCKSIZE, row_blocks, GROUP * NB, NESTED, ROW_NESTED, row_nested)
        return tl.reshape(tl.permute(tl.reshape(scales, (BLOCK_N, GROUP, NB)), (0, 2, 1)), (BLOCK_N * NB, GROUP))


@triton.jit
def nf4_row_nested(nested_absmax_ptr, rows, row_mask, row_blocks):
    """The nested absmax of each of ``rows``, for a forward whose rows each lie in one nested block
    (``NESTED`` and ``ROW_IN_NESTED``): loaded once per row and program, before the loop."""
    return tl.load(nested_absmax_ptr + ((rows * row_blocks) >> 8), mask=row_mask, other=0.0)


@triton.jit
def nf4_step_tile(packed_ptr, absmax_ptr, nested_absmax_ptr, code, code2, offset, group_scales,
                  step: tl.constexpr, rows, row_mask, col0, in_features, row_bytes,
                  BLOCK_C: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, EVEN_IN: tl.constexpr,
                  ALIGNED: tl.constexpr, GROUPED: tl.constexpr, WORDS: tl.constexpr, EVICT: tl.constexpr):
    """fp32 tile ``W[rows, col0 : col0 + BLOCK_C]`` of step ``step`` of a group: scaled by its column of
    ``group_scales`` (:func:`nf4_group_scales`) when ``GROUPED``, else by scales it loads itself
    (:func:`nf4_tile`: rows that do not hold whole blocks)."""
    if GROUPED:
        absmax = tl.reshape(take_column(group_scales, step), (rows.shape[0], BLOCK_C // BLOCKSIZE))
        return nf4_scale(nf4_codes(packed_ptr, code, rows, row_mask, col0, in_features, row_bytes, BLOCK_C,
                                   EVEN_IN, EVICT, WORDS), absmax)
    else:
        return nf4_tile(packed_ptr, absmax_ptr, nested_absmax_ptr, code, code2, offset, rows, row_mask, col0,
                        in_features, row_bytes, BLOCK_C, BLOCKSIZE, NESTED, EVEN_IN, ALIGNED, EVICT)


@triton.jit
def nf4_tile(
    packed_ptr, absmax_ptr, nested_absmax_ptr, code, code2, offset,
    rows, row_mask, col0, in_features, row_bytes,
    BLOCK_C: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
    EVEN_IN: tl.constexpr, ALIGNED: tl.constexpr, EVICT: tl.constexpr,
):
    """fp32 ``(len(rows), BLOCK_C)`` tile ``W[rows, col0 : col0 + BLOCK_C]``; 0 where ``row_mask`` is off
    or the column is ``>= in_features``. ``rows`` int64; ``col0`` a multiple of ``BLOCK_C``; ``row_bytes =
    in_features // 2``; ``code`` / ``code2`` / ``offset`` from :func:`nf4_tables`; ``EVEN_IN`` and
    ``ALIGNED`` from :func:`nf4_layout`; ``EVICT`` the packed bytes' eviction policy. Loads its own scales;
    the matmul kernels load a group of steps' scales at once (:func:`nf4_scales`) and use :func:`nf4_codes`."""
    values = nf4_codes(packed_ptr, code, rows, row_mask, col0, in_features, row_bytes, BLOCK_C, EVEN_IN, EVICT,
                       False)
    if ALIGNED:
        # every (row, block) of the tile is whole: one absmax per block, broadcast over its elements
        NB: tl.constexpr = BLOCK_C // BLOCKSIZE if BLOCK_C > BLOCKSIZE else 1
        SPAN: tl.constexpr = BLOCK_C // NB
        first = (rows * in_features + col0) // BLOCKSIZE
        offs_nb = tl.arange(0, NB)
        block = first[:, None] + offs_nb[None, :]
        block_mask = row_mask[:, None] & (col0 + offs_nb * SPAN < in_features)[None, :]
        return nf4_scale(values, _absmax(absmax_ptr, nested_absmax_ptr, code2, offset, block, block_mask, NESTED))
    else:
        cols = col0 + tl.arange(0, BLOCK_C)
        mask = row_mask[:, None] & (cols < in_features)[None, :]
        block = (rows[:, None] * in_features + cols[None, :]) // BLOCKSIZE
        return values * _absmax(absmax_ptr, nested_absmax_ptr, code2, offset, block, mask, NESTED)


@triton.jit
def _nf4_dequant_kernel(
    packed_ptr, absmax_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr, nested_offset_ptr, out_ptr,
    out_features, in_features, row_bytes, row_blocks, cols_per_program, stride_om,
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, EVEN_IN: tl.constexpr, ALIGNED: tl.constexpr,
    GROUPED: tl.constexpr, ROW_NESTED: tl.constexpr, ROW_IN_NESTED: tl.constexpr, WORDS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, GROUP: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < out_features
    # BLOCK_R rows x cols_per_program columns per program (a multiple of GROUP * BLOCK_C), GROUP tiles per pass
    GROUP_C: tl.constexpr = GROUP * BLOCK_C
    c_begin = tl.program_id(1) * (cols_per_program // GROUP_C) * GROUP_C
    c_end = tl.minimum(c_begin + cols_per_program, in_features)
    code, code2, offset = nf4_tables(code_ptr, nested_code_ptr, nested_offset_ptr, NESTED)
    row_nested = None  # the rows' nested absmax, loaded once where each row lies in one nested block
    if NESTED and ROW_IN_NESTED:
        row_nested = nf4_row_nested(nested_absmax_ptr, rows, row_mask, row_blocks)
    for c_group in range(c_begin, c_end, GROUP_C):
        scales = code  # stands in when not GROUPED (each tile then loads its own)
        if GROUPED:
            scales = nf4_group_scales(absmax_ptr, nested_absmax_ptr, code2, offset, c_group, c_end, rows, row_mask,
                                      0, row_blocks, False, False, GROUP, BLOCK_C, BLOCK_R, BLOCKSIZE, NESTED,
                                      ROW_NESTED, row_nested)
        for step in tl.static_range(GROUP):
            col0 = c_group + step * BLOCK_C
            w = nf4_step_tile(packed_ptr, absmax_ptr, nested_absmax_ptr, code, code2, offset, scales, step, rows,
                              row_mask, col0, in_features, row_bytes, BLOCK_C, BLOCKSIZE, NESTED, EVEN_IN, ALIGNED,
                              GROUPED, WORDS, "evict_first")
            cols = col0 + tl.arange(0, BLOCK_C)
            tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], w.to(out_ptr.dtype.element_ty),
                     mask=row_mask[:, None] & (cols < in_features)[None, :])


def nf4_layout(in_features: int, blocksize: int, block_c: int, group_cols: int = 0, words: bool = False) -> dict:
    """The layout constexprs of a kernel decoding tiles of ``block_c`` columns: ``EVEN_IN`` (rows start on a
    byte, ``in`` even) and ``ALIGNED`` (no absmax block straddles two rows of a tile) for :func:`nf4_tile`;
    with ``group_cols`` (the columns of a row whose absmax a kernel loads at once, a power of two) also
    ``GROUPED`` (rows hold whole blocks and a step holds whole blocks: :func:`nf4_scales` applies),
    ``ROW_NESTED`` (every group of a row lies in one nested block: one nested absmax per row and group),
    ``ROW_IN_NESTED`` (every row lies in one: one per row, :func:`nf4_row_nested`) and ``WORDS`` (packed rows
    read as 32-bit words: ``words``, the kernel's configuration asking for it on a 4-byte aligned weight, and
    rows of whole words)."""
    layout = {"EVEN_IN": in_features % 2 == 0, "ALIGNED": in_features % min(blocksize, block_c) == 0}
    if group_cols:
        group_blocks = max(1, group_cols // blocksize)
        layout["GROUPED"] = in_features % blocksize == 0 and blocksize <= block_c
        layout["ROW_NESTED"] = layout["GROUPED"] and (in_features // blocksize) % group_blocks == 0
        layout["ROW_IN_NESTED"] = layout["GROUPED"] and 256 % (in_features // blocksize) == 0
        layout["WORDS"] = layout["GROUPED"] and in_features % 8 == 0 and words
    return layout


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


def packed_word_aligned(weight: NF4Weight) -> bool:
    """Whether ``weight``'s packed bytes start 4-byte aligned, so rows of whole words may be read as 32-bit words
    (the ``packed_words`` argument of the NF4 plans; a view into a larger buffer may start anywhere)."""
    return weight.packed.data_ptr() % 4 == 0


def plan_nf4_dequantize(out_features: int, in_features: int, blocksize: int, nested: bool,
                        arch: tuple | None = None, packed_words: bool = True) -> LaunchPlan:
    """The launch that dequantises an ``(out_features, in_features)`` NF4 weight (``blocksize``,
    double-quantised if ``nested``) in 2-D tiles. fp fusion is off: the nested absmax must round as
    bitsandbytes' separate multiply and add do. ``packed_words``: the packed bytes start 4-byte aligned."""
    config = config_for(DEQUANT_CONFIGS, arch)
    block_r, block_c, group = config["BLOCK_R"], config["BLOCK_C"], config["GROUP"]
    cols_per_program = config["GROUPS"] * group * block_c
    layout = nf4_layout(in_features, blocksize, block_c, group * block_c, packed_words and config["WORDS"])
    return LaunchPlan(
        op="nf4_dequantize", variant="tiles", kernel=_nf4_dequant_kernel,
        grid=(triton.cdiv(out_features, block_r), triton.cdiv(in_features, cols_per_program)),
        constexprs={"BLOCKSIZE": blocksize, "NESTED": nested, **layout, "BLOCK_R": block_r, "BLOCK_C": block_c,
                    "GROUP": group},
        num_warps=config["num_warps"], num_stages=config["num_stages"], options={"enable_fp_fusion": False},
        runtime={"cols_per_program": cols_per_program},
    )


def nf4_dequantize(weight: NF4Weight, dtype: torch.dtype = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantise ``weight`` with Triton into ``out`` (a contiguous ``(out, in)`` tensor of ``dtype``, e.g.
    :func:`fastpeft.nf4.dequant_buffer`) or a new one; returns it."""
    dtype = weight.dtype if dtype is None else dtype
    if not isinstance(weight, NF4Weight):
        raise TypeError(f"expected an NF4Weight, got {type(weight).__name__}")
    if dtype not in DTYPES:
        raise TypeError(f"NF4 dequantisation produces one of {DTYPES}, not {dtype}")
    if out is None:
        out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    elif out.shape != weight.shape or out.dtype != dtype or out.device != weight.device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {tuple(weight.shape)} {dtype} tensor on {weight.device}, got "
                         f"{tuple(out.shape)} {out.dtype} {out.device}")
    out_features, in_features = weight.shape
    if out.numel() == 0:
        return out
    plan = plan_nf4_dequantize(out_features, in_features, weight.blocksize, weight.is_nested,
                               device_arch(weight.device), packed_words=packed_word_aligned(weight))
    launch(plan, *nf4_kernel_args(weight), out, out_features, in_features, in_features // 2,
           in_features // weight.blocksize, plan.runtime["cols_per_program"], out.stride(0))
    return out
