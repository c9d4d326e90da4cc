"""fastpeft.nn.DiffPruneLinear against the float64 reference: the sampled gate for fixed noise (unstructured and
structured), the deterministic gate in eval mode (also under no_grad / inference_mode), the expected-L0 penalty,
outputs and gradients over dense and NF4 bases (gradients reach w and the log-odds only), projection to a fixed
sparse diff, and bad input."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastpeft import reference
from fastpeft.nf4 import NF4Weight
from fastpeft.nn import DiffPruneLinear
from fastpeft.sparse_delta import SparseDelta

from conftest import assert_rel_close, bnb_linear4bit

GATE = dict(beta=1.0, gamma=-1.5, zeta=1.5)


def _layer(nf4=False, structured=False, in_features=64, out_features=24, bias=True, **gate):
    base = bnb_linear4bit(in_features, out_features, bias) if nf4 else nn.Linear(in_features, out_features, bias=bias)
    layer = DiffPruneLinear(base, structured, **gate)
    with torch.no_grad():  # a trained-looking state: diffs of both signs, gates open, closed and in between
        layer.diff_weight.normal_()
        layer.diff_log_alpha.uniform_(-3.0, 3.0)
        if layer.diff_group_log_alpha is not None:
            layer.diff_group_log_alpha.uniform_(-1.0, 2.0)
    return layer


def _dense_base(layer) -> torch.Tensor:
    weight = layer.base_weight()
    return weight.dequantize(torch.float64) if isinstance(weight, NF4Weight) else weight.double()


def _noise(shape):
    return torch.rand(shape, dtype=torch.float64).clamp(1e-6, 1 - 1e-6)


def _reference_gate(layer, u=None, group_u=None, beta=1.0, gamma=-1.5, zeta=1.5):
    """The layer's gate in float64 from the reference functions, on float64 leaves of its log-odds."""
    log_alpha = layer.diff_log_alpha.detach().double().requires_grad_()
    sample = (lambda a, noise: reference.hard_concrete_sample(a, noise, beta, gamma, zeta)) if u is not None else (
        lambda a, noise: reference.hard_concrete_eval(a, gamma, zeta))
    gate = sample(log_alpha, u)
    leaves = [log_alpha]
    if layer.diff_group_log_alpha is not None:
        group = layer.diff_group_log_alpha.detach().double().requires_grad_()
        group_gate = sample(group, group_u)
        if layer.structured is not True:
            group_gate = group_gate.repeat_interleave(layer.structured, dim=1)
        gate = gate * group_gate
        leaves.append(group)
    return gate, leaves


@pytest.mark.parametrize("structured", [False, True, 16], ids=["entries", "matrix", "groups16"])
@pytest.mark.parametrize("gate_constants", [GATE, dict(beta=2 / 3, gamma=-0.1, zeta=1.1)], ids=["paper", "louizos"])
def test_sampled_gate_matches_reference(structured, gate_constants):
    layer = _layer(structured=structured, **gate_constants).train()
    u = _noise(layer.diff_log_alpha.shape)
    group_u = None if layer.diff_group_log_alpha is None else _noise(layer.diff_group_log_alpha.shape)
    ref, _ = _reference_gate(layer, u, group_u, **gate_constants)
    got = layer.gate(u.float(), None if group_u is None else group_u.float())
    assert got.dtype == torch.float32 and got.shape == (24, 64)
    assert_rel_close(got, ref, torch.float32)
    assert ((got == 0) | (got == 1)).any() and ((got > 0) & (got < 1)).any()  # both regimes exercised


def test_sampled_gate_is_fresh_noise_each_call():
    layer = _layer().train()
    torch.manual_seed(3)
    first = layer.gate()
    torch.manual_seed(3)
    assert torch.equal(first, layer.gate())  # drawn from torch's RNG
    assert not torch.equal(first, layer.gate())


