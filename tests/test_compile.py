"""torch.compile over fastpeft layers (CPU, the reference backend behind the custom ops, AOT autograd with the
ops' fake kernels): accelerated PEFT layers and whole dense models compile with fullgraph=True and match eager
in outputs and gradients, NF4 bases included; LoRA dropout compiles into the graph."""

import warnings

import pytest
import torch

import fastpeft

from conftest import Holder, assert_rel_close, bnb_linear4bit, load_tiny_llama_4bit, make_tiny_llama

peft = pytest.importorskip("peft")

TOKENS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
BACKEND = "aot_eager"  # traces forward and backward through the ops' fake kernels; inductor needs minutes here


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _accelerated(config, model=None):
    model = peft.get_peft_model(make_tiny_llama() if model is None else model, config).train()
    fastpeft.accelerate(model)
    return model


def _outputs_and_grads(fn, inputs, params):
    out = fn(*inputs)
    out = out.logits if hasattr(out, "logits") else out
    grads = torch.autograd.grad(out.square().mean(), [*inputs, *params] if inputs[0].is_floating_point() else params)
    return out, grads


def _assert_compiled_matches_eager(module, inputs, fullgraph=True):
    params = [p for p in module.parameters() if p.requires_grad]
    ref, ref_grads = _outputs_and_grads(module, inputs, params)
    out, grads = _outputs_and_grads(torch.compile(module, fullgraph=fullgraph, backend=BACKEND), inputs, params)
    assert_rel_close(out, ref)
    for g, g_ref in zip(grads, ref_grads):
        assert_rel_close(g, g_ref, tol=1e-5)


@pytest.mark.parametrize("kind", ["lora", "dora", "ia3"])
def test_accelerated_layer_fullgraph(kind):
    if kind == "ia3":
        config = peft.IA3Config(target_modules=["q_proj"], feedforward_modules=[], init_ia3_weights=False)
    else:
        config = peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False, use_dora=kind == "dora",
                                 lora_dropout=0.1)
    layer = _accelerated(config).base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 5, 64, requires_grad=True)
    layer.eval()  # dropout off: compiled and eager draw different masks
    _assert_compiled_matches_eager(layer, (x,))
    layer.train()  # with dropout on it still compiles as one graph (nn.Dropout inside the graph)
    torch.compile(layer, fullgraph=True, backend=BACKEND)(x).sum().backward()


@pytest.mark.parametrize("kind", ["lora", "dora", "ia3"])
def test_compiling_an_accelerated_layer_warns_of_nothing(kind):
    # dynamo warns when it meets an lru_cache wrapper (it traces through the cache, which may then go stale)
    if kind == "ia3":
        config = peft.IA3Config(target_modules=["q_proj"], feedforward_modules=[], init_ia3_weights=False)
    else:
        config = peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False, use_dora=kind == "dora")
    layer = _accelerated(config).base_model.model.model.layers[0].self_attn.q_proj
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.compile(layer, fullgraph=True, backend=BACKEND)(torch.randn(2, 5, 64)).sum().backward()
    assert not [w for w in caught if "lru_cache" in str(w.message)]


def test_ia3_layer_fullgraph_after_eager_calls():
    # eager calls first (the reference's torch ops called directly, fastpeft.ops.ia3), then traced: dynamo takes the
    # op and the autograd Function instead, and both give the same values and gradients
    layer = fastpeft.IA3Linear(torch.nn.Linear(64, 48), init_ia3_weights=False)
    _assert_compiled_matches_eager(layer, (torch.randn(2, 5, 64, requires_grad=True),))


def test_whole_accelerated_model_fullgraph():
    model = _accelerated(peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    _assert_compiled_matches_eager(model, (TOKENS,))


def test_injected_model_fullgraph():
    model = make_tiny_llama()
    fastpeft.inject(model, r=4, use_dora=True, init_lora_weights=False)
    _assert_compiled_matches_eager(model.train(), (TOKENS,))


def _accelerated_4bit_layer(tiny_llama_dir):
    pytest.importorskip("bitsandbytes")
    model = _accelerated(peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False),
                         load_tiny_llama_4bit(tiny_llama_dir))
    return model.base_model.model.model.layers[0].self_attn.q_proj


def test_accelerated_4bit_layer_fullgraph(tiny_llama_dir):
    # the double-quantisation offset stays a device tensor (no .item()), so the NF4 path is one graph too
    layer = _accelerated_4bit_layer(tiny_llama_dir)
    _assert_compiled_matches_eager(layer, (torch.randn(2, 5, 64, requires_grad=True),))


@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
def test_layer_over_a_base_bitsandbytes_repacked_fullgraph(bnb_cpu_kernel_on, with_bias):
    # an eval pass repacks the 4-bit base for bitsandbytes' CPU kernel; a training call then runs that kernel's
    # forward inside the Function that adds its input gradient (bitsandbytes returns the kernel's output after a
    # `+= bias`, or after a `.to` of its own dtype)
    model = peft.get_peft_model(Holder(bnb_linear4bit(128, 64, with_bias)),
                                peft.LoraConfig(r=4, target_modules=["proj"], init_lora_weights=False))
    fastpeft.accelerate(model)
    layer = model.base_model.model.proj
    x = torch.randn(2, 3, 128)
    with torch.no_grad():
        layer.eval()(x)
    assert layer.get_base_layer().weight.quant_state.packing_format_for_cpu
    _assert_compiled_matches_eager(layer.train(), (x.requires_grad_(),))


def test_lora_linear_with_dropout_fullgraph():
    # W = 0, A = B = I: y = s · drop(x) and dx = s · mask / (1 - p), so the compiled graph's one mask is visible
    p, scaling, n = 0.25, 2.0, 16
    base = torch.nn.Linear(n, n, bias=False)
    torch.nn.init.zeros_(base.weight)
    layer = fastpeft.LoraLinear(base, r=n, lora_alpha=scaling * n, lora_dropout=p).train()
    with torch.no_grad():
        layer.lora_A.copy_(torch.eye(n))
        layer.lora_B.copy_(torch.eye(n))
    x = (torch.rand(8, n) + 0.5).requires_grad_()
    y = torch.compile(layer, fullgraph=True, backend=BACKEND)(x)
    y.sum().backward()
    kept = y.detach() != 0
    assert 0 < kept.sum() < kept.numel()
    torch.testing.assert_close(y.detach(), torch.where(kept, scaling * x.detach() / (1 - p), 0.0))
    torch.testing.assert_close(x.grad, kept.float() * scaling / (1 - p))
