"""The multi-adapter backward's Triton kernels (interpreter on CPU): shrink, segment gradients and dx through the
transposed bank, against fastpeft.reference in float64."""

import pytest
import torch

from fastpeft.bank import LoraBank
from fastpeft.kernels import multi_lora_grad as kernels
from fastpeft.kernels.plan import observing
from fastpeft.ops import MultiLoraMeta, multi_lora_add_, multi_lora_segment_grad, multi_lora_shrink

from conftest import DEVICE, ODD_SHAPES, assert_rel_close, kernel_dtypes, non_contiguous, poisoned
from test_fallback import _fail_launches, fallback  # noqa: F401  (fallback: a fixture)
from test_kernels_multi_lora import random_bank
from test_ops_multi_lora_grad import RANKS, assert_bank_grads, loop_grads


def ids_for(pattern: str, m: int, n: int) -> torch.Tensor:
    """Adapter ids: scattered with -1 rows and an empty segment (adapter 3), sorted, or one adapter for all."""
    if pattern == "one_adapter":
        return torch.full((m,), 5, device=DEVICE)  # rank 64: every rank block
    ids = torch.randint(-1, n, (m,), device=DEVICE)
    ids[ids == 3] = 1
    ids[: min(m, 2)] = torch.tensor([5, 0][: min(m, 2)])
    return ids.sort().values if pattern == "sorted" else ids


def kernel_backward(x, dy, bank, meta, out_a=None, out_b=None):
    """``(h, g, dA, dB, dx)`` on the Triton kernels; ``out_a`` / ``out_b``: the segment gradients' outputs."""
    h = multi_lora_shrink(x, bank, meta)
    g = multi_lora_shrink(dy, bank.transposed(), meta)
    launch = kernels.multi_lora_segment_grad
    d_lora_b = launch(dy, h, bank.ranks, bank.scalings, meta.slot_weights, meta.token_order, meta.segments, "lora_b",
                      out=out_b)
    d_lora_a = launch(g, x, bank.ranks, bank.scalings, meta.slot_weights, meta.token_order, meta.segments, "lora_a",
                      out=out_a)
    dx = multi_lora_add_(torch.zeros_like(x), dy, bank.transposed(), meta)
    return h, g, d_lora_a, d_lora_b, dx


def float64_shrinks(x, dy, adapters, ids, max_rank):
    h = torch.zeros(x.shape[0], max_rank, dtype=torch.float64)
    g = torch.zeros(x.shape[0], max_rank, dtype=torch.float64)
    for t, k in enumerate(ids.tolist()):
        if k >= 0 and adapters[k] is not None:
            a = adapters[k]
            h[t, :a.rank] = x[t].double() @ a.lora_a.double().t()
            g[t, :a.rank] = dy[t].double() @ a.lora_b.double()
    return h, g


@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize("m,in_features,out_features", ODD_SHAPES + [(150, 65, 47)])
@pytest.mark.parametrize("pattern", ["scattered", "sorted", "one_adapter"])
def test_backward_matches_float64(triton_backend, dtype, m, in_features, out_features, pattern):
    """Ranks 1..64 mixed (17: a partial rank block; 64: four; 0: an adapter absent from the layer), -1 rows, an
    adapter without tokens, tokens in any order, odd sizes, non-contiguous activations; the gradients' outputs
    NaN-poisoned (every element must be written)."""
    bank, adapters = random_bank(RANKS, in_features, out_features, dtype)
    ids = ids_for(pattern, m, len(RANKS))
    x = non_contiguous(torch.randn(m, in_features, dtype=dtype, device=DEVICE))
    dy = non_contiguous(torch.randn(m, out_features, dtype=dtype, device=DEVICE))
    meta = MultiLoraMeta.build(ids)
    out_a, out_b = poisoned(bank.lora_a.shape, dtype), poisoned(bank.lora_b.shape, dtype)
    h, g, d_lora_a, d_lora_b, dx = kernel_backward(x, dy, bank, meta, out_a, out_b)
    assert d_lora_a is out_a and d_lora_b is out_b
    ref_h, ref_g = float64_shrinks(x, dy, adapters, ids, bank.max_rank)
    assert_rel_close(h, ref_h, dtype)
    assert_rel_close(g, ref_g, dtype)
    ref_dx, ref_a, ref_b = loop_grads(x, dy, adapters, ids)
    assert_rel_close(dx, ref_dx, dtype)
    assert_bank_grads(d_lora_a, d_lora_b, adapters, ref_a, ref_b, dtype)


