"""fastpeft.accelerate swept over PEFT configurations on small custom models, in the manner of PEFT's own
tests/test_custom_models.py: for each configuration and each PEFT operation (several adapters, set_adapter,
disable_adapter, merge / unmerge, adapter_names, save / load, mixed models) the accelerated model gives PEFT's
outputs, gradients, trained parameters and saved files, and each layer call takes the path it should: every
call's decision of ``fastpeft.integration.fused_forward._fused_path`` is recorded and the counts are asserted (a fused op where
fastpeft computes what PEFT would, PEFT's forward, for the stated reason, elsewhere).

Expected decisions are written ``{"_fused_lora": 2}`` (the fused forward's name and how many calls) or
``{"peft:<words of the reason>": 2}``; a new fused path changes the rows it takes over.
"""

import copy
import json
from collections import Counter

import pytest
import torch
from torch import nn

import fastpeft
import fastpeft.integration.frozen_4bit
import fastpeft.integration.fused_forward

from conftest import assert_rel_close, bnb_linear4bit

peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")

LAYERS = ["lin0", "lin1"]
X = torch.randn(2, 5, 13, generator=torch.Generator().manual_seed(11))


class MLP(nn.Module):
    """Two biased linear layers around a ReLU (the shape of PEFT's test MLP, odd sizes)."""

    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(13, 22)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(22, 7)

    def forward(self, x):
        return self.lin1(self.relu(self.lin0(x)))


class MLP4bit(MLP):
    """:class:`MLP` over bitsandbytes NF4 ``Linear4bit`` layers (64 inputs: bitsandbytes' CPU dequantiser is
    right only when no block spans two rows)."""

    def __init__(self):
        nn.Module.__init__(self)
        self.lin0 = bnb_linear4bit(64, 128, with_bias=True)
        self.relu = nn.ReLU()
        self.lin1 = bnb_linear4bit(128, 7, with_bias=True)


def _lora(**kwargs):
    return peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": LAYERS, "init_lora_weights": False,
                              **kwargs})


def _ia3(**kwargs):
    return peft.IA3Config(**{"target_modules": LAYERS, "feedforward_modules": [], "init_ia3_weights": False,
                             **kwargs})


def _perturb_vectors(model):
    # PEFT initialises DoRA magnitudes to ‖W‖ and IA3 vectors to 1: move them, so an ignored one shows
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name or "ia3_l" in name:
                param.mul_(1 + 0.2 * torch.randn(param.shape, generator=generator))
            elif name.endswith("lora_B.default.bias"):
                param.normal_(generator=generator)


def _pair(config, model=MLP, **kwargs):
    """``(PEFT's model, the same model accelerated)`` over a fresh ``model()``, built twice from one seed (a
    deep copy of bitsandbytes' 4-bit weights is not faithful)."""
    pair = []
    for _ in range(2):
        torch.manual_seed(3)
        pair.append(peft.get_peft_model(model(), copy.deepcopy(config), **kwargs))
        _perturb_vectors(pair[-1])
    fastpeft.accelerate(pair[1])
    return tuple(pair)


@pytest.fixture
def decisions(monkeypatch):
    """The decisions of ``_fused_path`` since the last ``decisions.clear()``: the fused forward's name or
    ``"peft:" + reason`` per layer call."""
    record = []
    gate = fastpeft.integration.fused_forward._fused_path

    def recording(layer, x, args, kwargs):
        path = gate(layer, x, args, kwargs)
        record.append("peft:" + path if isinstance(path, str) else path[0].__name__)
        return path

    monkeypatch.setattr(fastpeft.integration.fused_forward, "_fused_path", recording)
    return record


def _counts(record, expected) -> dict:
    """``record`` counted under the keys of ``expected`` (a ``"peft:words"`` key takes each PEFT-path decision
    whose reason contains the words); decisions no key takes are counted under themselves."""
    counts = Counter()
    for decision in record:
        key = next((k for k in expected if k == decision or (k.startswith("peft:") and decision.startswith("peft:")
                                                              and k[5:] in decision)), decision)
        counts[key] += 1
    record.clear()
    return dict(counts)


