"""The ``multi_lora_add_`` primitive (``fastpeft::multi_lora_add_``): opcheck, and its CPU kernel
(``fastpeft.reference.multi_lora_add_``: the MultiLoraGrouping, gathered bmm for decode-like batches, slices for
contiguous rows) against the plain per-token float64 math of ``fastpeft.reference.multi_lora_delta``."""

import dataclasses

import pytest
import torch

from fastpeft import reference
from fastpeft.bank import LoraBank
from fastpeft.ops.multi_lora import MultiLoraMeta, multi_lora_add_

from conftest import DEVICE, assert_rel_close, non_contiguous, poisoned
from test_kernels_multi_lora import random_bank, reference_delta


def _ids(pattern: str, m: int, n: int) -> torch.Tensor:
    """Per-token adapter ids of the layouts the grouping distinguishes."""
    if pattern == "one_adapter":  # one group covering every token: a single in-place addmm_
        return torch.zeros(m, dtype=torch.long)
    if pattern == "distinct":  # decode: one token per adapter, the gathered bmm
        return torch.arange(m) % n
    if pattern == "rows":  # prefill, few rows per adapter: rows of 3 tokens gathered, one row without adapter
        return torch.tensor([2, 0, -1, 1, 2]).repeat_interleave(3)[:m]
    if pattern == "runs":  # prefill: each row's tokens contiguous, rows of the same adapter apart
        return torch.tensor([0, 0, 0, 1, 1, -1, -1, 0, 0, 2, 2, 2, 1])[:m]
    return torch.randint(-1, n, (m,))  # scattered, some without adapter


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("pattern", ["one_adapter", "distinct", "rows", "runs", "scattered"])
@pytest.mark.parametrize("ranks", [[8, 8, 8, 8], [3, 17, 1, 8]], ids=["equal_ranks", "mixed_ranks"])
def test_reference_path_matches_the_oracle(reference_backend, dtype, pattern, ranks):
    m, in_features, out_features = (15 if pattern == "rows" else 13), 33, 17
    bank, adapters = random_bank(ranks, in_features, out_features, dtype)
    for k, a in enumerate(adapters):  # rank padding is never read: NaN there would show
        bank.lora_a[k, a.rank:] = float("nan")
        bank.lora_b[k, :, a.rank:] = float("nan")
    ids = _ids(pattern, m, len(ranks))
    x = non_contiguous(torch.randn(m, in_features, dtype=dtype, device=DEVICE))
    base = torch.randn(m, out_features, dtype=dtype, device=DEVICE)
    y = non_contiguous(base.clone())
    meta = MultiLoraMeta.build(ids, decode=pattern == "distinct")
    gather = meta.reference_plan.gather
    if pattern != "scattered":  # 13 scattered tokens over 4 adapters may take either path
        assert (gather is not None) == (pattern in ("distinct", "rows"))
    if pattern == "rows":
        assert gather[0] == 3 and gather[1].tolist() == [0, 1, 3, 4]
    assert multi_lora_add_(y, x, bank, meta) is y
    assert_rel_close(y, base.double() + reference_delta(x, adapters, ids[:, None], None), dtype)


@pytest.mark.parametrize("pattern", ["one_adapter", "runs", "scattered"])
def test_each_bank_computes_with_its_own_adapters(reference_backend, pattern):
    """The CPU path keeps each bank's per-adapter views and numbers (its own rank and scaling, made at first use)
    on that bank: another bank through the same batch metadata, as after add_adapter replaces an adapter with one
    of another rank and scaling, computes with its own, and the first bank still with its."""
    m, in_features, out_features = 13, 33, 17
    meta = MultiLoraMeta.build(_ids(pattern, m, 3))
    x = torch.randn(m, in_features, dtype=torch.float64)
    first, adapters = random_bank([4, 6, 2], in_features, out_features, torch.float64)
    _, others = random_bank([9, 1, 5], in_features, out_features, torch.float64)
    others = [dataclasses.replace(a, scaling=-2 * a.scaling) for a in others]
    banks = [(first, adapters), (LoraBank.pack(others, in_features, out_features, torch.float64, DEVICE), others)]
    for bank, adapters in banks + banks:
        y = multi_lora_add_(torch.zeros(m, out_features, dtype=torch.float64), x, bank, meta)
        assert_rel_close(y, reference_delta(x, adapters, meta.slot_ids.long(), None), torch.float64)


@pytest.mark.parametrize("slots", [1, 3])
def test_weights_zero_weights_and_empty_rows(reference_backend, slots):
    m, in_features, out_features = 11, 20, 9
    bank, adapters = random_bank([4, 0, 4, 4], in_features, out_features, torch.float64)
    slot_ids = torch.arange(m * slots).reshape(m, slots) % 4
    slot_ids[2] = -1
    slot_weights = (torch.rand(m, slots) - 0.3).double()  # fp32 values: the metadata holds weights in fp32
    slot_weights[4, 0] = 0.0
    x = torch.randn(m, in_features, dtype=torch.float64)
    y = torch.zeros(m, out_features, dtype=torch.float64)
    y[2] = poisoned((out_features,), torch.float64)  # a row without adapter is never written
    multi_lora_add_(y, x, bank, MultiLoraMeta.build(slot_ids, slot_weights, decode=True))
    assert torch.isnan(y[2]).all()
    keep = torch.arange(m) != 2
    assert_rel_close(y[keep], reference_delta(x, adapters, slot_ids, slot_weights)[keep], torch.float64)


