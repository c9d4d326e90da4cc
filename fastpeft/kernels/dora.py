"""DoRA's weight norm in Triton: ``n[o] = ‖W[o, :] + s · (B A)[o, :]‖₂`` per output row, tile by tile.

Math: ``W`` ``(out, in)`` dense or packed NF4, ``A`` ``(r, in)``, ``B`` ``(out, r)``, ``s`` the LoRA
scaling. Each program owns ``BLOCK_O`` output rows and walks ``in`` in ``BLOCK_K`` slices: it decodes the
``W`` tile (``fastpeft.kernels.nf4.nf4_dequant_values`` for NF4, fp32 values as ``dequantize_4bit``
gives them), adds ``s · B_tile · A_slice`` (one ``tl.dot`` over the whole rank) and accumulates the
squares in fp32. Neither ``B A`` nor the dequantised ``W`` is ever materialised: the memory is ``(out,)``
where PEFT builds two ``(out, in)`` tensors. The norm is a constant of the DoRA forward (no gradient,
DoRA paper §4.3), so there is no backward kernel.

Everything is computed in fp32 from the stored values (dense ``W``, ``A``, ``B`` are read in their own
dtypes and upcast) and the norm is rounded once to the output dtype; PEFT instead forms ``W + s B A`` in
the input dtype before the norm, which differs by that dtype's rounding (fp32: none measurable).
fp32 ``tl.dot`` uses ``input_precision="ieee"`` (tf32 would round ``A`` and ``B`` to 10 bits).

Limits: the rank is one ``BLOCK_R`` tile (``r <= MAX_RANK``, plenty for DoRA's usual 8-64); block sizes
untuned (no GPU in this task).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..nf4 import NF4Weight
from .nf4 import nf4_dequant_values, nf4_kernel_args
from .plan import LaunchPlan, config_for, device_arch, launch

# Output rows and K slice per program, warps, stages, per GPU architecture. Source: untuned, no GPU
# (tl.dot needs >= 16 per dimension; warps and stages are Triton's defaults).
NORM_CONFIGS = {"default": {"BLOCK_O": 32, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}}
MAX_RANK = 256
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _dora_norm_kernel(
    w_ptr, absmax_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr, a_ptr, b_ptr, norm_ptr,
    nested_offset_ptr, scaling, out_features, in_features, rank,
    stride_wo, stride_wi, stride_ar, stride_ai, stride_bo, stride_br,
    IS_NF4: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    offs_o = tl.program_id(0).to(tl.int64) * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_r = tl.arange(0, BLOCK_R).to(tl.int64)
    o_mask = offs_o < out_features
    r_mask = offs_r < rank
    lora_b = tl.load(b_ptr + offs_o[:, None] * stride_bo + offs_r[None, :] * stride_br,
                     mask=o_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
    sum_sq = tl.zeros((BLOCK_O,), dtype=tl.float32)
    for k_start in range(0, in_features, BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K).to(tl.int64)
        k_mask = offs_k < in_features
        w_mask = o_mask[:, None] & k_mask[None, :]
        w_idx = offs_o[:, None] * stride_wo + offs_k[None, :] * stride_wi
        if IS_NF4:
            w = nf4_dequant_values(w_ptr, absmax_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr,
                                   nested_offset_ptr, w_idx, w_mask, BLOCKSIZE, NESTED)
        else:
            w = tl.load(w_ptr + w_idx, mask=w_mask, other=0.0).to(tl.float32)
        lora_a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ai,
                         mask=r_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        merged = w + scaling * tl.dot(lora_b, lora_a, input_precision="ieee")
        sum_sq += tl.sum(merged * merged, axis=1)
    tl.store(norm_ptr + offs_o, tl.sqrt(sum_sq).to(norm_ptr.dtype.element_ty), mask=o_mask)


def plan_dora_weight_norm(out_features: int, rank: int, is_nf4: bool, blocksize: int = 64, nested: bool = False,
                          arch: tuple | None = None) -> LaunchPlan:
    """The norm launch for an ``(out_features, in)`` weight (dense, or NF4 with ``blocksize`` / ``nested``)
    and rank ``rank``: one program per ``BLOCK_O`` rows, the whole rank in one ``BLOCK_R`` tile."""
    config = config_for(NORM_CONFIGS, arch)
    return LaunchPlan(
        op="dora_weight_norm", variant="nf4" if is_nf4 else "dense", kernel=_dora_norm_kernel,
        grid=(triton.cdiv(out_features, config["BLOCK_O"]),),
        constexprs={"IS_NF4": is_nf4, "BLOCKSIZE": blocksize, "NESTED": nested, "BLOCK_O": config["BLOCK_O"],
                    "BLOCK_K": config["BLOCK_K"], "BLOCK_R": max(16, triton.next_power_of_2(rank))},
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )


def dora_weight_norm(
    weight,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``‖W + s·B A‖₂`` per output row as ``(out,)`` in ``dtype`` (default ``lora_a.dtype``).

    ``weight``: dense ``(out, in)`` tensor (any strides) or :class:`NF4Weight`; ``lora_a`` ``(r, in)`` and
    ``lora_b`` ``(out, r)`` float tensors (any strides, any of fp32/fp16/bf16), ``1 <= r <= MAX_RANK``.
    ``out``: an optional contiguous ``(out,)`` buffer of ``dtype``. No autograd (the norm is detached).
    """
    is_nf4 = isinstance(weight, NF4Weight)
    if not is_nf4 and not (isinstance(weight, torch.Tensor) and weight.dim() == 2):
        raise TypeError(f"weight must be a 2-D tensor or an NF4Weight, got {type(weight).__name__}")
    if not is_nf4 and weight.dtype not in _DTYPES:
        raise TypeError(f"weight dtype must be one of {_DTYPES}, got {weight.dtype}")
    out_features, in_features = weight.shape
    for name, t in (("lora_a", lora_a), ("lora_b", lora_b)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor, got shape {tuple(getattr(t, 'shape', ()))}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} dtype must be one of {_DTYPES}, got {t.dtype}")
        if t.device != weight.device:
            raise ValueError(f"{name} is on {t.device}, the weight on {weight.device}")
    rank = lora_a.shape[0]
    if lora_a.shape[1] != in_features or tuple(lora_b.shape) != (out_features, rank):
        raise ValueError(f"lora_a {tuple(lora_a.shape)} and lora_b {tuple(lora_b.shape)} must be (r, {in_features}) "
                         f"and ({out_features}, r) for a {tuple(weight.shape)} weight")
    if not 1 <= rank <= MAX_RANK:
        raise ValueError(f"rank must be in [1, {MAX_RANK}], got {rank}")
    dtype = lora_a.dtype if dtype is None else dtype
    if dtype not in _DTYPES:
        raise TypeError(f"dtype must be one of {_DTYPES}, got {dtype}")
    if out is None:
        out = torch.empty(out_features, dtype=dtype, device=weight.device)
    elif tuple(out.shape) != (out_features,) or out.dtype != dtype or out.device != weight.device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous ({out_features},) {dtype} tensor on {weight.device}, got "
                         f"{tuple(out.shape)} {out.dtype} {out.device}")
    if out_features == 0:
        return out
    if is_nf4:
        packed, absmax, code, nested_code, nested_absmax, nested_offset = nf4_kernel_args(weight)
        blocksize, nested = weight.blocksize, weight.is_nested
        stride_wo, stride_wi = in_features, 1
    else:
        # the five NF4 pointers are never read (IS_NF4=False)
        packed, absmax, code, nested_code, nested_absmax, nested_offset = (weight,) * 6
        blocksize, nested = 64, False
        stride_wo, stride_wi = weight.stride()
    plan = plan_dora_weight_norm(out_features, rank, is_nf4, blocksize, nested, device_arch(weight.device))
    launch(plan, packed, absmax, code, nested_code, nested_absmax, lora_a, lora_b, out,
           nested_offset, float(scaling), out_features, in_features, rank,
           stride_wo, stride_wi, lora_a.stride(0), lora_a.stride(1), lora_b.stride(0), lora_b.stride(1))
    return out
