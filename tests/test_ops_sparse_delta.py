"""The sparse-delta ops (``sparse_delta_add_``, ``sparse_delta_linear``) on the reference backend (the CPU path:
torch's CSR products) against ``fastpeft.reference.sparse_delta_linear`` in float64; gradients of x, bias and the
values; opcheck; the ops' CPU kernels and the eager CPU path are the reference functions; bad inputs."""

import pytest
import torch

from fastpeft import reference
from fastpeft.nf4 import NF4Weight
from fastpeft.ops import sparse_delta_add_, sparse_delta_linear
from fastpeft.sparse_delta import SparseDelta, SparseDeltaBank

from conftest import DEVICE, assert_rel_close, non_contiguous, poisoned

GRAD_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def random_sparse_delta(out_features, in_features, density, dtype=torch.float32, empty_rows=True):
    """A random delta of about ``density`` (rows 0 and the last empty when ``empty_rows``), values ~ N(0, 1/in)."""
    mask = torch.rand(out_features, in_features, device=DEVICE) < density
    if empty_rows and out_features > 1:
        mask[0] = mask[-1] = False
    dense = torch.randn(out_features, in_features, device=DEVICE) / in_features**0.5
    return SparseDelta.from_dense(dense.to(dtype), mask)


def check_layer(lead, in_features, out_features, density, dtype, nf4, with_bias, values_dtype=None,
                x_view=non_contiguous):
    """``sparse_delta_linear`` and its gradients (x, bias, values) against the float64 reference."""
    dense = torch.randn(out_features, in_features, device=DEVICE) / in_features**0.5
    weight = NF4Weight.quantize(dense, 64, double_quant=True) if nf4 else dense.to(dtype)
    delta = random_sparse_delta(out_features, in_features, density, values_dtype or dtype)
    x = x_view(torch.randn(*lead, in_features, device=DEVICE, dtype=dtype))
    bias = torch.randn(out_features, device=DEVICE, dtype=dtype) if with_bias else None
    values = delta.values.clone()
    leaves = [t.requires_grad_() for t in (x, values, bias) if t is not None]
    dy = torch.randn(*lead, out_features, device=DEVICE)

    def run(leaves, weight, fn, delta_of):
        x, values, *bias = leaves
        y = fn(x, weight, bias[0] if bias else None, delta_of(values))
        return y, torch.autograd.grad(y, leaves, dy.to(y.dtype))

    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    ref, ref_grads = run(leaves64, weight if nf4 else weight.double(), reference.sparse_delta_linear,
                         lambda v: delta.with_values(v).to_dense())
    y, grads = run(leaves, weight, sparse_delta_linear, delta.with_values)
    assert y.dtype == dtype
    assert_rel_close(y, ref, dtype)
    for name, grad, ref_grad, leaf in zip(("dx", "dvalues", "dbias"), grads, ref_grads, leaves):
        assert grad.dtype == leaf.dtype, name
        assert_rel_close(grad, ref_grad, tol=GRAD_TOL[dtype])
    return y


# (leading dims, in, out, density): odd sizes, a 3-D x, a dense-ish and a very sparse delta
CASES = [((1,), 65, 47, 0.05), ((19,), 129, 95, 0.005), ((3, 7), 33, 17, 0.3), ((5,), 64, 40, 1.0)]


@pytest.mark.parametrize("nf4", [False, True])
@pytest.mark.parametrize("lead, in_features, out_features, density", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_layer_matches_reference(reference_backend, lead, in_features, out_features, density, nf4, dtype):
    check_layer(lead, in_features, out_features, density, dtype, nf4, with_bias=density != 0.005)


@pytest.mark.parametrize("values_dtype", [torch.float32, torch.float64])
def test_values_in_another_dtype(reference_backend, values_dtype):
    """fp32 values on a bf16 layer (trained values kept in fp32): the term in fp32, values' grads in fp32."""
    check_layer((6,), 48, 30, 0.1, torch.bfloat16, False, True, values_dtype=values_dtype)


def test_empty_delta_and_no_rows(reference_backend):
    weight = torch.randn(9, 13)
    empty = SparseDelta.from_dense(torch.zeros(9, 13))
    x = torch.randn(4, 13, requires_grad=True)
    y = sparse_delta_linear(x, weight, None, empty)
    assert torch.equal(y, x @ weight.t())
    y.sum().backward()
    assert torch.allclose(x.grad, weight.sum(0).expand(4, 13))
    delta = random_sparse_delta(9, 13, 0.2)
    values = delta.values.clone().requires_grad_()
    y0 = sparse_delta_linear(torch.randn(0, 13), weight, None, delta.with_values(values))
    assert y0.shape == (0, 9)
    y0.sum().backward()
    assert torch.equal(values.grad, torch.zeros_like(values))


def test_gradcheck(reference_backend):
    """The hand-written backward against finite differences in float64."""
    weight = torch.randn(7, 9, dtype=torch.float64)
    delta = random_sparse_delta(7, 9, 0.3, torch.float64)
    x = torch.randn(2, 3, 9, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, dtype=torch.float64, requires_grad=True)
    values = delta.values.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, b, v: sparse_delta_linear(x, weight, b, delta.with_values(v)),
                                    (x, bias, values))


