"""PEFT adapter files read and written without peft, round-tripping exactly with PEFT's own save/load."""

import json
import math

import pytest
import torch

from fastpeft.adapters import Adapter, CONFIG_NAME, WEIGHTS_NAME, load_adapter, save_adapter

from conftest import make_tiny_llama, save_peft_adapter


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    from peft import LoraConfig

    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                        rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 4})
    return save_peft_adapter(tmp_path_factory.mktemp("lora"), config)


def test_round_trip_through_peft_is_exact(lora_dir, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    adapter = load_adapter(lora_dir)
    save_adapter(adapter, tmp_path)
    assert json.loads((tmp_path / CONFIG_NAME).read_text()) == json.loads((lora_dir / CONFIG_NAME).read_text())
    ours, theirs = load_file(tmp_path / WEIGHTS_NAME), load_file(lora_dir / WEIGHTS_NAME)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    # PEFT loads what we wrote and saves it back unchanged
    model = PeftModel.from_pretrained(make_tiny_llama(), tmp_path)
    model.save_pretrained(tmp_path / "again")
    again = load_file(tmp_path / "again" / WEIGHTS_NAME)
    assert again.keys() == theirs.keys() and all(torch.equal(again[k], theirs[k]) for k in again)


def test_modules_give_peft_scalings(lora_dir):
    from peft import PeftModel

    modules = load_adapter(lora_dir).modules()
    peft_model = PeftModel.from_pretrained(make_tiny_llama(), lora_dir)
    assert len(modules) == 6
    for path, module in modules.items():
        layer = peft_model.base_model.model.get_submodule(path)
        assert module.scaling == layer.scaling["default"], path
        assert torch.equal(module.lora_a, layer.lora_A["default"].weight)
        assert torch.equal(module.lora_b, layer.lora_B["default"].weight)
    assert modules["model.layers.0.mlp.down_proj"].rank == 2
    assert modules["model.layers.1.self_attn.v_proj"].scaling == 4 / 8


def test_rslora_dora_and_ia3_modules(tmp_path):
    from peft import IA3Config, LoraConfig

    dora = load_adapter(save_peft_adapter(tmp_path / "dora", LoraConfig(
        r=4, lora_alpha=8, use_rslora=True, use_dora=True, target_modules=["q_proj"])))
    module = dora.modules()["model.layers.0.self_attn.q_proj"]
    assert module.scaling == 8 / math.sqrt(4) and module.magnitude.shape == (64,)
    ia3 = load_adapter(save_peft_adapter(tmp_path / "ia3", IA3Config(
        target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])))
    modules = ia3.modules()
    assert modules["model.layers.1.mlp.down_proj"].is_feedforward
    assert modules["model.layers.1.mlp.down_proj"].ia3_scale.shape == (128,)
    assert not modules["model.layers.1.self_attn.k_proj"].is_feedforward


def test_pickle_and_unsupported_files_are_refused(tmp_path):
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors"):
        load_adapter(tmp_path)
    (tmp_path / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="pickle file, which fastpeft refuses"):
        load_adapter(tmp_path)
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        load_adapter(tmp_path / "missing")
    with pytest.raises(ValueError, match="'PREFIX_TUNING' is not supported"):
        Adapter({"peft_type": "PREFIX_TUNING"}).modules()
    with pytest.raises(ValueError, match="unsupported tensor 'base_model.model.lm_head.weight'"):
        Adapter({"peft_type": "LORA"}, {"base_model.model.lm_head.weight": torch.zeros(1)}).modules()
