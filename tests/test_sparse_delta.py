"""The stored sparse delta: construction, conversions, the safetensors layout and its validation."""

import pytest
import torch

from fastpeft.sparse_delta import SparseDelta

from conftest import DEVICE


def random_delta(out_features=7, in_features=11, density=0.3, dtype=torch.float32, empty_rows=(2,)):
    """A dense delta with about ``density`` of its entries set, the rows ``empty_rows`` all zero."""
    mask = torch.rand(out_features, in_features, device=DEVICE) < density
    for row in empty_rows:
        mask[row] = False
    return torch.randn(out_features, in_features, dtype=dtype, device=DEVICE) * mask, mask


def test_from_dense_round_trips_and_keeps_csr_order():
    dense, mask = random_delta()
    delta = SparseDelta.from_dense(dense)
    assert delta.row_ptr.dtype == torch.int64 and delta.col_idx.dtype == torch.int32
    assert delta.shape == (7, 11) and delta.nnz == int(mask.sum())
    assert delta.density == pytest.approx(delta.nnz / 77)
    assert delta.dtype == torch.float32 and delta.device == DEVICE
    assert torch.equal(delta.to_dense(), dense)
    assert delta.row_ptr[2] == delta.row_ptr[3]  # the empty row
    for o in range(7):
        cols = delta.col_idx[delta.row_ptr[o]:delta.row_ptr[o + 1]]
        assert torch.equal(cols, mask[o].nonzero().squeeze(1).to(torch.int32))
    assert delta.validate() is delta


def test_mask_keeps_stored_zeros():
    dense = torch.zeros(3, 4)
    dense[0, 1] = 2.0
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[0, 1] = mask[1, 3] = mask[2, 0] = True  # two kept zeros
    delta = SparseDelta.from_dense(dense, mask)
    assert delta.nnz == 3
    assert delta.values.tolist() == [2.0, 0.0, 0.0]
    assert delta.row_ptr.tolist() == [0, 1, 2, 3] and delta.col_idx.tolist() == [1, 3, 0]
    # without the mask the zeros are dropped
    assert SparseDelta.from_dense(dense).nnz == 1


def test_empty_delta_and_empty_shape():
    delta = SparseDelta.from_dense(torch.zeros(5, 3))
    assert delta.nnz == 0 and delta.density == 0.0 and delta.row_ptr.tolist() == [0] * 6
    assert torch.equal(delta.to_dense(), torch.zeros(5, 3))
    empty = SparseDelta.from_dense(torch.zeros(0, 3))
    assert empty.shape == (0, 3) and empty.density == 0.0 and empty.validate() is empty


def test_to_dense_dtype_and_gradient():
    dense, _ = random_delta()
    delta = SparseDelta.from_dense(dense)
    values = delta.values.clone().requires_grad_()
    trained = delta.with_values(values)
    assert trained.row_ptr is delta.row_ptr and trained.values is values
    out = trained.to_dense(torch.float64)
    assert out.dtype == torch.float64
    (out * torch.arange(77, dtype=torch.float64).view(7, 11)).sum().backward()
    expected = (delta.rows * 11 + delta.col_idx.long()).double()
    assert torch.equal(values.grad.double(), expected)