def test_inference_needs_no_graph_and_keeps_values_frozen(reference_backend):
    weight = torch.randn(11, 20)
    delta = random_sparse_delta(11, 20, 0.1)
    x = torch.randn(3, 20)
    with torch.inference_mode():
        y = sparse_delta_linear(x, weight, None, delta)
    assert not y.requires_grad
    expected = reference.sparse_delta_linear(x.double(), weight.double(), None, delta.to_dense(torch.float64))
    assert_rel_close(y, expected, torch.float32)
    # the pattern cached under inference mode serves a training step afterwards
    values = delta.values.clone().requires_grad_()
    sparse_delta_linear(x.requires_grad_(), weight, None, delta.with_values(values)).sum().backward()
    assert values.grad is not None and x.grad is not None


def test_autocast_runs_the_dense_layer_in_the_autocast_dtype(reference_backend):
    weight = torch.randn(11, 20)
    delta = random_sparse_delta(11, 20, 0.1)
    x = torch.randn(3, 20)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sparse_delta_linear(x, weight, torch.randn(11), delta)
    assert y.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_add_writes_only_y_and_reads_any_strides(reference_backend, dtype):
    delta = random_sparse_delta(23, 31, 0.1, dtype)
    x = non_contiguous(torch.randn(6, 31, dtype=dtype))
    buffer = poisoned((6, 2 * 23), dtype)
    base = torch.randn(6, 23, dtype=dtype)
    y = buffer[:, ::2]
    y.copy_(base)
    assert sparse_delta_add_(y, x, delta) is y
    expected = base.double() + x.double() @ delta.to_dense(torch.float64).t()
    assert_rel_close(y, expected, dtype)
    assert torch.isnan(buffer[:, 1::2]).all()


def test_opcheck(reference_backend):
    delta = random_sparse_delta(9, 13, 0.3)
    for dtype in (torch.float32, torch.bfloat16):
        y, x = torch.randn(4, 9, dtype=dtype), torch.randn(4, 13, dtype=dtype)
        torch.library.opcheck(torch.ops.fastpeft.sparse_delta_add_.default,
                              (y, x, delta.row_ptr, delta.col_idx, delta.values, 13))


def test_errors():
    weight = torch.randn(9, 13)
    delta = random_sparse_delta(9, 13, 0.3)
    x = torch.randn(4, 13)
    with pytest.raises(TypeError, match="SparseDelta"):
        sparse_delta_linear(x, weight, None, delta.to_dense())
    with pytest.raises(ValueError, match="delta shape"):
        sparse_delta_linear(x, weight, None, random_sparse_delta(9, 12, 0.3))
    with pytest.raises(ValueError, match="needs 13"):
        sparse_delta_linear(torch.randn(4, 12), weight, None, delta)
    with pytest.raises(ValueError, match="frozen"):
        sparse_delta_linear(x, weight.requires_grad_(), None, delta)
    with pytest.raises(TypeError, match="share one floating dtype"):
        sparse_delta_add_(torch.zeros(4, 9, dtype=torch.float16), x, delta)
    with pytest.raises(ValueError, match="do not fit"):
        sparse_delta_add_(torch.zeros(4, 8), x, delta)
    with pytest.raises(ValueError, match="2-D"):
        sparse_delta_add_(torch.zeros(4, 9), x[None], delta)
    with pytest.raises(TypeError, match="SparseDelta"):
        sparse_delta_add_(torch.zeros(4, 9), x, None)


def random_bank(out_features, in_features, densities, dtype):
    deltas = [random_sparse_delta(out_features, in_features, d, dtype) for d in densities]
    return SparseDeltaBank.from_deltas(deltas), deltas


def check_bank_add(m, in_features, out_features, dtype, ids=None):
    """``sparse_delta_add_(y, x, bank, row_ids)`` against the per-row reference (float64)."""
    bank, deltas = random_bank(out_features, in_features, (0.2, 0.0, 0.05, 0.5), dtype)
    ids = torch.randint(-1, len(deltas), (m,), device=DEVICE) if ids is None else ids
    x = non_contiguous(torch.randn(m, in_features, dtype=dtype, device=DEVICE))
    weight = torch.randn(out_features, in_features, dtype=dtype, device=DEVICE)
    buffer = poisoned((m, 2 * out_features), dtype)
    y = buffer[:, ::2]
    y.copy_(x @ weight.t())
    assert sparse_delta_add_(y, x, bank, ids) is y
    expected = reference.multi_sparse_delta_linear(x.double(), weight.double(), None,
                                                   [d.to_dense(torch.float64) for d in deltas], ids)
    assert_rel_close(y, expected, dtype)
    assert torch.isnan(buffer[:, 1::2]).all()
    return y