def _step(model, x, seed=7):
    """One training step (output, gradients of the trainable parameters, then SGD): PEFT's dropout masks come
    from the same seed in both models."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(x)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    with torch.no_grad():
        for param in model.parameters():
            if param.grad is not None:
                param.sub_(0.1 * param.grad)
    return out.detach(), grads


def _assert_same(got, expected, tol=1e-5):
    (out, grads), (ref, ref_grads) = got, expected
    assert_rel_close(out, ref)
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:
        assert_rel_close(grads[name], ref_grads[name], tol=tol)


def _assert_same_eval(theirs, ours, x=X, **kwargs):
    with torch.no_grad():
        assert_rel_close(ours.eval()(x, **kwargs), theirs.eval()(x, **kwargs))


def _assert_same_saved(theirs, ours, path):
    """save_pretrained writes the same files (config bytes, tensor names, dtypes and values)."""
    theirs.save_pretrained(path / "theirs")
    ours.save_pretrained(path / "ours")
    names = sorted(p.relative_to(path / "theirs") for p in (path / "theirs").rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(path / "ours") for p in (path / "ours").rglob("*") if p.is_file())
    for name in names:
        if name.suffix == ".json":
            assert json.loads((path / "ours" / name).read_text()) == json.loads((path / "theirs" / name).read_text())
        elif name.suffix == ".safetensors":
            mine = safetensors_torch.load_file(path / "ours" / name)
            ref = safetensors_torch.load_file(path / "theirs" / name)
            assert mine.keys() == ref.keys()
            for key in ref:
                assert mine[key].dtype == ref[key].dtype
                assert_rel_close(mine[key], ref[key], tol=1e-5)
    return names


# ---------------------------------------------------------------------------------------------- configurations
# (id, PEFT config, decisions of one forward of the two-layer MLP)
CASES = [
    ("lora", lambda: _lora(), {"_fused_lora": 2}),
    ("lora-rslora", lambda: _lora(use_rslora=True, lora_alpha=5), {"_fused_lora": 2}),
    ("lora-dropout", lambda: _lora(lora_dropout=0.3), {"_fused_lora": 2}),
    ("lora-bias-all", lambda: _lora(bias="all"), {"_fused_lora": 2}),
    ("lora-bias-lora_only", lambda: _lora(bias="lora_only"), {"_fused_lora": 2}),
    ("lora-gaussian-patterns", lambda: _lora(init_lora_weights="gaussian", rank_pattern={"lin1": 2},
                                             alpha_pattern={"lin1": 3}), {"_fused_lora": 2}),
    ("lora-modules_to_save", lambda: _lora(target_modules=["lin0"], modules_to_save=["lin1"]), {"_fused_lora": 1}),
    ("lora-lora_bias", lambda: _lora(lora_bias=True), {"_fused_lora": 2}),
    ("dora", lambda: _lora(use_dora=True), {"_fused_dora": 2}),
    ("dora-dropout-bias-all", lambda: _lora(use_dora=True, lora_dropout=0.3, bias="all"), {"_fused_dora": 2}),
    ("dora-at-initialisation", lambda: _lora(use_dora=True, init_lora_weights=True), {"_fused_dora": 2}),
    ("ia3", lambda: _ia3(), {"_fused_ia3": 2}),
    ("ia3-feedforward", lambda: _ia3(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"]),
     {"_fused_ia3": 2}),
    ("adalora-dropout", lambda: peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10, lora_dropout=0.3,
                                                   target_modules=LAYERS), {"_fused_adalora": 2}),
]


@pytest.mark.parametrize("config, expected", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_training_and_saving_match_peft(config, expected, decisions, tmp_path):
    theirs, ours = _pair(config())
    for seed in (7, 8):  # the second step runs on parameters the first step's gradients moved
        expected_step = _step(theirs, X, seed)
        decisions.clear()
        _assert_same(_step(ours, X, seed), expected_step)
        assert _counts(decisions, expected) == expected
    _assert_same_eval(theirs, ours)
    assert _counts(decisions, expected) == expected
    assert "adapter_model.safetensors" in {p.name for p in _assert_same_saved(theirs, ours, tmp_path)}


@pytest.mark.parametrize("config, expected", [
    (_lora(lora_dropout=0.3, bias="all"), {"_fused_lora": 2}),
    (_lora(use_dora=True), {"_fused_dora": 2}),
    (_ia3(feedforward_modules=["lin1"]), {"_fused_ia3": 2}),
], ids=["lora", "dora", "ia3"])
def test_4bit_bases_match_peft(config, expected, decisions):
    pytest.importorskip("bitsandbytes")
    theirs, ours = _pair(config, MLP4bit)
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(11))
    _assert_same(_step(ours, x), _step(theirs, x), tol=1e-4)
    assert _counts(decisions, expected) == expected
    # training mode (same dropout seed): in eval mode without grad bitsandbytes repacks PEFT's weights for its
    # CPU kernel
    with torch.no_grad():
        outs = [torch.manual_seed(9) and model.train()(x) for model in (ours, theirs)]
    assert_rel_close(*outs)
    assert _counts(decisions, expected) == expected


def test_4bit_bases_serve_peft_forward(decisions, monkeypatch):
    """Where an adapted 4-bit layer runs PEFT's forward (adapters disabled here), PEFT calls its bitsandbytes base,
    which runs fastpeft's NF4 op as bitsandbytes' forward would: outputs and input gradients PEFT's."""
    pytest.importorskip("bitsandbytes")
    theirs, ours = _pair(_lora(), MLP4bit)
    bases = []
    frozen = fastpeft.integration.frozen_4bit.frozen_4bit_linear
    monkeypatch.setattr(fastpeft.integration.frozen_4bit, "frozen_4bit_linear",
                        lambda layer, x: bases.append(layer) or frozen(layer, x))
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(11))
    results = []
    for model in (ours, theirs):
        x_in = x.clone().requires_grad_()
        with model.disable_adapter():
            out = model.train()(x_in)  # train mode: bitsandbytes never repacks its weights for its CPU kernel
        out.square().mean().backward()
        results.append((out.detach(), x_in.grad))
    assert _counts(decisions, {"peft:disabled": 0}) == {"peft:disabled": 2}
    layers = (ours.base_model.model.lin0, ours.base_model.model.lin1)
    assert [id(b) for b in bases] == [id(layer.base_layer) for layer in layers]
    for got, expected in zip(*results):
        assert_rel_close(got, expected)


