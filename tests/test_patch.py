"""fastpeft.accelerate / restore on PEFT models (tiny Llama, fp32 CPU): same outputs and gradients as PEFT,
same Parameter objects and state-dict keys, PEFT's save_pretrained / set_adapter / merge_and_unload /
disable_adapter still working, unsupported layers reported, bad inputs refused clearly."""

import contextlib
import copy
import logging

import pytest
import torch

import fastpeft
from fastpeft.patch import PatchSummary

from conftest import assert_rel_close, load_tiny_llama_4bit, make_tiny_llama, set_bnb_cpu_kernel_check

peft = pytest.importorskip("peft")

TOKENS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))


def _peft_model(config, model=None):
    model = make_tiny_llama() if model is None else model
    return peft.get_peft_model(model, config)


def _lora(**kwargs):
    kwargs = {"r": 4, "lora_alpha": 8, "init_lora_weights": False, "target_modules": "all-linear", **kwargs}
    return peft.LoraConfig(**kwargs)


def _loss_and_grads(model):
    model.zero_grad(set_to_none=True)
    logits = model(TOKENS).logits
    logits.float().pow(2).mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@contextlib.contextmanager
def _counting_fast_ops():
    """Counts the calls of fastpeft's ops from accelerated layers (so a test fails if PEFT's forward ran)."""
    calls = []
    names = ("lora_linear", "dora_linear", "ia3_linear")
    originals = {name: getattr(fastpeft.patch, name) for name in names}
    for name, op in originals.items():
        setattr(fastpeft.patch, name, lambda *a, _op=op, **k: calls.append(1) or _op(*a, **k))
    try:
        yield calls
    finally:
        for name, op in originals.items():
            setattr(fastpeft.patch, name, op)


def _nonzero_dora_magnitudes(model):
    # PEFT initialises the magnitude to ‖W‖, which would hide a magnitude that is ignored
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name or "ia3_l" in name:
                param.mul_(1.0 + 0.1 * torch.randn(param.shape))


def _assert_matches_peft(config, model=None):
    # one model, PEFT's forward first, then accelerated (a deep copy of bitsandbytes' 4-bit weights is not
    # faithful); train mode (no dropout here) so bitsandbytes never repacks 4-bit weights for its CPU kernel
    model = _peft_model(config, model).train()
    _nonzero_dora_magnitudes(model)
    ref_out, ref_grads = _loss_and_grads(model)
    summary = fastpeft.accelerate(model)
    with _counting_fast_ops() as calls:
        out, grads = _loss_and_grads(model)
    assert len(calls) == len(summary.replaced)
    assert_rel_close(out, ref_out)
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:
        assert_rel_close(grads[name], ref_grads[name], tol=1e-4)
    return summary, model


