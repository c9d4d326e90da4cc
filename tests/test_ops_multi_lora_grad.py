"""The multi-adapter backward's primitives (``fastpeft::multi_lora_shrink``, ``fastpeft::multi_lora_segment_grad``)
and ``LoraBank.transposed``: opcheck, and their CPU kernels (``fastpeft.reference``) against autograd through a
plain per-token loop in float64."""

import pytest
import torch

from fastpeft import reference
from fastpeft.bank import LoraBank
from fastpeft.ops import MultiLoraMeta, multi_lora_add_, multi_lora_segment_grad, multi_lora_shrink

from conftest import DEVICE, assert_rel_close, non_contiguous
from test_kernels_multi_lora import random_bank

RANKS = [3, 17, 0, 1, 8, 64]  # mixed, one adapter absent from the layer (rank 0)


def loop_grads(x, dy, adapters, ids, weights=None):
    """``(dx, [dA_k], [dB_k])`` by autograd through ``y[t] = w_t s_k (x[t] A_kᵀ) B_kᵀ``, one token at a time, in
    float64; an adapter without tokens (or absent) gets zero gradients."""
    x = x.detach().double().requires_grad_()
    factors = [None if a is None else (a.lora_a.detach().double().requires_grad_(),
                                       a.lora_b.detach().double().requires_grad_()) for a in adapters]
    rows = []
    for t, k in enumerate(ids.tolist()):
        if k < 0 or factors[k] is None:
            rows.append(torch.zeros(dy.shape[1], dtype=torch.float64, device=x.device))
            continue
        w = 1.0 if weights is None else float(weights[t])
        lora_a, lora_b = factors[k]
        rows.append(w * adapters[k].scaling * (x[t] @ lora_a.t()) @ lora_b.t())
    # ``0 * x.sum()`` keeps x in the graph when no token has an adapter
    ((torch.stack(rows) * dy.double()).sum() + 0 * x.sum()).backward()
    grads = [(torch.zeros_like(a) if a.grad is None else a.grad, torch.zeros_like(b) if b.grad is None else b.grad)
             for a, b in (f if f is not None else (torch.zeros(0), torch.zeros(0)) for f in factors)]
    return x.grad, [g[0] for g in grads], [g[1] for g in grads]


def backward(x, dy, bank, meta):
    """``(dx, dA, dB)`` composed of the primitives, as the multi-adapter autograd Function composes them."""
    h = multi_lora_shrink(x, bank, meta)
    g = multi_lora_shrink(dy, bank.transposed(), meta)
    d_lora_b = multi_lora_segment_grad(dy, h, bank, meta, "lora_b")
    d_lora_a = multi_lora_segment_grad(g, x, bank, meta, "lora_a")
    dx = multi_lora_add_(torch.zeros_like(x), dy, bank.transposed(), meta)
    return dx, d_lora_a, d_lora_b


def assert_bank_grads(d_lora_a, d_lora_b, adapters, ref_a, ref_b, dtype):
    """Each adapter's gradient at its own rank matches; the padding beyond it is exactly zero."""
    for k, a in enumerate(adapters):
        rank = 0 if a is None else a.rank
        if rank:
            assert_rel_close(d_lora_a[k, :rank], ref_a[k], dtype)
            assert_rel_close(d_lora_b[k, :, :rank], ref_b[k], dtype)
        assert not d_lora_a[k, rank:].any() and not d_lora_b[k, :, rank:].any()


