"""Adapter banks: packing (mixed ranks, DoRA, IA3) and copy-on-write add/remove."""

import pytest
import torch

from fastpeft import reference
from fastpeft.adapters import Adapter, ModuleAdapter
from fastpeft.bank import AdapterBank, LayerSpec, LoraBank

IN, OUT = 33, 17


def lora_module(rank, scaling=2.0, magnitude=False):
    return ModuleAdapter(lora_a=torch.randn(rank, IN), lora_b=torch.randn(OUT, rank), scaling=scaling,
                         magnitude=torch.rand(OUT) + 0.5 if magnitude else None)


def lora_adapter(rank, layers=("l0", "l1")):
    tensors = {}
    for layer in layers:
        tensors[f"base_model.model.{layer}.lora_A.weight"] = torch.randn(rank, IN)
        tensors[f"base_model.model.{layer}.lora_B.weight"] = torch.randn(OUT, rank)
    return Adapter({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank}, tensors)


def empty_bank():
    spec = LayerSpec(IN, OUT, torch.float32, torch.device("cpu"), torch.randn(OUT, IN))
    return AdapterBank({"l0": spec, "l1": spec})


def test_pack_mixed_ranks_pads_with_zeros():
    modules = [lora_module(3, 0.5), None, lora_module(256, 1.5), lora_module(1)]
    bank = LoraBank.pack(modules, IN, OUT, torch.float16, "cpu")
    assert bank.lora_a.shape == (4, 256, IN) and bank.lora_b.shape == (4, OUT, 256)
    assert bank.ranks.tolist() == [3, 0, 256, 1] and bank.scalings.tolist() == [0.5, 0.0, 1.5, 2.0]
    assert torch.equal(bank.lora_a[0, :3], modules[0].lora_a.half()) and not bank.lora_a[0, 3:].any()
    assert torch.equal(bank.lora_b[3, :, :1], modules[3].lora_b.half()) and not bank.lora_b[3, :, 1:].any()
    assert not bank.lora_a[1].any() and bank.out_scale is None and bank.in_scale is None


def test_pack_dora_and_ia3_vectors():
    weight = torch.randn(OUT, IN)
    dora = lora_module(4, magnitude=True)
    ia3_out = ModuleAdapter(ia3_scale=torch.rand(OUT))
    ia3_in = ModuleAdapter(ia3_scale=torch.rand(IN), is_feedforward=True)
    bank = LoraBank.pack([dora, ia3_out, ia3_in, lora_module(2)], IN, OUT, torch.float32, "cpu", weight)
    norm = reference.dora_weight_norm(weight, dora.lora_a, dora.lora_b, dora.scaling)
    torch.testing.assert_close(bank.out_scale[0], dora.magnitude / norm)
    assert torch.equal(bank.bias_scale[0], torch.ones(OUT))  # DoRA leaves the bias alone
    assert torch.equal(bank.out_scale[1], ia3_out.ia3_scale) and torch.equal(bank.bias_scale[1], ia3_out.ia3_scale)
    assert torch.equal(bank.in_scale[2], ia3_in.ia3_scale) and torch.equal(bank.in_scale[0], torch.ones(IN))
    assert torch.equal(bank.out_scale[3], torch.ones(OUT)) and bank.ranks.tolist() == [4, 0, 0, 2]


def test_pack_rejects_bad_adapters():
    with pytest.raises(ValueError, match="adapter 0: rank 257 > 256"):
        LoraBank.pack([lora_module(257)], IN, OUT, torch.float32, "cpu")
    with pytest.raises(ValueError, match="adapter 1: rank 9 > 8"):
        LoraBank.pack([lora_module(8), lora_module(9)], IN, OUT, torch.float32, "cpu", rank_limit=8)
    with pytest.raises(ValueError, match=r"adapter 1: lora_a has shape \(2, 33\), the layer needs \(2, 34\)"):
        LoraBank.pack([None, lora_module(2)], IN + 1, OUT, torch.float32, "cpu")
    with pytest.raises(ValueError, match="adapter 0 is DoRA: packing it needs the base weight"):
        LoraBank.pack([lora_module(2, magnitude=True)], IN, OUT, torch.float32, "cpu")


