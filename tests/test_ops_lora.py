"""fastpeft.ops.lora: forward and gradients (x, A, B, bias) against the float64 reference, with dense and
NF4 bases, on the Triton kernels (interpreter on CPU) and the reference backend; gradcheck; opcheck."""

import threading

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastpeft import reference
from fastpeft.nf4 import NF4Weight
from fastpeft.ops.fused_linear import fused_linear
from fastpeft.ops.lora import lora_linear

from conftest import DEVICE, REL_TOL, assert_rel_close, kernel_dtypes, non_contiguous

GRAD_TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}  # several roundings of fp16 chains


def _inputs(lead, in_features, out_features, rank, dtype, nf4, double_quant, with_bias, bias_grad=False):
    dense = torch.randn(out_features, in_features, device=DEVICE) / in_features**0.5
    weight = NF4Weight.quantize(dense, 64, double_quant) if nf4 else dense.to(dtype)
    x = non_contiguous(torch.randn(*lead, in_features, device=DEVICE, dtype=dtype)).requires_grad_()
    lora_a = (torch.randn(rank, in_features, device=DEVICE, dtype=dtype) / in_features**0.5).requires_grad_()
    lora_b = torch.randn(out_features, rank, device=DEVICE, dtype=dtype).requires_grad_()
    bias = torch.randn(out_features, device=DEVICE, dtype=dtype).requires_grad_(bias_grad) if with_bias else None
    return x, weight, bias, lora_a, lora_b


def _dropped(x, mask, p):
    return None if mask is None else x * mask / (1 - p)


