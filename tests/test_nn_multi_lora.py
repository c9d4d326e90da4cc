"""MultiLoraLinear over a dense and an NF4 base: each row against the single-adapter reference op."""

import pytest
import torch

from fastpeft import reference
from fastpeft.adapters import Adapter
from fastpeft.bank import AdapterBank, LayerSpec
from fastpeft.nf4 import NF4Weight
from fastpeft.nn import MultiLoraBatch, MultiLoraLinear

from conftest import assert_rel_close, load_tiny_llama_4bit

IN, OUT = 33, 17


def adapter(path, rank=0, alpha=8, magnitude=False, ia3=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    prefix = f"base_model.model.{path}"
    if ia3 is not None:
        size = IN if ia3 == "ff" else OUT
        return Adapter({"peft_type": "IA3", "feedforward_modules": [path] if ia3 == "ff" else []},
                       {f"{prefix}.ia3_l": 0.5 + torch.rand(size, generator=g)})
    in_features, out_features = 128, 64
    if path == "layer":
        in_features, out_features = IN, OUT
    tensors = {f"{prefix}.lora_A.weight": torch.randn(rank, in_features, generator=g),
               f"{prefix}.lora_B.weight": torch.randn(out_features, rank, generator=g) / rank}
    if magnitude:
        tensors[f"{prefix}.lora_magnitude_vector"] = 0.5 + torch.rand(out_features, generator=g)
    return Adapter({"peft_type": "LORA", "r": rank, "lora_alpha": alpha}, tensors)


@pytest.mark.parametrize("backend", ["reference_backend", "triton_backend"])
def test_lora_dora_ia3_rows_on_dense_base_with_bias(backend, request):
    request.getfixturevalue(backend)
    base = torch.nn.Linear(IN, OUT)
    layer = MultiLoraLinear(base, "layer")
    adapters = {"lora3": adapter("layer", 3, seed=1), "lora19": adapter("layer", 19, alpha=4, seed=2),
                "dora": adapter("layer", 4, magnitude=True, seed=3), "ia3": adapter("layer", ia3="out", seed=4),
                "ia3ff": adapter("layer", ia3="ff", seed=5)}
    bank = AdapterBank({"layer": LayerSpec(IN, OUT, torch.float32, torch.device("cpu"), base.weight.detach())})
    bank = bank.with_adapters(adapters)
    row_ids = torch.tensor([0, 1, 2, 3, 4, -1, 1])
    x = torch.randn(len(row_ids), 5, IN)
    with torch.no_grad():
        out = layer(x, MultiLoraBatch(bank, row_ids))
    w, b = base.weight.detach().double(), base.bias.detach().double()
    mods = {name: a.modules()["layer"] for name, a in adapters.items()}
    for row, k in enumerate(row_ids.tolist()):
        xr = x[row].double()
        name = None if k < 0 else bank.names[k]
        m = mods.get(name)
        if name is None:
            ref = torch.nn.functional.linear(xr, w, b)
        elif name.startswith("ia3"):
            ref = reference.ia3_linear(xr, w, b, m.ia3_scale.double(), m.is_feedforward)
        elif name == "dora":
            ref = reference.dora_linear(xr, w, b, m.lora_a.double(), m.lora_b.double(), m.scaling,
                                        m.magnitude.double())
        else:
            ref = reference.lora_linear(xr, w, b, m.lora_a.double(), m.lora_b.double(), m.scaling)
        assert_rel_close(out[row], ref, torch.float32)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)  # no batch: the base layer alone


@pytest.mark.parametrize("backend", ["reference_backend", "triton_backend"])
def test_mixed_lora_on_nf4_base(tiny_llama_dir, backend, request):
    request.getfixturevalue(backend)
    base = load_tiny_llama_4bit(tiny_llama_dir).model.layers[0].mlp.down_proj  # Linear4bit, 128 -> 64
    path = "model.layers.0.mlp.down_proj"
    layer = MultiLoraLinear(base, path)
    nf4 = NF4Weight.from_bnb(base.weight)
    bank = AdapterBank({path: LayerSpec(128, 64, torch.float32, torch.device("cpu"), nf4)})
    bank = bank.with_adapters({"a": adapter(path, 2, seed=1), "b": adapter(path, 17, seed=2),
                               "dora": adapter(path, 5, magnitude=True, seed=3)})
    slot_ids = torch.tensor([[1, 0], [-1, -1], [0, -1], [1, -1], [2, -1]])
    slot_weights = torch.tensor([[0.25, -2.0], [0.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    x = torch.randn(5, 3, 128)
    with torch.no_grad():
        out = layer(x, MultiLoraBatch(bank, slot_ids, slot_weights))
    # bitsandbytes' CPU Linear4bit is ~3e-3 off the exact product with its own dequantised weight; the
    # module adds adapters to whatever the base layer gives (as PEFT does), so the oracle starts there too
    base_out = base(x).double()
    w = nf4.dequantize(torch.float32).double()
    mods = [m[path] for m in bank.modules]
    lora_as = [m.lora_a.double() for m in mods]
    lora_bs = [m.lora_b.double() for m in mods]
    scalings = [m.scaling for m in mods]
    lora_rows = slice(0, 4)
    ref = base_out[lora_rows] + reference.multi_lora_delta(
        x[lora_rows].double(), lora_as, lora_bs, scalings, slot_ids[lora_rows, None, :].expand(4, 3, 2),
        slot_weights[lora_rows, None, :].expand(4, 3, 2).double())
    assert_rel_close(out[lora_rows], ref, torch.float32)
    # DoRA without bias: (m / ‖W + s·BA‖) ⊙ (base(x) + s·(x Aᵀ) Bᵀ)
    dora = mods[2]
    norm = reference.dora_weight_norm(w, lora_as[2], lora_bs[2], dora.scaling)
    lora = reference.lora_linear(x[4].double(), torch.zeros_like(w), None, lora_as[2], lora_bs[2], dora.scaling)
    assert_rel_close(out[4], dora.magnitude.double() / norm * (base_out[4] + lora), torch.float32)


def test_batch_rows_must_match(reference_backend):
    layer = MultiLoraLinear(torch.nn.Linear(IN, OUT), "layer")
    bank = AdapterBank({"layer": LayerSpec(IN, OUT, torch.float32, torch.device("cpu"))})
    bank = bank.with_adapter("a", adapter("layer", 2))
    with pytest.raises(ValueError, match=r"leading shape \(3, 2\) does not start with the batch's 2 rows"):
        layer(torch.randn(3, 2, IN), MultiLoraBatch(bank, torch.tensor([0, -1])))
    with pytest.raises(ValueError, match="adapter id 1 out of range: the bank holds 1"):
        MultiLoraBatch(bank, torch.tensor([0, 1]))
