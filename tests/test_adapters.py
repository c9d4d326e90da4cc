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


class _Deadline:
    """Fails the test instead of hanging when the block runs over ``seconds`` (SIGALRM: the main thread, Unix)."""

    def __init__(self, seconds):
        self.seconds = seconds

    def __enter__(self):
        import signal

        def expire(signum, frame):
            raise TimeoutError(f"still running after {self.seconds} s")

        self.previous = signal.signal(signal.SIGALRM, expire)
        signal.alarm(self.seconds)

    def __exit__(self, *exc):
        import signal

        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.previous)


def _one_layer_adapter(module: str, **config) -> Adapter:
    prefix = f"base_model.model.{module}"
    return Adapter({"peft_type": "LORA", "r": 2, "lora_alpha": 8, **config},
                   {f"{prefix}.lora_A.weight": torch.randn(2, 8), f"{prefix}.lora_B.weight": torch.randn(6, 2)})


def test_patterns_meet_only_the_models_names_and_their_cost_is_bounded(monkeypatch):
    """A file's module name that the model lacks is refused before any pattern runs (``(a+)+$`` against 34 'a's and
    an 'X' backtracks for hours in Python's re); a pattern that backtracks without end on one of the model's own
    names is a ValueError after the time bound, not a hang; an invalid pattern is a ValueError."""
    import fastpeft
    from fastpeft import MultiLoraModel

    hostile = _one_layer_adapter("a" * 34 + "X", alpha_pattern={"(a+)+$": 4})
    with _Deadline(30):
        with pytest.raises(ValueError, match="which this model does not have"):
            fastpeft.load_model_adapter(torch.nn.Sequential(torch.nn.Linear(8, 6)), hostile)
        with pytest.raises(ValueError, match="which this model does not have|does not adapt"):
            MultiLoraModel(torch.nn.Sequential(torch.nn.Linear(8, 6)), {"x": hostile})

    name = "a" * 30
    model = torch.nn.Module()
    setattr(model, name, torch.nn.Linear(8, 6))
    monkeypatch.setattr(fastpeft.adapters, "PATTERN_TIMEOUT_S", 0.05)
    with _Deadline(60), pytest.raises(ValueError, match=r"takes over 0.05 s to match the module name 'a{30}'"):
        fastpeft.load_model_adapter(model, _one_layer_adapter(name, alpha_pattern={"(a|a)+b": 4}))
    with pytest.raises(ValueError, match="is not a valid regular expression"):
        fastpeft.load_model_adapter(model, _one_layer_adapter(name, alpha_pattern={"(a": 4}))
    summary = fastpeft.load_model_adapter(model, _one_layer_adapter(name, alpha_pattern={"a+": 4}))
    assert list(summary.replaced) == [name] and getattr(model, name).scaling == 2.0


def test_an_adapter_without_tensors_is_an_error(tmp_path):
    """An adapter file with no tensors adapts nothing: loading it says so (it was accepted with 0 layers)."""
    import fastpeft
    from fastpeft import MultiLoraModel
    from safetensors.torch import save_file

    (tmp_path / CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 8}))
    save_file({}, str(tmp_path / WEIGHTS_NAME), metadata={"format": "pt"})
    adapter = load_adapter(tmp_path)
    for load in (lambda: fastpeft.load_model_adapter(torch.nn.Sequential(torch.nn.Linear(8, 6)), tmp_path),
                 lambda: MultiLoraModel(torch.nn.Sequential(torch.nn.Linear(8, 6)), {"x": tmp_path}),
                 adapter.modules):
        with pytest.raises(ValueError, match="holds no tensors"):
            load()