def test_eager_path_skips_the_custom_op_and_the_op_agrees(reference_backend):
    """Eager calls run the plan directly; the registered op (what torch.compile sees) gives the same."""
    bank, _ = random_bank([5, 5, 5], 21, 10, torch.float32)
    meta = MultiLoraMeta.build(torch.tensor([2, 0, 1, -1, 2]), decode=True)
    x = torch.randn(5, 21)
    eager, via_op = torch.zeros(5, 10), torch.zeros(5, 10)
    multi_lora_add_(eager, x, bank, meta)
    torch.ops.fastpeft.multi_lora_add_(via_op, x, bank.lora_a, bank.lora_b, bank.ranks, bank.scalings, meta.slot_ids,
                                       meta.slot_weights, meta.token_order, meta.tiles, list(meta.slot_tiles),
                                       meta.block_m, meta.max_adapter_id)
    torch.testing.assert_close(eager, via_op)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pattern", ["one_adapter", "distinct", "rows", "runs", "scattered"])
def test_fp32_bank_on_low_precision_rows_is_peft_per_row(reference_backend, dtype, pattern):
    """PEFT's fp32 adapters on a bf16 / fp16 model: each row gets what PEFT's mixed-batch forward
    gives it, ``y + (s · (x.float() Aᵀ) Bᵀ).to(y.dtype)``, and a change of B below half a step of ``dtype``
    (B exactly representable in it, scaled by 1 + eps/8) moves the output as it moves PEFT's."""
    m, in_features, out_features = (15 if pattern == "rows" else 13), 33, 17
    _, adapters = random_bank([3, 17, 1, 8], in_features, out_features, torch.float32)
    ids = _ids(pattern, m, len(adapters))
    x = non_contiguous(torch.randn(m, in_features, dtype=dtype, device=DEVICE))
    base = 0.05 * torch.randn(m, out_features, dtype=dtype, device=DEVICE)  # small: the term's change shows
    outputs, expected = [], []
    for step in (0.0, torch.finfo(dtype).eps / 8):  # below half a step of B: rounding B undoes it
        for a in adapters:
            a.lora_b = a.lora_b.to(dtype).float() * (1 + step)
        bank = LoraBank.pack(adapters, in_features, out_features, torch.float32, DEVICE)
        y = non_contiguous(base.clone())
        multi_lora_add_(y, x, bank, MultiLoraMeta.build(ids, decode=pattern == "distinct"))
        peft = base.clone()
        for t, k in enumerate(ids.tolist()):
            if k >= 0:
                a = adapters[k]
                peft[t] += ((x[t:t + 1].float() @ a.lora_a.t() @ a.lora_b.t()) * a.scaling).to(dtype)[0]
        # the same casts in the same order: equal here; other BLAS builds may sum a row's product in
        # another order, so a few elements may be one rounding apart
        assert float((y != peft).double().mean()) <= 0.02
        torch.testing.assert_close(y, peft, rtol=2 * torch.finfo(dtype).eps, atol=0)
        outputs.append(y)
        expected.append(peft)
    changed = float((outputs[1] != outputs[0]).double().mean())
    changed_peft = float((expected[1] != expected[0]).double().mean())
    assert changed_peft > 0.01 and 0.5 * changed_peft <= changed <= 2 * changed_peft, (changed, changed_peft)


@pytest.mark.parametrize("bad_id", [2**31 - 1, 2**31, 2**32, 2**32 + 1])
def test_int64_ids_beyond_int32_are_refused(reference_backend, bad_id):
    """An int64 id that int32 cannot hold (or int32's largest value, which marks empty slots) is an error, not
    another adapter after the cast (``2**32`` would be 0)."""
    bank, _ = random_bank([4, 4], 9, 7, torch.float32)
    ids = torch.tensor([0, bad_id, -1], dtype=torch.int64)
    with pytest.raises(ValueError, match="out of range"):
        multi_lora_add_(torch.zeros(3, 7), torch.randn(3, 9), bank, MultiLoraMeta.build(ids))


def test_opcheck(reference_backend):
    bank, _ = random_bank([4, 9], 33, 17, torch.float32)
    meta = MultiLoraMeta.build(torch.tensor([0, 1, -1, 1]))
    args = (torch.zeros(4, 17), torch.randn(4, 33), bank.lora_a, bank.lora_b, bank.ranks, bank.scalings,
            meta.slot_ids, meta.slot_weights, meta.token_order, meta.tiles, list(meta.slot_tiles), meta.block_m,
            meta.max_adapter_id)
    torch.library.opcheck(torch.ops.fastpeft.multi_lora_add_.default, args)


@pytest.mark.parametrize("pattern", ["one_adapter", "distinct", "rows", "scattered"])
def test_the_cpu_kernel_groups_as_the_oracle_adds(pattern):
    """``reference.multi_lora_add_`` with no grouping given builds it from the slots; two slots with weights (no
    gathered path) and one slot (either path) give the per-token float64 math."""
    m, in_features, out_features = (15 if pattern == "rows" else 13), 33, 17
    bank, adapters = random_bank([3, 17, 1, 8], in_features, out_features, torch.float64)
    x = torch.randn(m, in_features, dtype=torch.float64)
    ids = _ids(pattern, m, 4)[:, None]
    # (slots, weights, tolerance): a token's weights for one adapter are summed in fp32 (the slot weights' dtype)
    for slot_ids, slot_weights, dtype in ((ids, torch.ones(ids.shape), torch.float64),
                                          (torch.cat([ids, ids.flip(0)], 1), torch.rand(m, 2) + 0.5, torch.float32)):
        y = torch.zeros(m, out_features, dtype=torch.float64)
        assert reference.multi_lora_add_(y, x, bank, slot_ids, slot_weights) is y
        assert_rel_close(y, reference_delta(x, adapters, slot_ids, slot_weights), dtype)