def _check_against_reference(x, weight, bias, lora_a, lora_b, scaling, mask, p, dtype):
    y = lora_linear(x, weight, bias, lora_a, lora_b, scaling, _dropped(x, mask, p))
    dy = torch.randn_like(y)
    leaves = [t for t in (x, lora_a, lora_b, bias) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(y, leaves, dy)

    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    x64, a64, b64 = leaves64[:3]
    bias64 = leaves64[3] if len(leaves64) == 4 else (None if bias is None else bias.double())
    weight64 = weight if isinstance(weight, NF4Weight) else weight.double()
    mask64 = None if mask is None else mask.double()
    ref = reference.lora_linear(x64, weight64, bias64, a64, b64, scaling, _dropped(x64, mask64, p))
    ref_grads = torch.autograd.grad(ref, leaves64, dy.double())

    assert y.dtype == dtype and y.shape == ref.shape
    assert_rel_close(y, ref, dtype)
    for name, grad, ref_grad in zip(("dx", "dA", "dB", "dbias"), grads, ref_grads):
        assert grad.dtype == dtype, name
        assert_rel_close(grad, ref_grad, tol=GRAD_TOL[dtype])


# (leading dims, in, out, r): M = 1 and 6 take the NF4 GEMV, M = 19 and 21 the GEMM; odd sizes throughout.
CASES = [((1,), 65, 47, 1), ((2, 3), 33, 17, 8), ((19,), 129, 95, 16), ((3, 7), 65, 33, 64)]


@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("lead, in_features, out_features, rank", CASES)
@pytest.mark.parametrize("dtype", kernel_dtypes())
def test_nf4_lora_triton_matches_reference(triton_backend, lead, in_features, out_features, rank, dropout, dtype):
    x, weight, bias, lora_a, lora_b = _inputs(lead, in_features, out_features, rank, dtype, nf4=True,
                                              double_quant=rank != 8, with_bias=rank != 16, bias_grad=rank == 64)
    p = 0.3
    mask = (torch.rand(x.shape, device=DEVICE) > p).to(dtype) if dropout else None
    _check_against_reference(x, weight, bias, lora_a, lora_b, 0.5 if rank != 64 else 16 / 64**0.5, mask, p, dtype)


@pytest.mark.parametrize("nf4", [False, True])
@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_lora_reference_backend_matches_reference(reference_backend, nf4, dropout, dtype):
    x, weight, bias, lora_a, lora_b = _inputs((4, 5), 64, 40, 8, dtype, nf4, double_quant=True, with_bias=True,
                                              bias_grad=True)
    mask = (torch.rand(x.shape, device=DEVICE) > 0.1).to(dtype) if dropout else None
    _check_against_reference(x, weight, bias, lora_a, lora_b, 2.0, mask, 0.1, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dense_lora_matches_reference(dtype):
    # the dense base never goes through Triton (cuBLAS, or CPU BLAS), so bf16 is testable here
    x, weight, bias, lora_a, lora_b = _inputs((19,), 33, 47, 16, dtype, nf4=False, double_quant=False, with_bias=True)
    _check_against_reference(x, weight, bias, lora_a, lora_b, 0.25, None, 0.0, dtype)


@pytest.mark.parametrize("nf4", [False, True])
def test_gradcheck_reference_path(reference_backend, nf4):
    x, weight, bias, lora_a, lora_b = _inputs((2, 1), 24, 5, 3, torch.float64, nf4, double_quant=True,
                                              with_bias=True, bias_grad=True)
    mask = (torch.rand(x.shape, dtype=torch.float64, device=DEVICE) > 0.25).double()

    def fn(x, bias, lora_a, lora_b):
        return lora_linear(x, weight, bias, lora_a, lora_b, 0.75, _dropped(x, mask, 0.25))

    assert torch.autograd.gradcheck(fn, (x, bias, lora_a, lora_b), fast_mode=True)
    assert torch.autograd.gradcheck(lambda x: lora_linear(x, weight, bias.detach(), None, None, 0.0), (x,), fast_mode=True)


def test_x_without_grad_and_base_only(triton_backend):
    x, weight, bias, lora_a, lora_b = _inputs((3,), 65, 17, 2, torch.float32, nf4=True, double_quant=True,
                                              with_bias=False)
    x = x.detach()
    y = lora_linear(x, weight, None, lora_a, lora_b, 1.0)
    y.sum().backward()
    assert x.grad is None and lora_a.grad is not None and lora_b.grad is not None
    base = lora_linear(x, weight, None, None, None, 0.0)
    assert_rel_close(base, x.double() @ weight.dequantize(torch.float64).T, torch.float32)


def test_lora_linear_rejects_bad_inputs():
    weight = torch.randn(8, 16)
    x, lora_a, lora_b = torch.randn(3, 16), torch.randn(2, 16), torch.randn(8, 2)
    with pytest.raises(ValueError, match="x has 15 features"):
        lora_linear(torch.randn(3, 15), weight, None, lora_a, lora_b, 1.0)
    with pytest.raises(ValueError, match="must be frozen"):
        lora_linear(x, weight.requires_grad_(), None, lora_a, lora_b, 1.0)
    weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"must be \(2, 16\)|must be \(r, 16\) and \(8, r\)"):
        lora_linear(x, weight, None, lora_a, torch.randn(8, 3), 1.0)
    with pytest.raises(ValueError, match="given together"):
        lora_linear(x, weight, None, lora_a, None, 1.0)
    with pytest.raises(ValueError, match=r"bias must be \(8,\)"):
        lora_linear(x, weight, torch.randn(9), lora_a, lora_b, 1.0)
    with pytest.raises(ValueError, match="x_dropped shape"):
        lora_linear(x, weight, None, lora_a, lora_b, 1.0, x_dropped=torch.randn(2, 16))
    with pytest.raises(TypeError, match="x dtype"):
        lora_linear(x.long(), weight, None, lora_a, lora_b, 1.0)
    with pytest.raises(TypeError, match="NF4Weight"):
        fused_linear(x, weight.numpy())


def test_backward_keeps_no_dequantised_weight(triton_backend):
    x, weight, bias, lora_a, lora_b = _inputs((19,), 65, 47, 4, torch.float32, nf4=True, double_quant=True,
                                              with_bias=True)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = lora_linear(x, weight, bias, lora_a, lora_b, 1.0)
    assert (47, 65) not in saved and (65, 47) not in saved, saved
    # x (for dA), h (for dB), A and B: nothing of the base's size
    assert sum(torch.Size(s).numel() for s in saved) <= 19 * 65 + 19 * 4 + 4 * 65 + 47 * 4
    y.sum().backward()
    assert x.grad is not None and lora_a.grad is not None


class _CountBernoulli(TorchDispatchMode):
    """Counts the Bernoulli draws of the ops dispatched while it is active."""

    def __init__(self):
        super().__init__()
        self.draws = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.bernoulli_, torch.ops.aten.bernoulli):
            self.draws += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("nf4", [False, True])
