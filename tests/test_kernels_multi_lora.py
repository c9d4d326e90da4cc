"""Multi-LoRA Triton kernels (interpreter on CPU) against fastpeft.reference in float64."""

import pytest
import torch

from fastpeft import reference
from fastpeft.adapters import ModuleAdapter
from fastpeft.bank import LoraBank
from fastpeft.ops.multi_lora import MultiLoraMeta, multi_lora_add_

from conftest import DEVICE, ODD_SHAPES, assert_rel_close, kernel_dtypes, non_contiguous, poisoned


@pytest.fixture(params=[False, True], ids=["two_launch", "fused"])
def fused(request, monkeypatch):
    """Run the test with the shrink+expand launches, then with the fused kernel, in both regimes."""
    from fastpeft.kernels import multi_lora

    monkeypatch.setattr(multi_lora, "FUSED", {"decode": request.param, "prefill": request.param})
    return request.param


def random_bank(ranks, in_features, out_features, dtype):
    adapters = [None if r == 0 else ModuleAdapter(
        lora_a=torch.randn(r, in_features, dtype=dtype, device=DEVICE) / in_features ** 0.5,
        lora_b=torch.randn(out_features, r, dtype=dtype, device=DEVICE) / r ** 0.5,
        scaling=0.5 + k) for k, r in enumerate(ranks)]
    return LoraBank.pack(adapters, in_features, out_features, dtype, DEVICE), adapters


def reference_delta(x, adapters, slot_ids, slot_weights):
    """float64 oracle; an adapter absent from the layer is a rank-0 (zero) adapter."""
    in_features = x.shape[-1]
    out_features = next(a.lora_b.shape[0] for a in adapters if a is not None)
    lora_as = [torch.zeros(0, in_features, dtype=torch.float64, device=DEVICE) if a is None else a.lora_a.double()
               for a in adapters]
    lora_bs = [torch.zeros(out_features, 0, dtype=torch.float64, device=DEVICE) if a is None else a.lora_b.double()
               for a in adapters]
    scalings = [0.0 if a is None else a.scaling for a in adapters]
    return reference.multi_lora_delta(x.double(), lora_as, lora_bs, scalings, slot_ids, slot_weights)


@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize("m,in_features,out_features", ODD_SHAPES)
@pytest.mark.parametrize("decode", [False, True])
def test_mixed_ranks_match_reference(triton_backend, fused, dtype, m, in_features, out_features, decode):
    ranks = [3, 17, 1, 8]
    bank, adapters = random_bank(ranks, in_features, out_features, dtype)
    ids = torch.randint(-1, len(ranks), (m,), device=DEVICE)
    ids[0] = 1  # rank 17: crosses a BLOCK_R boundary
    x = non_contiguous(torch.randn(m, in_features, dtype=dtype, device=DEVICE))
    base = torch.randn(m, out_features, dtype=dtype, device=DEVICE)
    y = non_contiguous(base.clone())
    multi_lora_add_(y, x, bank, MultiLoraMeta.build(ids, decode=decode))
    weight = torch.zeros(out_features, in_features, dtype=torch.float64, device=DEVICE)
    ref = base.double() + reference.multi_lora_linear(
        x.double(), weight, None, [a.lora_a.double() for a in adapters], [a.lora_b.double() for a in adapters],
        [a.scaling for a in adapters], ids)
    assert_rel_close(y, ref, dtype)


@pytest.mark.parametrize("dtype", kernel_dtypes())
def test_weighted_slots_and_missing_layer(triton_backend, fused, dtype):
    m, in_features, out_features = 19, 65, 47
    bank, adapters = random_bank([5, 0, 16, 2], in_features, out_features, dtype)
    slot_ids = torch.randint(-1, 4, (m, 3), device=DEVICE)
    slot_weights = torch.rand(m, 3, device=DEVICE)
    x = torch.randn(m, in_features, dtype=dtype, device=DEVICE)
    y = torch.zeros(m, out_features, dtype=dtype, device=DEVICE)
    multi_lora_add_(y, x, bank, MultiLoraMeta.build(slot_ids, slot_weights))
    assert_rel_close(y, reference_delta(x, adapters, slot_ids, slot_weights), dtype)


