"""fastpeft.ops.multi_lora_train: the multi-LoRA training term against a float64 loop over adapters (autograd on
plain torch ops): output, dx and every factor's gradient, mixed ranks, tokens in any order, rows of no adapter, an
adapter without tokens (None gradient), per-adapter dropout from per-adapter generators; bad input."""

import pytest
import torch

from fastpeft.ops.multi_lora import MultiLoraMeta
from fastpeft.ops.multi_lora_train import AdapterDropout, multi_lora_train_term


def _case(seed=0, m=37, in_f=24, out_f=19, ranks=(3, 8, 1), dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    lora_as = [torch.randn(r, in_f, generator=g, dtype=dtype).requires_grad_() for r in ranks]
    lora_bs = [torch.randn(out_f, r, generator=g, dtype=dtype).requires_grad_() for r in ranks]
    ids = torch.randint(-1, len(ranks) - 1, (m,), generator=g)  # the last adapter has no token
    x = torch.randn(m, in_f, generator=g, dtype=dtype).requires_grad_()
    return x, lora_as, lora_bs, ids


def _loop(x, lora_as, lora_bs, scalings, ids, rates, seeds):
    """The term adapter by adapter over its tokens (in batch order), each mask drawn as nn.Dropout draws it."""
    out = torch.zeros(x.shape[0], lora_bs[0].shape[0], dtype=x.dtype)
    for k, (a, b) in enumerate(zip(lora_as, lora_bs)):
        tokens = (ids == k).nonzero().squeeze(1)
        if tokens.numel() == 0:
            continue
        x_k = x[tokens]
        if rates[k] > 0:
            mask = torch.empty(x_k.shape, dtype=x.dtype).bernoulli_(1 - rates[k],
                                                                  generator=torch.Generator().manual_seed(seeds[k]))
            x_k = x_k * mask / (1 - rates[k])
        out = out.index_add(0, tokens, (x_k @ a.t()) @ b.t() * scalings[k])
    return out


@pytest.mark.parametrize("rates", [(0.0, 0.0, 0.0), (0.3, 0.0, 0.2)], ids=["no-dropout", "dropout"])
def test_matches_loop_over_adapters(rates):
    x, lora_as, lora_bs, ids = _case()
    scalings, seeds = [0.5, 2.0, 1.5], [7, 8, 9]
    dropouts = [AdapterDropout(p, torch.Generator().manual_seed(s)) for p, s in zip(rates, seeds)]
    out = multi_lora_train_term(x, lora_as, lora_bs, scalings, MultiLoraMeta.build(ids), dropouts)
    ref = _loop(x, lora_as, lora_bs, scalings, ids, rates, seeds)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(out)
    inputs = [x, *lora_as, *lora_bs]
    grads = torch.autograd.grad(out, inputs, dy, allow_unused=True)
    ref_grads = torch.autograd.grad(ref, inputs, dy, allow_unused=True)
    for got, want in zip(grads, ref_grads):
        if want is None:  # the adapter without tokens: no gradient at all, not zeros
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert grads[3] is None and grads[6] is None


def test_backward_leaves_the_generators_alone():
    x, lora_as, lora_bs, ids = _case()
    generator = torch.Generator().manual_seed(3)
    out = multi_lora_train_term(x, lora_as, lora_bs, [1.0] * 3, MultiLoraMeta.build(ids),
                                [AdapterDropout(0.5, generator)] * 3)
    state = generator.get_state()
    out.sum().backward()
    assert torch.equal(generator.get_state(), state)


def test_bad_input():
    x, lora_as, lora_bs, ids = _case()
    meta = MultiLoraMeta.build(ids)
    with pytest.raises(ValueError, match="one lora_a, lora_b and scaling"):
        multi_lora_train_term(x, lora_as, lora_bs[:2], [1.0] * 3, meta)
    with pytest.raises(ValueError, match="must be"):
        multi_lora_train_term(x, lora_as, [b.t() for b in lora_bs], [1.0] * 3, meta)
    with pytest.raises(TypeError, match="one dtype"):
        multi_lora_train_term(x, [lora_as[0].float(), *lora_as[1:]], lora_bs, [1.0] * 3, meta)
    with pytest.raises(ValueError, match="metadata is for"):
        multi_lora_train_term(x[:-1], lora_as, lora_bs, [1.0] * 3, meta)
    with pytest.raises(ValueError, match="out of range"):
        multi_lora_train_term(x, lora_as[:1], lora_bs[:1], [1.0], meta)
    with pytest.raises(ValueError, match="0 <= p < 1"):
        multi_lora_train_term(x, lora_as, lora_bs, [1.0] * 3, meta, [AdapterDropout(1.0)] * 3)


@pytest.mark.parametrize("rates", [(0.0, 0.0, 0.0), (0.3, 0.0, 0.2)], ids=["no-dropout", "dropout"])
def test_triton_kernels_match_the_loop(triton_backend, rates):
    """On the Triton kernels (the interpreter on CPU): fp32 within 1e-5 of the float64 loop."""
    x, lora_as, lora_bs, ids = _case(m=45, in_f=40, out_f=33, ranks=(3, 16, 1))
    scalings, seeds = [0.5, 2.0, 1.5], [7, 8, 9]
    dropouts = [AdapterDropout(p, torch.Generator().manual_seed(s)) for p, s in zip(rates, seeds)]
    inputs32 = [t.detach().float().requires_grad_() for t in (x, *lora_as, *lora_bs)]
    out = multi_lora_train_term(inputs32[0], inputs32[1:4], inputs32[4:], scalings, MultiLoraMeta.build(ids), dropouts)
    ref = _loop(x, lora_as, lora_bs, scalings, ids, rates, seeds)
    dy = torch.randn_like(ref)
    grads = torch.autograd.grad(out, inputs32, dy.float(), allow_unused=True)
    ref_grads = torch.autograd.grad(ref, [x, *lora_as, *lora_bs], dy, allow_unused=True)
    assert (out.double() - ref).norm() <= 1e-5 * ref.norm()
    for got, want in zip(grads, ref_grads):
        assert (got is None) == (want is None)
        if want is not None:
            assert (got.double() - want).norm() <= 1e-5 * want.norm()