@pytest.mark.parametrize("kind", ["lora", "dora", "ia3"])
def test_accelerate_matches_peft_dense(kind):
    if kind == "ia3":
        config = peft.IA3Config(target_modules=["q_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                                init_ia3_weights=False)
    else:
        config = _lora(use_dora=kind == "dora", lora_dropout=0.0)
    summary, ours = _assert_matches_peft(config)
    assert set(summary.replaced.values()) == {kind} and not summary.skipped
    assert len(summary.replaced) == (14 if kind != "ia3" else 6)
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    assert fastpeft.patch._is_accelerated(layer) and isinstance(layer, peft.tuners.tuners_utils.BaseTunerLayer)


@pytest.mark.parametrize("use_dora", [False, True])
def test_accelerate_matches_peft_4bit(tiny_llama_dir, use_dora):
    pytest.importorskip("bitsandbytes")
    summary, _ = _assert_matches_peft(_lora(use_dora=use_dora), load_tiny_llama_4bit(tiny_llama_dir))
    assert set(summary.replaced.values()) == {("dora" if use_dora else "lora") + "+nf4"}


def test_accelerate_keeps_parameters_keys_and_saved_adapter(tmp_path):
    model = _peft_model(_lora())
    params = list(model.parameters())
    state = model.state_dict()
    model.save_pretrained(tmp_path / "before")
    fastpeft.accelerate(model)
    assert all(a is b for a, b in zip(params, model.parameters())) and len(params) == len(list(model.parameters()))
    after = model.state_dict()
    assert list(after) == list(state) and all(after[k] is state[k] or torch.equal(after[k], state[k]) for k in state)
    model.save_pretrained(tmp_path / "after")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "before" / name).read_bytes() == (tmp_path / "after" / name).read_bytes()
    # an optimizer built before accelerate trains the accelerated model
    model.train()
    optimizer = torch.optim.SGD([p for p in params if p.requires_grad], lr=0.1)
    lora_b = model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    before = lora_b.detach().clone()
    model(TOKENS, labels=TOKENS).loss.backward()
    optimizer.step()
    assert not torch.equal(before, lora_b.detach())


def test_set_adapter_load_adapter_and_disable(tmp_path):
    theirs = _peft_model(_lora())
    theirs.add_adapter("second", _lora(r=2))
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "second" in name:
                param.normal_()
    ours = copy.deepcopy(theirs)
    fastpeft.accelerate(ours)
    for adapter in ("second", "default"):
        theirs.set_adapter(adapter)
        ours.set_adapter(adapter)
        assert_rel_close(ours(TOKENS).logits, theirs(TOKENS).logits)
    with ours.disable_adapter(), theirs.disable_adapter():
        assert_rel_close(ours(TOKENS).logits, theirs(TOKENS).logits)
    # an adapter loaded after accelerate runs on fastpeft too (the forward reads PEFT's state per call)
    theirs.save_pretrained(tmp_path)  # writes "default" at the root, "second" under second/
    ours.load_adapter(tmp_path / "second", adapter_name="third")
    ours.set_adapter("third")
    theirs.set_adapter("second")
    with _counting_fast_ops() as calls:
        assert_rel_close(ours(TOKENS).logits, theirs(TOKENS).logits)
    assert len(calls) == 14


def test_merge_and_unload_and_restore():
    theirs = _peft_model(_lora())
    ours = copy.deepcopy(theirs)
    fastpeft.accelerate(ours)
    assert fastpeft.accelerate(ours).replaced  # idempotent
    expected = theirs(TOKENS).logits
    layer = ours.base_model.model.model.layers[1].mlp.up_proj
    assert fastpeft.restore(ours) == 14
    assert type(layer) is peft.tuners.lora.Linear
    with pytest.raises(ValueError, match="no layer of this model was accelerated"):
        fastpeft.restore(ours)
    fastpeft.accelerate(ours)
    merged = ours.merge_and_unload()
    assert type(merged.model.layers[1].mlp.up_proj) is torch.nn.Linear
    assert_rel_close(merged(TOKENS).logits, expected)


def test_unsupported_layers_are_reported(caplog):
    model = _peft_model(peft.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False))
    with caplog.at_level(logging.WARNING, logger="fastpeft"):
        summary = fastpeft.accelerate(model)
    assert isinstance(summary, PatchSummary)
    assert list(summary.skipped) == ["base_model.model.model.embed_tokens"]
    assert "Embedding" in summary.skipped["base_model.model.model.embed_tokens"]
    assert len(summary.replaced) == 2 and "skipped base_model.model.model.embed_tokens" in caplog.text
    assert type(model.base_model.model.model.embed_tokens) is peft.tuners.lora.Embedding


def test_model_without_adapters_is_refused():
    with pytest.raises(ValueError, match="no PEFT adapter layers.*fastpeft.inject"):
        fastpeft.accelerate(make_tiny_llama())


def test_device_mismatch_is_a_clear_error():
    model = _peft_model(_lora(target_modules=["q_proj"]))
    fastpeft.accelerate(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with pytest.raises(ValueError, match="x is on meta, the weight on cpu"):
        layer(torch.empty(2, 64, device="meta"))


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_accelerated_layer_on_triton_kernels(triton_backend, tiny_llama_dir, nf4):
    # the Triton kernels (interpreter on CPU) behind an accelerated layer, against PEFT's forward on it
    if nf4:
        pytest.importorskip("bitsandbytes")
    base = load_tiny_llama_4bit(tiny_llama_dir) if nf4 else make_tiny_llama()
    model = _peft_model(_lora(target_modules=["v_proj"], use_dora=not nf4), base).train()
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    x = torch.randn(7, 64, requires_grad=True)
    params = [p for p in layer.parameters() if p.requires_grad]
    ref = layer(x)
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, *params])
    fastpeft.accelerate(model)
    out = layer(x)
    grads = torch.autograd.grad(out.square().sum(), [x, *params])
    assert_rel_close(out, ref)
    for g, g_ref in zip(grads, ref_grads):
        assert_rel_close(g, g_ref, tol=1e-4)


