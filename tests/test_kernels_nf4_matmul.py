"""The fused NF4 GEMM + LoRA epilogue kernel against the float64 reference (Triton's interpreter on CPU)."""

import pytest
import torch

from fastpeft.nf4 import NF4Weight

from conftest import DEVICE, assert_rel_close, kernel_dtypes, non_contiguous, poisoned

kernels = pytest.importorskip("fastpeft.kernels.nf4_matmul")


def _reference(a, weight, transpose_weight, bias, lora_h, lora_expand, scaling, col_scale):
    w = weight.dequantize(torch.float64)
    out = a.double() @ (w if transpose_weight else w.T)
    if lora_h is not None:
        out = out + scaling * (lora_h.double() @ lora_expand.double())
    if col_scale is not None:
        out = out * col_scale.double()
    return out if bias is None else out + bias.double()


# (M, in, out, r): M = 1, 7 and 16 (the largest) take the GEMV variant, 19 and 40 the tl.dot GEMM; none
# are block multiples.
CASES = [(1, 65, 47, 1), (7, 33, 17, 8), (16, 47, 33, 16), (19, 129, 95, 16), (40, 65, 33, 64)]


@pytest.mark.parametrize("transpose_weight", [False, True])
@pytest.mark.parametrize("m, in_features, out_features, rank", CASES)
@pytest.mark.parametrize("dtype", kernel_dtypes())
def test_nf4_lora_matmul_matches_reference(m, in_features, out_features, rank, transpose_weight, dtype):
    double_quant = rank % 2 == 0  # alternate, so both absmax formats meet every variant
    with_bias = rank != 8
    weight = NF4Weight.quantize(torch.randn(out_features, in_features, device=DEVICE), 64, double_quant)
    k, n = (out_features, in_features) if transpose_weight else (in_features, out_features)
    a = non_contiguous(torch.randn(m, k, device=DEVICE, dtype=dtype))
    lora_h = torch.randn(m, rank, device=DEVICE, dtype=dtype)
    lora_expand = torch.randn(n, rank, device=DEVICE, dtype=dtype).t()  # a transposed view, like Bᵀ
    bias = torch.randn(n, device=DEVICE, dtype=dtype) if with_bias else None
    out = poisoned((m, n), dtype)
    kernels.nf4_lora_matmul(a, weight, transpose_weight=transpose_weight, bias=bias, lora_h=lora_h,
                            lora_expand=lora_expand, scaling=0.7, out=out)
    ref = _reference(a, weight, transpose_weight, bias, lora_h, lora_expand, 0.7, None)
    assert_rel_close(out, ref, dtype)


@pytest.mark.parametrize("m", [3, 21])
def test_nf4_lora_matmul_col_scale_and_no_lora(m):
    weight = NF4Weight.quantize(torch.randn(47, 65, device=DEVICE), 32, double_quant=True)
    a = torch.randn(m, 65, device=DEVICE)
    col_scale = torch.rand(47, device=DEVICE) + 0.5
    bias = torch.randn(47, device=DEVICE)
    out = kernels.nf4_lora_matmul(a, weight, bias=bias, col_scale=col_scale)
    assert_rel_close(out, _reference(a, weight, False, bias, None, None, 0.0, col_scale), torch.float32)
    lora_h, lora_expand = torch.randn(m, 4, device=DEVICE), torch.randn(4, 47, device=DEVICE)
    out = kernels.nf4_lora_matmul(a, weight, lora_h=lora_h, lora_expand=lora_expand, scaling=2.0, col_scale=col_scale)
    assert_rel_close(out, _reference(a, weight, False, None, lora_h, lora_expand, 2.0, col_scale), torch.float32)


def test_nf4_lora_matmul_rejects_bad_inputs():
    weight = NF4Weight.quantize(torch.randn(17, 64, device=DEVICE), 64)
    a = torch.randn(3, 64, device=DEVICE)
    with pytest.raises(ValueError, match="a has 17 columns"):
        kernels.nf4_lora_matmul(torch.randn(3, 17, device=DEVICE), weight)
    with pytest.raises(ValueError, match="a has 64 columns"):
        kernels.nf4_lora_matmul(a, weight, transpose_weight=True)
    with pytest.raises(TypeError, match="must be an NF4Weight"):
        kernels.nf4_lora_matmul(a, torch.randn(17, 64))
    with pytest.raises(TypeError, match="a dtype"):
        kernels.nf4_lora_matmul(a.long(), weight)
    with pytest.raises(ValueError, match="given together"):
        kernels.nf4_lora_matmul(a, weight, lora_h=torch.randn(3, 2, device=DEVICE))
    with pytest.raises(ValueError, match=r"must be \(M, r\) = \(3, r\)"):
        kernels.nf4_lora_matmul(a, weight, lora_h=torch.randn(3, 2, device=DEVICE),
                                lora_expand=torch.randn(2, 64, device=DEVICE))
    with pytest.raises(TypeError, match="lora_h dtype"):
        kernels.nf4_lora_matmul(a, weight, lora_h=torch.randn(3, 2, device=DEVICE).half(),
                                lora_expand=torch.randn(2, 17, device=DEVICE))
    with pytest.raises(ValueError, match="bias must be a 1-D tensor of 17"):
        kernels.nf4_lora_matmul(a, weight, bias=torch.randn(64, device=DEVICE))
    with pytest.raises(TypeError, match="bias dtype"):
        kernels.nf4_lora_matmul(a, weight, bias=torch.randn(17, device=DEVICE).half())
    with pytest.raises(ValueError, match="out must be"):
        kernels.nf4_lora_matmul(a, weight, out=torch.empty(3, 64, device=DEVICE))


@pytest.mark.parametrize("dtype", kernel_dtypes())
def test_nf4_gemv_split_k_adds_the_epilogue_once(dtype):
    # few output tiles and K = 5 blocks of the GEMV's BLOCK_K: the plan splits K five ways (tests/test_plan.py)
    weight = NF4Weight.quantize(torch.randn(5, 300, device=DEVICE), 64, double_quant=True)
    a = torch.randn(3, 300, device=DEVICE, dtype=dtype)
    lora_h, lora_expand = torch.randn(3, 2, device=DEVICE, dtype=dtype), torch.randn(2, 5, device=DEVICE, dtype=dtype)
    bias, col_scale = torch.randn(5, device=DEVICE, dtype=dtype), torch.rand(5, device=DEVICE) + 0.5
    out = poisoned((3, 5), dtype)
    kernels.nf4_lora_matmul(a, weight, bias=bias, lora_h=lora_h, lora_expand=lora_expand, scaling=1.5,
                            col_scale=col_scale, out=out)
    assert_rel_close(out, _reference(a, weight, False, bias, lora_h, lora_expand, 1.5, col_scale), dtype)