def test_to_and_with_values_checks():
    dense, _ = random_delta()
    delta = SparseDelta.from_dense(dense)
    assert delta.to() is delta
    half = delta.to(dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.col_idx.dtype == torch.int32 and half.row_ptr is delta.row_ptr
    with pytest.raises(ValueError, match="values must be"):
        delta.with_values(torch.zeros(delta.nnz + 1))
    with pytest.raises(TypeError, match="values dtype"):
        delta.with_values(torch.zeros(delta.nnz, dtype=torch.int64))


def test_transpose_is_the_transposed_delta():
    dense, _ = random_delta(9, 6, empty_rows=(0, 8))
    delta = SparseDelta.from_dense(dense)
    transposed = delta.transpose()
    assert transposed.shape == (6, 9)
    assert torch.equal(transposed.to_dense(), dense.t())
    assert transposed.validate() is transposed
    # the pattern is built once and reused by deltas of the same pattern
    assert delta.with_values(delta.values * 2).transposed_pattern()[2] is delta.transposed_pattern()[2]


def test_pattern_cache_made_in_inference_mode_serves_autograd():
    dense, _ = random_delta()
    delta = SparseDelta.from_dense(dense)
    with torch.inference_mode():
        rows = delta.rows
    assert not rows.is_inference()
    values = delta.values.clone().requires_grad_()
    delta.with_values(values).to_dense().sum().backward()
    assert torch.equal(values.grad, torch.ones_like(values))


def test_state_dict_round_trip_through_safetensors(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    other, _ = random_delta(dtype=torch.bfloat16)
    dense, _ = random_delta(dtype=torch.bfloat16)
    delta = SparseDelta.from_dense(dense)
    tensors = {**SparseDelta.from_dense(other).state_dict("model.layers.0.q_proj."),
               **delta.state_dict("model.layers.1.q_proj.")}
    assert set(tensors) == {f"model.layers.{i}.q_proj.{n}" for i in (0, 1) for n in ("row_ptr", "col_idx", "values")}
    path = tmp_path / "delta.safetensors"
    safetensors.save_file({k: v.cpu() for k, v in tensors.items()}, str(path))
    loaded = SparseDelta.from_state_dict(safetensors.load_file(str(path)), "model.layers.1.q_proj.", (7, 11))
    assert loaded.dtype == torch.bfloat16
    assert torch.equal(loaded.to_dense(), dense.cpu())


def _stored(delta, **changes):
    tensors = {k: v.clone() for k, v in delta.state_dict("p.").items()}
    for key, value in changes.items():
        tensors["p." + key] = value
    return tensors


@pytest.mark.parametrize("case, message", [
    ("missing", "missing tensor 'p.values'"),
    ("row_ptr_int32", "row_ptr dtype"),
    ("col_idx_int64", "col_idx dtype"),
    ("values_int", "values dtype"),
    ("row_ptr_2d", "row_ptr must be 1-D"),
    ("row_ptr_length", "out \\+ 1"),
    ("lengths_differ", "one entry per stored element"),
    ("row_ptr_start", "row_ptr\\[0\\] must be 0"),
    ("row_ptr_end", "row_ptr\\[-1\\] must be nnz"),
    ("row_ptr_decreasing", "row_ptr decreases at row"),
    ("col_negative", "column indices must be in"),
    ("col_too_large", "column indices must be in"),
    ("col_unsorted", "ascend strictly"),
    ("col_repeated", "ascend strictly"),
    ("value_nan", "value .* is nan"),
    ("value_inf", "value .* is inf"),
    ("not_a_tensor", "is not a tensor"),
])
def test_from_state_dict_rejects_hostile_files(case, message):
    dense = torch.zeros(4, 6)
    dense[0, [1, 3]] = 1.0
    dense[1, [0, 2, 5]] = 2.0
    dense[3, 4] = 3.0
    delta = SparseDelta.from_dense(dense)  # row_ptr [0, 2, 5, 5, 6], col [1, 3, 0, 2, 5, 4]
    rp, col, val = delta.row_ptr.clone(), delta.col_idx.clone(), delta.values.clone()
    tensors = {
        "missing": lambda: {"p.row_ptr": rp, "p.col_idx": col},
        "row_ptr_int32": lambda: _stored(delta, row_ptr=rp.int()),
        "col_idx_int64": lambda: _stored(delta, col_idx=col.long()),
        "values_int": lambda: _stored(delta, values=val.long()),
        "row_ptr_2d": lambda: _stored(delta, row_ptr=rp.view(1, -1)),
        "row_ptr_length": lambda: _stored(delta, row_ptr=rp[:-1]),
        "lengths_differ": lambda: _stored(delta, values=val[:-1]),
        "row_ptr_start": lambda: _stored(delta, row_ptr=rp + 1),
        "row_ptr_end": lambda: _stored(delta, row_ptr=torch.tensor([0, 2, 5, 5, 5])),
        "row_ptr_decreasing": lambda: _stored(delta, row_ptr=torch.tensor([0, 5, 2, 6, 6])),
        "col_negative": lambda: _stored(delta, col_idx=torch.tensor([1, 3, -1, 2, 5, 4], dtype=torch.int32)),
        "col_too_large": lambda: _stored(delta, col_idx=torch.tensor([1, 3, 0, 2, 6, 4], dtype=torch.int32)),
        "col_unsorted": lambda: _stored(delta, col_idx=torch.tensor([1, 3, 2, 0, 5, 4], dtype=torch.int32)),
        "col_repeated": lambda: _stored(delta, col_idx=torch.tensor([1, 1, 0, 2, 5, 4], dtype=torch.int32)),
        "value_nan": lambda: _stored(delta, values=torch.tensor([1.0, float("nan"), 2, 2, 2, 3])),
        "value_inf": lambda: _stored(delta, values=torch.tensor([1.0, 1, 2, float("inf"), 2, 3])),
        "not_a_tensor": lambda: _stored(delta, values=[1.0] * 6),
    }[case]()
    with pytest.raises(ValueError, match=message):
        SparseDelta.from_state_dict(tensors, "p.", (4, 6))


def test_from_state_dict_accepts_what_it_should():
    dense = torch.zeros(4, 6)
    dense[3, 5] = float("nan")
    dense[0, 0] = 1.0
    delta = SparseDelta.from_dense(dense, mask=dense != 0)
    # NaN only when told; a new column in a new row may be smaller than the last of the previous row
    loaded = SparseDelta.from_state_dict(delta.state_dict("p."), "p.", (4, 6), check_finite=False)
    assert loaded.nnz == 2
    with pytest.raises(ValueError, match="shape"):
        SparseDelta.from_state_dict(delta.state_dict("p."), "p.", (4, 6, 1))
    # the columns restart in each row: [5] after [0] in another row is fine, as is [0] after [5]
    dense2 = torch.zeros(3, 6)
    dense2[0, 5] = dense2[1, 0] = dense2[2, 5] = 1.0
    SparseDelta.from_state_dict(SparseDelta.from_dense(dense2).state_dict(), "", (3, 6))


def test_construction_checks_structure():
    rp, col, val = torch.tensor([0, 1]), torch.tensor([0], dtype=torch.int32), torch.ones(1)
    with pytest.raises(ValueError, match="shape must be"):
        SparseDelta(rp, col, val, (1, -2))
    with pytest.raises(ValueError, match="contiguous"):
        SparseDelta(torch.tensor([0, 9, 1, 9])[::2], col, val, (1, 3))
    with pytest.raises(ValueError, match="2-D tensor"):
        SparseDelta.from_dense(torch.ones(3))
    with pytest.raises(ValueError, match="mask must be"):
        SparseDelta.from_dense(torch.ones(2, 2), torch.ones(2, 2))


# --- merge / unmerge ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_is_rounded_once_and_unmerge_with_the_original_is_exact(dtype):
    weight = torch.randn(7, 11, device=DEVICE).to(dtype)
    dense, mask = random_delta(dtype=torch.float32)
    delta = SparseDelta.from_dense(dense, mask)
    before = weight.clone()
    original = delta.merge_into(weight)
    expected = (before.double() + dense.double()).to(dtype)
    assert torch.equal(weight[mask], expected[mask])  # W + δ formed in fp64, rounded once
    assert torch.equal(weight[~mask], before[~mask])  # untouched off the pattern
    assert original.dtype == dtype and torch.equal(original, before[mask])
    delta.unmerge_from(weight, original)
    assert torch.equal(weight, before)


def test_unmerge_without_the_original_is_within_rounding():
    weight = torch.randn(7, 11, device=DEVICE).to(torch.bfloat16)
    dense, mask = random_delta(dtype=torch.float32)
    delta = SparseDelta.from_dense(dense * 0.3, mask)
    before = weight.clone()
    delta.merge_into(weight)
    delta.unmerge_from(weight)
    assert torch.equal(weight[~mask], before[~mask])
    # two bf16 roundings: within 2 units in the last place of max(|W|, |W + δ|) (bf16: 2^-7 relative)
    bound = 2 * 2.0 ** -7 * torch.maximum(before.float().abs(), (before.float() + dense * 0.3).abs())
    assert ((weight.float() - before.float()).abs() <= bound).all()


def test_merge_errors():
    delta = SparseDelta.from_dense(random_delta()[0])
    with pytest.raises(ValueError, match="dense \\(7, 11\\)"):
        delta.merge_into(torch.zeros(11, 7))
    with pytest.raises(TypeError, match="weight dtype"):
        delta.merge_into(torch.zeros(7, 11, dtype=torch.int32))
    with pytest.raises(ValueError, match="original must be"):
        delta.unmerge_from(torch.zeros(7, 11), torch.zeros(delta.nnz, dtype=torch.float16))


# --- the bank -------------------------------------------------------------------------------------------------


def test_bank_packs_and_slices_deltas():
    from fastpeft.sparse_delta import SparseDeltaBank

    deltas = [SparseDelta.from_dense(random_delta(density=d)[0]) for d in (0.3, 0.0, 0.6)]
    deltas[1] = SparseDelta.from_dense(torch.zeros(7, 11, device=DEVICE))
    bank = SparseDeltaBank.from_deltas([deltas[0], deltas[1], deltas[2].to(dtype=torch.float64)])
    assert bank.num_deltas == 3 and bank.dtype == torch.float64 and bank.shape == (7, 11)
    assert bank.offsets == (0, deltas[0].nnz, deltas[0].nnz, deltas[0].nnz + deltas[2].nnz)
    assert bank.row_ptr[2, 0] == deltas[0].nnz and bank.row_ptr[2, -1] == bank.offsets[3]
    for k, d in enumerate(deltas):
        assert torch.equal(bank.delta(k).to_dense(), d.to_dense(torch.float64))
    assert bank.delta(0) is bank.delta(0)
    assert bank.validate() is bank
    with pytest.raises(ValueError, match="out of range"):
        bank.delta(3)
    with pytest.raises(ValueError, match="delta 1 is"):
        SparseDeltaBank.from_deltas([deltas[0], SparseDelta.from_dense(torch.ones(7, 12))])
    with pytest.raises(ValueError, match="offsets must ascend"):
        SparseDeltaBank(bank.row_ptr, bank.col_idx, bank.values, bank.shape, (0, 1, 2, 3))
    with pytest.raises(ValueError, match="row_ptr must be"):
        SparseDeltaBank(bank.row_ptr[:2], bank.col_idx, bank.values, bank.shape, bank.offsets)
    # a bank whose row pointers disagree with its offsets fails validation
    broken = bank.row_ptr.clone()
    broken[2, 1:] += 1
    with pytest.raises(ValueError, match="bank delta 2"):
        SparseDeltaBank(broken, bank.col_idx, bank.values, bank.shape, bank.offsets).validate()