def test_rows_without_adapter_are_untouched(triton_backend, fused):
    """Tokens with id -1 are in no tile: even a NaN-poisoned row stays exactly as it was."""
    bank, _ = random_bank([4, 9], 33, 17, torch.float32)
    ids = torch.tensor([-1, 0, -1, 1, 1, -1, 0], device=DEVICE)
    y = torch.randn(7, 17, device=DEVICE)
    y[ids < 0] = poisoned((3, 17), torch.float32)
    before = y.clone()
    multi_lora_add_(y, torch.randn(7, 33, device=DEVICE), bank, MultiLoraMeta.build(ids))
    assert torch.isnan(y[ids < 0]).all()
    assert torch.isfinite(y[ids >= 0]).all() and not torch.equal(y[ids >= 0], before[ids >= 0])


def test_metadata_groups_tokens_without_reordering():
    ids = torch.tensor([2, -1, 0, 2, 0, 2, -1])
    meta = MultiLoraMeta.build(ids)
    assert meta.token_order[0].tolist()[:5] == [2, 4, 0, 3, 5]
    assert meta.tiles.tolist() == [[0, 0, 2], [2, 2, 3]]
    decode = MultiLoraMeta.build(ids, decode=True)
    assert decode.tiles[:, 2].tolist() == [1] * 5 and decode.block_m == 1


def test_prefill_tiles_of_64_tokens_on_sm90(triton_backend, fused):
    """sm_90 tiles prefill tokens 64 at a time (wgmma's M): segments longer and shorter than a tile, several
    tiles of one adapter, under the interpreter, against the float64 reference; other GPUs and the CPU tile 16."""
    from fastpeft.ops.multi_lora import prefill_block_m

    assert prefill_block_m((9, 0)) == 64 and prefill_block_m((8, 0)) == prefill_block_m(None) == 16
    assert MultiLoraMeta.build(torch.tensor([0, 1])).block_m == 16  # a CPU tensor: no GPU architecture
    m, in_features, out_features = 150, 33, 17
    bank, adapters = random_bank([5, 16, 3], in_features, out_features, torch.float32)
    ids = torch.cat([torch.zeros(130, dtype=torch.long), torch.full((12,), 2), torch.full((8,), -1)])
    ids = ids[torch.randperm(m)].to(DEVICE)
    meta = MultiLoraMeta.build(ids, block_m=64)
    assert meta.block_m == 64 and sorted(meta.tiles[:, 2].tolist()) == [2, 12, 64, 64]
    x = torch.randn(m, in_features, device=DEVICE)
    y = torch.zeros(m, out_features, device=DEVICE)
    multi_lora_add_(y, x, bank, meta)
    assert_rel_close(y, reference_delta(x, adapters, ids[:, None], torch.ones(m, 1, device=DEVICE)), torch.float32)
    with pytest.raises(ValueError, match="block_m must be 1 \\(decode\\) or 16/32/64"):
        MultiLoraMeta.build(ids, block_m=48)


