"""DoRA as an op (``fastpeft.ops.dora``): the weight norm by the cached-‖W‖² identity (dense and NF4) and the layer
(forward and gradients of x, bias, A, B, magnitude) against the float64 reference, on the Triton kernels
(interpreter on CPU) and the reference backend; gradcheck of the hand-written backward; input errors."""

import pytest
import torch

from fastpeft import reference
from fastpeft.nf4 import NF4Weight
from fastpeft.ops import dora as dora_ops
from fastpeft.ops.dora import MAX_RANK, dora_linear, dora_weight_norm, weight_norm_by_identity as norm_kernel

from conftest import DEVICE, assert_rel_close, kernel_dtypes, non_contiguous, poisoned

GRAD_TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}  # several fp16 roundings in a chain


def _lora(in_features, out_features, rank, dtype):
    lora_a = torch.randn(rank, in_features, device=DEVICE, dtype=dtype) / in_features**0.5
    lora_b = torch.randn(out_features, rank, device=DEVICE, dtype=dtype)
    return lora_a, lora_b


# (in, out, r): odd sizes, ranks 1 .. 64, a weight narrower than one K block
NORM_CASES = [(33, 17, 1), (65, 47, 5), (129, 95, 64), (20, 40, 17)]


@pytest.mark.parametrize("in_features, out_features, rank", NORM_CASES)
@pytest.mark.parametrize("dtype", kernel_dtypes())
def test_norm_kernel_dense_matches_reference(in_features, out_features, rank, dtype):
    weight = non_contiguous(torch.randn(out_features, in_features, device=DEVICE, dtype=dtype))
    lora_a, lora_b = _lora(in_features, out_features, rank, dtype)
    lora_b = non_contiguous(lora_b)
    out = poisoned((out_features,), dtype)
    norm_kernel(weight, lora_a, lora_b, 0.7, out=out)
    ref = reference.dora_weight_norm(weight.double(), lora_a.double(), lora_b.double(), 0.7)
    assert_rel_close(out, ref, dtype)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("in_features, out_features, rank", NORM_CASES[:3])
def test_norm_kernel_nf4_matches_reference(in_features, out_features, rank, double_quant):
    weight = NF4Weight.quantize(torch.randn(out_features, in_features, device=DEVICE), 64, double_quant)
    lora_a, lora_b = _lora(in_features, out_features, rank, torch.float32)
    out = norm_kernel(weight, lora_a, lora_b, 2.0)
    assert out.dtype == torch.float32
    assert_rel_close(out, reference.dora_weight_norm(weight, lora_a.double(), lora_b.double(), 2.0), torch.float32)


@pytest.mark.parametrize("nf4", [False, True])
def test_norm_identity_survives_cancellation(nf4):
    """Rows where s·B A nearly cancels W (n / ‖W‖ ≈ 7e-3): the identity's three terms cancel; each row stays
    within the module docstring's bound 4 u (‖W‖² + ‖s B A‖²) / n² of float64 (u = 2⁻²⁴, fp32)."""
    in_features, out_features, rank, scaling = 64, 24, 64, 0.5
    dense = torch.randn(out_features, in_features, device=DEVICE)
    weight = NF4Weight.quantize(dense, 64, double_quant=True) if nf4 else dense
    w64 = weight.dequantize(torch.float64) if nf4 else dense.double()
    # an orthogonal A (well conditioned: the terms stay of the size of ‖W‖²), B = -W Aᵀ / s + residual
    lora_a = torch.linalg.qr(torch.randn(in_features, rank, device=DEVICE, dtype=torch.float64))[0].t()
    residual = 1e-2 * torch.randn(out_features, rank, device=DEVICE, dtype=torch.float64)
    lora_b = -w64 @ lora_a.t() / scaling + residual  # s B A = -W + s · residual · A
    lora_a, lora_b = lora_a.float(), lora_b.float()
    ref = reference.dora_weight_norm(w64, lora_a.double(), lora_b.double(), scaling)
    w_sq = w64.square().sum(1)
    assert (ref.square() / w_sq).max() < 1e-4  # the rows do cancel
    out = norm_kernel(weight, lora_a, lora_b, scaling)
    lora_sq = (scaling * lora_b.double() @ lora_a.double()).square().sum(1)
    bound = 4 * 2.0**-24 * (w_sq + lora_sq) / ref.square()
    assert ((out.double() - ref).abs() / ref <= bound).all()


