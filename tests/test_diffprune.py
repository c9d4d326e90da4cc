"""fastpeft.diffprune on whole models, and the DiffPruning references in fastpeft.reference: hard-concrete gates
at closed-form points, the projection's exact count and tie order, inject (also as fastpeft.inject(method=
"diffprune")), training the tiny Llama (dense and NF4) with the L0 penalty, global and per-layer projection, the
short fine-tune with the mask fixed, save / load round trips, hostile files, merge and bad input."""

import json
import math

import pytest
import torch
from torch import nn

import fastpeft
from fastpeft import diffprune, reference
from fastpeft.nn import DiffPruneLinear, LoraLinear

from conftest import load_example, load_tiny_llama_4bit, make_tiny_llama

example = load_example("train_tiny_llama")
diffprune_example = load_example("diffprune_tiny_llama")


# ---------------------------------------------------------------------------------------------- references
def test_hard_concrete_closed_form_points():
    log_alpha = torch.tensor([0.0, 0.0, 2.0, -50.0, 50.0], dtype=torch.float64)
    u = torch.tensor([0.5, 0.75, 0.5, 0.5, 0.5], dtype=torch.float64)
    z = reference.hard_concrete_sample(log_alpha, u, 1.0, -1.5, 1.5)
    # s = σ(log(u / (1 − u)) + α): 0.5, 0.75, σ(2); z = 3 s − 1.5 clamped to [0, 1]
    expected = torch.tensor([0.0, 0.75, min(1.0, 3 * torch.sigmoid(torch.tensor(2.0)).item() - 1.5), 0.0, 1.0],
                            dtype=torch.float64)
    torch.testing.assert_close(z, expected)
    # the temperature divides the log-odds: β = 1/2 doubles them
    torch.testing.assert_close(reference.hard_concrete_sample(torch.tensor([0.25], dtype=torch.float64),
                                                              torch.tensor([0.5], dtype=torch.float64), 0.5, -0.1, 1.1),
                               torch.sigmoid(torch.tensor([0.5], dtype=torch.float64)) * 1.2 - 0.1)
    torch.testing.assert_close(reference.hard_concrete_eval(torch.tensor([0.0, 1.0, -9.0], dtype=torch.float64),
                                                            -1.5, 1.5),
                               torch.tensor([0.0, 3 * torch.sigmoid(torch.tensor(1.0)).item() - 1.5, 0.0],
                                            dtype=torch.float64))
    # expected L0 of one gate: P(z > 0) = σ(α − β log(−γ/ζ))
    torch.testing.assert_close(reference.expected_l0(torch.tensor([1.0], dtype=torch.float64), 2 / 3, -0.1, 1.1),
                               torch.sigmoid(torch.tensor(1.0 - 2 / 3 * math.log(0.1 / 1.1), dtype=torch.float64)))


