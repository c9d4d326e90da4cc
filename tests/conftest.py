"""Shared test helpers: per-dtype error bounds, odd shapes, NaN poisoning, tiny Llama models.

Without a CUDA device, Triton kernels run in Triton's CPU interpreter: ``TRITON_INTERPRET=1`` is set
here, before anything imports triton. Its ``tl.dot`` is wrong for bf16 inputs and its fp32 -> bf16 casts
truncate instead of rounding to nearest even (Triton 3.4-3.9); ``fastpeft.kernels.interpreter`` corrects both
(bf16 only) and is installed here, so kernel tests run in bf16 as well (``kernel_dtypes``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# A kernel that fails must fail its test, never pass silently on the PyTorch fallback
# (fastpeft.ops.dispatch.run_kernel); tests/test_fallback.py unsets it to test the fallback itself.
os.environ.setdefault("FASTPEFT_STRICT", "1")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# Hypothesis in CI: derandomised (the same examples every run, a failure reproduces), no per-example deadline
# (interpreter and CPU timings vary), and each test's budget set by its own max_examples.
# HYPOTHESIS_PROFILE=explore searches with fresh random examples instead.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("explore", deadline=None, max_examples=500, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

from fastpeft.kernels.interpreter import install_bf16_interpreter_fix  # noqa: E402

install_bf16_interpreter_fix()  # no-op unless TRITON_INTERPRET=1

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# ‖out − ref‖ / ‖ref‖ bounds, ref computed in float64.
REL_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
TF32_REL_TOL = 5e-4


def kernel_dtypes() -> list[torch.dtype]:
    """Dtypes every kernel test runs in (bf16 in the interpreter through ``install_bf16_interpreter_fix``)."""
    return [torch.float32, torch.float16, torch.bfloat16]


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖₂ / ‖ref‖₂ in float64 (0 when both are 0)."""
    out64, ref64 = out.detach().double(), ref.detach().double()
    denom = torch.linalg.vector_norm(ref64)
    diff = torch.linalg.vector_norm(out64 - ref64)
    return float(diff / denom) if denom > 0 else float(diff)


def assert_rel_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None, tol: float | None = None):
    """Assert shape equality, no NaN/inf, and relative error within the bound for ``dtype``."""
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), "output has NaN or inf (unwritten NaN-poisoned elements?)"
    bound = tol if tol is not None else REL_TOL[dtype or out.dtype]
    err = rel_error(out, ref)
    assert err <= bound, f"relative error {err:.3e} > {bound:.1e} ({out.dtype})"


def poisoned(shape, dtype, device=DEVICE) -> torch.Tensor:
    """An output buffer filled with NaN, so any element a kernel forgets to write fails the test."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def non_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values as ``t`` in a non-contiguous view (every other column of a wider buffer)."""
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    view = wide[..., ::2]
    assert not view.is_contiguous() or t.shape[-1] == 1
    return view



class Holder(torch.nn.Module):
    """A one-layer model (``.proj``) so PEFT can wrap a single layer."""

    def __init__(self, proj):
        super().__init__()
        self.proj = proj


def bnb_linear4bit(in_features: int, out_features: int, with_bias: bool):
    """A double-quantised NF4 ``bitsandbytes.nn.Linear4bit`` with fp32 compute, from a random dense layer."""
    bnb = pytest.importorskip("bitsandbytes")
    dense = torch.nn.Linear(in_features, out_features, bias=with_bias)
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=with_bias, compute_dtype=torch.float32,
                              compress_statistics=True, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, compress_statistics=True,
                                     quant_type="nf4")
    if with_bias:
        layer.bias = torch.nn.Parameter(dense.bias.data.clone())
    return layer.to(DEVICE)


def layer_grads(layer, x, dy, params):
    """``(layer(x), dx, *d params)`` for the upstream gradient ``dy``."""
    x = x.detach().requires_grad_()  # keeps a non-contiguous view as it is
    y = layer(x)
    return (y, *torch.autograd.grad(y, [x, *params], dy))


# Odd sizes: not multiples of any block size a kernel uses.
ODD_SHAPES = [(1, 33, 17), (7, 65, 47), (19, 129, 95)]  # (M, in, out)


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture
def triton_backend(monkeypatch):
    """Force the Triton kernels (interpreter on CPU)."""
    monkeypatch.setenv("FASTPEFT_BACKEND", "triton")


@pytest.fixture
def reference_backend(monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "reference")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def set_bnb_cpu_kernel_check(monkeypatch, supported: bool) -> None:
    """Make bitsandbytes' feature check for its CPU 4-bit kernel (AVX512-BF16, read by every ``Linear4bit`` built
    afterwards as ``support_avx512bf16_for_cpu``) answer ``supported``, whatever this CPU has."""
    modules = pytest.importorskip("bitsandbytes.nn.modules")
    monkeypatch.setattr(modules, "has_avx512bf16", lambda: supported)