def test_norm_caches_the_base_norm_until_the_base_changes(monkeypatch):
    weight = torch.randn(17, 33, device=DEVICE)
    lora_a, lora_b = _lora(33, 17, 4, torch.float32)

    def ref():
        return reference.dora_weight_norm(weight.double(), lora_a.double(), lora_b.double(), 0.7)

    computed = []
    original = torch.linalg.vector_norm

    def norm(*args, **kwargs):
        if args[0].dim() == 2:  # a weight's row norms (the error helper takes norms of 1-D vectors)
            computed.append(args[0].shape)
        return original(*args, **kwargs)

    expected = ref()
    monkeypatch.setattr(torch.linalg, "vector_norm", norm)
    for _ in range(2):
        assert_rel_close(norm_kernel(weight, lora_a, lora_b, 0.7), expected)
    assert computed == [(17, 33)] and weight in dora_ops._weight_sq_norms
    weight.mul_(2.0)  # an in-place change of the (frozen) base bumps its version: recomputed
    out = norm_kernel(weight, lora_a, lora_b, 0.7)
    monkeypatch.undo()
    assert_rel_close(out, ref())
    assert computed == [(17, 33)] * 2


def test_norm_kernel_errors():
    weight = torch.randn(9, 20)
    lora_a, lora_b = _lora(20, 9, 3, torch.float32)
    with pytest.raises(ValueError, match=r"must be \(r, 20\) and \(9, r\)"):
        norm_kernel(weight, lora_a[:, :10], lora_b, 1.0)
    with pytest.raises(ValueError, match=r"rank must be in \[1, 256\], got 257"):
        norm_kernel(weight, *_lora(20, 9, MAX_RANK + 1, torch.float32), 1.0)
    with pytest.raises(TypeError, match="lora_a dtype"):
        norm_kernel(weight, lora_a.double(), lora_b, 1.0)
    with pytest.raises(TypeError, match="NF4Weight"):
        norm_kernel(weight[0], lora_a, lora_b, 1.0)
    with pytest.raises(ValueError, match="out must be a contiguous"):
        norm_kernel(weight, lora_a, lora_b, 1.0, out=torch.empty(9, dtype=torch.float16))


def _check_op(lead, in_features, out_features, rank, dtype, nf4, dropout, with_bias):
    dense = torch.randn(out_features, in_features, device=DEVICE) / in_features**0.5
    weight = NF4Weight.quantize(dense, 64, double_quant=True) if nf4 else dense.to(dtype)
    x = non_contiguous(torch.randn(*lead, in_features, device=DEVICE, dtype=dtype))
    lora_a, lora_b = _lora(in_features, out_features, rank, dtype)
    magnitude = torch.rand(out_features, device=DEVICE, dtype=dtype) + 0.5
    bias = torch.randn(out_features, device=DEVICE, dtype=dtype) if with_bias else None
    mask = (torch.rand(x.shape, device=DEVICE) > 0.25).to(dtype) / 0.75 if dropout else None
    leaves = [t.requires_grad_() for t in (x, lora_a, lora_b, magnitude, bias) if t is not None]

    def run(leaves, weight, fn):
        x, a, b, m, *bias = leaves
        y = fn(x, weight, bias[0] if bias else None, a, b, 0.5, m, None if mask is None else x * mask.to(x.dtype))
        return y, torch.autograd.grad(y, leaves, dy.to(y.dtype))

    dy = torch.randn(*lead, out_features, device=DEVICE)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    ref, ref_grads = run(leaves64, weight if nf4 else weight.double(), reference.dora_linear)
    y, grads = run(leaves, weight, dora_linear)
    assert y.dtype == dtype
    assert_rel_close(y, ref, dtype)
    for name, grad, ref_grad in zip(("dx", "dA", "dB", "dmagnitude", "dbias"), grads, ref_grads):
        assert grad.dtype == dtype, name
        assert_rel_close(grad, ref_grad, tol=GRAD_TOL[dtype])