@pytest.mark.parametrize("pattern", ["scattered", "sorted", "one_adapter", "none"])
def test_backward_matches_autograd_of_the_per_token_loop(reference_backend, pattern):
    m, in_features, out_features = 29, 33, 19
    bank, adapters = random_bank(RANKS, in_features, out_features, torch.float64)
    for k, a in enumerate(adapters):  # padding never read: NaN there would show
        bank.lora_a[k, 0 if a is None else a.rank:] = float("nan")
        bank.lora_b[k, :, 0 if a is None else a.rank:] = float("nan")
    ids = {"scattered": torch.randint(-1, len(RANKS), (m,)),
           "sorted": torch.randint(-1, len(RANKS), (m,)).sort().values,
           "one_adapter": torch.full((m,), 1), "none": torch.full((m,), -1)}[pattern]
    if pattern == "scattered":
        ids[ids == 3] = 4  # adapter 3 (rank 1) has no tokens: an empty segment
    x = non_contiguous(torch.randn(m, in_features, dtype=torch.float64, device=DEVICE))
    dy = torch.randn(m, out_features, dtype=torch.float64, device=DEVICE)
    meta = MultiLoraMeta.build(ids)
    dx, d_lora_a, d_lora_b = backward(x, dy, bank, meta)
    ref_dx, ref_a, ref_b = loop_grads(x, dy, adapters, ids)
    assert d_lora_a.shape == bank.lora_a.shape and d_lora_b.shape == bank.lora_b.shape
    assert_rel_close(dx, ref_dx, torch.float64)
    assert_bank_grads(d_lora_a, d_lora_b, adapters, ref_a, ref_b, torch.float64)


def test_slot_weights_scale_each_token(reference_backend):
    m, in_features, out_features = 13, 20, 9
    bank, adapters = random_bank([4, 6, 2], in_features, out_features, torch.float64)
    ids, weights = torch.randint(-1, 3, (m,)), torch.rand(m) + 0.25
    x, dy = torch.randn(m, in_features, dtype=torch.float64), torch.randn(m, out_features, dtype=torch.float64)
    meta = MultiLoraMeta.build(ids, weights)
    dx, d_lora_a, d_lora_b = backward(x, dy, bank, meta)
    ref_dx, ref_a, ref_b = loop_grads(x, dy, adapters, ids, meta.slot_weights[:, 0])
    assert_rel_close(dx, ref_dx, torch.float64)
    assert_bank_grads(d_lora_a, d_lora_b, adapters, ref_a, ref_b, torch.float64)


def test_shrink_is_unscaled_and_zero_outside_each_adapter(reference_backend):
    bank, adapters = random_bank([2, 5], 11, 7, torch.float64)
    ids = torch.tensor([1, -1, 0, 1])
    x = torch.randn(4, 11, dtype=torch.float64)
    h = multi_lora_shrink(x, bank, MultiLoraMeta.build(ids))
    assert h.shape == (4, 5) and h.dtype == torch.float64
    assert torch.equal(h[1], torch.zeros(5, dtype=torch.float64)) and not h[2, 2:].any()
    torch.testing.assert_close(h[0], x[0] @ adapters[1].lora_a.t())
    torch.testing.assert_close(h[2, :2], x[2] @ adapters[0].lora_a.t())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_bank_with_low_precision_activations(reference_backend, dtype):
    """PEFT's fp32 adapters on a bf16 / fp16 model: h and g in fp32, the factors' gradients in fp32."""
    m, in_features, out_features = 17, 33, 19
    bank, adapters = random_bank([3, 17, 8], in_features, out_features, torch.float32)
    ids = torch.randint(-1, 3, (m,))
    x, dy = torch.randn(m, in_features, dtype=dtype), torch.randn(m, out_features, dtype=dtype)
    meta = MultiLoraMeta.build(ids)
    h = multi_lora_shrink(x, bank, meta)
    d_lora_b = multi_lora_segment_grad(dy, h, bank, meta, "lora_b")
    d_lora_a = multi_lora_segment_grad(multi_lora_shrink(dy, bank.transposed(), meta), x, bank, meta, "lora_a")
    assert h.dtype == d_lora_a.dtype == d_lora_b.dtype == torch.float32
    _, ref_a, ref_b = loop_grads(x, dy, adapters, ids)
    assert_bank_grads(d_lora_a, d_lora_b, adapters, ref_a, ref_b, torch.float32)