def test_dropout_p_draws_the_mask_once_on_cpu(reference_backend, nf4):
    # CPU's Bernoulli draw costs more than the layer's LoRA math: backward keeps the forward's mask, no redraw
    x, weight, bias, lora_a, lora_b = _inputs((3, 5), 65, 33, 8, torch.float32, nf4, double_quant=True,
                                              with_bias=True)
    with _CountBernoulli() as forward_draws:
        y = lora_linear(x, weight, bias, lora_a, lora_b, 0.5, dropout_p=0.2)
    with _CountBernoulli() as backward_draws:
        torch.autograd.grad(y, [x, lora_a, lora_b], torch.randn_like(y))
    assert (forward_draws.draws, backward_draws.draws) == (1, 0)


@pytest.mark.parametrize("nf4, backend, lead", [(True, "triton", (2, 3)), (True, "triton", (19,)),
                                                (False, "reference", (4, 5)), (True, "reference", (3,))])
@pytest.mark.parametrize("dtype", kernel_dtypes())
def test_dropout_p_backward_uses_the_forward_mask(monkeypatch, nf4, backend, lead, dtype):
    monkeypatch.setenv("FASTPEFT_BACKEND", backend)
    x, weight, bias, lora_a, lora_b = _inputs(lead, 65, 33, 8, dtype, nf4, double_quant=True, with_bias=True)
    p = 0.3
    torch.manual_seed(7)
    expected_mask = torch.nn.functional.dropout(torch.ones(x.shape, dtype=dtype, device=DEVICE), p, training=True)
    torch.manual_seed(7)
    y = lora_linear(x, weight, bias, lora_a, lora_b, 0.5, dropout_p=p)
    after_forward = torch.get_rng_state()
    dy = torch.randn_like(y)
    torch.set_rng_state(after_forward)
    grads = torch.autograd.grad(y, [x, lora_a, lora_b], dy)
    assert torch.equal(torch.get_rng_state(), after_forward)  # backward consumed no random numbers

    leaves64 = [t.detach().double().requires_grad_() for t in (x, lora_a, lora_b)]
    x64, a64, b64 = leaves64
    weight64 = weight if nf4 else weight.double()
    ref = reference.lora_linear(x64, weight64, bias.double(), a64, b64, 0.5, x64 * expected_mask.double())
    ref_grads = torch.autograd.grad(ref, leaves64, dy.double())
    assert_rel_close(y, ref, dtype)
    for grad, ref_grad in zip(grads, ref_grads):
        assert_rel_close(grad, ref_grad, tol=GRAD_TOL[dtype])


def test_gradcheck_dropout_p(reference_backend):
    x, weight, bias, lora_a, lora_b = _inputs((3,), 24, 5, 3, torch.float64, nf4=True, double_quant=True,
                                              with_bias=False)

    def fn(x, lora_a, lora_b):
        torch.manual_seed(3)  # the same mask on every evaluation
        return lora_linear(x, weight, None, lora_a, lora_b, 0.75, dropout_p=0.5)

    assert torch.autograd.gradcheck(fn, (x, lora_a, lora_b), fast_mode=True)


def test_dropout_arguments_are_checked():
    x, weight = torch.randn(2, 8), torch.randn(4, 8)
    lora_a, lora_b = torch.randn(2, 8), torch.randn(4, 2)
    with pytest.raises(ValueError, match="not both"):
        lora_linear(x, weight, None, lora_a, lora_b, 1.0, x_dropped=x, dropout_p=0.1)
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
        lora_linear(x, weight, None, lora_a, lora_b, 1.0, dropout_p=1.0)