def test_pack_without_a_rank_limit():
    module = lora_module(300)
    bank = LoraBank.pack([module], IN, OUT, torch.float32, "cpu", rank_limit=None)
    assert bank.ranks.tolist() == [300] and torch.equal(bank.lora_a[0], module.lora_a)


def test_add_and_remove_are_copy_on_write():
    bank0 = empty_bank().with_adapters({"a": lora_adapter(4), "b": lora_adapter(9, layers=("l1",))})
    snapshot = {path: (layer.lora_a.clone(), layer.ranks.clone()) for path, layer in bank0.layers.items()}
    bank1 = bank0.with_adapter("c", lora_adapter(2))
    bank2 = bank1.without_adapter("a")
    assert bank0.names == ("a", "b") and bank1.names == ("a", "b", "c") and bank2.names == ("b", "c")
    assert bank0.version < bank1.version < bank2.version
    for path, (lora_a, ranks) in snapshot.items():  # the old bank's tensors were never written
        assert torch.equal(bank0.layers[path].lora_a, lora_a) and torch.equal(bank0.layers[path].ranks, ranks)
    assert bank0.layers["l0"].ranks.tolist() == [4, 0]
    assert bank2.layers["l0"].ranks.tolist() == [0, 2] and bank2.layers["l1"].ranks.tolist() == [9, 2]
    assert torch.equal(bank2.layers["l1"].lora_a[0], bank0.layers["l1"].lora_a[1])
    assert bank1.layers["l0"].scalings[2] == 2.0  # lora_alpha / r of adapter c (alpha = 2r)
    replaced = bank2.with_adapter("b", lora_adapter(3))
    assert replaced.names == ("b", "c") and replaced.layers["l1"].ranks.tolist() == [3, 2]


def test_unknown_layers_and_names_raise():
    with pytest.raises(ValueError, match=r"adapter 'x' targets layers this model does not adapt: \['l9'\]"):
        empty_bank().with_adapter("x", lora_adapter(2, layers=("l9",)))
    with pytest.raises(KeyError, match="unknown adapter 'nope'; loaded: \\['a'\\]"):
        empty_bank().with_adapter("a", lora_adapter(2)).without_adapter("nope")


def test_layers_pack_in_the_dtype_peft_loads_adapters_into():
    """PEFT keeps adapters in fp32 on a bf16 model (it upcasts fp16 / bf16 ones, autocast_adapter_dtype) and
    computes their terms in fp32; the bank packs every adapter in fp32 too, whatever its file holds and whichever
    adapters sit beside it (a bf16 bank would round them; a promoted one would change an adapter's numbers with
    its neighbours)."""
    spec = LayerSpec(IN, OUT, torch.bfloat16, torch.device("cpu"), torch.randn(OUT, IN))
    model = AdapterBank({"l0": spec, "l1": spec})
    bank = model.with_adapter("a", lora_adapter(4, layers=("l0",)))
    assert bank.layers["l0"].lora_a.dtype == bank.layers["l0"].lora_b.dtype == torch.float32
    assert torch.equal(bank.layers["l0"].lora_a[0], bank.modules[0]["l0"].lora_a)  # not rounded
    assert bank.layers["l1"].max_rank == 0
    low = lora_adapter(2, layers=("l0",))
    low.tensors = {key: t.to(torch.bfloat16) for key, t in low.tensors.items()}
    assert model.with_adapter("b", low).layers["l0"].lora_a.dtype == torch.float32
    assert bank.with_adapter("b", low).layers["l0"].lora_b.dtype == torch.float32
    fp64 = LayerSpec(IN, OUT, torch.float64, torch.device("cpu"), torch.randn(OUT, IN, dtype=torch.float64))
    assert AdapterBank({"l0": fp64}).with_adapter("b", low).layers["l0"].lora_a.dtype == torch.float64
