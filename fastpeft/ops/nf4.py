"""NF4 dequantisation as a ``torch.library`` custom op (``fastpeft::nf4_dequantize``), dispatched to
the Triton kernel or to the reference path, ``fastpeft.reference.base_weight`` (bitsandbytes' own C++ CPU
dequantiser where it is bit-exact, else ``NF4Weight.dequantize``)."""

from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from ..nf4 import NF4Weight
from .dispatch import backend_for, run_kernel


@torch.library.custom_op("fastpeft::nf4_dequantize", mutates_args=())
def _nf4_dequantize_op(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_code: Optional[torch.Tensor],
    nested_absmax: Optional[torch.Tensor],
    nested_offset: Optional[torch.Tensor],
    out_features: int,
    in_features: int,
    blocksize: int,
    weight_dtype: torch.dtype,
    dtype: torch.dtype,
) -> torch.Tensor:
    weight = NF4Weight.from_op_args(packed, absmax, nested_code, nested_absmax, nested_offset, out_features,
                                    in_features, blocksize, weight_dtype)
    if backend_for(packed.device) == "triton":
        from ..kernels.nf4 import nf4_dequantize

        return run_kernel("nf4_dequantize", lambda: nf4_dequantize(weight, dtype),
                          lambda: reference.base_weight(weight, dtype))
    return reference.base_weight(weight, dtype)


@_nf4_dequantize_op.register_fake
def _(packed, absmax, nested_code, nested_absmax, nested_offset, out_features, in_features, blocksize,
      weight_dtype, dtype):
    return packed.new_empty((out_features, in_features), dtype=dtype)


def dequantize_nf4(weight: NF4Weight, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The dense ``(out, in)`` weight in ``dtype`` (default: the weight's dtype); Triton on CUDA,
    the reference path on CPU (see ``fastpeft.ops.dispatch``). Bit-exact with bitsandbytes either way."""
    if not isinstance(weight, NF4Weight):
        raise TypeError(f"expected an NF4Weight, got {type(weight).__name__}")
    dtype = weight.dtype if dtype is None else dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"NF4 dequantisation produces float32, float16 or bfloat16, not {dtype}")
    return _nf4_dequantize_op(*weight.op_args(), dtype)