@pytest.mark.parametrize("ids", ["mixed", "one", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_bank_add_matches_per_row_reference(reference_backend, dtype, ids):
    m = 9
    row_ids = {"mixed": torch.tensor([0, 3, -1, 2, 0, 1, 3, -1, 3]), "one": torch.full((m,), 3),
               "none": torch.full((m,), -1)}[ids].to(DEVICE)
    check_bank_add(m, 37, 23, dtype, row_ids)


def test_bank_add_errors(reference_backend):
    bank, _ = random_bank(9, 13, (0.3, 0.3), torch.float32)
    y, x = torch.zeros(4, 9), torch.randn(4, 13)
    with pytest.raises(ValueError, match=r"delta ids must be in \[-1, 1\]"):
        sparse_delta_add_(y, x, bank, torch.tensor([0, 1, 2, -1]))
    with pytest.raises(ValueError, match="integer tensor"):
        sparse_delta_add_(y, x, bank, torch.zeros(4))
    with pytest.raises(ValueError, match="integer tensor"):
        sparse_delta_add_(y, x, bank, None)
    with pytest.raises(ValueError, match="row_ids pick deltas"):
        sparse_delta_add_(y, x, bank.delta(0), torch.zeros(4, dtype=torch.long))


def test_bank_opcheck(reference_backend):
    bank, _ = random_bank(9, 13, (0.3, 0.1), torch.float32)
    ids = torch.tensor([1, -1, 0, 1], dtype=torch.int32)
    torch.library.opcheck(torch.ops.fastpeft.sparse_delta_bank_add_.default,
                          (torch.randn(4, 9), torch.randn(4, 13), bank.row_ptr, bank.col_idx, bank.values, ids, 13))


def _record(monkeypatch, name):
    """Wrap ``fastpeft.reference.<name>`` so that each call's arguments are appended to the returned list."""
    calls, original = [], getattr(reference, name)

    def recorder(*args):
        calls.append(args)
        return original(*args)

    monkeypatch.setattr(reference, name, recorder)
    return calls


@pytest.mark.parametrize("bank", [False, True], ids=["delta", "bank"])
def test_cpu_kernel_and_eager_path_are_the_reference_functions(monkeypatch, bank):
    """The ops' ``cpu`` kernels call ``fastpeft.reference.sparse_delta_add_`` / ``sparse_delta_bank_add_`` with the
    delta rebuilt from the op's flat arguments; the eager call on CPU hands the reference the caller's delta itself,
    without dispatching the op."""
    import fastpeft.ops.sparse_delta as ops

    monkeypatch.delenv("FASTPEFT_BACKEND", raising=False)
    if bank:
        delta = SparseDeltaBank.from_deltas([random_sparse_delta(9, 13, d).to("cpu") for d in (0.3, 0.1)])
        row_ids = torch.tensor([1, -1, 0, 1], dtype=torch.int32)
        op, name, extra = torch.ops.fastpeft.sparse_delta_bank_add_.default, "sparse_delta_bank_add_", (row_ids,)
    else:
        delta = random_sparse_delta(9, 13, 0.3).to("cpu")
        op, name, extra = torch.ops.fastpeft.sparse_delta_add_.default, "sparse_delta_add_", ()
    calls = _record(monkeypatch, name)
    x, base = torch.randn(4, 13), torch.randn(4, 9)
    expected = base.clone()
    sparse_delta_add_(expected, x, delta, *extra)

    y = base.clone()
    op(y, x, delta.row_ptr, delta.col_idx, delta.values, *extra, 13)
    (y_arg, x_arg, rebuilt, *rest), = calls[1:]
    assert y_arg is y and x_arg is x and rebuilt is not delta
    assert rebuilt.row_ptr is delta.row_ptr and rebuilt.col_idx is delta.col_idx and rebuilt.values is delta.values
    assert rebuilt.shape == delta.shape and all(a is b for a, b in zip(rest, extra))
    assert torch.equal(y, expected)

    def no_dispatch(*args):
        raise AssertionError("the eager CPU call dispatched the op")

    monkeypatch.setattr(ops, "_bank_add_op" if bank else "_add_op", no_dispatch)
    y = base.clone()
    assert sparse_delta_add_(y, x, delta, *extra) is y
    assert calls[2][2] is delta and torch.equal(y, expected)


def test_values_changed_in_place_before_backward_is_an_error(reference_backend):
    """dx reads the values: an optimizer step between forward and backward must not give a silently wrong dx."""
    weight = torch.randn(9, 13)
    delta = random_sparse_delta(9, 13, 0.3)
    values = delta.values.clone().requires_grad_()
    x = torch.randn(4, 13, requires_grad=True)
    y = sparse_delta_linear(x, weight, None, delta.with_values(values))
    with torch.no_grad():
        values.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
