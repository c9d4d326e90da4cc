"""The ``fused_linear`` primitive (``fastpeft::fused_linear``): opcheck on fresh random inputs, dense and NF4, every
epilogue; every term against float64 math on the reference backend and on the Triton kernels (interpreter on CPU),
odd sizes, non-contiguous inputs; the CUDA kernel's choice of launcher; input errors."""

import importlib

import pytest
import torch

from fastpeft import reference
from fastpeft.nf4 import NF4Weight, weight_op_args
from fastpeft.ops import fused_linear

from conftest import DEVICE, REL_TOL, assert_rel_close, non_contiguous

OP = torch.ops.fastpeft.fused_linear.default
fused = importlib.import_module("fastpeft.ops.fused_linear")  # the module (the package attribute is the function)


def _weight(out_features, in_features, nf4, dtype=torch.float32):
    dense = torch.randn(out_features, in_features, device=DEVICE) / in_features**0.5
    return NF4Weight.quantize(dense, 64, double_quant=True) if nf4 else dense.to(dtype)


def _dense64(weight):
    return weight.dequantize(torch.float64) if isinstance(weight, NF4Weight) else weight.double()


def _op_args(a, weight, transpose_weight=False, in_scale=None, bias=None, scale_bias=False, lora_h=None,
             lora_expand=None, scaling=1.0, col_scale=None, reduce_rows=None, store_out=True, out_dtype=None):
    return (a, *weight_op_args(weight), transpose_weight, in_scale, bias, scale_bias, lora_h, lora_expand, scaling,
            col_scale, reduce_rows, store_out, out_dtype)


def test_nf4_lora_matmul_passes_opcheck(reference_backend):
    weight = NF4Weight.quantize(torch.randn(9, 64, device=DEVICE), 64, double_quant=True)
    a, h, expand = torch.randn(5, 9), torch.randn(5, 3), torch.randn(3, 64)
    torch.library.opcheck(OP, _op_args(a, weight, True, None, torch.randn(64), False, h, expand, 0.5, torch.rand(64)))
    out = fused_linear(a, weight, transpose_weight=True, lora_h=h, lora_expand=expand, scaling=0.5)[0]
    assert_rel_close(out, a.double() @ weight.dequantize(torch.float64) + 0.5 * h.double() @ expand.double(),
                     tol=REL_TOL[torch.float32])


def test_ia3_matmul_passes_opcheck(reference_backend):
    weight = NF4Weight.quantize(torch.randn(9, 64), 64, double_quant=True)
    a, rows = torch.randn(5, 9), torch.randn(5, 64)
    torch.library.opcheck(OP, _op_args(a, weight, True, torch.rand(9), torch.randn(64), True, None, None, 1.0,
                                       torch.rand(64), rows, True))
    torch.library.opcheck(OP, _op_args(a, torch.randn(9, 64), True, None, None, True, None, None, 1.0, None, rows,
                                       False))


# every epilogue the layers use, and the combinations the CUDA kernel sends to the reference's torch ops
EPILOGUES = {
    "plain": {},
    "bias": {"bias": True},
    "lora": {"lora": True, "bias": True},
    "col scale, bias after": {"col_scale": True, "bias": True, "lora": True},
    "ia3 input scale": {"in_scale": True, "bias": True, "scale_bias": True},
    "ia3 output scale": {"col_scale": True, "bias": True, "scale_bias": True},
    "row reduction": {"reduce": True, "bias": True, "scale_bias": True},
    "reduction only": {"reduce": True, "store_out": False},
    "fp32 out": {"out_dtype": torch.float32},
}