@pytest.mark.parametrize("structured", [False, True, 8])
def test_eval_gate_is_deterministic_and_matches_reference(structured):
    layer = _layer(structured=structured).eval()
    ref, _ = _reference_gate(layer)
    assert_rel_close(layer.gate(), ref, torch.float32)
    x = torch.randn(3, 5, 64)
    y_ref = F.linear(x.double(), _dense_base(layer) + ref.detach() * layer.diff_weight.double(),
                     layer.bias.double())
    y = layer(x)
    assert_rel_close(y, y_ref, torch.float32)
    assert torch.equal(layer(x), y)
    with torch.no_grad():
        assert torch.equal(layer(x), y)
    with torch.inference_mode():
        assert torch.equal(layer(x), y)
    with pytest.raises(ValueError, match="deterministic"):
        layer.gate(torch.rand(24, 64))


@pytest.mark.parametrize("structured", [False, True, 16])
def test_l0_penalty_matches_reference(structured):
    layer = _layer(structured=structured)
    log_alpha = layer.diff_log_alpha.detach().double().requires_grad_()
    group = None
    if layer.diff_group_log_alpha is not None:
        group = layer.diff_group_log_alpha.detach().double().requires_grad_()
    per_entry = None if group is None else (group if structured is True else group.repeat_interleave(structured, 1))
    ref = reference.expected_l0(log_alpha, 1.0, -1.5, 1.5, per_entry)
    # written out: P(entry nonzero) = σ(α − β log(−γ/ζ)) (times its group's)
    shift = torch.log(torch.tensor(1.5 / 1.5, dtype=torch.float64))
    by_hand = torch.sigmoid(log_alpha - shift)
    if per_entry is not None:
        by_hand = by_hand * torch.sigmoid(per_entry - shift)
    torch.testing.assert_close(ref, by_hand.sum())
    penalty = layer.l0_penalty()
    assert penalty.dim() == 0
    assert_rel_close(penalty, ref, torch.float32)
    penalty.backward()
    ref.backward()
    assert_rel_close(layer.diff_log_alpha.grad, log_alpha.grad, torch.float32)
    if group is not None:
        assert_rel_close(layer.diff_group_log_alpha.grad, group.grad, torch.float32)


def test_fresh_layer_is_the_base_and_penalty_starts_near_count():
    base = nn.Linear(32, 8)
    layer = DiffPruneLinear(base)
    x = torch.randn(4, 32)
    assert torch.equal(layer.diff_weight, torch.zeros(8, 32))
    torch.testing.assert_close(layer(x), base(x))
    # log_alpha_init = 5: every gate open with probability σ(5)
    torch.testing.assert_close(layer.l0_penalty(), torch.sigmoid(torch.tensor(5.0)) * 256)