# ---------------------------------------------------------------------------------------------- PEFT operations
@pytest.fixture
def two_adapters():
    """PEFT's model and the accelerated one with adapters ``default`` (LoRA) and ``other`` (rsLoRA, rank 3,
    dropout), ``default`` active."""
    theirs, ours = _pair(_lora())
    for model in (theirs, ours):
        torch.manual_seed(4)
        model.add_adapter("other", _lora(r=3, use_rslora=True, lora_dropout=0.2))
    return theirs, ours


def test_set_adapter_and_several_active_adapters(two_adapters, decisions):
    theirs, ours = two_adapters
    for model in (theirs, ours):
        model.set_adapter("other")
    _assert_same(_step(ours, X), _step(theirs, X))
    assert _counts(decisions, {}) == {"_fused_lora": 2}
    for model in (theirs, ours):  # several active adapters: the base model's set_adapter takes a list
        model.base_model.set_adapter(["default", "other"])
    _assert_same(_step(ours, X), _step(theirs, X))  # "other" has dropout: PEFT draws a mask per adapter
    assert _counts(decisions, {"peft:several active": 0}) == {"peft:several active": 2}
    _assert_same_eval(theirs, ours)  # no dropout: one fused term with concatenated factors
    assert _counts(decisions, {}) == {"_fused_several_lora": 2}


def test_disable_adapter(two_adapters, decisions):
    theirs, ours = two_adapters
    with theirs.disable_adapter(), ours.disable_adapter():
        _assert_same_eval(theirs, ours)
    assert _counts(decisions, {"peft:disabled": 0}) == {"peft:disabled": 2}
    _assert_same_eval(theirs, ours)
    assert _counts(decisions, {}) == {"_fused_lora": 2}


def test_merge_unmerge_and_merge_and_unload(two_adapters, decisions):
    theirs, ours = two_adapters
    for model in (theirs, ours):
        model.merge_adapter()
    _assert_same_eval(theirs, ours)
    assert _counts(decisions, {"peft:merged": 0}) == {"peft:merged": 2}
    for model in (theirs, ours):
        model.unmerge_adapter()
    _assert_same_eval(theirs, ours)
    assert _counts(decisions, {}) == {"_fused_lora": 2}
    merged_theirs, merged_ours = theirs.merge_and_unload(), ours.merge_and_unload()
    assert type(merged_ours.lin0) is nn.Linear
    assert_rel_close(merged_ours(X), merged_theirs(X))


def test_adapter_names_mixed_batch(two_adapters, decisions):
    theirs, ours = two_adapters
    _assert_same_eval(theirs, ours, adapter_names=["default", "other"])
    assert _counts(decisions, {}) == {"_fused_mixed_batch": 2}