def test_transposed_bank_is_a_view_made_once():
    bank, _ = random_bank([3, 5], 11, 7, torch.float32)
    flipped = bank.transposed()
    assert flipped is bank.transposed()
    assert flipped.lora_a.shape == (2, 5, 7) and flipped.lora_b.shape == (2, 11, 5)
    assert flipped.lora_a.data_ptr() == bank.lora_b.data_ptr() and flipped.ranks is bank.ranks
    with_vectors = LoraBank(bank.lora_a, bank.lora_b, bank.ranks, bank.scalings, out_scale=torch.ones(2, 7))
    with pytest.raises(ValueError, match="DoRA / IA3"):
        with_vectors.transposed()


def test_segments_locate_each_adapters_tokens():
    meta = MultiLoraMeta.build(torch.tensor([2, -1, 0, 2, 0, 2, -1]))
    assert meta.segments.tolist() == [[[0, 2], [0, 0], [2, 3]]]
    order = meta.token_order[0].tolist()
    assert order[0:2] == [2, 4] and order[2:5] == [0, 3, 5]
    assert MultiLoraMeta.build(torch.full((3,), -1)).segments.shape == (1, 0, 2)


def test_bad_inputs_raise_before_anything_runs(triton_backend):
    bank, _ = random_bank([3, 5], 11, 7, torch.float32)
    x, dy = torch.randn(4, 11), torch.randn(4, 7)
    meta = MultiLoraMeta.build(torch.tensor([0, 1, -1, 1]))
    h = torch.zeros(4, 5)
    with pytest.raises(ValueError, match="which must be one of"):
        multi_lora_segment_grad(dy, h, bank, meta, "lora_c")
    with pytest.raises(ValueError, match="must be the bank's largest rank 5"):
        multi_lora_segment_grad(dy, h[:, :3], bank, meta, "lora_b")
    with pytest.raises(ValueError, match="metadata is for 4 tokens"):
        multi_lora_shrink(x[:3], bank, meta)
    with pytest.raises(ValueError, match="one adapter slot per token"):
        multi_lora_shrink(x, bank, MultiLoraMeta.build(torch.zeros(4, 2, dtype=torch.long)))
    with pytest.raises(ValueError, match="adapter id 2 out of range"):
        multi_lora_shrink(x, bank, MultiLoraMeta.build(torch.tensor([0, 2, -1, 1])))
    with pytest.raises(ValueError, match=r"x must be \(M, 11\)"):
        multi_lora_shrink(dy, bank, meta)


def test_opcheck(reference_backend):
    bank, _ = random_bank([4, 9, 2], 33, 17, torch.float32)
    meta = MultiLoraMeta.build(torch.tensor([0, 1, -1, 1, 0]))
    x, dy = torch.randn(5, 33), torch.randn(5, 17)
    torch.library.opcheck(torch.ops.fastpeft.multi_lora_shrink.default,
                          (x, bank.lora_a, bank.ranks, meta.slot_ids, meta.token_order, meta.tiles, meta.block_m,
                           meta.max_adapter_id))
    h = reference.multi_lora_shrink(x, bank.lora_a, bank.ranks, meta.slot_ids)
    for left, right, which in ((dy, h, "lora_b"), (h, x, "lora_a")):
        torch.library.opcheck(torch.ops.fastpeft.multi_lora_segment_grad.default,
                              (left, right, bank.ranks, bank.scalings, meta.slot_ids, meta.slot_weights,
                               meta.token_order, meta.segments, which))


def test_eager_path_and_the_op_agree(reference_backend):
    bank, _ = random_bank([5, 3], 21, 10, torch.float32)
    meta = MultiLoraMeta.build(torch.tensor([1, 0, -1, 1, 0]))
    x, dy = torch.randn(5, 21), torch.randn(5, 10)
    h = multi_lora_shrink(x, bank, meta)
    torch.testing.assert_close(h, torch.ops.fastpeft.multi_lora_shrink(
        x, bank.lora_a, bank.ranks, meta.slot_ids, meta.token_order, meta.tiles, meta.block_m, meta.max_adapter_id))
    torch.testing.assert_close(multi_lora_segment_grad(dy, h, bank, meta, "lora_b"),
                               torch.ops.fastpeft.multi_lora_segment_grad(
                                   dy, h, bank.ranks, bank.scalings, meta.slot_ids, meta.slot_weights,
                                   meta.token_order, meta.segments, "lora_b"))