def _linear_op_calls(nf4):
    """``(name, f(x, weight, bias, params))`` for each fastpeft linear op and mode, ``params`` the adapter
    tensors: the ops whose output a caller may change in place."""
    from fastpeft.ops.dora import dora_linear
    from fastpeft.ops.ia3 import ia3_linear

    def dropped(x):
        return torch.nn.functional.dropout(x, 0.3)

    return [
        ("lora", lambda x, w, b, a, bb, m, l_in, l_out: lora_linear(x, w, b, a, bb, 0.7)),
        ("lora x_dropped", lambda x, w, b, a, bb, m, l_in, l_out: lora_linear(x, w, b, a, bb, 0.7, dropped(x))),
        ("lora dropout_p", lambda x, w, b, a, bb, m, l_in, l_out: lora_linear(x, w, b, a, bb, 0.7, dropout_p=0.3)),
        ("lora base only", lambda x, w, b, a, bb, m, l_in, l_out: lora_linear(x, w, b, None, None, 0.0)),
        ("dora", lambda x, w, b, a, bb, m, l_in, l_out: dora_linear(x, w, b, a, bb, 0.7, m)),
        ("dora x_dropped", lambda x, w, b, a, bb, m, l_in, l_out: dora_linear(x, w, b, a, bb, 0.7, m, dropped(x))),
        ("ia3 feed-forward", lambda x, w, b, a, bb, m, l_in, l_out: ia3_linear(x, w, b, l_in, True)),
        ("ia3", lambda x, w, b, a, bb, m, l_in, l_out: ia3_linear(x, w, b, l_out, False)),
    ]


@pytest.mark.parametrize("lead", [(5,), (2, 3)])
@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_outputs_can_be_changed_in_place(reference_backend, nf4, lead):
    # nn.ReLU(inplace=True) after the layer, or PEFT's `result += ...` over it: the op's output must not be a
    # view autograd forbids to modify, and the gradients must be those of the out-of-place computation
    x, weight, bias, lora_a, lora_b = _inputs(lead, 33, 17, 3, torch.float32, nf4, False, True, bias_grad=True)
    magnitude = (1 + 0.1 * torch.randn(17, device=DEVICE)).requires_grad_()
    l_in = (1 + 0.1 * torch.randn(33, device=DEVICE)).requires_grad_()
    l_out = (1 + 0.1 * torch.randn(17, device=DEVICE)).requires_grad_()
    params = [x, bias, lora_a, lora_b, magnitude, l_in, l_out]
    for name, op in _linear_op_calls(nf4):
        results = []
        for in_place in (False, True):
            torch.manual_seed(7)
            y = op(x, weight, bias, lora_a, lora_b, magnitude, l_in, l_out)
            if in_place:
                y.add_(1.0).relu_()
            else:
                y = torch.relu(y + 1.0)
            used = [p for p in params if p.grad_fn is None]
            grads = torch.autograd.grad(y.square().sum(), used, allow_unused=True)
            results.append((y.detach(), grads))
        (ref, ref_grads), (out, grads) = results
        assert torch.equal(out, ref), name
        for grad, ref_grad in zip(grads, ref_grads):
            assert (grad is None) == (ref_grad is None) and (grad is None or torch.equal(grad, ref_grad)), name


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_weight_stored_transposed(monkeypatch, backend):
    # a GPT-2 Conv1D keeps its weight (in, out): the ops take its transposed view (any strides), no copy
    from fastpeft.ops.dora import dora_linear

    monkeypatch.setenv("FASTPEFT_BACKEND", backend)
    x, weight, bias, lora_a, lora_b = _inputs((2, 3), 33, 17, 4, torch.float32, nf4=False, double_quant=False,
                                              with_bias=True, bias_grad=True)
    stored = weight.t().contiguous()  # (in, out)
    magnitude = torch.rand(17, device=DEVICE).add_(0.5).requires_grad_()
    leaves = [x, lora_a, lora_b, bias]
    for op, ref_op, extra in ((lora_linear, reference.lora_linear, ()), (dora_linear, reference.dora_linear, (magnitude,))):
        y = op(x, stored.t(), bias, lora_a, lora_b, 0.7, *extra)
        dy = torch.randn_like(y)
        grads = torch.autograd.grad(y, leaves + list(extra), dy)
        leaves64 = [t.detach().double().requires_grad_() for t in leaves + list(extra)]
        ref = ref_op(leaves64[0], weight.double(), leaves64[3], leaves64[1], leaves64[2], 0.7, *leaves64[4:])
        ref_grads = torch.autograd.grad(ref, leaves64, dy.double())
        assert_rel_close(y, ref, torch.float32)
        for grad, ref_grad in zip(grads, ref_grads):
            assert_rel_close(grad, ref_grad, tol=GRAD_TOL[torch.float32])


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the CPU path's buffer")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_nf4_matmul_dequantises_into_one_reusable_buffer(reference_backend, monkeypatch, dtype):
    """On CPU the NF4 op dequantises with bitsandbytes' kernel into the thread's reusable buffer of its dtype
    (no dense weight allocated per call), with exactly the values of the allocating path (fp32, then one
    cast); gradients, which need the weight after the op, never see that buffer."""
    pytest.importorskip("bitsandbytes")
    from fastpeft import nf4 as nf4_module

    monkeypatch.setattr(nf4_module, "_thread_buffers", threading.local())
    weights = [NF4Weight.quantize(torch.randn(24, 128) * 50, 64, double_quant=True),
               NF4Weight.quantize(torch.randn(40, 128), 64)]
    for weight in weights + weights:
        a = torch.randn(3, 128, dtype=dtype)
        dense = reference.base_weight(weight, dtype)
        assert torch.equal(fused_linear(a, weight)[0], a @ dense.T)
        (buffer,) = nf4_module.dequant_buffers(DEVICE).values()
        assert buffer.dtype == dtype and torch.equal(buffer[:weight.shape.numel()].view(weight.shape), dense)
    assert buffer.numel() == 40 * 128  # one buffer, grown once to the largest layer
    other_thread = []  # another thread dequantises into its own buffer (freed with it), never into this one
    worker = threading.Thread(target=lambda: other_thread.append((fused_linear(a, weights[0])[0],
                                                                 nf4_module.dequant_buffers(DEVICE)[dtype])))
    worker.start()
    worker.join()
    assert other_thread[0][1].data_ptr() != buffer.data_ptr()
    assert nf4_module.dequant_buffers(DEVICE)[dtype] is buffer
    x = torch.randn(2, 128, dtype=dtype, requires_grad=True)
    lora_a, lora_b = torch.randn(4, 128, requires_grad=True), torch.randn(24, 4, requires_grad=True)
    lora_linear(x, weights[0], None, lora_a, lora_b, 0.5).sum().backward()
    grads = [t.grad.clone() for t in (x, lora_a, lora_b)]
    for t in (x, lora_a, lora_b):
        t.grad = None
    reference.lora_linear(x, weights[0], None, lora_a, lora_b, 0.5).sum().backward()
    for got, t in zip(grads, (x, lora_a, lora_b)):
        torch.testing.assert_close(got, t.grad)


