"""Numerics at the edges, against PEFT's own layers on the same weights: NaN / inf / huge / zero scalings and
fp16 overflow (the same entries NaN and inf as PEFT's, the finite ones close), LoRA dropout on a
non-contiguous input (PEFT's mask under the same seed), and adapter files stored in another dtype than the
model's."""

import copy
import math

import pytest
import torch
from torch import nn

from fastpeft.nn import DoraLinear, LoraLinear

from conftest import Holder, assert_rel_close, bnb_linear4bit

peft = pytest.importorskip("peft")

# 64 x 128 -> 96 at rank 8: big enough that CPU BLAS takes its blocked path (its alpha handling is what differs)
IN, OUT, RANK = 128, 96, 8
SCALINGS = [math.nan, math.inf, -math.inf, 1e300, 1e-50, 0.0]


def assert_same_values(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """NaN, +inf and -inf at the same entries; the finite entries within ``dtype``'s bound."""
    assert y.dtype == ref.dtype
    for name, where in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        got, want = where(y), where(ref)
        assert torch.equal(got, want), f"{name}: {int(got.sum())} entries, PEFT {int(want.sum())}"
    finite = torch.isfinite(ref)
    if finite.any():
        assert_rel_close(y[finite], ref[finite], dtype)


def _peft_layer(base: nn.Module, use_dora: bool, dtype: torch.dtype, dropout: float = 0.0):
    """PEFT's LoRA / DoRA layer over ``base`` with random non-zero factors in ``dtype``, some rows of B zero (so an
    infinite scaling meets 0 · inf)."""
    config = peft.LoraConfig(r=RANK, lora_alpha=16, lora_dropout=dropout, use_dora=use_dora, target_modules=["proj"],
                             init_lora_weights=False)
    layer = peft.get_peft_model(Holder(base), config, autocast_adapter_dtype=False).base_model.model.proj
    with torch.no_grad():
        layer.lora_B["default"].weight[::7] = 0
    assert layer.lora_A["default"].weight.dtype == dtype
    return layer


def _ours(theirs, scaling: float) -> nn.Module:
    """fastpeft's layer sharing PEFT's base and parameters, at ``scaling`` (PEFT's set to it too)."""
    theirs.scaling["default"] = scaling
    params = (theirs.base_layer, theirs.lora_A["default"].weight, theirs.lora_B["default"].weight, scaling,
              theirs.lora_dropout["default"])
    if theirs.use_dora["default"]:
        return DoraLinear.from_parameters(*params, theirs.lora_magnitude_vector["default"].weight)
    return LoraLinear.from_parameters(*params)


def _grads(layer, x, dy, params):
    x = x.detach().requires_grad_()
    y = layer(x)
    return (y, *torch.autograd.grad(y, [x, *params], dy))


def _params(layer):
    names = ["lora_A", "lora_B"] + (["lora_magnitude_vector"] if layer.use_dora["default"] else [])
    return [getattr(layer, name)["default"].weight for name in names]


@pytest.mark.parametrize("scaling", SCALINGS)
@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_scaling_edge_values_match_peft(use_dora, nf4, scaling):
    """NaN / inf / 1e300 / tiny / zero scalings give PEFT's outputs and gradients, entry for entry: fused BLAS
    products with such an alpha give finite values for NaN, NaN for inf, or raise for 1e300."""
    torch.manual_seed(0)
    theirs = _peft_layer(bnb_linear4bit(IN, OUT, True) if nf4 else nn.Linear(IN, OUT), use_dora, torch.float32)
    ours = _ours(theirs, scaling)
    x = torch.randn(64, IN)
    x[3, 5] = math.inf  # 0 · inf in the LoRA term where s is 0
    dy = torch.randn(64, OUT)
    with torch.no_grad():
        assert_same_values(ours(x), theirs(x), torch.float32)
    for got, want in zip(_grads(ours, x, dy, _params(theirs)), _grads(theirs, x, dy, _params(theirs))):
        assert_same_values(got, want, torch.float32)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_fp16_overflow_matches_peft(use_dora):
    """fp16 adapters on an fp16 layer, inputs large enough that some entries overflow: the same entries inf and
    NaN as PEFT's (which rounds ``h Bᵀ`` to fp16 before the scale and the scaled term before the sum), outputs
    and gradients."""
    torch.manual_seed(0)
    theirs = _peft_layer(nn.Linear(IN, OUT).half(), use_dora, torch.float16)
    ours = _ours(theirs, theirs.scaling["default"])
    x = (torch.randn(64, IN) * 4e4).clamp(-6e4, 6e4).half()
    dy = torch.randn(64, OUT).half()
    with torch.no_grad():
        ref = theirs(x)
        assert ref.isinf().any() and ref.isfinite().any()  # overflows somewhere, not everywhere
        assert_same_values(ours(x), ref, torch.float16)
    for got, want in zip(_grads(ours, x, dy, _params(theirs)), _grads(theirs, x, dy, _params(theirs))):
        assert_same_values(got, want, torch.float16)


@pytest.mark.parametrize("layout", ["transposed", "permuted"])
def test_dropout_on_a_non_contiguous_input_draws_peft_mask(layout):
    """PEFT calls ``nn.Dropout`` on ``x`` as given; its noise takes ``x``'s memory layout, so a transposed ``x``
    draws another mask than a contiguous copy would. Same seed, same mask: outputs and gradients."""
    torch.manual_seed(0)
    theirs = _peft_layer(nn.Linear(IN, OUT), False, torch.float32, dropout=0.3).train()
    ours = _ours(theirs, theirs.scaling["default"]).train()
    if layout == "transposed":
        x = torch.randn(IN, 6).t()
    else:
        x = torch.randn(5, 6, IN).permute(1, 0, 2)
    assert not x.is_contiguous()
    dy = torch.randn(*x.shape[:-1], OUT)
    torch.manual_seed(1)
    want = _grads(theirs, x, dy, _params(theirs))
    torch.manual_seed(1)
    got = _grads(ours, x, dy, _params(theirs))
    for g, w in zip(got, want):
        assert_rel_close(g, w, torch.float32)


def _accelerated_pair(case: str, scaling: float):
    """The layer of a one-layer PEFT model (two LoRA adapters for ``several`` / ``mixed``, ``lora_bias`` for
    ``bias``, AdaLoRA for ``adalora``) with one adapter at ``scaling``, and that of an accelerated deep copy."""
    import fastpeft

    base = Holder(nn.Linear(IN, OUT))
    if case == "adalora":
        config = peft.AdaLoraConfig(r=RANK, lora_alpha=16, target_modules=["proj"], init_lora_weights=False,
                                    total_step=10)
    else:
        config = peft.LoraConfig(r=RANK, lora_alpha=16, target_modules=["proj"], init_lora_weights=False,
                                 lora_bias=case == "bias")
    theirs = peft.get_peft_model(base, config)
    layer = theirs.base_model.model.proj
    if case in ("several", "mixed"):
        theirs.add_adapter("other", config)
        theirs.base_model.set_adapter(["default", "other"])
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
        lora_b = layer.lora_B["default"]
        (lora_b if case == "adalora" else lora_b.weight)[::7] = 0
    layer.scaling["default"] = scaling
    theirs.eval()
    ours = copy.deepcopy(theirs)
    fastpeft.accelerate(ours)
    return layer, ours.base_model.model.proj


@pytest.mark.parametrize("scaling", [math.nan, math.inf, 1e300])
@pytest.mark.parametrize("case", ["one", "several", "mixed", "bias", "adalora"])
def test_accelerated_peft_model_with_edge_scalings_matches_peft(case, scaling):
    """An accelerated PEFT layer gives PEFT's entries for such a scaling on each fused path: several active
    adapters and ``lora_bias`` fold the scaling into factors, AdaLoRA into B, mixed batches into BLAS's alpha."""
    torch.manual_seed(0)
    theirs, ours = _accelerated_pair(case, scaling)
    x = torch.randn(4, 16, IN)
    x[1, 2, 3] = math.inf
    kwargs = {"adapter_names": ["default", "other", "__base__", "default"]} if case == "mixed" else {}
    with torch.no_grad():
        assert_same_values(ours(x, **kwargs), theirs(x, **kwargs), torch.float32)


def _edge_adapter(tmp_path, name: str, lora_alpha: float, seed: int, use_dora: bool = False):
    """A PEFT LoRA (or DoRA) adapter directory for the tiny Llama with ``lora_alpha`` written into its config (NaN
    and Infinity as JSON writes them) and every seventh row of each lora_B zero."""
    from fastpeft import load_adapter, save_adapter

    from conftest import save_peft_adapter

    config = peft.LoraConfig(r=4, lora_alpha=8, use_dora=use_dora, target_modules=["q_proj", "v_proj"])
    path = save_peft_adapter(tmp_path / f"{name}_src", config, seed=seed)
    adapter = load_adapter(path)
    adapter.config["lora_alpha"] = lora_alpha
    for key, tensor in adapter.tensors.items():
        if key.endswith("lora_B.weight"):
            tensor[::7] = 0
    save_adapter(adapter, tmp_path / name)
    assert ("NaN" if math.isnan(lora_alpha) else "Infinity" if math.isinf(lora_alpha) else "lora_alpha") in \
        (tmp_path / name / "adapter_config.json").read_text()
    return tmp_path / name


def _q_proj_outputs(model, call):
    """The outputs of the first layer's q_proj during ``call()`` (what a NaN / inf adapter gives there, before
    attention spreads it over every entry)."""
    outputs = []
    layer = next(m for name, m in model.named_modules() if name.endswith("layers.0.self_attn.q_proj"))
    handle = layer.register_forward_hook(lambda module, args, out: outputs.append(out.detach().clone()))
    try:
        with torch.no_grad():
            call()
    finally:
        handle.remove()
    return outputs[0]


@pytest.mark.parametrize("lora_alpha", [math.nan, math.inf, 1e300])
@pytest.mark.parametrize("rows", [["edge", None], ["edge", "plain", "edge"]], ids=["grouped", "gathered"])
def test_multi_lora_model_and_load_model_adapter_with_edge_alpha_match_peft(tmp_path, lora_alpha, rows):
    """``lora_alpha`` NaN / Infinity / 1e300 in an adapter's config: MultiLoraModel (beside a plain adapter: the
    batched path of the CPU op; alone: the per-adapter one) and load_model_adapter give PEFT's entries."""
    import fastpeft

    from conftest import make_tiny_llama

    paths = {"edge": _edge_adapter(tmp_path, "edge", lora_alpha, 0), "plain": _edge_adapter(tmp_path, "plain", 8, 1)}
    ids = torch.randint(0, 100, (len(rows), 6), generator=torch.Generator().manual_seed(0))
    served = fastpeft.MultiLoraModel(make_tiny_llama(), {name: paths[name] for name in set(rows) - {None}})
    got = _q_proj_outputs(served, lambda: served(input_ids=ids, adapter_names=rows))
    loaded = make_tiny_llama()
    fastpeft.load_model_adapter(loaded, paths["edge"], trainable=False)
    got_loaded = _q_proj_outputs(loaded, lambda: loaded(input_ids=ids))
    for b, name in enumerate(rows):
        theirs = make_tiny_llama() if name is None else peft.PeftModel.from_pretrained(make_tiny_llama(), paths[name])
        want = _q_proj_outputs(theirs, lambda: theirs(input_ids=ids[b:b + 1]))[0]
        assert_same_values(got[b], want, torch.float32)
        if name == "edge":
            assert_same_values(got_loaded[b], want, torch.float32)


def _half_adapter(tmp_path):
    """A PEFT LoRA adapter directory for the tiny Llama whose tensors are stored in fp16."""
    from fastpeft import load_adapter, save_adapter

    from conftest import save_peft_adapter

    adapter = load_adapter(save_peft_adapter(tmp_path / "src", peft.LoraConfig(r=4, lora_alpha=8,
                                                                               target_modules=["q_proj", "v_proj"])))
    adapter.tensors = {key: tensor.half() for key, tensor in adapter.tensors.items()}
    save_adapter(adapter, tmp_path / "half")
    return tmp_path / "half"


def test_an_fp16_adapter_file_on_an_fp32_model_runs_in_fp32_as_peft_loads_it(tmp_path):
    """PEFT copies an fp16 file into the model's fp32 parameters: load_model_adapter's layers hold fp32 too and
    give PEFT's outputs at fp32 precision (an fp16 LoRA branch is 5e-4 off)."""
    import fastpeft

    from conftest import make_tiny_llama

    path = _half_adapter(tmp_path)
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    ours = make_tiny_llama()
    fastpeft.load_model_adapter(ours, path, trainable=False)
    theirs = peft.PeftModel.from_pretrained(make_tiny_llama(), path)
    with torch.no_grad():
        assert_rel_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, torch.float32)
    assert {p.dtype for n, p in ours.named_parameters() if "lora" in n} == {torch.float32}


