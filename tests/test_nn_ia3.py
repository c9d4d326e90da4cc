"""fastpeft.nn.IA3Linear against PEFT's own IA3 layers (ia3.Linear / ia3.Linear4bit, is_feedforward both
ways) on identical weights (fp32 CPU, outputs and gradients of x and the IA3 vector), plus merge/unmerge
against PEFT's, disable_adapter, and loading a PEFT IA3 adapter file."""

import copy

import pytest
import torch
from torch import nn

from fastpeft import load_adapter
from fastpeft.nf4 import NF4Weight
from fastpeft.nn import IA3Linear

from conftest import (DEVICE, Holder, assert_rel_close, bnb_linear4bit, layer_grads, make_tiny_llama, non_contiguous,
                      save_peft_adapter)

peft = pytest.importorskip("peft")


def _pair(nf4, with_bias, is_feedforward):
    """A PEFT IA3 layer (random vector) and an IA3Linear built independently with a copy of it."""
    base = bnb_linear4bit(128, 40, with_bias) if nf4 else nn.Linear(64, 40, bias=with_bias)
    ours = IA3Linear(copy.deepcopy(base), is_feedforward=is_feedforward, init_ia3_weights=False)
    config = peft.IA3Config(target_modules=["proj"], feedforward_modules=["proj"] if is_feedforward else [],
                            init_ia3_weights=False)
    theirs = peft.get_peft_model(Holder(base), config).base_model.model.proj
    assert theirs.is_feedforward == is_feedforward
    assert ours.peft_shape() == theirs.ia3_l["default"].shape == ours.peft_ia3_l().shape
    with torch.no_grad():
        ours.peft_ia3_l().copy_(theirs.ia3_l["default"])
    return theirs, ours


def _assert_same_outputs_and_grads(theirs, ours, x, dy):
    """Outputs, dx and d ia3_l of PEFT's layer and ours, fp32 rounding apart."""
    y_ref, *ref = layer_grads(theirs, x, dy, [theirs.ia3_l["default"]])
    y, *got = layer_grads(ours, x, dy, [ours.ia3_l])
    assert_rel_close(y, y_ref, torch.float32)
    for g, g_ref in zip(got, ref):
        assert_rel_close(g.reshape(g_ref.shape), g_ref, torch.float32)


