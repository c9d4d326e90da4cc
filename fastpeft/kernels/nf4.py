"""NF4 dequantisation in Triton, bit-exact with bitsandbytes.

``nf4_dequant_values`` is the building block every NF4 kernel uses: given flat row-major element
indices of any tile shape, it loads the packed nibbles and the (possibly double-quantised) absmax and
returns the fp32 weight values. Arithmetic order matches bitsandbytes (see ``fastpeft/nf4.py``):
nested absmax ``code2[q] * absmax2[j // 256]`` rounded to fp32, ``+ offset`` rounded to fp32, then
``code[idx] * absmax`` in fp32. Kernels that need bit-exact values must be launched with
``enable_fp_fusion=False`` so the multiply and add are not contracted into one FMA.

``nf4_dequantize`` (the launcher) writes the full ``(out, in)`` weight; it exists for merges, for
tests and as the building block of "dequantise then cuBLAS" paths. Fused kernels never call it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..nf4 import NESTED_BLOCKSIZE as _NESTED_BLOCKSIZE, NF4_CODE, NF4Weight
from .plan import LaunchPlan, config_for, device_arch, launch

NESTED_BLOCKSIZE = tl.constexpr(_NESTED_BLOCKSIZE)

_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Elements per program, warps, stages of the dequantisation kernel, per GPU architecture.
# Source: untuned, no GPU (BLOCK 1024 = 8 elements per thread at 4 warps; warps and stages are Triton's
# defaults).
DEQUANT_CONFIGS = {"default": {"BLOCK": 1024, "num_warps": 4, "num_stages": 3}}
_code_cache: dict = {}


@triton.jit
def nf4_dequant_values(
    packed_ptr, absmax_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr, nested_offset_ptr,
    flat_idx, mask,
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
):
    """fp32 weight values at int64 ``flat_idx`` (any shape); masked-off lanes return 0."""
    byte = tl.load(packed_ptr + (flat_idx >> 1), mask=mask, other=0).to(tl.int32)
    # the first element of each pair (even index) sits in the high nibble
    nibble = (byte >> ((1 - (flat_idx & 1)) * 4).to(tl.int32)) & 0xF
    value = tl.load(code_ptr + nibble, mask=mask, other=0.0)
    block = flat_idx // BLOCKSIZE
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        absmax = tl.load(nested_code_ptr + q, mask=mask, other=0.0)
        absmax = absmax * tl.load(nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        absmax = absmax + tl.load(nested_offset_ptr)
    else:
        absmax = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return value * absmax


@triton.jit
def _nf4_dequant_kernel(
    packed_ptr, absmax_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr, nested_offset_ptr, out_ptr, numel,
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, BLOCK: tl.constexpr,
):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < numel
    w = nf4_dequant_values(
        packed_ptr, absmax_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr, nested_offset_ptr,
        idx, mask, BLOCKSIZE, NESTED,
    )
    tl.store(out_ptr + idx, w.to(out_ptr.dtype.element_ty), mask=mask)


def nf4_code(device: torch.device) -> torch.Tensor:
    """The 16 NF4 code values on ``device`` (cached; created on first use, never at import)."""
    device = torch.device(device)
    if device not in _code_cache:
        _code_cache[device] = NF4_CODE.to(device)
    return _code_cache[device]


def nf4_kernel_args(weight: NF4Weight) -> tuple:
    """``(packed, absmax, code, nested_code, nested_absmax, nested_offset)`` in the order
    ``nf4_dequant_values`` takes them (all tensors); for a non-nested weight the nested pointers repeat
    ``absmax`` (never read, ``NESTED=False``)."""
    if weight.is_nested:
        return (weight.packed, weight.absmax, nf4_code(weight.device), weight.nested_code,
                weight.nested_absmax, weight.nested_offset)
    return (weight.packed, weight.absmax, nf4_code(weight.device), weight.absmax, weight.absmax, weight.absmax)


def plan_nf4_dequantize(numel: int, blocksize: int, nested: bool, arch: tuple | None = None) -> LaunchPlan:
    """The launch that dequantises ``numel`` NF4 elements (``blocksize``, double-quantised if ``nested``).
    fp fusion is off: the nested absmax must round as bitsandbytes' separate multiply and add do."""
    config = config_for(DEQUANT_CONFIGS, arch)
    return LaunchPlan(
        op="nf4_dequantize", variant="elementwise", kernel=_nf4_dequant_kernel,
        grid=(triton.cdiv(numel, config["BLOCK"]),),
        constexprs={"BLOCKSIZE": blocksize, "NESTED": nested, "BLOCK": config["BLOCK"]},
        num_warps=config["num_warps"], num_stages=config["num_stages"], options={"enable_fp_fusion": False},
    )


def nf4_dequantize(weight: NF4Weight, dtype: torch.dtype = None) -> torch.Tensor:
    """Dequantise ``weight`` to a new contiguous ``(out, in)`` tensor of ``dtype`` with Triton."""
    dtype = weight.dtype if dtype is None else dtype
    if not isinstance(weight, NF4Weight):
        raise TypeError(f"expected an NF4Weight, got {type(weight).__name__}")
    if dtype not in _OUT_DTYPES:
        raise TypeError(f"NF4 dequantisation produces one of {_OUT_DTYPES}, not {dtype}")
    out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    numel = out.numel()
    if numel == 0:
        return out
    plan = plan_nf4_dequantize(numel, weight.blocksize, weight.is_nested, device_arch(weight.device))
    launch(plan, *nf4_kernel_args(weight), out, numel)
    return out