def test_multi_lora_model_adapter_gives_the_same_outputs_alone_and_beside_another(tmp_path):
    """An fp16 adapter file served alone and beside an fp32 adapter: the same outputs for its rows (its bank's
    dtype does not depend on the adapters beside it), and PEFT's."""
    import fastpeft

    from conftest import make_tiny_llama, save_peft_adapter

    half = _half_adapter(tmp_path)
    full = save_peft_adapter(tmp_path / "full", peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj"]), seed=3)
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    alone = fastpeft.MultiLoraModel(make_tiny_llama(), {"half": half})
    beside = fastpeft.MultiLoraModel(make_tiny_llama(), {"half": half, "full": full})
    with torch.no_grad():
        y_alone = alone(input_ids=ids, adapter_names=["half", "half"]).logits
        y_beside = beside(input_ids=ids, adapter_names=["half", "full"]).logits
        want = peft.PeftModel.from_pretrained(make_tiny_llama(), half)(input_ids=ids).logits
    assert torch.equal(y_alone[0], y_beside[0])
    assert_rel_close(y_alone, want, torch.float32)


def test_a_bank_fuses_unless_an_adapter_on_the_layer_has_an_edge_scaling():
    """The multi-LoRA op keeps its fused paths (the kernels on CUDA) for a bank whose adapters that do not touch
    the layer hold scaling 0, and leaves them only for an edge scaling of an adapter that does."""
    from fastpeft.adapters import ModuleAdapter
    from fastpeft.bank import LoraBank

    def bank(scaling):
        adapter = ModuleAdapter(torch.randn(4, 16), torch.randn(8, 4), scaling)
        return LoraBank.pack([adapter, None], 16, 8, torch.float32, "cpu")

    assert bank(2.0).scalings.tolist() == [2.0, 0.0]
    assert bank(2.0).scalings_fuse
    assert not bank(math.nan).scalings_fuse and not bank(0.0).scalings_fuse
    assert LoraBank.pack([ModuleAdapter(torch.randn(4, 16), torch.randn(8, 4), 2.0)], 16, 8, torch.float16,
                         "cpu").scalings_fuse is False


@pytest.mark.parametrize("lora_alpha", [math.nan, math.inf])
def test_dora_adapter_with_edge_alpha_matches_peft(tmp_path, lora_alpha):
    """A DoRA adapter file with ``lora_alpha`` NaN / Infinity: load_model_adapter's DoraLinear and MultiLoraModel
    give PEFT's entries."""
    import fastpeft

    from conftest import make_tiny_llama

    path = _edge_adapter(tmp_path, "edge", lora_alpha, 0, use_dora=True)
    ids = torch.randint(0, 100, (1, 6), generator=torch.Generator().manual_seed(0))
    theirs = peft.PeftModel.from_pretrained(make_tiny_llama(), path)
    want = _q_proj_outputs(theirs, lambda: theirs(input_ids=ids))
    loaded = make_tiny_llama()
    fastpeft.load_model_adapter(loaded, path, trainable=False)
    assert_same_values(_q_proj_outputs(loaded, lambda: loaded(input_ids=ids)), want, torch.float32)
    served = fastpeft.MultiLoraModel(make_tiny_llama(), {"edge": path})
    assert_same_values(_q_proj_outputs(served, lambda: served(input_ids=ids, adapter_names=["edge"])), want,
                       torch.float32)