def test_expected_l0_is_the_sampled_nonzero_rate():
    log_alpha = torch.tensor([-2.0, 0.0, 1.5], dtype=torch.float64)
    u = torch.rand(200_000, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    rate = (reference.hard_concrete_sample(log_alpha, u, 2 / 3, -0.1, 1.1) > 0).double().mean(0).sum()
    assert abs(rate - reference.expected_l0(log_alpha, 2 / 3, -0.1, 1.1)) < 0.01


@pytest.mark.parametrize("numel, sparsity, count", [(10, 0.3, 3), (10, 0.25, 3), (10, 0.24, 2), (1000, 0.005, 5),
                                                    (7, 1.0, 7), (3, 1e-9, 1), (100, 0.125, 13)])
def test_projection_count(numel, sparsity, count):
    assert reference.projection_count(numel, sparsity) == count
    mask = reference.magnitude_projection(torch.randn(numel, dtype=torch.float64), sparsity)
    assert int(mask.sum()) == count


def test_magnitude_projection_ties_and_signs():
    delta = torch.tensor([[1.0, -3.0, 3.0], [0.0, 3.0, -1.0]])
    # |δ| = 3 three times: the lower row-major indices first
    assert reference.magnitude_projection(delta, 2 / 6).tolist() == [[False, True, True], [False, False, False]]
    assert reference.magnitude_projection(delta, 4 / 6).tolist() == [[True, True, True], [False, True, False]]
    flat = torch.zeros(10)
    assert reference.magnitude_projection(flat, 0.3).nonzero().flatten().tolist() == [0, 1, 2]
    assert reference.magnitude_projection(flat, 1.0).all()


@pytest.mark.parametrize("sparsity", [0, 0.0, -0.1, 1.01, float("nan"), float("inf"), True, "0.1", None])
def test_projection_rejects_sparsity_outside_0_1(sparsity):
    with pytest.raises(ValueError, match="sparsity"):
        reference.magnitude_projection(torch.randn(10), sparsity)


def test_projection_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        reference.magnitude_projection(torch.tensor([1.0, float("nan")]), 0.5)


# ---------------------------------------------------------------------------------------------- inject
def _trainable(model):
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_inject_all_linear():
    model = make_tiny_llama()
    summary = diffprune.inject(model)
    layers = diffprune.diffprune_layers(model)
    assert len(layers) == 14 and set(summary.replaced) == set(layers)
    assert set(summary.replaced.values()) == {"diffprune"}
    assert "lm_head" not in layers and isinstance(model.lm_head, nn.Linear)
    assert _trainable(model) == {f"{n}.{p}" for n in layers for p in ("diff_weight", "diff_log_alpha")}


def test_public_inject_method_diffprune():
    model = make_tiny_llama()
    summary = fastpeft.inject(model, method="diffprune", target_modules=["q_proj", "v_proj"], structured=True,
                              sparsity=0.01)
    assert set(summary.replaced) == {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, DiffPruneLinear) and layer.structured is True
    assert model._fastpeft_diffprune_config["sparsity"] == 0.01
    with pytest.raises(ValueError, match=r"\['r'\] do not apply"):
        fastpeft.inject(make_tiny_llama(), r=4, method="diffprune")
    with pytest.raises(ValueError, match="unknown method"):
        fastpeft.inject(make_tiny_llama(), method="bitfit")
    with pytest.raises(TypeError, match="sparsity"):
        fastpeft.inject(make_tiny_llama(), sparsity=0.1)
    # LoRA's path is unchanged
    assert set(fastpeft.inject(make_tiny_llama(), r=2).replaced.values()) == {"lora"}


def test_inject_bad_input():
    with pytest.raises(ValueError, match="sparsity"):
        diffprune.inject(make_tiny_llama(), sparsity=0.0)
    with pytest.raises(ValueError, match="sparsity"):
        diffprune.inject(make_tiny_llama(), sparsity=1.5)
    with pytest.raises(ValueError, match="l0_lambda"):
        diffprune.inject(make_tiny_llama(), l0_lambda=-1.0)
    with pytest.raises(ValueError, match="projection"):
        diffprune.inject(make_tiny_llama(), projection="row")
    with pytest.raises(ValueError, match="gamma < 0"):
        diffprune.inject(make_tiny_llama(), gamma=0.5)
    with pytest.raises(ValueError, match="matched no linear layer"):
        diffprune.inject(make_tiny_llama(), target_modules=["nope"])
    model = make_tiny_llama()
    with pytest.raises(ValueError, match="structured"):  # 64 and 128 inputs: a group of 48 fits neither
        diffprune.inject(model, structured=48)
    assert not diffprune.diffprune_layers(model)  # nothing changed
    diffprune.inject(model)
    with pytest.raises(ValueError, match="already has fastpeft layers"):
        diffprune.inject(model)
    lora_model = make_tiny_llama()
    fastpeft.inject(lora_model, r=2)
    with pytest.raises(ValueError, match="already has fastpeft layers"):
        diffprune.inject(lora_model)
    with pytest.raises(ValueError, match="no DiffPruning layers"):
        diffprune.l0_penalty(make_tiny_llama())


def test_inject_refuses_a_peft_model():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(make_tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="PEFT model"):
        diffprune.inject(model)


def test_l0_penalty_is_lambda_times_the_layer_sum():
    model = make_tiny_llama()
    diffprune.inject(model, l0_lambda=0.5, structured=16)
    layers = diffprune.diffprune_layers(model).values()
    total = sum(layer.l0_penalty() for layer in layers)
    torch.testing.assert_close(diffprune.l0_penalty(model), 0.5 * total)
    torch.testing.assert_close(diffprune.l0_penalty(model, l0_lambda=2.0), 2.0 * total)
    diffprune.l0_penalty(model).backward()
    assert all(layer.diff_log_alpha.grad is not None and layer.diff_weight.grad is None for layer in layers)


# ---------------------------------------------------------------------------------------------- training
STEPS = 20


def _base(quantize_4bit, tiny_llama_dir):
    return (load_tiny_llama_4bit(tiny_llama_dir) if quantize_4bit else make_tiny_llama()).train()


def _train(model, steps, penalty=True):
    return diffprune_example.train(model, example.counting_batches(steps), lr=1e-2, penalty=penalty)


def _logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=example.counting_batches(1)[0]).logits


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Per base kind, a tiny Llama trained 20 steps with DiffPruning and projected to 1 % globally, and the loss
    curve of the training."""
    cache = {}

    def get(quantize_4bit, tiny_llama_dir):
        if quantize_4bit not in cache:
            torch.manual_seed(0)
            model = _base(quantize_4bit, tiny_llama_dir)
            diffprune.inject(model, sparsity=0.01, l0_lambda=1e-4)
            losses = _train(model, STEPS)
            diffprune.project(model)
            cache[quantize_4bit] = model, losses
        return cache[quantize_4bit]

    return get


@pytest.mark.parametrize("quantize_4bit", [False, True], ids=["dense", "4bit"])
def test_training_projection_and_fine_tune(quantize_4bit, tiny_llama_dir):
    if quantize_4bit:
        pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    model = _base(quantize_4bit, tiny_llama_dir)
    diffprune.inject(model, sparsity=0.01, l0_lambda=1e-4)
    base_params = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    penalty_before = diffprune.l0_penalty(model).item()
    losses = _train(model, STEPS)
    assert losses[-1] < losses[0] - 0.5, f"the loss did not fall: {losses}"
    assert diffprune.l0_penalty(model).item() < penalty_before  # the gates' log-odds moved down
    for name, param in model.named_parameters():
        if name in base_params:
            assert torch.equal(param, base_params[name]), f"{name} changed: the base must stay frozen"

    layers = diffprune.diffprune_layers(model)
    total = sum(layer.in_features * layer.out_features for layer in layers.values())
    kept = diffprune.project(model)
    assert sum(kept.values()) == reference.projection_count(total, 0.01) == sum(
        layer.delta_values.numel() for layer in layers.values())
    assert _trainable(model) == {f"{n}.delta_values" for n in layers}
    masks = {n: (layer.delta_row_ptr.clone(), layer.delta_col_idx.clone()) for n, layer in layers.items()}
    fine_tune = _train(model, 5, penalty=False)
    assert fine_tune[-1] < fine_tune[0], f"the fine-tune did not lower the loss: {fine_tune}"
    for name, layer in layers.items():
        assert torch.equal(layer.delta_row_ptr, masks[name][0]) and torch.equal(layer.delta_col_idx, masks[name][1])
    with pytest.raises(ValueError, match="projected already"):
        diffprune.project(model)


def test_global_projection_ranks_all_layers_together():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    diffprune.inject(model, target_modules=["0", "1"], sparsity=0.25)
    first, second = model[0], model[1]
    with torch.no_grad():
        first.diff_weight.fill_(1.0)
        second.diff_weight.fill_(2.0)
        second.diff_weight[0, 0] = 1.0  # ties with every entry of the first layer: the first layer wins them
        first.diff_log_alpha.fill_(10.0)  # eval gate 1: δ = w
        second.diff_log_alpha.fill_(10.0)
    kept = diffprune.project(model)
    assert kept == {"0": 0, "1": 8}  # 25 % of 32 entries: the 8 largest, all in the second layer
    assert second.delta_weight().tolist()[0][0] == 0.0  # its one entry equal to the first layer's lost
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    diffprune.inject(model, target_modules=["0", "1"], sparsity=0.25)
    with torch.no_grad():
        for layer in model:
            layer.diff_weight.fill_(1.0)
            layer.diff_log_alpha.fill_(10.0)
    assert diffprune.project(model) == {"0": 8, "1": 0}  # all tied: the earlier layer's entries first
    assert model[0].delta_row_ptr.tolist() == [0, 4, 8, 8, 8]


def test_per_layer_projection_is_exact_per_layer():
    model = make_tiny_llama()
    diffprune.inject(model, sparsity=0.03, projection="layer")
    with torch.no_grad():
        for layer in diffprune.diffprune_layers(model).values():
            layer.diff_weight.normal_()
    kept = diffprune.project(model)
    for name, layer in diffprune.diffprune_layers(model).items():
        assert kept[name] == reference.projection_count(layer.in_features * layer.out_features, 0.03)
    model = make_tiny_llama()
    diffprune.inject(model)
    with pytest.raises(ValueError, match="sparsity"):
        diffprune.project(model, sparsity=0.0)
    with pytest.raises(ValueError, match="projection"):
        diffprune.project(model, projection="rows")


# ---------------------------------------------------------------------------------------------- save / load / merge
@pytest.mark.parametrize("quantize_4bit", [False, True], ids=["dense", "4bit"])
def test_save_load_round_trip(quantize_4bit, trained, tiny_llama_dir, tmp_path):
    if quantize_4bit:
        pytest.importorskip("bitsandbytes")
    model, _ = trained(quantize_4bit, tiny_llama_dir)
    diffprune.save(model, tmp_path)
    config = json.loads((tmp_path / diffprune.CONFIG_NAME).read_text())
    assert config["format"] == "fastpeft-diffprune" and config["version"] == 1
    assert config["layers"]["model.layers.0.mlp.down_proj"] == [64, 128]
    assert config["sparsity"] == 0.01 and config["projection"] == "global"

    fresh = _base(quantize_4bit, tiny_llama_dir)
    summary = diffprune.load(fresh, tmp_path)
    assert set(summary.replaced) == set(diffprune.diffprune_layers(model))
    assert torch.equal(_logits(fresh), _logits(model))
    assert _trainable(fresh) == {f"{n}.delta_values" for n in summary.replaced}
    inference = _base(quantize_4bit, tiny_llama_dir)
    diffprune.load(inference, tmp_path, trainable=False)
    assert not _trainable(inference)
    assert torch.equal(_logits(inference), _logits(model))


def test_load_replaces_layers_the_file_does_not_name(trained, tiny_llama_dir, tmp_path):
    model, _ = trained(False, tiny_llama_dir)
    diffprune.save(model, tmp_path)
    other = make_tiny_llama()
    diffprune.inject(other, target_modules="all-linear")
    config = json.loads((tmp_path / diffprune.CONFIG_NAME).read_text())
    dropped = "model.layers.1.mlp.down_proj"
    del config["layers"][dropped]
    (tmp_path / diffprune.CONFIG_NAME).write_text(json.dumps(config))
    _drop_tensors(tmp_path, dropped + ".")
    summary = diffprune.load(other, tmp_path)
    assert list(summary.removed) == [dropped]
    assert type(other.get_submodule(dropped)) is nn.Linear
    assert all(layer.projected for layer in diffprune.diffprune_layers(other).values())


def _drop_tensors(path, prefix):
    from safetensors.torch import load_file, save_file

    file = path / diffprune.WEIGHTS_NAME
    tensors = {k: v for k, v in load_file(str(file)).items() if not k.startswith(prefix)}
    save_file(tensors, str(file))


def _edit_tensors(path, edit):
    from safetensors.torch import load_file, save_file

    file = path / diffprune.WEIGHTS_NAME
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file))


def _edit_config(path, edit):
    file = path / diffprune.CONFIG_NAME
    config = json.loads(file.read_text())
    edit(config)
    file.write_text(json.dumps(config))


def _hostile_cases():
    name = "model.layers.0.self_attn.q_proj"

    def rename(config):
        config["layers"]["model.layers.9.self_attn.q_proj"] = config["layers"].pop(name)

    def wrong_shape(config):
        config["layers"][name] = [64, 65]

    def extra_tensor(tensors):
        tensors["model.layers.0.self_attn.q_proj.extra"] = torch.zeros(1)

    def bad_column(tensors):
        tensors[name + ".col_idx"] = torch.full_like(tensors[name + ".col_idx"], 64)

    def short_values(tensors):
        tensors[name + ".values"] = tensors[name + ".values"][:-1].clone()

    def not_a_layer(config):
        config["layers"]["model.norm"] = [64, 64]

    return {
        "unknown layer": (rename, None, ValueError, "does not have"),
        "wrong shape": (wrong_shape, None, ValueError, r"\(64, 65\)"),
        "not a linear layer": (not_a_layer, None, TypeError, "LlamaRMSNorm"),
        "extra tensor": (None, extra_tensor, ValueError, "belong to no layer"),
        "column out of range": (None, bad_column, ValueError, "invalid"),
        "values of another length": (None, short_values, ValueError, "invalid"),
        "other format": (lambda c: c.update(format="peft"), None, ValueError, "not a fastpeft DiffPruning"),
        "other version": (lambda c: c.update(version=2), None, ValueError, "version 2"),
        "bad layer list": (lambda c: c.update(layers=[1, 2]), None, ValueError, "module path"),
    }


@pytest.mark.parametrize("case", list(_hostile_cases()))
def test_hostile_files_are_refused_before_anything_changes(case, trained, tiny_llama_dir, tmp_path):
    model, _ = trained(False, tiny_llama_dir)
    diffprune.save(model, tmp_path)
    edit_config, edit_tensors, error, message = _hostile_cases()[case]
    if edit_config is not None:
        _edit_config(tmp_path, edit_config)
    if edit_tensors is not None:
        _edit_tensors(tmp_path, edit_tensors)
    fresh = make_tiny_llama()
    before = _logits(fresh)
    with pytest.raises(error, match=message):
        diffprune.load(fresh, tmp_path)
    assert not diffprune.diffprune_layers(fresh)
    assert torch.equal(_logits(fresh), before)


def test_unreadable_files(trained, tiny_llama_dir, tmp_path):
    model, _ = trained(False, tiny_llama_dir)
    diffprune.save(model, tmp_path)
    weights = tmp_path / diffprune.WEIGHTS_NAME
    weights.write_bytes(b"\x80\x04this is a pickle, not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        diffprune.load(make_tiny_llama(), tmp_path)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=diffprune.WEIGHTS_NAME):
        diffprune.load(make_tiny_llama(), tmp_path)
    diffprune.save(model, tmp_path / "other")
    (tmp_path / "other" / diffprune.CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        diffprune.load(make_tiny_llama(), tmp_path / "other")


def test_save_needs_a_projected_model(tmp_path):
    model = make_tiny_llama()
    diffprune.inject(model)
    with pytest.raises(ValueError, match="not projected"):
        diffprune.save(model, tmp_path)
    with pytest.raises(ValueError, match="no DiffPruning layers"):
        diffprune.save(make_tiny_llama(), tmp_path)


def test_merge_dense(trained, tiny_llama_dir, tmp_path):
    model, _ = trained(False, tiny_llama_dir)
    diffprune.save(model, tmp_path)
    copy = make_tiny_llama()
    diffprune.load(copy, tmp_path)
    expected = _logits(copy)
    assert diffprune.merge(copy) == 14
    assert not diffprune.diffprune_layers(copy)
    assert type(copy.model.layers[0].mlp.down_proj) is nn.Linear
    torch.testing.assert_close(_logits(copy), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_logits(copy), _logits(make_tiny_llama()))


def test_merge_refuses_nf4(trained, tiny_llama_dir):
    pytest.importorskip("bitsandbytes")
    model, _ = trained(True, tiny_llama_dir)
    with pytest.raises(ValueError, match="NF4 base"):
        diffprune.merge(model)
    assert len(diffprune.diffprune_layers(model)) == 14


def test_lora_layers_are_not_diffprune_layers():
    model = make_tiny_llama()
    fastpeft.inject(model, r=2)
    assert not diffprune.diffprune_layers(model)
    assert any(isinstance(m, LoraLinear) for m in model.modules())


def test_example_runs(capsys):
    load_example("diffprune_tiny_llama").main(["--steps", "5", "--fine-tune-steps", "2", "--sparsity", "0.02"])
    out = capsys.readouterr().out
    assert "1475 of 73728 diff entries kept" in out and "identical logits" in out


@pytest.mark.parametrize("projected", [True, False])
def test_merge_rounds_once_in_the_weight_dtype(projected):
    model = nn.Sequential(nn.Linear(64, 16), nn.Linear(16, 8)).to(torch.bfloat16)
    diffprune.inject(model, target_modules=["0", "1"], sparsity=0.1)
    with torch.no_grad():
        for layer in model:
            layer.diff_weight.normal_(std=3e-3)  # about half a bf16 step of W: rounding δ first would differ
    if projected:
        diffprune.project(model)
    expected = [(layer.base_layer.weight.double() + layer.delta_weight().double()).to(torch.bfloat16)
                for layer in model]
    diffprune.merge(model)
    assert all(type(layer) is nn.Linear for layer in model)
    for layer, weight in zip(model, expected):
        assert torch.equal(layer.weight, weight)