@pytest.mark.parametrize("dtype", kernel_dtypes())
def test_long_segments_split_over_tokens_deterministically(triton_backend, monkeypatch, dtype):
    """Few adapters over many tokens: the plan splits each segment's tokens, a second kernel sums the fp32 partials
    in split order; the result matches float64 and is bitwise the same at every run."""
    monkeypatch.setattr(kernels, "MIN_SPLIT_TOKENS", 32)
    m, in_features, out_features = 301, 40, 24
    bank, adapters = random_bank([7, 20], in_features, out_features, dtype)
    ids = torch.randint(-1, 2, (m,), device=DEVICE)
    x = torch.randn(m, in_features, dtype=dtype, device=DEVICE)
    dy = torch.randn(m, out_features, dtype=dtype, device=DEVICE)
    meta = MultiLoraMeta.build(ids)
    with observing() as plans:
        _, _, d_lora_a, d_lora_b, _ = kernel_backward(x, dy, bank, meta, poisoned(bank.lora_a.shape, dtype),
                                                      poisoned(bank.lora_b.shape, dtype))
    variants = [p.variant for p in plans if p.op == "multi_lora_segment_grad"]
    assert variants == ["segment-grad-split", "segment-grad-reduce"] * 2
    assert all(p.runtime["splits"] == m // 32 for p in plans if p.op == "multi_lora_segment_grad")
    _, ref_a, ref_b = loop_grads(x, dy, adapters, ids)
    assert_bank_grads(d_lora_a, d_lora_b, adapters, ref_a, ref_b, dtype)
    _, _, again_a, again_b, _ = kernel_backward(x, dy, bank, meta)
    assert torch.equal(again_a, d_lora_a) and torch.equal(again_b, d_lora_b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_bank_with_low_precision_activations(triton_backend, dtype):
    """PEFT's fp32 adapters on a bf16 / fp16 model: h, g and the factors' gradients in fp32 (the dot in IEEE fp32),
    as accurate as fp32 math on the rounded activations."""
    m, in_features, out_features = 45, 33, 19
    bank, adapters = random_bank([3, 17, 8], in_features, out_features, torch.float32)
    ids = torch.randint(-1, 3, (m,), device=DEVICE)
    x = torch.randn(m, in_features, dtype=dtype, device=DEVICE)
    dy = torch.randn(m, out_features, dtype=dtype, device=DEVICE)
    h, g, d_lora_a, d_lora_b, _ = kernel_backward(x, dy, bank, MultiLoraMeta.build(ids))
    assert h.dtype == g.dtype == d_lora_a.dtype == d_lora_b.dtype == torch.float32
    _, ref_a, ref_b = loop_grads(x, dy, adapters, ids)
    assert_bank_grads(d_lora_a, d_lora_b, adapters, ref_a, ref_b, torch.float32)


def test_slot_weights_and_rank_padding(triton_backend):
    """Per-token slot weights scale each token's share; NaN in the rank operand's columns beyond an adapter's rank
    (inside a rank block it uses) leaves the gradient there exactly zero and the rest exact."""
    m, in_features, out_features = 23, 33, 19
    bank, adapters = random_bank([5, 12], in_features, out_features, torch.float32)
    ids = torch.randint(-1, 2, (m,), device=DEVICE)
    weights = torch.rand(m, device=DEVICE) + 0.25
    meta = MultiLoraMeta.build(ids, weights)
    x = torch.randn(m, in_features, device=DEVICE)
    dy = torch.randn(m, out_features, device=DEVICE)
    h = multi_lora_shrink(x, bank, meta)
    g = multi_lora_shrink(dy, bank.transposed(), meta)
    for k, a in enumerate(adapters):
        h[ids == k, a.rank:] = float("nan")
        g[ids == k, a.rank:] = float("nan")
    d_lora_b = multi_lora_segment_grad(dy, h, bank, meta, "lora_b")
    d_lora_a = multi_lora_segment_grad(g, x, bank, meta, "lora_a")
    _, ref_a, ref_b = loop_grads(x, dy, adapters, ids, meta.slot_weights[:, 0])
    assert_bank_grads(d_lora_a, d_lora_b, adapters, ref_a, ref_b, torch.float32)


@pytest.mark.parametrize("block_m", [1, 64])
def test_shrink_on_decode_and_wide_tiles(triton_backend, block_m):
    m, in_features, out_features = 70, 33, 19
    bank, adapters = random_bank([3, 17, 8], in_features, out_features, torch.float32)
    ids = torch.randint(-1, 3, (m,), device=DEVICE)
    x, dy = torch.randn(m, in_features, device=DEVICE), torch.randn(m, out_features, device=DEVICE)
    meta = MultiLoraMeta.build(ids, block_m=block_m)
    ref_h, ref_g = float64_shrinks(x, dy, adapters, ids, bank.max_rank)
    assert_rel_close(multi_lora_shrink(x, bank, meta), ref_h, torch.float32)
    assert_rel_close(multi_lora_shrink(dy, bank.transposed(), meta), ref_g, torch.float32)


def test_no_tokens_with_an_adapter_gives_zeros(triton_backend):
    bank, _ = random_bank([3, 5], 11, 7, torch.float32)
    meta = MultiLoraMeta.build(torch.full((4,), -1, device=DEVICE))
    x, dy = torch.randn(4, 11, device=DEVICE), torch.randn(4, 7, device=DEVICE)
    _, _, d_lora_a, d_lora_b, dx = kernel_backward(x, dy, bank, meta, poisoned(bank.lora_a.shape, torch.float32),
                                                   poisoned(bank.lora_b.shape, torch.float32))
    assert not d_lora_a.any() and not d_lora_b.any() and not dx.any()


def test_plans_by_rank_grid_size_and_architecture():
    assert [kernels.rank_block(r) for r in (1, 16, 17, 32, 33, 64, 256)] == [16, 16, 32, 32, 64, 64, 64]
    # many adapters fill the GPU: one launch; the grid covers every adapter of the bank
    (plan,) = kernels.plan_multi_lora_segment_grad(64, 64, 4096, 64, 8192, False, (9, 0))
    assert plan.grid == (64, 64, 1) and plan.constexprs["BLOCK_T"] == 64 and not plan.constexprs["PARTIAL"]
    # an fp32 operand (PEFT's fp32 adapters): the IEEE dot, 32 tokens a step (shared memory for 25 % occupancy)
    (plan,) = kernels.plan_multi_lora_segment_grad(64, 64, 4096, 64, 8192, True, (9, 0))
    assert plan.constexprs["FP32_DOT"] and plan.constexprs["BLOCK_T"] == 32
    # one adapter over 8192 tokens, a 4096-wide feature axis at rank 16: 64 programs, 264 wanted on sm_90: 5 splits
    split, reduce = kernels.plan_multi_lora_segment_grad(1, 1, 4096, 16, 8192, False, (9, 0))
    assert split.runtime["splits"] == 5 and split.grid == (5, 64, 1) and reduce.grid == (1, 64, 1)
    assert kernels.plan_multi_lora_segment_grad(1, 1, 4096, 16, 1024, False, (8, 0))[0].runtime["splits"] == 2
    assert kernels.plan_multi_lora_segment_grad(1, 1, 4096, 16, 600, False, None)[0].runtime["splits"] == 1


def test_bad_launcher_inputs_raise_before_launch(triton_backend):
    bank, _ = random_bank([3, 5], 11, 7, torch.float32)
    meta = MultiLoraMeta.build(torch.tensor([0, 1, -1, 1]))
    dy, h = torch.randn(4, 7), torch.zeros(4, 5)
    args = (bank.ranks, bank.scalings, meta.slot_weights, meta.token_order, meta.segments, "lora_b")
    with pytest.raises(TypeError, match="must share a dtype or one be float32"):
        kernels.multi_lora_segment_grad(dy.half(), h.bfloat16(), *args)
    with pytest.raises(ValueError, match="out must be torch.float32"):
        kernels.multi_lora_segment_grad(dy, h, *args, out=torch.zeros(2, 5, 7))
    with pytest.raises(TypeError, match="ranks must be int32"):
        kernels.multi_lora_segment_grad(dy, h, bank.ranks.long(), *args[1:])
    with pytest.raises(TypeError, match="lora_a dtype torch.float16 must be x's dtype torch.bfloat16 or float32"):
        kernels.multi_lora_shrink(torch.randn(4, 11).bfloat16(), bank.lora_a.half(), bank.ranks, meta.token_order,
                                  meta.tiles, meta.block_m, meta.max_adapter_id)
    flipped = LoraBank(bank.lora_a, bank.lora_b, bank.ranks, bank.scalings).transposed()
    with pytest.raises(ValueError, match=r"need x \(M, in\), lora_a \(N, R, in\)"):
        kernels.multi_lora_shrink(torch.randn(4, 11), flipped.lora_a, bank.ranks, meta.token_order, meta.tiles,
                                  meta.block_m, meta.max_adapter_id)


def test_a_failing_launch_falls_back_to_the_reference(fallback, monkeypatch):
    """A kernel that fails to compile or launch on the user's GPU: each primitive warns once and runs its reference."""
    from fastpeft.kernels import multi_lora

    launches = _fail_launches(monkeypatch, multi_lora._multi_lora_shrink_kernel,
                              kernels._multi_lora_segment_grad_kernel)
    bank, adapters = random_bank([3, 6], 11, 7, torch.float32)
    ids = torch.tensor([0, 1, -1, 1, 0])
    meta = MultiLoraMeta.build(ids)
    x, dy = torch.randn(5, 11), torch.randn(5, 7)
    with pytest.warns(RuntimeWarning) as caught:
        h = multi_lora_shrink(x, bank, meta)
        d_lora_b = multi_lora_segment_grad(dy, h, bank, meta, "lora_b")
        d_lora_a = multi_lora_segment_grad(multi_lora_shrink(dy, bank.transposed(), meta), x, bank, meta, "lora_a")
    warned = {str(w.message).split("PyTorch path of ")[1].split(" instead")[0] for w in caught}
    assert warned == {"multi_lora_shrink", "multi_lora_segment_grad"} and len(launches) == 4
    _, ref_a, ref_b = loop_grads(x, dy, adapters, ids)
    assert_bank_grads(d_lora_a, d_lora_b, adapters, ref_a, ref_b, torch.float32)
