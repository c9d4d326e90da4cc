"""The NF4 dequantisation primitive (``fastpeft::nf4_dequantize``): an :class:`~fastpeft.nf4.NF4Weight` as its dense
``(out, in)`` weight, bit-exact with bitsandbytes' ``dequantize_4bit``. CUDA kernel: the Triton dequantiser
(``fastpeft.kernels.nf4.nf4_dequantize``); CPU kernel: ``fastpeft.reference.nf4_dequantize`` (bitsandbytes' own C++
CPU dequantiser where it is bit-exact, else ``NF4Weight.dequantize``)."""

from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from ..nf4 import WEIGHT_OP_SCHEMA, NF4Weight, weight_from_op_args, weight_op_args
from .dispatch import eager_reference, register_primitive

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _launch(weight: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    from ..kernels.nf4 import nf4_dequantize as kernel

    return kernel(weight, dtype)


def _from_op_args(*args) -> tuple:
    return weight_from_op_args(*args[:10]), args[10]


def _fake(dense, packed, absmax, nested_code, nested_absmax, nested_offset, out_features, in_features, blocksize,
          weight_dtype, dtype):
    return packed.new_empty((out_features, in_features), dtype=dtype)


_nf4_dequantize_op = register_primitive(
    "nf4_dequantize", f"({WEIGHT_OP_SCHEMA}, ScalarType dtype) -> Tensor",
    _fake, _launch, reference.nf4_dequantize, _from_op_args)


def nf4_dequantize(weight: NF4Weight, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The dense ``(out, in)`` weight in ``dtype`` (float32, float16 or bfloat16; default: the weight's dtype), a
    tensor of its own; Triton on CUDA, the reference on CPU (``fastpeft.ops.dispatch``). Bit-exact with
    bitsandbytes either way."""
    if not isinstance(weight, NF4Weight):
        raise TypeError(f"expected an NF4Weight, got {type(weight).__name__}")
    dtype = weight.dtype if dtype is None else dtype
    if dtype not in _DTYPES:
        raise TypeError(f"NF4 dequantisation produces float32, float16 or bfloat16, not {dtype}")
    if eager_reference(weight.device):
        return reference.nf4_dequantize(weight, dtype)
    return _nf4_dequantize_op(*weight_op_args(weight), dtype)