# (leading dims, in, out, r): on NF4, M = 1 takes the GEMV; M = 19 and 21 in fp32 dequantise + cuBLAS
OP_CASES = [((1,), 65, 47, 4), ((19,), 129, 95, 16), ((3, 7), 33, 17, 1)]


@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("nf4", [False, True])
@pytest.mark.parametrize("lead, in_features, out_features, rank", OP_CASES)
@pytest.mark.parametrize("dtype", kernel_dtypes())
def test_dora_op_triton_matches_reference(triton_backend, lead, in_features, out_features, rank, nf4, dropout, dtype):
    _check_op(lead, in_features, out_features, rank, dtype, nf4, dropout, with_bias=rank != 16)


@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("nf4", [False, True])
def test_dora_op_reference_backend_matches_reference(reference_backend, nf4, dropout):
    _check_op((2, 5), 64, 40, 8, torch.float32, nf4, dropout, with_bias=True)


def test_dora_backward_gradcheck(reference_backend):
    """The hand-written backward against finite differences (float64) in x, bias and magnitude, on which the
    detached norm does not depend; A and B (whose finite differences would move the norm) are compared to
    the reference's autograd in the tests above."""
    weight = torch.randn(7, 9, dtype=torch.float64)
    lora_a, lora_b = torch.randn(3, 9, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    x = torch.randn(2, 4, 9, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, dtype=torch.float64, requires_grad=True)
    magnitude = torch.rand(7, dtype=torch.float64, requires_grad=True)
    mask = (torch.rand(2, 4, 9) > 0.5).double() * 2
    assert torch.autograd.gradcheck(lambda x, b, m: dora_linear(x, weight, b, lora_a, lora_b, 0.3, m), (x, bias, magnitude))
    assert torch.autograd.gradcheck(
        lambda x, b, m: dora_linear(x, weight, b, lora_a, lora_b, 0.3, m, x * mask), (x, bias, magnitude))


def test_norm_is_detached(reference_backend):
    weight = NF4Weight.quantize(torch.randn(9, 64), 64, double_quant=True)
    lora_a = torch.randn(3, 64, requires_grad=True)
    lora_b = torch.randn(9, 3, requires_grad=True)
    norm = dora_weight_norm(weight, lora_a, lora_b, 0.5)
    assert not norm.requires_grad
    assert_rel_close(norm, reference.dora_weight_norm(weight, lora_a.double(), lora_b.double(), 0.5), torch.float32)


def test_dora_op_errors():
    weight = torch.randn(9, 20)
    lora_a, lora_b = _lora(20, 9, 3, torch.float32)
    x = torch.randn(4, 20)
    with pytest.raises(ValueError, match=r"magnitude must be \(9,\)"):
        dora_linear(x, weight, None, lora_a, lora_b, 1.0, torch.ones(8))
    with pytest.raises(ValueError, match=r"must be \(r, 20\) and \(9, r\)"):
        dora_linear(x, weight, None, lora_a, lora_b.t(), 1.0, torch.ones(9))
    with pytest.raises(ValueError, match="x has 19 features"):
        dora_linear(x[:, :19], weight, None, lora_a, lora_b, 1.0, torch.ones(9))
    with pytest.raises(ValueError, match="must be frozen"):
        dora_linear(x, weight.requires_grad_(), None, lora_a, lora_b, 1.0, torch.ones(9))


def test_backward_saves_nothing_of_the_weight_size(triton_backend):
    """Training memory: DoRA on an NF4 base keeps x, h, A, B and (out,) vectors, no (out, in) or (M, out) tensor."""
    weight = NF4Weight.quantize(torch.randn(47, 65, device=DEVICE), 64, double_quant=True)
    lora_a, lora_b = (t.requires_grad_() for t in _lora(65, 47, 4, torch.float32))
    magnitude = (torch.rand(47, device=DEVICE) + 0.5).requires_grad_()
    x = torch.randn(19, 65, device=DEVICE, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = dora_linear(x, weight, None, lora_a, lora_b, 1.0, magnitude)
    assert (47, 65) not in saved and (19, 47) not in saved, saved
    assert sum(torch.Size(s).numel() for s in saved) <= 19 * 65 + 19 * 4 + 4 * 65 + 47 * 4 + 2 * 47, saved
    y.sum().backward()
    assert x.grad is not None and magnitude.grad is not None