@pytest.mark.parametrize("structured", [False, 16])
@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_training_forward_and_gradients_match_reference(nf4, structured):
    layer = _layer(nf4=nf4, structured=structured).train()
    u = _noise(layer.diff_log_alpha.shape)
    group_u = None if layer.diff_group_log_alpha is None else _noise(layer.diff_group_log_alpha.shape)
    x = torch.randn(2, 7, 64, requires_grad=True)
    dy = torch.randn(2, 7, 24)

    gate_ref, leaves = _reference_gate(layer, u, group_u)
    diff64 = layer.diff_weight.detach().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    y_ref = F.linear(x64, _dense_base(layer) + gate_ref * diff64, layer.bias.double())
    grads_ref = torch.autograd.grad(y_ref, [x64, diff64, *leaves], dy.double())

    # the layer's forward with this very noise: the gate it computes from (u, group_u)
    gate = layer.gate(u.float(), None if group_u is None else group_u.float())
    weight = layer.base_weight()
    delta = gate * layer.diff_weight
    if isinstance(weight, NF4Weight):
        y = F.linear(x, weight.dequantize(torch.float32), layer.bias) + F.linear(x, delta)
    else:
        y = F.linear(x, weight + delta, layer.bias)
    params = [layer.diff_weight, layer.diff_log_alpha] + (
        [] if layer.diff_group_log_alpha is None else [layer.diff_group_log_alpha])
    grads = torch.autograd.grad(y, [x, *params], dy)
    assert_rel_close(y, y_ref, torch.float32)
    for got, ref in zip(grads, grads_ref):
        assert_rel_close(got, ref, torch.float32, tol=1e-4)

    # the module's own forward runs the same math with fresh noise: outputs and gradients reach the diff only
    torch.manual_seed(5)
    out = layer(x)
    torch.manual_seed(5)
    noise = torch.rand(layer.diff_log_alpha.shape).clamp_(1e-6, 1 - 1e-6)
    group_noise = None if group_u is None else torch.rand(group_u.shape).clamp_(1e-6, 1 - 1e-6)
    expected_gate = layer.gate(noise, group_noise)
    delta = expected_gate * layer.diff_weight
    expected = (F.linear(x, weight.dequantize(torch.float32), layer.bias) + F.linear(x, delta)
                if isinstance(weight, NF4Weight) else F.linear(x, weight + delta, layer.bias))
    assert_rel_close(out, expected, torch.float32)
    (out * dy).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    frozen = [p for p in layer.base_layer.parameters()]
    assert frozen and all(not p.requires_grad and p.grad is None for p in frozen)


def test_bf16_base_adds_the_diff_in_fp32_once():
    base = nn.Linear(64, 16).to(torch.bfloat16)
    layer = DiffPruneLinear(base).eval()
    with torch.no_grad():
        layer.diff_weight.normal_(std=1e-3)  # below bf16's resolution of W: rounding δ first would lose it
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    merged = (base.weight.float() + layer.delta_weight()).to(torch.bfloat16)
    assert torch.equal(y, F.linear(x, merged, base.bias))


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_project_keeps_the_masked_diff(nf4):
    layer = _layer(nf4=nf4).eval()
    delta = layer.delta_weight()
    mask = reference.magnitude_projection(delta, 0.1)
    x = torch.randn(6, 64)
    layer.project(mask)
    assert layer.projected and not hasattr(layer, "diff_weight") and not hasattr(layer, "diff_log_alpha")
    assert [name for name, _ in layer.named_parameters(recurse=False)] == ["delta_values"]
    assert layer.delta_values.requires_grad and layer.delta_values.numel() == int(mask.sum())
    torch.testing.assert_close(layer.delta_weight(), torch.where(mask, delta, 0))
    y_ref = F.linear(x.double(), _dense_base(layer) + torch.where(mask, delta, 0).double(), layer.bias.double())
    assert_rel_close(layer(x), y_ref, torch.float32)
    assert_rel_close(layer.train()(x), y_ref, torch.float32)  # no gate left to sample
    assert layer.l0_penalty().item() == 0.0
    with pytest.raises(ValueError, match="projected"):
        layer.gate()
    with pytest.raises(ValueError, match="projected"):
        layer.project(mask)


def test_projected_values_train_with_the_mask_fixed():
    layer = _layer()
    layer.project(reference.magnitude_projection(layer.delta_weight(), 0.2))
    row_ptr, col_idx = layer.delta_row_ptr.clone(), layer.delta_col_idx.clone()
    values = layer.delta_values.detach().clone()
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    x, target = torch.randn(8, 64), torch.randn(8, 24)
    for _ in range(3):
        F.mse_loss(layer(x), target).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.equal(layer.delta_row_ptr, row_ptr) and torch.equal(layer.delta_col_idx, col_idx)
    assert not torch.equal(layer.delta_values.detach(), values)
    assert all(p.grad is None for p in layer.base_layer.parameters())