@pytest.mark.parametrize("is_feedforward", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("nf4", [False, True])
def test_matches_peft(nf4, with_bias, is_feedforward):
    theirs, ours = _pair(nf4, with_bias, is_feedforward)
    x = non_contiguous(torch.randn(2, 5, ours.in_features, device=DEVICE))
    dy = torch.randn(2, 5, 40)
    _assert_same_outputs_and_grads(theirs, ours, x, dy)


@pytest.mark.parametrize("is_feedforward", [False, True])
def test_merge_matches_peft_and_unmerges(is_feedforward):
    theirs, ours = _pair(nf4=False, with_bias=True, is_feedforward=is_feedforward)
    x = torch.randn(6, 64)
    with torch.no_grad():
        y = ours(x)
        weight, bias = ours.base_layer.weight.clone(), ours.base_layer.bias.clone()
        ours.merge()
        theirs.merge()
        assert_rel_close(ours.base_layer.weight, theirs.base_layer.weight, torch.float32)
        assert_rel_close(ours.base_layer.bias, theirs.base_layer.bias, torch.float32)
        assert_rel_close(ours(x), y, torch.float32)
        with ours.disable_adapter():
            assert not ours.merged
            assert_rel_close(ours(x), ours.base_layer(x), torch.float32)
        assert ours.merged
        ours.unmerge()
        assert_rel_close(ours.base_layer.weight, weight, torch.float32)
        assert_rel_close(ours.base_layer.bias, bias, torch.float32)
        assert_rel_close(ours(x), y, torch.float32)


def test_nf4_weight_base_and_no_nf4_merge():
    dense = torch.randn(40, 128)
    layer = IA3Linear(NF4Weight.quantize(dense, 64, double_quant=True), bias=torch.randn(40))
    assert layer.ia3_l.shape == (40,) and torch.equal(layer.ia3_l, torch.ones(40)) and layer.peft_shape() == (40, 1)
    x = torch.randn(3, 128)
    with torch.no_grad():
        expected = x @ layer.base_weight().dequantize(torch.float32).t() + layer.bias
        assert_rel_close(layer(x), expected, torch.float32)
    with pytest.raises(ValueError, match="merges only into a dense base"):
        layer.merge()


def test_from_peft_adapter_file(tmp_path):
    config = peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    path = save_peft_adapter(tmp_path, config)
    theirs = peft.PeftModel.from_pretrained(make_tiny_llama(), path).eval()
    adapters = load_adapter(path).modules()
    base = make_tiny_llama()
    for name, feedforward in (("model.layers.0.self_attn.k_proj", False), ("model.layers.1.mlp.down_proj", True)):
        ours = IA3Linear.from_adapter(base.get_submodule(name), adapters[name])
        assert ours.is_feedforward == feedforward
        x = torch.randn(3, ours.in_features)
        with torch.no_grad():
            assert_rel_close(ours(x), theirs.base_model.model.get_submodule(name)(x), torch.float32)


@pytest.mark.parametrize("is_feedforward", [False, True])
def test_state_dict_takes_peft_shaped_and_flat_vectors(is_feedforward):
    """ia3_l is flat; a PEFT layer's vector (1, in) / (out, 1) loads into it, as does the layer's own state; any
    other shape is load_state_dict's size-mismatch error, not a silent reshape."""
    theirs, ours = _pair(nf4=False, with_bias=True, is_feedforward=is_feedforward)
    peft_vector = theirs.ia3_l["default"].detach()
    fresh = IA3Linear(copy.deepcopy(ours.base_layer), is_feedforward)
    fresh.load_state_dict({"base_layer.weight": ours.base_layer.weight, "base_layer.bias": ours.base_layer.bias,
                           "ia3_l": peft_vector})
    assert fresh.ia3_l.shape == (peft_vector.numel(),) and torch.equal(fresh.peft_ia3_l(), peft_vector)
    x = torch.randn(4, 64)
    with torch.no_grad():
        assert_rel_close(fresh(x), theirs(x), torch.float32)
    again = IA3Linear(copy.deepcopy(ours.base_layer), is_feedforward)
    again.load_state_dict(fresh.state_dict())
    assert torch.equal(again.ia3_l, fresh.ia3_l)
    with pytest.raises(RuntimeError, match="size mismatch for ia3_l"):
        again.load_state_dict({**fresh.state_dict(), "ia3_l": peft_vector.reshape(peft_vector.shape[::-1])})


def test_errors():
    with pytest.raises(TypeError, match="base_layer must be torch.nn.Linear"):
        IA3Linear(nn.Conv1d(3, 4, 1))
    with pytest.raises(ValueError, match="bias= is only for an NF4Weight base"):
        IA3Linear(nn.Linear(3, 4), bias=torch.ones(4))


@pytest.mark.parametrize("is_feedforward", [False, True])
@pytest.mark.parametrize("nf4", [False, True])
def test_reference_ia3_linear_is_peft(nf4, is_feedforward):
    """fastpeft.reference.ia3_linear, the oracle of the kernel tests, on PEFT's own tensors."""
    from fastpeft import reference

    theirs, ours = _pair(nf4, True, is_feedforward)
    x = torch.randn(4, ours.in_features)
    with torch.no_grad():
        ref = reference.ia3_linear(x, ours.base_weight(), ours.bias, theirs.ia3_l["default"].view(-1), is_feedforward)
        assert_rel_close(ref, theirs(x), torch.float32)


@pytest.mark.parametrize("is_feedforward", [False, True])
def test_matches_peft_on_triton_kernels(triton_backend, is_feedforward):
    """The NF4 layer end to end on the Triton kernels (interpreter on CPU)."""
    theirs, ours = _pair(True, True, is_feedforward)
    x, dy = torch.randn(19, 128), torch.randn(19, 40)
    _assert_same_outputs_and_grads(theirs, ours, x, dy)


@pytest.mark.parametrize("is_feedforward", [False, True])
def test_fp16_base_matches_peft(is_feedforward):
    """An fp16 base: PEFT keeps ia3_l in fp32 (autocast_adapter_dtype), and so does IA3Linear."""
    base = nn.Linear(64, 40).half()
    ours = IA3Linear(copy.deepcopy(base), is_feedforward, init_ia3_weights=False)
    config = peft.IA3Config(target_modules=["proj"], feedforward_modules=["proj"] if is_feedforward else [],
                            init_ia3_weights=False)
    theirs = peft.get_peft_model(Holder(base), config).base_model.model.proj
    assert ours.ia3_l.dtype == theirs.ia3_l["default"].dtype == torch.float32
    with torch.no_grad():
        ours.peft_ia3_l().copy_(theirs.ia3_l["default"])
    x, dy = torch.randn(5, 64, dtype=torch.float16), torch.randn(5, 40, dtype=torch.float16)
    y_ref, *ref = layer_grads(theirs, x, dy, [theirs.ia3_l["default"]])
    y, *got = layer_grads(ours, x, dy, [ours.ia3_l])
    assert y.dtype == torch.float16
    assert_rel_close(y, y_ref, torch.float16)
    for g, g_ref in zip(got, ref):
        assert g.dtype == g_ref.dtype
        assert_rel_close(g.reshape(g_ref.shape), g_ref, torch.float16)


# ---------------------------------------------------------------------------------------------- the layer's state
# IA3Linear reads its tensors at every call. Every change below comes after a first call; the next call must give
# what the op gives from scratch (the same values, dtype and gradients, or the same clear error).


def _from_scratch(layer, x):
    """ia3_linear on the layer's current state."""
    from fastpeft.ops.ia3 import ia3_linear

    if layer.disabled or layer.merged:
        return nn.functional.linear(x, layer.base_weight(), layer.bias)
    return ia3_linear(x, layer.base_weight(), layer.bias, layer.ia3_l.view(-1), layer.is_feedforward)


def _frozen(t):
    return nn.Parameter(t, requires_grad=False)


def _halved(t):
    """``t``'s first half along its longer dimension: the same storage, another shape."""
    return t[: t.shape[0] // 2] if t.shape[0] > 1 else t[:, : t.shape[1] // 2]


STATE_CHANGES = {
    "weight replaced": lambda layer: setattr(layer.base_layer, "weight", _frozen(torch.randn(16, 24))),
    "weight data in another dtype": lambda layer: setattr(layer.base_layer.weight, "data",
                                                       layer.base_layer.weight.data.double()),
    "weight updated in place": lambda layer: layer.base_layer.weight.data.mul_(-2),
    "bias added": lambda layer: setattr(layer.base_layer, "bias", _frozen(torch.randn(16))),
    "ia3_l replaced": lambda layer: setattr(layer, "ia3_l", nn.Parameter(torch.randn_like(layer.ia3_l))),
    "ia3_l data replaced": lambda layer: setattr(layer.ia3_l, "data", torch.randn_like(layer.ia3_l)),
    "ia3_l data viewing other storage": lambda layer: setattr(
        layer.ia3_l, "data", torch.randn(2 * layer.ia3_l.numel())[::2].view_as(layer.ia3_l)),
    "ia3_l updated in place": lambda layer: layer.ia3_l.data.mul_(3),
    "base layer replaced": lambda layer: setattr(layer, "base_layer", nn.Linear(24, 16).requires_grad_(False)),
    "merged": lambda layer: layer.merge(),
}
# changes after which the op raises, and so must the layer
BAD_STATE_CHANGES = {
    "weight data of another shape": (lambda layer: setattr(layer.base_layer.weight, "data", torch.randn(16, 12)),
                                     "x has 24 features; the weight \\(16, 12\\) needs 12"),
    "weight on another device": (lambda layer: setattr(layer.base_layer, "weight", _frozen(torch.randn(16, 24,
                                                                                                   device="meta"))),
                                 "x is on cpu, the weight on meta"),
    "bias of another shape": (lambda layer: setattr(layer.base_layer, "bias", _frozen(torch.randn(8))),
                              "bias must be \\(16,\\)"),
    "ia3_l data narrowed in place": (lambda layer: setattr(layer.ia3_l, "data", _halved(layer.ia3_l.data)),
                                     "ia3_scale must be"),
    "is_feedforward flipped": (lambda layer: setattr(layer, "is_feedforward", not layer.is_feedforward),
                               "ia3_scale must be"),
}


@pytest.mark.parametrize("change", [*STATE_CHANGES, *BAD_STATE_CHANGES])
@pytest.mark.parametrize("is_feedforward", [False, True])
def test_each_call_follows_the_layer_state(change, is_feedforward):
    layer = IA3Linear(nn.Linear(24, 16, bias=False), is_feedforward, init_ia3_weights=False)
    x = torch.randn(3, 24)
    with torch.no_grad():
        layer(x)
        if change in BAD_STATE_CHANGES:
            apply_change, message = BAD_STATE_CHANGES[change]
            apply_change(layer)
            with pytest.raises(ValueError, match=message):
                _from_scratch(layer, x)
            with pytest.raises(ValueError, match=message):
                layer(x)
            return
        STATE_CHANGES[change](layer)
        y = layer(x)
        expected = _from_scratch(layer, x)
        assert y.dtype == expected.dtype and torch.equal(y, expected)


@pytest.mark.parametrize("dense", [True, False])
def test_the_cpu_path_runs_the_reference_directly(monkeypatch, dense):
    """On the reference backend, eager: over a dense base every call runs the reference's torch ops directly
    (fastpeft.reference.fused_linear; autograd differentiates them), with or without grad, and never the autograd
    Function; over a 4-bit base only calls without autograd do, and under autograd the Function runs."""
    import fastpeft.ops.ia3 as ops_ia3

    direct, functions = [], []
    real_reference, real_apply = ops_ia3.reference.fused_linear, ops_ia3.IA3LinearFunction.apply
    monkeypatch.setattr(ops_ia3.reference, "fused_linear", lambda *a, **k: direct.append(1) or real_reference(*a, **k))
    monkeypatch.setattr(ops_ia3.IA3LinearFunction, "apply", lambda *a: functions.append(1) or real_apply(*a))
    layer = IA3Linear(nn.Linear(64, 40) if dense else bnb_linear4bit(64, 40, True), init_ia3_weights=False)
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(1, 64)
            assert torch.equal(layer(x), _from_scratch(layer, x))  # a decode loop
            layer.ia3_l.data.mul_(1.5)
    assert len(direct) == 6 and not functions
    x = torch.randn(2, 64, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert x.grad is not None and layer.ia3_l.grad is not None
    # over NF4 the Function's own products (z for dl, then dx) are the primitive's reference
    assert (len(direct), len(functions)) == ((7, 0) if dense else (8, 1))


def test_a_called_layer_pickles_and_copies():
    """A called layer holds nothing of its calls: torch.save of the whole module and deepcopy work after calls."""
    import copy
    import io

    layer = IA3Linear(nn.Linear(24, 16), init_ia3_weights=False)
    x = torch.randn(3, 24)
    layer(x)
    y = layer(x)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    for other in (torch.load(buffer, weights_only=False), copy.deepcopy(layer)):
        assert torch.equal(other(x), y) and torch.equal(other(x), y)


def _grads(layer, forward, x, dy):
    return torch.autograd.grad(forward(layer, x), [x, layer.ia3_l], dy)


@pytest.mark.parametrize("is_feedforward", [False, True])
def test_each_call_follows_the_call_before(monkeypatch, is_feedforward):
    """Input dtype, shape and device, bad inputs, grad mode, trainable tensors, autocast, disable_adapter and the
    backend variable, each after a first call: what the op gives from scratch (values, dtype, gradients, errors)."""
    layer = IA3Linear(nn.Linear(24, 16), is_feedforward, init_ia3_weights=False)
    with torch.no_grad():
        for x in (torch.randn(3, 24), torch.randn(3, 24, dtype=torch.float64), torch.randn(2, 5, 24),
                  torch.randn(0, 24), non_contiguous(torch.randn(4, 24))):
            y = layer(x)
            assert y.dtype == x.dtype and torch.equal(y, _from_scratch(layer, x))
        for bad, error, message in ((torch.ones(4, 24, dtype=torch.int64), TypeError, "x dtype must be floating"),
                                    (torch.randn(4, 24, device="meta"), ValueError, "x is on meta, the weight on cpu"),
                                    (torch.randn(4, 23), ValueError, "x has 23 features")):
            layer(torch.randn(*bad.shape[:-1], 24))  # a call on inputs of that shape, then the bad one
            with pytest.raises(error, match=message):
                layer(bad)
        with layer.disable_adapter():
            x = torch.randn(3, 24)
            assert torch.equal(layer(x), layer.base_layer(x))

    # grad mode after no-grad calls: l gets its gradient 
    x, dy = torch.randn(3, 24, requires_grad=True), torch.randn(3, 16)
    got, expected = _grads(layer, IA3Linear.__call__, x, dy), _grads(layer, _from_scratch, x, dy)
    assert all(torch.equal(g, e) for g, e in zip(got, expected))
    layer(x).mul_(2).sum().backward()  # the output can be changed in place, with and without grad
    with torch.no_grad():
        layer(x).add_(1)

    layer(x)
    layer.base_layer.weight.requires_grad_(True)  # an unfrozen base after a call: the op's clear error
    with pytest.raises(ValueError, match="must be frozen"):
        layer(x)
    layer.requires_grad_(False)  # everything frozen: a grad-mode call, then a no-grad call
    x = torch.randn(6, 24)
    assert not layer(x).requires_grad
    with torch.no_grad():
        assert torch.equal(layer(x), _from_scratch(layer, x))
    layer.ia3_l.requires_grad_(True)

    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast after a call: PEFT's dtype rule
        y, expected = layer(x), _from_scratch(layer, x)
    assert y.dtype == expected.dtype == torch.bfloat16 and torch.equal(y, expected)

    # the backend variable switched after a call: the Triton kernels run (interpreter on CPU)
    from fastpeft.kernels import ia3 as kernels

    launches = []
    real = kernels.ia3_matmul
    monkeypatch.setattr(kernels, "ia3_matmul", lambda *a, **k: launches.append(1) or real(*a, **k))
    with torch.no_grad():
        layer(x)
        assert not launches
        monkeypatch.setenv("FASTPEFT_BACKEND", "triton")
        y = layer(x)
        assert launches
        assert_rel_close(y, _from_scratch(layer, x), torch.float32)


def test_a_4bit_base_after_a_dense_one():
    """Under autograd a 4-bit base runs the autograd Function, never the plain path, which would keep the
    thread's dequantisation buffer for backward (another 4-bit layer's forward overwrites it)."""
    layer = IA3Linear(nn.Linear(64, 40, bias=False), init_ia3_weights=False)
    x, dy = torch.randn(3, 64, requires_grad=True), torch.randn(3, 40)
    layer(x)
    layer.base_layer = bnb_linear4bit(64, 40, False)
    y = layer(x)
    other = IA3Linear(bnb_linear4bit(64, 40, False), init_ia3_weights=False)
    other(x)  # dequantises another weight into the buffer between this forward and its backward
    got = torch.autograd.grad(y, [x, layer.ia3_l], dy)
    expected = _grads(layer, _from_scratch, x, dy)
    assert all(torch.equal(g, e) for g, e in zip(got, expected))


def test_each_call_follows_what_requires_grad(triton_backend):
    """Which tensors require grad decides whether the call is recorded at all (on the Triton backend an unrecorded
    call is the kernel without autograd): each change after a first call gets its gradients."""
    layer = IA3Linear(nn.Linear(24, 16), init_ia3_weights=False).requires_grad_(False)
    x = torch.randn(3, 24)
    for tensor in (x, layer.base_layer.bias, layer.ia3_l):
        assert not layer(x).requires_grad  # nothing to differentiate
        tensor.requires_grad_(True)
        y = layer(x)
        (grad,) = torch.autograd.grad(y.sum(), [tensor])
        (expected,) = torch.autograd.grad(_from_scratch(layer, x).sum(), [tensor])
        assert_rel_close(grad, expected, torch.float32)
        tensor.requires_grad_(False)


@pytest.mark.parametrize("is_feedforward", [False, True])
def test_bad_inputs_after_good_calls_raise_the_checked_error(is_feedforward):
    """After good calls (which let the layer skip the op's checks), an input that would broadcast into a result,
    an ``(M, 1)`` or 0-d ``x`` or a vector or bias swapped for one of another shape, raises as on a first call."""
    def fresh():
        layer = IA3Linear(nn.Linear(24, 16), is_feedforward, init_ia3_weights=False)
        with torch.no_grad():
            layer(torch.randn(4, 24))
            layer(torch.randn(4, 24))
        return layer

    for bad in (torch.randn(4, 1), torch.randn(())):
        with torch.no_grad(), pytest.raises(ValueError, match="x has 1 features|shape \\(\\.\\.\\., in_features\\)"):
            fresh()(bad)
    layer = fresh()
    layer.ia3_l = nn.Parameter(torch.ones(1))
    with torch.no_grad(), pytest.raises(ValueError, match="ia3_scale must be"):
        layer(torch.randn(4, 24))
    layer = fresh()
    layer.base_layer.bias = nn.Parameter(torch.ones(1), requires_grad=False)
    with torch.no_grad(), pytest.raises(ValueError, match="bias must be"):
        layer(torch.randn(4, 24))
