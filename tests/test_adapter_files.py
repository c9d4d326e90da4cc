"""fastpeft.save_model_adapter / load_model_adapter without peft on the tiny Llama: PEFT loading what fastpeft
saved and fastpeft loading what PEFT saved (LoRA, DoRA, IA3; dense and 4-bit), a second adapter replacing the
first, and every bad file a clear error before the model changes."""

import pytest
import torch

import fastpeft
from fastpeft.nn import IA3Linear

from conftest import assert_rel_close, load_tiny_llama_4bit, make_tiny_llama, save_peft_adapter

TOKENS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _randomise_adapter(model):
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape))


@pytest.mark.parametrize("use_dora", [False, True])
def test_peft_loads_what_fastpeft_saved(tmp_path, use_dora):
    peft = pytest.importorskip("peft")
    model = make_tiny_llama()
    fastpeft.inject(model, r=4, alpha=16, target_modules=LINEAR, use_dora=use_dora, use_rslora=True)
    _randomise_adapter(model)
    fastpeft.save_model_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(make_tiny_llama(), tmp_path)
    assert theirs.peft_config["default"].use_dora == use_dora
    assert_rel_close(model(TOKENS).logits, theirs(TOKENS).logits)


@pytest.mark.parametrize("kind", ["lora", "dora", "ia3"])
def test_fastpeft_loads_what_peft_saved(tmp_path, kind):
    peft = pytest.importorskip("peft")
    if kind == "ia3":
        config = peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    else:
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=LINEAR, use_dora=kind == "dora")
    save_peft_adapter(tmp_path / "peft", config)
    theirs = peft.PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "peft")
    ours = make_tiny_llama()
    summary = fastpeft.load_model_adapter(ours, tmp_path / "peft")
    assert set(summary.replaced.values()) == {kind}
    assert_rel_close(ours(TOKENS).logits, theirs(TOKENS).logits)
    # loading again goes into the fastpeft layers; saving gives PEFT's tensors back
    fastpeft.load_model_adapter(ours, tmp_path / "peft")
    fastpeft.save_model_adapter(ours, tmp_path / "ours")
    saved, original = fastpeft.load_adapter(tmp_path / "ours"), fastpeft.load_adapter(tmp_path / "peft")
    assert saved.tensors.keys() == original.tensors.keys()
    assert all(torch.equal(saved.tensors[k], original.tensors[k]) for k in saved.tensors)


def test_load_into_4bit(tmp_path, tiny_llama_dir):
    peft = pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    save_peft_adapter(tmp_path, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"]))
    # train mode (no dropout): bitsandbytes' eval-mode CPU path computes in bf16-rounded form
    theirs = peft.PeftModel.from_pretrained(load_tiny_llama_4bit(tiny_llama_dir), tmp_path).train()
    ours = load_tiny_llama_4bit(tiny_llama_dir).train()
    assert set(fastpeft.load_model_adapter(ours, tmp_path).replaced.values()) == {"lora+nf4"}
    assert_rel_close(ours(TOKENS).logits, theirs(TOKENS).logits)


def test_save_without_adapter_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no fastpeft adapter to save"):
        fastpeft.save_model_adapter(make_tiny_llama(), tmp_path)


def _saved_adapter(tmp_path):
    model = make_tiny_llama()
    fastpeft.inject(model, r=4, target_modules=["q_proj"])
    fastpeft.save_model_adapter(model, tmp_path)
    return fastpeft.load_adapter(tmp_path)


def test_load_mismatched_shapes(tmp_path):
    adapter = _saved_adapter(tmp_path)
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    adapter.tensors[key] = torch.zeros(4, 65)
    model = make_tiny_llama()
    with pytest.raises(ValueError, match=r"model.layers.1.self_attn.q_proj: lora_A \(4, 65\) and lora_B \(64, 4\) do "
                                         r"not fit the layer \(in=64, out=64\)"):
        fastpeft.load_model_adapter(model, adapter)
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear  # checked before changing anything
    # into already-adapted layers of another rank
    injected = make_tiny_llama()
    fastpeft.inject(injected, r=2, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="adapter has rank 4, the layer rank 2"):
        fastpeft.load_model_adapter(injected, _saved_adapter(tmp_path / "again"))


def test_load_wrong_modules_and_dtypes(tmp_path):
    adapter = _saved_adapter(tmp_path)
    renamed = fastpeft.Adapter(adapter.config, {k.replace("q_proj", "qq_proj"): v for k, v in adapter.tensors.items()})
    with pytest.raises(ValueError, match="adapts 'model.layers.0.self_attn.qq_proj', which this model does not have"):
        fastpeft.load_model_adapter(make_tiny_llama(), renamed)
    on_norm = fastpeft.Adapter(adapter.config, {k.replace("self_attn.q_proj", "input_layernorm"): v
                                                for k, v in adapter.tensors.items()})
    with pytest.raises(TypeError, match="adapts 'model.layers.0.input_layernorm', a LlamaRMSNorm"):
        fastpeft.load_model_adapter(make_tiny_llama(), on_norm)
    as_int = fastpeft.Adapter(adapter.config, {k: v.to(torch.int32) for k, v in adapter.tensors.items()})
    with pytest.raises(TypeError, match="lora_A has dtype torch.int32; adapter tensors must be floating point"):
        fastpeft.load_model_adapter(make_tiny_llama(), as_int)


def test_ia3_layers_copy_into_existing(tmp_path):
    peft = pytest.importorskip("peft")
    save_peft_adapter(tmp_path, peft.IA3Config(target_modules=["down_proj"], feedforward_modules=["down_proj"]))
    model = make_tiny_llama()
    fastpeft.load_model_adapter(model, tmp_path)
    assert isinstance(model.model.layers[0].mlp.down_proj, IA3Linear)
    lora = make_tiny_llama()
    fastpeft.inject(lora, target_modules=["down_proj"])
    with pytest.raises(ValueError, match="is a LoraLinear; the adapter's entry is of another kind"):
        fastpeft.load_model_adapter(lora, tmp_path)


def test_loading_a_second_adapter_replaces_the_first(tmp_path):
    """A (q, v) then B (q only): the model is B's, as PEFT loads B alone; A's v_proj layers go back to their own
    base layer (unmerged first when merged), and save writes B's tensors under B's config."""
    peft = pytest.importorskip("peft")
    save_peft_adapter(tmp_path / "a", peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), seed=1)
    save_peft_adapter(tmp_path / "b", peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj"]), seed=2)
    ours = make_tiny_llama()
    v_base = ours.model.layers[0].self_attn.v_proj
    fastpeft.load_model_adapter(ours, tmp_path / "a")
    ours.model.layers[0].self_attn.v_proj.merge()
    summary = fastpeft.load_model_adapter(ours, tmp_path / "b")
    assert ours.model.layers[0].self_attn.v_proj is v_base and type(v_base) is torch.nn.Linear
    assert set(summary.replaced) == {f"model.layers.{i}.self_attn.q_proj" for i in range(2)}
    assert summary.removed == {f"model.layers.{i}.self_attn.v_proj": "lora" for i in range(2)}
    theirs = peft.PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "b")
    assert_rel_close(ours(TOKENS).logits, theirs(TOKENS).logits)
    fastpeft.save_model_adapter(ours, tmp_path / "saved")
    saved, b = fastpeft.load_adapter(tmp_path / "saved"), fastpeft.load_adapter(tmp_path / "b")
    assert saved.tensors.keys() == b.tensors.keys() and saved.config["target_modules"] == b.config["target_modules"]