def test_from_sparse_delta():
    base = nn.Linear(32, 8)
    dense = torch.zeros(8, 32)
    dense[1, 3], dense[5, 30] = 0.5, -2.0
    delta = SparseDelta.from_dense(dense)
    layer = DiffPruneLinear.from_sparse_delta(base, delta)
    x = torch.randn(3, 32)
    torch.testing.assert_close(layer(x), F.linear(x, base.weight + dense, base.bias))
    assert layer.projected and layer.delta_values.requires_grad
    with pytest.raises(ValueError, match=r"\(8, 33\)"):
        DiffPruneLinear.from_sparse_delta(base, SparseDelta.from_dense(torch.ones(8, 33)))
    with pytest.raises(TypeError, match="SparseDelta"):
        DiffPruneLinear.from_sparse_delta(base, dense)


def test_nf4_weight_base():
    dense = nn.Linear(64, 16)
    nf4 = NF4Weight.quantize(dense.weight.detach())
    layer = DiffPruneLinear(nf4, bias=dense.bias.detach()).eval()
    with torch.no_grad():
        layer.diff_weight.normal_()
    x = torch.randn(4, 64)
    y_ref = F.linear(x.double(), nf4.dequantize(torch.float64) + layer.delta_weight().double(),
                     dense.bias.double())
    assert_rel_close(layer(x), y_ref, torch.float32)


def test_bad_input():
    with pytest.raises(TypeError, match="base_layer"):
        DiffPruneLinear(nn.Conv1d(3, 3, 1))
    with pytest.raises(TypeError, match="only float"):
        int_base = nn.Linear(4, 4)
        int_base.weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)
        DiffPruneLinear(int_base)
    with pytest.raises(ValueError, match="bias="):
        DiffPruneLinear(nn.Linear(4, 4), bias=torch.zeros(4))
    for structured in (0, 5, -2, 2.0, "rows"):
        with pytest.raises(ValueError, match="structured"):
            DiffPruneLinear(nn.Linear(8, 4), structured)
    for constants in (dict(gamma=0.0), dict(gamma=0.1), dict(zeta=1.0), dict(beta=0.0), dict(beta=float("nan")),
                      dict(log_alpha_init=float("inf"))):
        with pytest.raises(ValueError):
            DiffPruneLinear(nn.Linear(8, 4), **constants)
    layer = DiffPruneLinear(nn.Linear(8, 4)).train()
    with pytest.raises(ValueError, match="8 features|needs 8"):
        layer(torch.randn(2, 7))
    with pytest.raises(TypeError, match="floating point"):
        layer(torch.ones(2, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"shape \(4, 8\)"):
        layer.gate(torch.rand(8, 4))
    with pytest.raises(ValueError, match="group_u"):
        layer.gate(torch.rand(4, 8), torch.rand(1, 1))
    with pytest.raises(ValueError, match="bool tensor"):
        layer.project(torch.ones(4, 8))
    with pytest.raises(ValueError, match="bool tensor"):
        layer.project(torch.ones(4, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="not projected"):
        layer.sparse_delta


def test_projected_layer_follows_its_buffers_in_every_mode():
    first, second = _layer(), _layer()
    first.project(reference.magnitude_projection(first.delta_weight(), 0.1))
    second.project(reference.magnitude_projection(second.delta_weight(), 0.1))
    assert not torch.equal(first.delta_col_idx, second.delta_col_idx)
    x = torch.randn(5, 64)
    with torch.inference_mode():  # the pattern first built in inference mode, then trained on
        first(x)
    (first(x) ** 2).sum().backward()
    assert first.delta_values.grad is not None
    # load_state_dict writes the pattern in place: the layer runs the new one
    with torch.no_grad():
        first.base_layer.weight.copy_(second.base_layer.weight)
        first.base_layer.bias.copy_(second.base_layer.bias)
    first.load_state_dict(second.state_dict())
    torch.testing.assert_close(first(x), second(x))
    with torch.no_grad():
        assert torch.equal(first(x), second(x))
