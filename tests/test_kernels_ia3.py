"""IA3: the scaled-matmul kernel (dense and NF4; prologue / epilogue scales, fused row reduction) against the
float64 reference on the Triton kernels (interpreter on CPU); launcher errors. The op is tests/test_ops_ia3.py."""

import pytest
import torch

from fastpeft import reference
from fastpeft.kernels import ia3 as ia3_kernels
from fastpeft.kernels.ia3 import ia3_matmul as ia3_kernel
from fastpeft.nf4 import NF4Weight

from conftest import DEVICE, assert_rel_close, kernel_dtypes, non_contiguous

GRAD_TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


# (out, in, M): odd in-features decode element-wise; 192 has whole absmax blocks per row (grouped scales, one
# nested absmax per block), 512 whole groups of blocks per row, each row in one nested block (its nested absmax
# loaded once per program in the forward; 33 rows of 8 blocks span two nested blocks)
SHAPES = [(47, 65, 19), (40, 192, 5), (33, 512, 3)]


@pytest.mark.parametrize("config", ["default", (9, 0)])
@pytest.mark.parametrize("nf4, shape", [(False, SHAPES[0])] + [(True, shape) for shape in SHAPES])
@pytest.mark.parametrize("transpose_weight", [False, True])
@pytest.mark.parametrize("dtype", kernel_dtypes())
def test_kernel_all_terms_match_reference(dtype, transpose_weight, nf4, shape, config, monkeypatch):
    # the interpreter plans with the default tables; (9, 0) runs sm_90's (SWAP_AB: the transposed tile)
    for table in (ia3_kernels.DENSE_CONFIGS, ia3_kernels.NF4_CONFIGS):
        monkeypatch.setitem(table, "default", table[config])
    out_features, in_features, m = shape
    dense = torch.randn(out_features, in_features, device=DEVICE)
    weight = NF4Weight.quantize(dense, 64, double_quant=True) if nf4 else non_contiguous(dense.to(dtype))
    w64 = weight.dequantize(torch.float64) if nf4 else weight.double()
    k, n = (out_features, in_features) if transpose_weight else (in_features, out_features)
    a = non_contiguous(torch.randn(m, k, device=DEVICE, dtype=dtype))
    in_scale, out_scale = torch.randn(k, device=DEVICE), torch.randn(n, device=DEVICE, dtype=dtype)
    bias = torch.randn(n, device=DEVICE, dtype=dtype)
    rows = non_contiguous(torch.randn(m, n, device=DEVICE, dtype=dtype))
    out, reduced = ia3_kernel(a, weight, transpose_weight=transpose_weight, in_scale=in_scale, bias=bias,
                              out_scale=out_scale, reduce_rows=rows)
    z = (a.double() * in_scale.double()) @ (w64 if transpose_weight else w64.t()) + bias.double()
    assert out.dtype == dtype and reduced.dtype == torch.float32
    assert_rel_close(out, z * out_scale.double(), dtype)
    assert_rel_close(reduced, (rows.double() * z).sum(0), dtype)


def test_kernel_reduction_only_writes_no_output():
    weight = torch.randn(17, 33)
    a, rows = torch.randn(7, 33), torch.randn(7, 17)
    out, reduced = ia3_kernel(a, weight, reduce_rows=rows, store_out=False)
    assert out is None
    assert_rel_close(reduced, (rows.double() * (a.double() @ weight.double().t())).sum(0), torch.float32)


def test_kernel_errors():
    weight = torch.randn(9, 20)
    a = torch.randn(4, 20)
    with pytest.raises(ValueError, match=r"a has 20 columns; op\(W\) of a \(9, 20\) weight needs 9"):
        ia3_kernel(a, weight, transpose_weight=True)
    with pytest.raises(ValueError, match="in_scale must be a 1-D tensor of 20 elements"):
        ia3_kernel(a, weight, in_scale=torch.ones(9))
    with pytest.raises(ValueError, match="out_scale must be contiguous"):
        ia3_kernel(a, weight, out_scale=torch.ones(18)[::2])
    with pytest.raises(TypeError, match="weight dtype torch.float16 must equal"):
        ia3_kernel(a, weight.half())
    with pytest.raises(ValueError, match=r"reduce_rows must be a float \(4, 9\)"):
        ia3_kernel(a, weight, reduce_rows=torch.ones(4, 20))
    with pytest.raises(ValueError, match="nothing to compute"):
        ia3_kernel(a, weight, store_out=False)