def test_integer_base_or_bias_and_factors_on_another_device_are_refused():
    """An int8 base weight or an integer bias is not cast and used; LoRA factors, bias and DoRA's inputs on another
    device than x raise a ValueError naming both (meta stands in for a second device)."""
    from fastpeft.ops.dora import dora_linear

    x, weight = torch.randn(3, 16), torch.randn(8, 16)
    lora_a, lora_b = torch.randn(2, 16), torch.randn(8, 2)
    with pytest.raises(TypeError, match="dense weight must be floating point, got torch.int8"):
        lora_linear(x, weight.to(torch.int8), None, lora_a, lora_b, 1.0)
    with pytest.raises(TypeError, match="bias must be floating point, got torch.int64"):
        lora_linear(x, weight, torch.ones(8, dtype=torch.int64), lora_a, lora_b, 1.0)
    for a, b, what in ((lora_a.to("meta"), lora_b, "lora_a"), (lora_a, lora_b.to("meta"), "lora_b")):
        with pytest.raises(ValueError, match=f"x is on cpu, {what} on meta"):
            lora_linear(x, weight, None, a, b, 1.0)
        with pytest.raises(ValueError, match=f"x is on cpu, {what} on meta"):
            dora_linear(x, weight, None, a, b, 1.0, torch.ones(8))
    with pytest.raises(ValueError, match="x is on cpu, bias on meta"):
        lora_linear(x, weight, torch.ones(8, device="meta"), lora_a, lora_b, 1.0)
    with pytest.raises(TypeError, match="lora_a must be floating point"):
        lora_linear(x, weight, None, lora_a.to(torch.int32), lora_b, 1.0)