def test_out_of_range_ids_raise_before_launch(triton_backend):
    bank, _ = random_bank([4, 9], 33, 17, torch.float32)
    x, y = torch.randn(3, 33), torch.zeros(3, 17)
    with pytest.raises(ValueError, match="adapter id 2 out of range"):
        multi_lora_add_(y, x, bank, MultiLoraMeta.build(torch.tensor([0, 2, -1])))
    with pytest.raises(ValueError, match="must be >= -1"):
        MultiLoraMeta.build(torch.tensor([0, -2, -1]))
    from fastpeft.kernels.multi_lora import multi_lora_add_ as launch

    meta = MultiLoraMeta.build(torch.tensor([0, 1, -1]))
    with pytest.raises(ValueError, match="adapter id 1 out of range: the bank holds 1"):
        launch(y, x, bank.lora_a[:1], bank.lora_b[:1], bank.ranks[:1], bank.scalings[:1], meta.slot_weights,
               meta.token_order, meta.tiles, list(meta.slot_tiles), meta.block_m, meta.max_adapter_id)
    with pytest.raises(TypeError, match="dtype torch.float16 != x dtype"):
        launch(y.half(), x, bank.lora_a, bank.lora_b, bank.ranks, bank.scalings, meta.slot_weights,
               meta.token_order, meta.tiles, list(meta.slot_tiles), meta.block_m, meta.max_adapter_id)
    with pytest.raises(TypeError, match=r"the bank \(lora_a torch.float16, lora_b torch.float16\) must be in x's "
                                        "dtype torch.bfloat16 or both float32"):
        launch(y.bfloat16(), x.bfloat16(), bank.lora_a.half(), bank.lora_b.half(), bank.ranks, bank.scalings,
               meta.slot_weights, meta.token_order, meta.tiles, list(meta.slot_tiles), meta.block_m,
               meta.max_adapter_id)


@pytest.mark.parametrize("dtype", kernel_dtypes())
def test_rank_padding_is_never_read(triton_backend, fused, dtype):
    """Ranks 1 and 256 in one bank; the padding is poisoned with NaN, so reading it would show. Rank 16 is
    whole rank blocks only (read without a rank mask), 20 whole blocks and a partial one, 1 a partial one."""
    m, in_features, out_features = 7, 33, 17
    bank, adapters = random_bank([1, 256, 20, 16], in_features, out_features, dtype)
    for k, a in enumerate(adapters):
        bank.lora_a[k, a.rank:] = float("nan")
        bank.lora_b[k, :, a.rank:] = float("nan")
    ids = torch.tensor([1, 0, 2, -1, 3, 2, 0], device=DEVICE)
    x = torch.randn(m, in_features, dtype=dtype, device=DEVICE)
    for decode in (False, True):
        y = torch.zeros(m, out_features, dtype=dtype, device=DEVICE)
        multi_lora_add_(y, x, bank, MultiLoraMeta.build(ids, decode=decode))
        assert_rel_close(y, reference_delta(x, adapters, ids[:, None], None), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("decode", [False, True])
def test_fp32_bank_with_low_precision_activations(triton_backend, fused, dtype, decode):
    """PEFT's fp32 adapters on a bf16 / fp16 model: x and y in the model's dtype, the bank in fp32;
    h stays fp32 and y is rounded once. A change of B below half a step of ``dtype`` (B exactly representable
    in it, scaled by 1 + eps/8) moves the output as in the float64 reference; a bank rounded to x's dtype
    would give the same output before and after."""
    m, in_features, out_features = 13, 33, 47
    _, adapters = random_bank([3, 17, 1, 8], in_features, out_features, torch.float32)
    ids = torch.randint(-1, 4, (m,), device=DEVICE)
    ids[:4] = torch.arange(4)
    x = non_contiguous(torch.randn(m, in_features, dtype=dtype, device=DEVICE))
    meta = MultiLoraMeta.build(ids, decode=decode)
    outputs, references = [], []
    for step in (0.0, torch.finfo(dtype).eps / 8):  # below half a step of B: rounding B undoes it
        for a in adapters:
            a.lora_b = a.lora_b.to(dtype).float() * (1 + step)
        bank = LoraBank.pack(adapters, in_features, out_features, torch.float32, DEVICE)
        y = non_contiguous(torch.zeros(m, out_features, dtype=dtype, device=DEVICE))
        multi_lora_add_(y, x, bank, meta)
        reference = reference_delta(x, adapters, ids[:, None], None)
        assert_rel_close(y, reference, dtype)
        outputs.append(y)
        references.append(reference.to(dtype))
    changed = float((outputs[1] != outputs[0]).double().mean())
    expected = float((references[1] != references[0]).double().mean())
    assert expected > 0.01 and 0.5 * expected <= changed <= 2 * expected, (changed, expected)