# ---------------------------------------------------------------------------------------------- per-call gate
class _MLP(torch.nn.Module):
    """Two biased linear layers, small enough for many configurations."""

    def __init__(self):
        super().__init__()
        self.lin0 = torch.nn.Linear(13, 22)
        self.lin1 = torch.nn.Linear(22, 7)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


def _mlp_pair(config, **kwargs):
    """``(PEFT's model, the same model accelerated)`` for ``config`` over a fresh :class:`_MLP`."""
    torch.manual_seed(3)
    theirs = peft.get_peft_model(_MLP(), config, **kwargs)
    ours = copy.deepcopy(theirs)
    fastpeft.accelerate(ours)
    return theirs, ours


def _assert_same_step(theirs, ours, x):
    """The same output and the same gradient of every trainable parameter."""
    outs = []
    for model in (theirs, ours):
        model.zero_grad(set_to_none=True)
        out = model(x)
        out.square().sum().backward()
        outs.append((out.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (ref, ref_grads), (out, grads) = outs
    assert_rel_close(out, ref)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert_rel_close(grads[name], ref_grads[name], tol=1e-5)


X = torch.randn(5, 13, generator=torch.Generator().manual_seed(2))


def test_adapter_with_a_lora_variant_added_after_accelerate_runs_peft():
    if "use_bdlora" not in peft.LoraConfig.__dataclass_fields__:
        pytest.skip(f"peft {peft.__version__} has no LoRA variant for nn.Linear besides DoRA (BD-LoRA: use_bdlora)")
    theirs, ours = _mlp_pair(_lora(target_modules=["lin0", "lin1"]))
    bdlora = _lora(target_modules=["lin0", "lin1"], use_bdlora={"target_modules_bd_a": ["lin1"],
                                                               "target_modules_bd_b": ["lin0"], "nblocks": 2})
    for model in (theirs, ours):
        torch.manual_seed(4)
        model.add_adapter("bd", bdlora)
        model.set_adapter("bd")
    _assert_same_step(theirs, ours, X)
    summary = fastpeft.accelerate(ours)
    assert set(summary.peft_forward) == set(summary.replaced) == {"base_model.model.lin0", "base_model.model.lin1"}
    assert all("BdLoraLinearVariant" in why for why in summary.peft_forward.values())


def test_lora_bias_adapter_added_after_accelerate_is_fused():
    theirs, ours = _mlp_pair(_lora(target_modules=["lin0"]))
    for model in (theirs, ours):
        torch.manual_seed(4)
        model.add_adapter("biased", _lora(target_modules=["lin0"], lora_bias=True))
        torch.nn.init.normal_(model.base_model.model.lin0.lora_B["biased"].bias)
        model.set_adapter("biased")
    with _counting_fast_ops() as calls:
        _assert_same_step(theirs, ours, X)
    assert len(calls) == 1
    summary = fastpeft.accelerate(ours)
    assert summary.replaced == {"base_model.model.lin0": "lora"} and not summary.skipped and not summary.peft_forward


def test_trainable_base_weight_gets_peft_gradient():
    theirs, ours = _mlp_pair(_lora(target_modules=["lin0", "lin1"]))
    for model in (theirs, ours):
        model.base_model.model.lin0.base_layer.weight.requires_grad_(True)
    with _counting_fast_ops() as calls:
        _assert_same_step(theirs, ours, X)
        with torch.no_grad():  # a frozen-for-this-call weight takes the fused path again
            ours(X)
    assert len(calls) == 3  # lin1 twice, lin0 without grad


def test_stacked_lora_over_loha_is_left_to_peft():
    loha = peft.LoHaConfig(r=2, target_modules=["lin0"], init_weights=False)
    torch.manual_seed(3)
    theirs = peft.get_peft_model(_MLP(), loha, adapter_name="loha", mixed=True)
    theirs.add_adapter("lora", _lora(target_modules=["lin0", "lin1"]))
    theirs.set_adapter(["loha", "lora"])
    ours = copy.deepcopy(theirs)
    summary = fastpeft.accelerate(ours)
    assert summary.replaced == {"base_model.model.lin1": "lora"}
    assert "stacked" in summary.skipped["base_model.model.lin0"]
    with _counting_fast_ops() as calls:
        _assert_same_step(theirs, ours, X)
    assert len(calls) == 1


@pytest.mark.parametrize("where", ["base_layer", "lora_A", "lora_B", "lora_dropout", "global"])
@pytest.mark.parametrize("hook", ["forward", "forward_pre", "full_backward"])
def test_hooks_on_peft_submodules_fire(where, hook):
    theirs, ours = _mlp_pair(_lora(target_modules=["lin0"], lora_dropout=0.1))
    fired = {id(theirs): 0, id(ours): 0}
    handles = []
    for model in (theirs, ours):
        def count(*args, _key=id(model)):
            fired[_key] += 1
        layer = model.base_model.model.lin0
        if where == "global":
            register = getattr(torch.nn.modules.module, f"register_module_{hook}_hook")
            handles.append(register(count))
            continue
        module = layer.base_layer if where == "base_layer" else getattr(layer, where)["default"]
        handles.append(getattr(module, f"register_{hook}_hook")(count))
        model.train()
    try:
        with _counting_fast_ops() as calls:
            for model in (theirs, ours):
                torch.manual_seed(5)
                model(X.requires_grad_()).sum().backward()
    finally:
        for handle in handles:
            handle.remove()
        X.requires_grad_(False)
    assert fired[id(ours)] == fired[id(theirs)] > 0 and not calls


def test_repr_is_peft():
    theirs, ours = _mlp_pair(_lora(target_modules=["lin0"], use_dora=True))
    assert repr(ours) == repr(theirs)
    assert type(ours.base_model.model.lin0).__name__ == "Linear"


@pytest.mark.parametrize("kind", ["lora", "dora", "ia3"])
def test_in_place_ops_on_accelerated_outputs(kind):
    # nn.ReLU(inplace=True) after the layer (and PEFT's own `result += ...` over a wrapped layer)
    if kind == "ia3":
        config = peft.IA3Config(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"], init_ia3_weights=False)
    else:
        config = _lora(target_modules=["lin0", "lin1"], use_dora=kind == "dora")
    theirs, ours = _mlp_pair(config)
    for model in (theirs, ours):
        model.base_model.model.forward = lambda x, _m=model.base_model.model: _m.lin1(torch.relu_(_m.lin0(x)) + 1.0)
    with _counting_fast_ops() as calls:
        _assert_same_step(theirs, ours, X.unsqueeze(0).expand(3, -1, -1))
    assert len(calls) == 2


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_dora_at_initialisation_is_the_base_model_bit_for_bit(dropout):
    theirs, ours = _mlp_pair(_lora(target_modules=["lin0", "lin1"], use_dora=True, init_lora_weights=True,
                                   lora_dropout=dropout))
    ours.train()
    with torch.no_grad(), theirs.disable_adapter():
        base = theirs(X)
    with _counting_fast_ops() as calls:
        assert torch.equal(ours(X), base) and torch.equal(theirs.train()(X), base)
        assert torch.equal(ours.eval()(X), base)
    assert len(calls) == 4


def test_a_4bit_base_repacked_by_bitsandbytes_runs_peft_forward(tiny_llama_dir):
    """bitsandbytes repacks a Linear4bit for its bf16 CPU kernel on an eval no-grad forward (AVX512-BF16 CPUs);
    from then on PEFT computes with that kernel, so the accelerated layer hands the call to PEFT's forward."""
    model = _peft_model(_lora(target_modules=["q_proj"]), load_tiny_llama_4bit(tiny_llama_dir))
    fastpeft.accelerate(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 3, layer.in_features)
    layer.get_base_layer().weight.quant_state.packing_format_for_cpu = True  # what that forward leaves behind
    peft_class = layer._fastpeft_peft_class
    peft_forward = peft_class.forward
    with torch.no_grad(), _counting_fast_ops() as calls:
        try:
            peft_class.forward = lambda self, x: "peft"
            assert layer(x) == "peft" and not calls
        finally:
            peft_class.forward = peft_forward


def _peft_4bit_lora(path):
    """A PEFT LoRA model (q_proj, down_proj; the other linear layers frozen 4-bit) over the tiny Llama in 4 bits,
    in eval mode; the same adapter weights at every call."""
    torch.manual_seed(5)
    return _peft_model(_lora(target_modules=["q_proj", "down_proj"]), load_tiny_llama_4bit(path)).eval()


def _4bit_layers(model) -> list:
    import bitsandbytes

    return [m for m in model.modules() if isinstance(m, bitsandbytes.nn.Linear4bit)]


def _repacked(layer) -> bool:
    return getattr(layer.weight.quant_state, "packing_format_for_cpu", False)


@pytest.mark.parametrize("kernel_check", [False, True], ids=["check_off", "check_on"])
def test_4bit_eval_calls_follow_bitsandbytes_cpu_kernel_check(tiny_llama_dir, monkeypatch, kernel_check):
    """bitsandbytes' feature check (AVX512-BF16) forced each way, so both paths run on every host. On: its
    eval-mode no-grad forward repacks each 4-bit layer and multiplies with its own CPU kernel (bf16), so those are
    PEFT's numbers, and the accelerated model runs bitsandbytes' forward for such calls, bit for bit, whether the
    repack happened before ``accelerate`` or after (``late``: a forward ran first). Off: the exact NF4 product
    on both sides, fused, and nothing is repacked."""
    set_bnb_cpu_kernel_check(monkeypatch, kernel_check)
    theirs, ours, late = (_peft_4bit_lora(tiny_llama_dir) for _ in range(3))
    assert all(layer.support_avx512bf16_for_cpu == kernel_check for layer in _4bit_layers(ours))
    summary = fastpeft.accelerate(ours)
    frozen_calls = []
    frozen_4bit_linear = fastpeft.peft_paths.frozen_4bit_linear
    monkeypatch.setattr(fastpeft.patch, "frozen_4bit_linear",
                        lambda layer, x: frozen_calls.append(layer) or frozen_4bit_linear(layer, x))
    with torch.no_grad():
        expected = theirs(TOKENS).logits
        late(TOKENS)
        late_summary = fastpeft.accelerate(late)
        assert late_summary.replaced == summary.replaced and not late_summary.skipped
        with _counting_fast_ops() as calls:
            out, late_out = ours(TOKENS).logits, late(TOKENS).logits
    layers = _4bit_layers(ours) + _4bit_layers(late)
    if kernel_check:
        assert torch.equal(out, expected) and torch.equal(late_out, expected)
        assert not calls and not frozen_calls and all(_repacked(layer) for layer in layers)
    else:
        assert_rel_close(out, expected)
        assert torch.equal(late_out, out)
        assert len(calls) == 2 * 4 and len(frozen_calls) == 2 * 10 and not any(_repacked(layer) for layer in layers)


@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
def test_training_over_a_layer_bitsandbytes_repacked_gets_the_input_gradient(bnb_cpu_kernel_on, with_bias):
    """After an eval pass has repacked a 4-bit layer (bitsandbytes' check on), bitsandbytes multiplies every CPU
    call with its kernel, which has no backward: PEFT's training forward then gives the input no gradient through
    the base (or raises, with a bias). The accelerated layer gives that kernel's output, bit for bit, and the
    exact gradient of the weight the layer holds (its repacked layout read bit for bit)."""
    from conftest import Holder, bnb_linear4bit

    model = peft.get_peft_model(Holder(bnb_linear4bit(128, 64, with_bias)),
                                _lora(target_modules=["proj"], lora_dropout=0.0))
    fastpeft.accelerate(model)
    layer = model.base_model.model.proj
    x = torch.randn(2, 3, 128)
    with torch.no_grad():
        layer.eval()(x)
    base = layer.get_base_layer()
    assert _repacked(base)
    with torch.no_grad():
        expected = layer(x)
    x_leaf = x.clone().requires_grad_()
    y = layer.train()(x_leaf)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert torch.equal(y.detach(), expected)
    weight = fastpeft.NF4Weight.from_bnb(base).dequantize(torch.float64)
    lora_a, lora_b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    scaling = layer.scaling["default"]
    dy64 = dy.double()
    assert_rel_close(x_leaf.grad, dy64 @ weight + scaling * (dy64 @ lora_b) @ lora_a)
    h = x.double() @ lora_a.t()
    assert_rel_close(layer.lora_B["default"].weight.grad,
                     scaling * dy64.reshape(-1, 64).t() @ h.reshape(-1, lora_a.shape[0]))


def test_a_4bit_layer_computing_in_another_dtype_runs_peft_forward(tiny_llama_dir, monkeypatch):
    """``bnb_4bit_compute_dtype=bfloat16`` on an fp32 model: bitsandbytes (and so PEFT) multiplies in bf16; the
    fused ops would compute in fp32 (3.7e-8 from the exact result where PEFT is 2.1e-3 away), so
    the accelerated layers run PEFT's forward and the outputs and gradients are PEFT's, bit for bit. The 4-bit
    base PEFT's forward calls runs on fastpeft's NF4 op (bitsandbytes' compute dtype rule; faster on CPU, issue
    16 item 3), as every frozen 4-bit layer does; ``frozen_4bit=False`` and ``restore`` put bitsandbytes back."""
    model = _peft_model(_lora(target_modules=["q_proj", "down_proj"]),
                        load_tiny_llama_4bit(tiny_llama_dir, torch.bfloat16)).train()
    ref_out, ref_grads = _loss_and_grads(model)
    summary = fastpeft.accelerate(model)
    assert sorted(set(summary.replaced.values())) == ["lora+nf4", "nf4"] and len(summary.replaced) == 14
    bases = []
    frozen_4bit_linear = fastpeft.peft_paths.frozen_4bit_linear
    monkeypatch.setattr(fastpeft.patch, "frozen_4bit_linear",
                        lambda layer, x: bases.append(layer) or frozen_4bit_linear(layer, x))
    with _counting_fast_ops() as calls:
        out, grads = _loss_and_grads(model)
    assert not calls
    all_4bit = [m for m in model.modules() if type(m).__name__ == "Linear4bit" and not hasattr(m, "base_layer")]
    assert len(all_4bit) == 14 and {id(m) for m in bases} == {id(m) for m in all_4bit}
    assert torch.equal(out, ref_out) and grads.keys() == ref_grads.keys()
    assert all(torch.equal(grads[name], ref_grads[name]) for name in grads)
    for put_back in (lambda: fastpeft.accelerate(model, frozen_4bit=False), lambda: fastpeft.restore(model)):
        put_back()
        bases.clear()
        assert torch.equal(_loss_and_grads(model)[0], ref_out) and not bases
        fastpeft.accelerate(model)


@pytest.mark.parametrize("unload", ["merge_and_unload", "unload", "none"])
def test_an_accelerated_or_unloaded_4bit_model_pickles_as_peft_and_bitsandbytes_classes(tiny_llama_dir, unload):
    """torch.save of an accelerated 4-bit PEFT model, and of what merge_and_unload() / unload() return, writes PEFT's
    and bitsandbytes' own classes (a file that loads without fastpeft's runtime classes), with the same outputs;
    deepcopy keeps the accelerated classes."""
    import io

    bnb = pytest.importorskip("bitsandbytes")
    model = _peft_model(_lora(target_modules=["q_proj", "down_proj"]), load_tiny_llama_4bit(tiny_llama_dir)).train()
    fastpeft.accelerate(model)
    if unload != "none":
        model = getattr(model, unload)()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert not any(type(m).__module__ == "fastpeft.patch" for m in loaded.modules())
    assert sum(type(m) is bnb.nn.Linear4bit for m in loaded.modules()) == 14
    assert torch.equal(loaded(TOKENS).logits, model(TOKENS).logits)
    copied = copy.deepcopy(model)
    assert [type(m) for m in copied.modules()] == [type(m) for m in model.modules()]


@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float32])
def test_the_summary_counts_what_runs_on_fastpeft_ops(tiny_llama_dir, compute_dtype):
    """bnb_4bit_compute_dtype=bfloat16 on an fp32 model: the adapted 4-bit layers run PEFT's forward at every call,
    so the summary does not count them on fastpeft ops and says why (the frozen 4-bit layers do run fastpeft's NF4
    op); with fp32 compute every switched layer counts."""
    model = _peft_model(_lora(target_modules=["q_proj", "down_proj"]),
                        load_tiny_llama_4bit(tiny_llama_dir, compute_dtype)).train()
    summary = fastpeft.accelerate(model)
    adapted = {name for name, kind in summary.replaced.items() if kind == "lora+nf4"}
    assert len(adapted) == 4 and len(summary.replaced) == 14
    if compute_dtype == torch.float32:
        assert not summary.unfused and str(summary).startswith("fastpeft: 14 layers on fastpeft ops (4 lora+nf4, 10 nf4)")
        return
    assert set(summary.unfused) == adapted
    text = str(summary)
    assert text.startswith("fastpeft: 10 layers on fastpeft ops (10 nf4); 4 switched but running PEFT's forward")
    assert "computes the 4-bit base in torch.bfloat16" in text and "activations are torch.float32" in text
    with _counting_fast_ops() as calls:
        _loss_and_grads(model)
    assert not calls  # what the summary says: no fused call on those layers
