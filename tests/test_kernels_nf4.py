"""The Triton NF4 dequantiser, bit-exact against the reference (Triton's interpreter on CPU)."""

import pytest
import torch

from fastpeft.nf4 import NF4Weight
from fastpeft.ops import nf4_dequantize

from conftest import DEVICE, kernel_dtypes


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize(
    "shape, blocksize",
    [((37, 53), 64), ((3, 1111), 32), ((65, 129), 256), ((1, 7), 4096), ((520, 33), 64)],  # odd counts; >256 blocks
)
@pytest.mark.parametrize("dtype", kernel_dtypes())
def test_triton_dequant_is_bit_exact(triton_backend, shape, blocksize, double_quant, dtype):
    weight = NF4Weight.quantize(torch.randn(shape, device=DEVICE) * 3, blocksize, double_quant)
    out = nf4_dequantize(weight, dtype)
    expected = weight.dequantize(dtype)
    assert out.dtype == dtype and out.shape == shape and out.is_contiguous()
    assert torch.equal(out, expected)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize(
    "shape, blocksize",
    # even in-features take the vector decode: whole blocks per tile row (aligned: one block per row, two or
    # four per 128-column tile, a block over several tiles) and blocks straddling rows (100 % 64 != 0);
    # 300 x 64 has > 256 blocks (two second-level scales); 1024 rows of whole groups of 16 blocks (one nested
    # absmax per row and group), 4352 three programs along the columns, the last one partial
    [((300, 64), 64), ((9, 192), 32), ((3, 512), 256), ((2, 4096), 4096), ((5, 100), 64), ((19, 1024), 64),
     ((3, 4352), 64)],
)
def test_triton_dequant_vector_layouts_are_bit_exact(triton_backend, shape, blocksize, double_quant):
    from fastpeft.kernels.nf4 import DEQUANT_CONFIGS, nf4_layout

    weight = NF4Weight.quantize(torch.randn(shape, device=DEVICE) * 3, blocksize, double_quant)
    assert nf4_layout(shape[1], blocksize, DEQUANT_CONFIGS["default"]["BLOCK_C"])["EVEN_IN"]
    assert torch.equal(nf4_dequantize(weight, torch.float32), weight.dequantize(torch.float32))


def test_triton_dequant_writes_every_element(triton_backend):
    # a fresh output is allocated by the launcher; NaN-poisoning the allocator's memory checks coverage
    from fastpeft.kernels import nf4 as kernels

    weight = NF4Weight.quantize(torch.randn(13, 77, device=DEVICE), 64, double_quant=True)
    original_empty = torch.empty
    try:
        torch.empty = lambda *a, **k: original_empty(*a, **k).fill_(float("nan"))
        out = kernels.nf4_dequantize(weight, torch.float32)
    finally:
        torch.empty = original_empty
    assert torch.isfinite(out).all()
    assert torch.equal(out, weight.dequantize(torch.float32))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("double_quant", [False, True])
def test_quantize_on_cuda_matches_bitsandbytes_cuda(double_quant):
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(300, 512, device="cuda", dtype=torch.bfloat16)
    packed, state = bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    ours = NF4Weight.quantize(w, 64, double_quant)
    assert torch.equal(ours.packed, packed.view(-1))
    assert torch.equal(ours.absmax, state.absmax)
    assert torch.equal(nf4_dequantize(NF4Weight.from_bnb(packed, state)), bnb_f.dequantize_4bit(packed, state))
