"""The ``nf4_dequantize`` primitive (``fastpeft::nf4_dequantize``): opcheck, the eager call against the op on both
backends (bit-exact with ``NF4Weight.dequantize``), input errors. The Triton launcher itself:
tests/test_kernels_nf4.py; the format: tests/test_nf4.py."""

import pytest
import torch

from fastpeft import reference
from fastpeft.nf4 import NF4Weight, weight_op_args
from fastpeft.ops import nf4_dequantize

from conftest import DEVICE


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequant_op_passes_opcheck(double_quant, dtype):
    weight = NF4Weight.quantize(torch.randn(9, 64, device=DEVICE), 64, double_quant=double_quant)
    torch.library.opcheck(torch.ops.fastpeft.nf4_dequantize.default, (*weight_op_args(weight), dtype))
    odd = NF4Weight.quantize(torch.randn(7, 33, device=DEVICE), 32, double_quant=double_quant)  # odd element count
    torch.library.opcheck(torch.ops.fastpeft.nf4_dequantize.default, (*weight_op_args(odd), dtype))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_eager_call_and_the_op_agree_bit_for_bit(monkeypatch, backend):
    """The eager shortcut (the reference called directly) and the op's kernel give the same tensor, a tensor of
    its own, on either backend."""
    monkeypatch.setenv("FASTPEFT_BACKEND", backend)
    weight = NF4Weight.quantize(torch.randn(37, 53, device=DEVICE) * 3, 64, double_quant=True)
    for dtype in (torch.float32, torch.bfloat16):
        eager = nf4_dequantize(weight, dtype)
        op = torch.ops.fastpeft.nf4_dequantize.default(*weight_op_args(weight), dtype)
        assert torch.equal(eager, weight.dequantize(dtype)) and torch.equal(op, eager)
        assert torch.equal(reference.nf4_dequantize(weight, dtype), eager)
        eager.fill_(0)  # not a buffer another call reads back
        assert torch.equal(nf4_dequantize(weight, dtype), op)


def test_dequant_rejects_bad_dtype():
    weight = NF4Weight.quantize(torch.randn(4, 64), 64)
    with pytest.raises(TypeError, match="not torch.int8"):
        nf4_dequantize(weight, torch.int8)
    with pytest.raises(TypeError, match="expected an NF4Weight"):
        nf4_dequantize(torch.randn(4, 64))