def test_save_and_load_several_adapters(two_adapters, decisions, tmp_path):
    theirs, ours = two_adapters
    _assert_same(_step(ours, X), _step(theirs, X))
    names = {str(p) for p in _assert_same_saved(theirs, ours, tmp_path)}
    assert {"adapter_model.safetensors", "other/adapter_model.safetensors"} <= names
    # PEFT's files load into an accelerated model and run fused
    for model in (theirs, ours):
        model.load_adapter(tmp_path / "theirs" / "other", adapter_name="loaded")
        model.set_adapter("loaded")
    decisions.clear()
    _assert_same_eval(theirs, ours)
    assert _counts(decisions, {}) == {"_fused_lora": 2}
    loaded = peft.PeftModel.from_pretrained(MLP(), tmp_path / "ours")
    fastpeft.accelerate(loaded)
    loaded.load_state_dict(ours.state_dict(), strict=False)  # the same base weights as the trained models
    theirs.set_adapter("default")
    _assert_same_eval(theirs, loaded)
    assert _counts(decisions, {}) == {"_fused_lora": 2}


# ---------------------------------------------------------------------------------------------- mixed models
def _mixed_pair(first, first_config, second, second_config):
    torch.manual_seed(3)
    theirs = peft.get_peft_model(MLP(), first_config, adapter_name=first, mixed=True)
    theirs.add_adapter(second, second_config)
    theirs.set_adapter([first, second])
    ours = copy.deepcopy(theirs)
    summary = fastpeft.accelerate(ours)
    return theirs, ours, summary


@pytest.mark.parametrize("inner", ["loha", "lokr"])
def test_mixed_model_lora_over_another_adapter(inner, decisions):
    # the outer LoRA layer's base is the LoHa / LoKr layer: PEFT's forward runs it (reading the innermost
    # nn.Linear would drop the inner adapter); lin1 carries LoRA alone and runs fused
    inner_config = (peft.LoHaConfig if inner == "loha" else peft.LoKrConfig)(r=2, target_modules=["lin0"],
                                                                             init_weights=False)
    theirs, ours, summary = _mixed_pair(inner, inner_config, "lora", _lora())
    assert summary.replaced == {"base_model.model.lin1": "lora"} and "stacked" in summary.skipped["base_model.model.lin0"]
    _assert_same(_step(ours, X), _step(theirs, X))
    assert _counts(decisions, {}) == {"_fused_lora": 1}


@pytest.mark.parametrize("outer", ["loha", "adalora"])
def test_mixed_model_another_adapter_over_lora(outer, decisions):
    # LoHa / AdaLoRA added after LoRA wrap the LoRA layer, which (over nn.Linear) runs fused under them;
    # AdaLoRA adds its term to the LoRA layer's output in place (`result += ...`)
    if outer == "loha":
        outer_config = peft.LoHaConfig(r=2, target_modules=["lin0"], init_weights=False)
    else:
        outer_config = peft.AdaLoraConfig(r=2, target_modules=["lin0"], total_step=10, init_lora_weights=False)
    theirs, ours, summary = _mixed_pair("lora", _lora(target_modules=["lin0"]), outer, outer_config)
    assert summary.replaced == {"base_model.model.lin0.base_layer": "lora"}
    _assert_same(_step(ours, X), _step(theirs, X))
    assert _counts(decisions, {}) == {"_fused_lora": 1}


@pytest.mark.parametrize("config, expected", [
    (_lora(lora_dropout=0.3), {"_fused_lora": 2}),
    (_lora(use_dora=True), {"_fused_dora": 2}),
    (_ia3(feedforward_modules=["lin1"]), {"_fused_ia3": 2}),
], ids=["lora", "dora", "ia3"])
def test_autocast_matches_peft(config, expected, decisions):
    # what HF Trainer(bf16=True) runs: fp32 weights, bf16 compute under autocast; the same output dtype as PEFT
    theirs, ours = _pair(config)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected_step = _step(theirs, X)
        got = _step(ours, X)
    assert got[0].dtype == expected_step[0].dtype == torch.bfloat16
    _assert_same(got, expected_step, tol=2e-2)
    assert _counts(decisions, expected) == expected