def _case(m, out_features, in_features, nf4, transpose_weight, spec, dtype=torch.float32):
    weight = _weight(out_features, in_features, nf4, dtype)
    k, n = (out_features, in_features) if transpose_weight else (in_features, out_features)
    adapter_dtype = spec.get("adapter_dtype", dtype)
    a = non_contiguous(torch.randn(m, k, device=DEVICE, dtype=dtype))
    kwargs = dict(transpose_weight=transpose_weight, scale_bias=spec.get("scale_bias", False),
                  store_out=spec.get("store_out", True), out_dtype=spec.get("out_dtype"))
    if spec.get("in_scale"):
        kwargs["in_scale"] = torch.rand(k, device=DEVICE, dtype=dtype) + 0.5
    if spec.get("bias"):
        kwargs["bias"] = torch.randn(n, device=DEVICE, dtype=dtype)
    if spec.get("lora"):
        kwargs.update(lora_h=torch.randn(m, 3, device=DEVICE, dtype=adapter_dtype),
                      lora_expand=non_contiguous(torch.randn(3, n, device=DEVICE, dtype=adapter_dtype)), scaling=0.7)
    if spec.get("col_scale"):
        kwargs["col_scale"] = torch.rand(n, device=DEVICE, dtype=dtype) + 0.5
    if spec.get("reduce"):
        kwargs["reduce_rows"] = non_contiguous(torch.randn(m, n, device=DEVICE, dtype=dtype))
    return a, weight, kwargs


def _expected(a, weight, kwargs):
    """The module docstring's math in float64."""
    w = _dense64(weight)
    a64 = a.double() if kwargs.get("in_scale") is None else a.double() * kwargs["in_scale"].double()
    z = a64 @ (w if kwargs["transpose_weight"] else w.t())
    if kwargs.get("lora_h") is not None:
        z = z + kwargs["scaling"] * kwargs["lora_h"].double() @ kwargs["lora_expand"].double()
    bias = kwargs.get("bias")
    if bias is not None and kwargs["scale_bias"]:
        z = z + bias.double()
    reduced = None if kwargs.get("reduce_rows") is None else (kwargs["reduce_rows"].double() * z).sum(0)
    out = z if kwargs.get("col_scale") is None else z * kwargs["col_scale"].double()
    if bias is not None and not kwargs["scale_bias"]:
        out = out + bias.double()
    return out, reduced


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("transpose_weight", [False, True])
@pytest.mark.parametrize("nf4", [False, True])
def test_every_term_matches_float64(monkeypatch, backend, epilogue, transpose_weight, nf4):
    monkeypatch.setenv("FASTPEFT_BACKEND", backend)
    spec = EPILOGUES[epilogue]
    a, weight, kwargs = _case(5, 47, 65, nf4, transpose_weight, spec)  # odd sizes: not multiples of a block
    out, reduced = fused_linear(a, weight, **kwargs)
    expected_out, expected_reduced = _expected(a, weight, kwargs)
    if kwargs["store_out"]:
        assert out.dtype == (kwargs["out_dtype"] or a.dtype)
        assert_rel_close(out, expected_out, torch.float32)
    else:
        assert out is None
    if expected_reduced is None:
        assert reduced is None
    else:
        assert reduced.dtype == torch.float32
        assert_rel_close(reduced, expected_reduced, torch.float32)
    # the op itself (what torch.compile traces, and the CUDA / Triton path) computes the same
    op_out, op_reduced = OP(*_op_args(a, weight, **kwargs))
    if kwargs["store_out"]:
        assert_rel_close(op_out, expected_out, torch.float32)
    if expected_reduced is not None:
        assert_rel_close(op_reduced, expected_reduced, torch.float32)


