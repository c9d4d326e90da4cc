"""The sparse-delta Triton kernels (Triton's interpreter on CPU) against the float64 reference: every regime of the
plan (decode, small, prefill), odd shapes, empty rows, an all-empty delta, non-contiguous x and y, NaN-poisoned
memory around y, fp32 / fp16 / bf16 (and fp32 values beside half-precision x); the layer op on the Triton backend
(forward and the hand-written backward, whose dx runs the kernel over δᵀ); fp64 through the ops runs the
reference; launcher errors and plans."""

import pytest
import torch

from fastpeft.kernels import sparse_delta as kernels
from fastpeft.kernels.plan import observing
from fastpeft.ops import sparse_delta_add_
from fastpeft.sparse_delta import SparseDelta

from conftest import DEVICE, assert_rel_close, kernel_dtypes, non_contiguous, poisoned
from test_ops_sparse_delta import check_bank_add, check_layer, random_bank, random_sparse_delta


def _expected(base, x, delta):
    return base.double() + x.double() @ delta.to_dense(torch.float64).t()


# (M, in, out): M = 1 decode, 5 and 33 the 16-token tile, 70 the 64-token tile (two blocks, the second partial)
SHAPES = [(1, 65, 47), (5, 33, 17), (33, 129, 95), (70, 47, 40)]


@pytest.mark.parametrize("m, in_features, out_features", SHAPES)
@pytest.mark.parametrize("dtype", kernel_dtypes())
def test_add_matches_reference(triton_backend, m, in_features, out_features, dtype):
    delta = random_sparse_delta(out_features, in_features, 0.15, dtype)
    x = non_contiguous(torch.randn(m, in_features, dtype=dtype, device=DEVICE))
    # y a strided view inside a NaN-poisoned buffer: nothing outside the view may be read into it or written
    buffer = poisoned((m + 2, out_features + 3), dtype)
    y = buffer[1:m + 1, 2:out_features + 2]
    base = torch.randn(m, out_features, dtype=dtype, device=DEVICE)
    base[:, 0] = -0.0  # a row without entries: y + 0 would turn it into +0.0
    y.copy_(base)
    with observing() as plans:
        assert sparse_delta_add_(y, x, delta) is y
    assert [p.variant for p in plans] == [kernels._regime(m)]
    assert_rel_close(y, _expected(base, x, delta), dtype)
    outside = buffer.clone()
    outside[1:m + 1, 2:out_features + 2] = 0
    assert torch.isnan(outside).sum() == outside.numel() - m * out_features
    # rows of δ without entries (the first and the last) keep y's bits
    assert torch.signbit(y[:, 0]).all() and torch.equal(y[:, -1], base[:, -1])


@pytest.mark.parametrize("m", [1, 5, 70])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp32_values_beside_half_x(triton_backend, m, dtype):
    """fp32 values (trained in fp32) on a half-precision layer: the fp32 product path (FP32_DOT)."""
    delta = random_sparse_delta(37, 50, 0.2, torch.float32)
    x = torch.randn(m, 50, dtype=dtype, device=DEVICE)
    base = torch.randn(m, 37, dtype=dtype, device=DEVICE)
    y = base.clone()
    sparse_delta_add_(y, x, delta)
    assert_rel_close(y, _expected(base, x, delta), dtype)


def test_dense_rows_and_a_row_block_spanning_many_steps(triton_backend):
    """A full delta (every row many BLOCK_J steps long) and one hot row among empty ones."""
    delta = random_sparse_delta(20, 150, 1.0, torch.float32, empty_rows=False)
    x = torch.randn(70, 150, device=DEVICE)
    base = torch.randn(70, 20, device=DEVICE)
    y = base.clone()
    sparse_delta_add_(y, x, delta)
    assert_rel_close(y, _expected(base, x, delta), torch.float32)
    dense = torch.zeros(40, 150, device=DEVICE)
    dense[17] = torch.randn(150)
    hot = SparseDelta.from_dense(dense)
    y = base[:, :1].expand(70, 40).clone()
    keep = y.clone()
    sparse_delta_add_(y, x, hot)
    assert_rel_close(y, _expected(keep, x, hot), torch.float32)
    assert torch.equal(y[:, :17], keep[:, :17]) and torch.equal(y[:, 18:], keep[:, 18:])


def test_empty_delta_and_no_tokens_launch_nothing(triton_backend):
    empty = SparseDelta.from_dense(torch.zeros(9, 13, device=DEVICE))
    y = torch.randn(4, 9, device=DEVICE)
    keep = y.clone()
    with observing() as plans:
        sparse_delta_add_(y, torch.randn(4, 13, device=DEVICE), empty)
        sparse_delta_add_(torch.empty(0, 9, device=DEVICE), torch.empty(0, 13, device=DEVICE),
                          random_sparse_delta(9, 13, 0.3))
    assert plans == [] and torch.equal(y, keep)


@pytest.mark.parametrize("lead, in_features, out_features, density", [((1,), 65, 47, 0.1), ((3, 7), 33, 17, 0.3),
                                                                      ((70,), 40, 29, 0.2)])
@pytest.mark.parametrize("dtype", kernel_dtypes())
def test_layer_on_triton_backend(triton_backend, lead, in_features, out_features, density, dtype):
    with observing() as plans:
        check_layer(lead, in_features, out_features, density, dtype, nf4=False, with_bias=True)
    assert len(plans) == 2  # the forward's add and dx's add over δᵀ