# ---------------------------------------------------------------------------------------------- call order, autocast
# every method, dense and over NF4 bases: (id, PEFT config, model class, decisions of one forward)
METHODS = [
    ("lora", lambda: _lora(), MLP, {"_fused_lora": 2}),
    ("lora-dropout", lambda: _lora(lora_dropout=0.3), MLP, {"_fused_lora": 2}),
    ("dora", lambda: _lora(use_dora=True), MLP, {"_fused_dora": 2}),
    ("dora-dropout", lambda: _lora(use_dora=True, lora_dropout=0.3), MLP, {"_fused_dora": 2}),
    ("dora-at-initialisation", lambda: _lora(use_dora=True, init_lora_weights=True), MLP, {"_fused_dora": 2}),
    ("ia3", lambda: _ia3(), MLP, {"_fused_ia3": 2}),
    ("ia3-feedforward", lambda: _ia3(feedforward_modules=["lin1"]), MLP, {"_fused_ia3": 2}),
    ("lora-nf4", lambda: _lora(lora_dropout=0.3), MLP4bit, {"_fused_lora": 2}),
    ("dora-nf4", lambda: _lora(use_dora=True), MLP4bit, {"_fused_dora": 2}),
    ("dora-dropout-nf4", lambda: _lora(use_dora=True, lora_dropout=0.3), MLP4bit, {"_fused_dora": 2}),
    ("ia3-nf4", lambda: _ia3(feedforward_modules=["lin1"]), MLP4bit, {"_fused_ia3": 2}),
]


def _method_pair(config, model):
    if model is MLP4bit:
        pytest.importorskip("bitsandbytes")
    x = torch.randn(2, 5, 64 if model is MLP4bit else 13, generator=torch.Generator().manual_seed(11))
    return (*_pair(config(), model), x)


def _autocast_step(model, x, seed=7, update=True):
    """A bf16 mixed-precision training step as torch.amp runs it: the forward under autocast, the loss and the
    backward outside (HF Trainer with bf16=True), then SGD unless not ``update`` (bf16 gradients would leave the
    two models' parameters a bf16 rounding apart)."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    out.float().square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    with torch.no_grad():
        for param in model.parameters():
            if param.grad is not None and update:
                param.sub_(0.1 * param.grad)
    return out.detach(), grads


@pytest.mark.parametrize("config, model, expected", [m[1:] for m in METHODS], ids=[m[0] for m in METHODS])
def test_autocast_training_with_backward_outside_matches_peft(config, model, expected, decisions):
    theirs, ours, x = _method_pair(config, model)
    for seed in (7, 8):  # two dropout masks; no update (bf16 gradients a rounding apart would compound)
        expected_step = _autocast_step(theirs, x, seed, update=False)
        decisions.clear()
        got = _autocast_step(ours, x, seed, update=False)
        assert got[0].dtype == expected_step[0].dtype
        _assert_same(got, expected_step, tol=2e-2)
        if model is MLP4bit:  # bitsandbytes multiplies in bf16 under autocast, the NF4 ops in the input's fp32
            expected = {"peft:under autocast": 2}
        assert _counts(decisions, expected) == expected


def _eval_call(model, x, context):
    with context:
        return model.eval()(x).clone()


@pytest.mark.parametrize("config, model, expected", [m[1:] for m in METHODS], ids=[m[0] for m in METHODS])
def test_call_order_across_modes_matches_peft(config, model, expected, decisions):
    """The first call under inference_mode, then training, no_grad, autocast training and training again, each
    PEFT's at every step (state a call leaves behind must not change a later call in another mode). In eval mode
    without grad bitsandbytes repacks PEFT's 4-bit weights for its CPU kernel, so the 4-bit models take the
    training and autocast steps only."""
    theirs, ours, x = _method_pair(config, model)
    nf4 = model is MLP4bit
    for step in ("inference_mode", "training", "no_grad", "autocast", "training"):
        if step in ("inference_mode", "no_grad"):
            if nf4:
                continue
            context = torch.inference_mode() if step == "inference_mode" else torch.no_grad()
            assert_rel_close(_eval_call(ours, x, context), _eval_call(theirs, x, context))
        elif step == "training":
            _assert_same(_step(ours, x), _step(theirs, x), tol=1e-4 if nf4 else 1e-5)
        else:
            _assert_same(_autocast_step(ours, x, update=False), _autocast_step(theirs, x, update=False), tol=2e-2)
    assert set(_counts(decisions, {**expected, "peft:under autocast": 0})) == set(expected) | (
        {"peft:under autocast"} if nf4 else set())