@pytest.fixture(autouse=True)
def _bnb_cpu_kernel_off(monkeypatch):
    """Where bitsandbytes' feature check holds (AVX512-BF16 CPUs), its eval-mode no-grad forward repacks a 4-bit
    layer and multiplies in bf16 with its own kernel: ~3e-3 from the exact NF4 product, so a test comparing with
    the exact product would pass or fail by host. Every test runs with the check off, the exact product on any
    host; the tests of the kernel's path turn it on (``bnb_cpu_kernel_on``)."""
    if importlib.util.find_spec("bitsandbytes") is not None:
        set_bnb_cpu_kernel_check(monkeypatch, False)


@pytest.fixture
def bnb_cpu_kernel_on(monkeypatch):
    """bitsandbytes' feature check for its CPU 4-bit kernel forced on: its eval-mode no-grad forward repacks the
    layer and runs that path (the kernel where this CPU has AVX512-BF16, else bitsandbytes' generic
    ``gemv_4bit`` over the repacked layout)."""
    set_bnb_cpu_kernel_check(monkeypatch, True)


def tiny_llama_config():
    from transformers import LlamaConfig

    # hidden and intermediate sizes are multiples of 64 so bitsandbytes' CPU dequantiser, which
    # mishandles blocks spanning rows (blocksize > in_features), gives correct results for PEFT.
    return LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-6, tie_word_embeddings=False, pad_token_id=0,
    )


def make_tiny_llama(dtype=torch.float32, seed: int = 0):
    """A freshly initialised tiny Llama (no download), in eval mode."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config()).to(dtype).eval()


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """The tiny Llama saved to disk (safetensors), for from_pretrained-based loading."""
    path = tmp_path_factory.mktemp("tiny_llama")
    make_tiny_llama().save_pretrained(path)
    return path


def load_tiny_llama_4bit(path, compute_dtype=torch.float32):
    """The tiny Llama loaded through bitsandbytes NF4 with double quantisation (works on CPU); the weights left
    dense (embeddings, norms, lm_head) in float32, as saved (transformers 4 would make them float16 unless told)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.float32,
                                                device_map={"": DEVICE.type}).eval()


@pytest.fixture
def tiny_llama_4bit(tiny_llama_dir):
    return load_tiny_llama_4bit(tiny_llama_dir)


def save_peft_adapter(path, peft_config, seed: int = 0):
    """Save a PEFT adapter for the tiny Llama to ``path`` with every adapter weight random and non-zero
    (PEFT initialises lora_B to zero and IA3 / DoRA vectors to the identity, which would hide bugs)."""
    from peft import get_peft_model

    randomise_adapters(get_peft_model(make_tiny_llama(), peft_config), seed, 0.2).save_pretrained(path)
    return path


def randomise_adapters(model, seed: int, std: float):
    """Every trainable tensor of a PEFT model random and non-zero, around 1 for DoRA magnitudes and IA3 vectors
    and 0 otherwise, with standard deviation ``std`` (PEFT starts lora_B at 0 and IA3 / DoRA at the identity,
    which would hide a wrong adapter path); returns ``model``."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                centre = 1.0 if ("magnitude" in name or "ia3_l" in name) else 0.0
                param.copy_(centre + std * torch.randn(param.shape, generator=generator))
    return model


def load_example(name: str):
    """``examples/<name>.py`` as a module (the examples are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------- accelerated PEFT models
def lora_config(**kwargs):
    """PEFT's ``LoraConfig``: rank 4, alpha 8, random B (a zero B would hide an ignored adapter), all linear layers;
    ``kwargs`` override."""
    import peft

    return peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "init_lora_weights": False, "target_modules": "all-linear",
                              **kwargs})


def peft_model(config, model=None):
    """``peft.get_peft_model`` over ``model`` (a fresh tiny Llama by default)."""
    import peft

    return peft.get_peft_model(make_tiny_llama() if model is None else model, config)


def loss_and_grads(model, tokens):
    """``(logits, {name: gradient})`` of a squared-logits loss, for every trainable parameter."""
    model.zero_grad(set_to_none=True)
    logits = model(tokens).logits
    logits.float().pow(2).mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@contextlib.contextmanager
def counting_fused_ops(*extra):
    """Counts the calls of fastpeft's ops from accelerated PEFT layers (so a test fails if PEFT's forward ran): the
    list of the ops' names, one per call. ``extra``: more ``(module, function name, label)`` to count."""
    from fastpeft.integration import fused_forward

    targets = [(fused_forward, name, name) for name in ("lora_linear", "dora_linear", "ia3_linear")] + list(extra)
    calls = []
    originals = [getattr(module, name) for module, name, _ in targets]
    for (module, name, label), op in zip(targets, originals):
        setattr(module, name, lambda *a, _op=op, _label=label, **k: calls.append(_label) or _op(*a, **k))
    try:
        yield calls
    finally:
        for (module, name, _), op in zip(targets, originals):
            setattr(module, name, op)
