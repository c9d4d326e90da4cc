"""IA3 as an op (``fastpeft.ops.ia3``): forward and gradients of x, ia3_scale, bias against the float64 reference,
on the Triton kernels (interpreter on CPU) and the reference backend; gradcheck; input errors."""

import pytest
import torch

from fastpeft import reference
from fastpeft.nf4 import NF4Weight
from fastpeft.ops.ia3 import ia3_linear

from conftest import DEVICE, assert_rel_close, kernel_dtypes, non_contiguous

GRAD_TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def _check_op(lead, in_features, out_features, dtype, nf4, is_feedforward, with_bias):
    dense = torch.randn(out_features, in_features, device=DEVICE) / in_features**0.5
    weight = NF4Weight.quantize(dense, 64, double_quant=False) if nf4 else dense.to(dtype)
    x = non_contiguous(torch.randn(*lead, in_features, device=DEVICE, dtype=dtype))
    scale = torch.randn(in_features if is_feedforward else out_features, device=DEVICE, dtype=dtype)
    bias = torch.randn(out_features, device=DEVICE, dtype=dtype) if with_bias else None
    leaves = [t.requires_grad_() for t in (x, scale, bias) if t is not None]
    dy = torch.randn(*lead, out_features, device=DEVICE)

    def run(leaves, weight, fn):
        x, scale, *bias = leaves
        y = fn(x, weight, bias[0] if bias else None, scale, is_feedforward)
        return y, torch.autograd.grad(y, leaves, dy.to(y.dtype))

    ref, ref_grads = run([t.detach().double().requires_grad_() for t in leaves], weight if nf4 else weight.double(),
                         reference.ia3_linear)
    y, grads = run(leaves, weight, ia3_linear)
    assert y.dtype == dtype
    assert_rel_close(y, ref, dtype)
    for name, grad, ref_grad in zip(("dx", "dscale", "dbias"), grads, ref_grads):
        assert grad.dtype == dtype, name
        assert_rel_close(grad, ref_grad, tol=GRAD_TOL[dtype])


# (leading dims, in, out): odd sizes, M = 1, 19 and 21
OP_CASES = [((1,), 65, 47), ((19,), 129, 95), ((3, 7), 33, 17)]


@pytest.mark.parametrize("is_feedforward", [False, True])
@pytest.mark.parametrize("nf4", [False, True])
@pytest.mark.parametrize("lead, in_features, out_features", OP_CASES)
@pytest.mark.parametrize("dtype", kernel_dtypes())
def test_ia3_op_triton_matches_reference(triton_backend, lead, in_features, out_features, nf4, is_feedforward, dtype):
    _check_op(lead, in_features, out_features, dtype, nf4, is_feedforward, with_bias=in_features != 129)


@pytest.mark.parametrize("is_feedforward", [False, True])
@pytest.mark.parametrize("nf4", [False, True])
def test_ia3_op_reference_backend_matches_reference(reference_backend, nf4, is_feedforward):
    _check_op((2, 5), 64, 40, torch.float32, nf4, is_feedforward, with_bias=True)


@pytest.mark.parametrize("is_feedforward", [False, True])
def test_ia3_backward_gradcheck(reference_backend, is_feedforward):
    weight = torch.randn(7, 9, dtype=torch.float64)
    x = torch.randn(2, 4, 9, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, dtype=torch.float64, requires_grad=True)
    scale = torch.randn(9 if is_feedforward else 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, b, l: ia3_linear(x, weight, b, l, is_feedforward), (x, bias, scale))


def test_ia3_op_errors():
    weight, x = torch.randn(9, 20), torch.randn(4, 20)
    with pytest.raises(ValueError, match=r"ia3_scale must be \(20,\) for is_feedforward=True, got \(9,\)"):
        ia3_linear(x, weight, None, torch.ones(9), True)
    with pytest.raises(ValueError, match=r"ia3_scale must be \(9,\) for is_feedforward=False"):
        ia3_linear(x, weight, None, torch.ones(20), False)
    with pytest.raises(ValueError, match=r"bias must be \(9,\)"):
        ia3_linear(x, weight, torch.ones(3), torch.ones(9), False)
    with pytest.raises(TypeError, match="weight must be a 2-D tensor or an NF4Weight"):
        ia3_linear(x, weight[0], None, torch.ones(9), False)


def test_ia3_op_refuses_integer_tensors_and_a_scale_on_another_device():
    """An int8 base weight, an integer bias or scale raises a TypeError; a scale on another device than x (meta
    stands in for a second device) a ValueError naming both."""
    weight, x = torch.randn(9, 20), torch.randn(4, 20)
    with pytest.raises(TypeError, match="dense weight must be floating point, got torch.int8"):
        ia3_linear(x, weight.to(torch.int8), None, torch.ones(9), False)
    with pytest.raises(TypeError, match="bias must be floating point"):
        ia3_linear(x, weight, torch.ones(9, dtype=torch.int32), torch.ones(9), False)
    with pytest.raises(TypeError, match="ia3_scale must be floating point"):
        ia3_linear(x, weight, None, torch.ones(20, dtype=torch.int64), True)
    for is_feedforward, size in ((True, 20), (False, 9)):
        with pytest.raises(ValueError, match="x is on cpu, ia3_scale on meta"):
            ia3_linear(x, weight, None, torch.ones(size, device="meta"), is_feedforward)