@pytest.mark.parametrize("epilogue", ["lora", "ia3 output scale", "row reduction", "fp32 out"])
@pytest.mark.parametrize("nf4", [False, True])
def test_opcheck_on_fresh_inputs(reference_backend, epilogue, nf4):
    a, weight, kwargs = _case(3, 17, 33, nf4, False, EPILOGUES[epilogue])
    if kwargs.get("lora_expand") is not None:
        kwargs["lora_expand"] = kwargs["lora_expand"].contiguous()
    torch.library.opcheck(OP, _op_args(a.contiguous(), weight, **kwargs))


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("nf4", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_terms_round_once_with_wide_adapters(monkeypatch, backend, nf4, dtype):
    """fp32 adapter terms on half-precision activations: formed in fp32, the sum rounded once to ``a``'s dtype."""
    monkeypatch.setenv("FASTPEFT_BACKEND", backend)
    a, weight, kwargs = _case(4, 24, 64, nf4, False, {"lora": True, "adapter_dtype": torch.float32}, dtype)
    out = fused_linear(a, weight, **kwargs)[0]
    assert out.dtype == dtype
    assert_rel_close(out, _expected(a, weight, kwargs)[0], dtype)


ROUTES = [
    ("lora", False, "torch"), ("lora", True, "nf4"), ("plain", True, "nf4"), ("col scale, bias after", True, "nf4"),
    ("col scale, bias after", False, "torch"), ("ia3 input scale", False, "ia3"), ("ia3 output scale", True, "ia3"),
    ("row reduction", False, "ia3"), ("reduction only", True, "ia3"), ("fp32 out", False, "torch"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("epilogue, nf4, route", ROUTES + [("fp32 out", True, "nf4")])
def test_the_cuda_kernel_picks_the_launcher_by_the_arguments(epilogue, nf4, route, dtype):
    if dtype != torch.float32 and epilogue == "fp32 out" and not nf4:
        route = "mm_fp32"  # a half-precision product whose fp32 accumulator is kept
    a, weight, kwargs = _case(3, 17, 64, nf4, False, EPILOGUES[epilogue], dtype)
    picked = fused._route(weight, a.dtype, kwargs.get("in_scale"), kwargs.get("bias"), kwargs["scale_bias"],
                          kwargs.get("lora_h"), kwargs.get("col_scale"), kwargs.get("reduce_rows"), kwargs["store_out"],
                          kwargs["out_dtype"])
    assert picked == route


def test_a_dense_cublas_call_skips_the_op_dispatch_when_eager(monkeypatch):
    """A dense product that would run the reference's torch ops on CUDA too is called directly; one with an IA3
    epilogue goes through the op on the Triton backend (the interpreter on CPU)."""
    from fastpeft.kernels import ia3 as ia3_kernels

    monkeypatch.setenv("FASTPEFT_BACKEND", "triton")
    ops_called, launched = [], []
    real_op, real_kernel = fused._fused_linear_op, ia3_kernels.ia3_matmul
    monkeypatch.setattr(fused, "_fused_linear_op", lambda *args: ops_called.append(1) or real_op(*args))
    monkeypatch.setattr(ia3_kernels, "ia3_matmul", lambda *a, **k: launched.append(1) or real_kernel(*a, **k))
    a, weight, kwargs = _case(3, 17, 64, False, False, EPILOGUES["lora"])
    assert_rel_close(fused_linear(a, weight, **kwargs)[0], _expected(a, weight, kwargs)[0], torch.float32)
    assert not ops_called
    a, weight, kwargs = _case(3, 17, 64, False, False, EPILOGUES["ia3 output scale"])
    assert_rel_close(fused_linear(a, weight, **kwargs)[0], _expected(a, weight, kwargs)[0], torch.float32)
    assert ops_called and launched


def test_the_reference_is_differentiable_where_autograd_records_it():
    """Called directly under autograd (the layers' plain paths), the reference computes out of place and autograd
    differentiates it; an NF4 base is then not dequantised into the reusable buffer."""
    weight = torch.randn(8, 16, dtype=torch.float64)
    a = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    scale = torch.rand(8, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, s, b: reference.fused_linear(a, weight, bias=b, scale_bias=True, col_scale=s)[0], (a, scale, bias))
    nf4, col_scale = NF4Weight.quantize(torch.randn(8, 64), 64), torch.rand(8)
    x = torch.randn(2, 64, requires_grad=True)
    y = reference.fused_linear(x, nf4, col_scale=col_scale)[0]
    reference.fused_linear(torch.randn(2, 64), NF4Weight.quantize(torch.randn(8, 64), 64))  # the buffer rewritten
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert_rel_close(grad, col_scale.double().expand(2, 8) @ nf4.dequantize(torch.float64), torch.float32)


def test_rejects_bad_inputs():
    a, weight = torch.randn(3, 16), torch.randn(8, 16)
    with pytest.raises(TypeError, match="NF4Weight"):
        fused_linear(a, weight.numpy())
    with pytest.raises(ValueError, match="given together"):
        fused_linear(a, weight, lora_h=torch.randn(3, 2))
    with pytest.raises(ValueError, match="nothing to compute"):
        fused_linear(a, weight, store_out=False)
    with pytest.raises(TypeError, match="out_dtype"):
        fused_linear(a, weight, out_dtype=torch.float16)