def test_nf4_layer_on_triton_backend(triton_backend):
    check_layer((3,), 64, 24, 0.2, torch.bfloat16, nf4=True, with_bias=False)


def test_plans():
    assert kernels.plan_sparse_delta_add(1, 100, False).variant == "decode"
    small = kernels.plan_sparse_delta_add(16, 100, False)
    assert small.variant == "small" and small.constexprs["USE_DOT"] and small.runtime["gather_columns"]
    prefill = kernels.plan_sparse_delta_add(4096, 5632, True, arch=(9, 0))
    assert prefill.variant == "prefill" and prefill.grid == (5632 // 16, 4096 // 64)
    assert prefill.constexprs["FP32_DOT"]
    assert not kernels.plan_sparse_delta_add(1, 100, False).runtime["gather_columns"]
    assert kernels._fp32_dot(torch.bfloat16, torch.float32) and not kernels._fp32_dot(torch.bfloat16, torch.bfloat16)
    assert kernels._fp32_dot(torch.float32, torch.float32)


def test_launcher_errors():
    delta = random_sparse_delta(9, 13, 0.3)
    y, x = torch.zeros(4, 9), torch.randn(4, 13)
    args = (delta.row_ptr, delta.col_idx, delta.values)
    with pytest.raises(TypeError, match="x dtype"):
        kernels.sparse_delta_add_(y, x.double(), *args, 13)
    with pytest.raises(TypeError, match="y dtype"):
        kernels.sparse_delta_add_(y.half(), x, *args, 13)
    with pytest.raises(ValueError, match="need x"):
        kernels.sparse_delta_add_(y, x[:, :12], *args, 13)
    with pytest.raises(ValueError, match="row_ptr must be contiguous int64"):
        kernels.sparse_delta_add_(y, x, delta.row_ptr.int(), delta.col_idx, delta.values, 13)
    with pytest.raises(ValueError, match="row_ptr must be contiguous int64"):
        kernels.sparse_delta_add_(torch.zeros(4, 8), x, *args, 13)
    with pytest.raises(ValueError, match="col_idx must be"):
        kernels.sparse_delta_add_(y, x, delta.row_ptr, delta.col_idx.long(), delta.values, 13)
    with pytest.raises(ValueError, match="values must be contiguous"):
        kernels.sparse_delta_add_(y, x, delta.row_ptr, delta.col_idx, delta.values[:-1], 13)
    with pytest.raises(ValueError, match="one device"):
        kernels.sparse_delta_add_(y.to("meta"), x.to("meta"), *args, 13)


@pytest.mark.parametrize("m, in_features, out_features", [(1, 65, 47), (9, 33, 70)])
@pytest.mark.parametrize("dtype", kernel_dtypes())
def test_bank_add_matches_per_row_reference(triton_backend, m, in_features, out_features, dtype):
    with observing() as plans:
        check_bank_add(m, in_features, out_features, dtype)
    assert [p.variant for p in plans] == ["bank"]


def test_bank_launcher_errors():
    bank, _ = random_bank(9, 13, (0.3, 0.1), torch.float32)
    y, x = torch.zeros(4, 9), torch.randn(4, 13)
    with pytest.raises(ValueError, match="row_ids must be contiguous int32"):
        kernels.sparse_delta_bank_add_(y, x, bank.row_ptr, bank.col_idx, bank.values, torch.zeros(4, dtype=torch.long),
                                       13)
    with pytest.raises(ValueError, match="row_ptr must be contiguous int64"):
        kernels.sparse_delta_bank_add_(y, x, bank.row_ptr[0], bank.col_idx, bank.values,
                                       torch.zeros(4, dtype=torch.int32), 13)


@pytest.mark.parametrize("bank", [False, True], ids=["delta", "bank"])
def test_fp64_through_the_op_runs_the_reference_and_launches_nothing(triton_backend, monkeypatch, bank):
    """The op itself (what ``torch.compile`` traces) on the Triton backend: fp64, which the kernels do not take, runs
    the ``fastpeft.reference`` function inside the device kernel; fp32 launches the Triton kernel instead."""
    from test_ops_sparse_delta import _record

    if bank:
        delta, _ = random_bank(9, 13, (0.3, 0.1), torch.float64)
        row_ids = torch.tensor([1, -1, 0, 1], dtype=torch.int32, device=DEVICE)
        op, name, extra = torch.ops.fastpeft.sparse_delta_bank_add_.default, "sparse_delta_bank_add_", (row_ids,)
    else:
        delta = random_sparse_delta(9, 13, 0.3, torch.float64)
        op, name, extra = torch.ops.fastpeft.sparse_delta_add_.default, "sparse_delta_add_", ()
    calls = _record(monkeypatch, name)
    x, base = torch.randn(4, 13, dtype=torch.float64, device=DEVICE), torch.randn(4, 9, dtype=torch.float64,
                                                                                  device=DEVICE)
    expected = base.clone()
    sparse_delta_add_(expected, x, delta, *extra)
    assert len(calls) == 1 and calls[0][2] is delta  # the eager fp64 call runs the reference on the delta itself
    for dtype, launches in ((torch.float64, []), (torch.float32, ["bank" if bank else "small"])):
        y = base.to(dtype, copy=True)
        with observing() as plans:
            op(y, x.to(dtype), delta.row_ptr, delta.col_idx, delta.values.to(dtype), *extra, 13)
        assert [p.variant for p in plans] == launches
        assert_rel_close(y, expected, dtype)
    assert len(calls) == 2
