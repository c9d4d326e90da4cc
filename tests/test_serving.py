"""MultiLoraModel on the tiny Llama: mixed batches against PEFT run row by row / with adapter_names."""

import contextlib

import pytest
import torch

from fastpeft import MultiLoraModel

from conftest import load_tiny_llama_4bit, make_tiny_llama, save_peft_adapter

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    from peft import IA3Config, LoraConfig

    root = tmp_path_factory.mktemp("adapters")
    configs = {
        "a": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "b": LoraConfig(r=16, lora_alpha=16, use_rslora=True, target_modules=TARGETS),
        "c": LoraConfig(r=1, lora_alpha=3, target_modules=["down_proj", "o_proj"]),
        "dora": LoraConfig(r=8, lora_alpha=16, use_dora=True, target_modules=["q_proj", "up_proj"]),
        "ia3": IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
    }
    return {name: save_peft_adapter(root / name, config, seed=i) for i, (name, config) in enumerate(configs.items())}


def input_ids(rows, length=9, seed=1):
    return torch.randint(1, 128, (rows, length), generator=torch.Generator().manual_seed(seed))


def peft_single(base, path):
    from peft import PeftModel

    return PeftModel.from_pretrained(base, path).eval()


def peft_mixed(base, adapter_dirs, names):
    from peft import PeftModel

    model = PeftModel.from_pretrained(base, adapter_dirs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapter_dirs[name], adapter_name=name)
    return model.eval()


# the Triton kernels (interpreter on CPU) sum in another order than PyTorch: fp32 rounding differences
TOLERANCE = {"reference_backend": 1e-5, "triton_backend": 1e-4}


@pytest.mark.parametrize("backend", ["reference_backend", "triton_backend"])
@pytest.mark.parametrize("four_bit", [False, True])
def test_mixed_batch_logits_match_peft(adapter_dirs, tiny_llama_dir, four_bit, backend, request):
    request.getfixturevalue(backend)
    load = (lambda: load_tiny_llama_4bit(tiny_llama_dir)) if four_bit else make_tiny_llama
    names = ["a", "b", "c"]
    rows = ["b", None, "a", "c", "b", "a"]
    ids = input_ids(len(rows))
    served = MultiLoraModel(load(), {n: adapter_dirs[n] for n in names})
    out = served(input_ids=ids, adapter_names=rows).logits
    peft_model = peft_mixed(load(), adapter_dirs, names)
    with torch.no_grad():
        ref = peft_model(input_ids=ids, adapter_names=[r or "__base__" for r in rows]).logits
        base = make_tiny_llama()(input_ids=ids).logits
    assert (out - base).abs().amax() > 1e-2  # the adapters change the logits: the test can fail
    torch.testing.assert_close(out, ref, rtol=TOLERANCE[backend], atol=TOLERANCE[backend])


@pytest.mark.parametrize("backend", ["reference_backend", "triton_backend"])
def test_generate_matches_peft_per_adapter(adapter_dirs, backend, request):
    """Prefill tiles (16 tokens) then decode steps (one-token tiles) must both be right."""
    request.getfixturevalue(backend)
    names = ["a", "b", "c", "dora", "ia3"]
    rows = ["c", "a", None, "dora", "b", "ia3"]
    ids = input_ids(len(rows), length=5, seed=2)
    served = MultiLoraModel(make_tiny_llama(), {n: adapter_dirs[n] for n in names})
    out = served.generate(input_ids=ids, adapter_names=rows, max_new_tokens=6, do_sample=False)
    for b, name in enumerate(rows):
        model = make_tiny_llama() if name is None else peft_single(make_tiny_llama(), adapter_dirs[name])
        with torch.no_grad():
            ref = model.generate(input_ids=ids[b:b + 1], max_new_tokens=6, do_sample=False)
        assert out[b].tolist() == ref[0].tolist(), f"row {b} ({name})"


def test_weighted_combination_matches_peft_cat(adapter_dirs):
    """{a: 0.7, b: 0.3} is 0.7·LoRA_a + 0.3·LoRA_b: PEFT's combination_type="cat" builds exactly that."""
    combo = {"a": 0.7, "b": -0.3}
    rows = [combo, "a", None, {"c": 2.0}]
    ids = input_ids(len(rows), seed=3)
    served = MultiLoraModel(make_tiny_llama(), {n: adapter_dirs[n] for n in "abc"})
    out = served(input_ids=ids, adapter_names=rows).logits
    peft_model = peft_mixed(make_tiny_llama(), adapter_dirs, ["a", "b", "c"])
    peft_model.add_weighted_adapter(["a", "b"], [0.7, -0.3], "ab", combination_type="cat")
    peft_model.add_weighted_adapter(["c"], [2.0], "c2", combination_type="cat")
    with torch.no_grad():
        ref = peft_model(input_ids=ids, adapter_names=["ab", "a", "__base__", "c2"]).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_dora_and_ia3_in_a_mixed_batch_match_single_adapter_peft(adapter_dirs):
    rows = ["dora", "a", "ia3", None, "dora"]
    ids = input_ids(len(rows), seed=4)
    served = MultiLoraModel(make_tiny_llama(), {n: adapter_dirs[n] for n in ["a", "dora", "ia3"]})
    out = served(input_ids=ids, adapter_names=rows).logits
    for b, name in enumerate(rows):
        model = make_tiny_llama() if name is None else peft_single(make_tiny_llama(), adapter_dirs[name])
        with torch.no_grad():
            ref = model(input_ids=ids[b:b + 1]).logits
        torch.testing.assert_close(out[b:b + 1], ref, rtol=1e-5, atol=1e-5, msg=f"row {b} ({name})")
    with pytest.raises(ValueError, match="DoRA/IA3: they cannot be weighted"):
        served.batch([{"dora": 0.5, "a": 0.5}])


def test_adding_and_removing_adapters_never_changes_a_built_batch(adapter_dirs):
    served = MultiLoraModel(make_tiny_llama(), {"a": adapter_dirs["a"], "b": adapter_dirs["b"]})
    rows = ["b", "a", None]
    ids = input_ids(3, seed=5)
    batch = served.batch(rows)
    before = served(input_ids=ids, batch=batch).logits
    served.remove_adapter("a")  # "b" moves to slot 0 in the new bank
    served.add_adapter("c", adapter_dirs["c"])
    assert served.adapter_names == ("b", "c") and batch.bank.names == ("a", "b")
    torch.testing.assert_close(served(input_ids=ids, batch=batch).logits, before, rtol=0, atol=0)
    torch.testing.assert_close(served(input_ids=ids[:1], adapter_names=["b"]).logits, before[:1], rtol=1e-6, atol=1e-6)
    with pytest.raises(KeyError, match="unknown adapter 'a'"):
        served.batch(["a"])


def test_a_repeated_request_reuses_its_batch_until_the_adapters_or_the_bank_change(adapter_dirs):
    """The per-step metadata and the CPU path's gathered factors are built once for a repeated choice of adapters
    (per generate call they cost more than decode steps), never reused across banks or choices."""
    served = MultiLoraModel(make_tiny_llama(), {"a": adapter_dirs["a"], "b": adapter_dirs["b"]})
    rows = ["b", {"a": 0.5, "b": 1}, None]
    batch = served.batch(rows)
    assert served.batch(list(rows)) is batch and batch.repeated(2) is batch.repeated(2)
    assert served.batch(["b", {"a": 0.5, "b": 2}, None]) is not batch
    assert served.batch(["b", {"b": 1, "a": 0.5}, None]) is not batch  # another slot order
    batch = served.batch(rows)
    ids = input_ids(3, seed=5)
    before = served(input_ids=ids, batch=batch).logits
    served.add_adapter("c", adapter_dirs["c"])
    again = served.batch(rows)
    assert again is not batch and again.bank is served.bank
    torch.testing.assert_close(served(input_ids=ids, adapter_names=rows).logits, before, rtol=1e-6, atol=1e-6)
    greedy = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    first = served.generate(input_ids=ids, adapter_names=rows, **greedy)
    torch.testing.assert_close(served.generate(input_ids=ids, adapter_names=rows, **greedy), first, rtol=0, atol=0)


def test_bad_requests_raise(adapter_dirs):
    served = MultiLoraModel(make_tiny_llama(), {"a": adapter_dirs["a"]})
    with pytest.raises(ValueError, match="exactly one of adapter_names"):
        served(input_ids=input_ids(1))
    with pytest.raises(ValueError, match="adapter_names has 2 entries for an input of 3 rows"):
        served(input_ids=input_ids(3), adapter_names=["a", None])
    with pytest.raises(TypeError, match="entries must be None, a name"):
        served.batch([3])


def test_dora_on_a_4bit_layer_bitsandbytes_repacked_for_cpu_is_refused(adapter_dirs, tiny_llama_dir):
    def repacked_model():
        model = load_tiny_llama_4bit(tiny_llama_dir)
        # what bitsandbytes' eval-mode CPU forward leaves behind: no longer the NF4 layout
        model.model.layers[0].self_attn.q_proj.weight.quant_state.packing_format_for_cpu = True
        return model

    MultiLoraModel(repacked_model(), {"a": adapter_dirs["a"]})  # LoRA needs no base weight
    with pytest.raises(ValueError, match="is DoRA: packing it needs the base weight"):
        MultiLoraModel(repacked_model(), {"dora": adapter_dirs["dora"]})


def test_beams_and_return_sequences_keep_each_rows_adapter(adapter_dirs):
    """generate repeats each row for beams / return sequences; the copies keep the row's adapter (vs PEFT
    generating row by row with the same settings)."""
    rows = ["b", None, "a"]
    ids = input_ids(len(rows), length=5, seed=6)
    settings = dict(max_new_tokens=4, do_sample=False, num_beams=3, num_return_sequences=2)
    served = MultiLoraModel(make_tiny_llama(), {n: adapter_dirs[n] for n in "ab"})
    out = served.generate(input_ids=ids, adapter_names=rows, **settings)
    assert out.shape[0] == 2 * len(rows)
    for b, name in enumerate(rows):
        model = make_tiny_llama() if name is None else peft_single(make_tiny_llama(), adapter_dirs[name])
        with torch.no_grad():
            ref = model.generate(input_ids=ids[b:b + 1], **settings)
        assert out[2 * b:2 * b + 2].tolist() == ref.tolist(), f"row {b} ({name})"


def _count_forwards(served):
    calls = []
    served.model.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls


def test_bad_requests_are_refused_before_the_model_runs(adapter_dirs):
    served = MultiLoraModel(make_tiny_llama(), {"a": adapter_dirs["a"]})
    calls = _count_forwards(served)
    with pytest.raises(ValueError, match="adapter_names has 2 entries for an input of 3 rows"):
        served.generate(input_ids=input_ids(3), adapter_names=["a", None], max_new_tokens=2)
    with pytest.raises(ValueError, match="the batch has 1 entries for an input of 2 rows"):
        served(input_ids=input_ids(2), batch=served.batch(["a"]))
    with pytest.raises(TypeError, match="one entry per row"):
        served.generate(input_ids=input_ids(1), adapter_names="a", max_new_tokens=2)
    with pytest.raises(KeyError, match=r"unknown adapter 'nope'; loaded: \['a'\]"):
        served.generate(input_ids=input_ids(2), adapter_names=["a", "nope"], max_new_tokens=2)
    assert not calls


def _adapter_with(path, **changes):
    """The adapter at ``path`` with its q_proj factors replaced (``lora_A`` / ``lora_B`` keyword tensors)."""
    from fastpeft.adapters import load_adapter

    adapter = load_adapter(path)
    for suffix, tensor in changes.items():
        key = f"base_model.model.model.layers.0.self_attn.q_proj.{suffix}.weight"
        adapter.tensors[key] = tensor
    return adapter


def test_unreadable_or_unfitting_adapters_name_adapter_and_layer_and_serving_goes_on(adapter_dirs, tmp_path):
    import shutil

    served = MultiLoraModel(make_tiny_llama(), {"a": adapter_dirs["a"], "b": adapter_dirs["b"]})
    rows, ids = ["a", "b", None], input_ids(3, seed=7)
    before = served(input_ids=ids, adapter_names=rows).logits
    calls = _count_forwards(served)

    truncated, corrupted = tmp_path / "truncated", tmp_path / "corrupted"
    for bad in (truncated, corrupted):
        shutil.copytree(adapter_dirs["a"], bad)
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    weights = corrupted / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:8] + b"#" * 16 + data[24:])  # garbage in the JSON header
    for name, path in (("truncated", truncated), ("corrupted", corrupted)):
        with pytest.raises(ValueError, match=f"adapter '{name}': .*not a readable safetensors file"):
            served.add_adapter(name, path)
    with pytest.raises(FileNotFoundError, match="adapter 'missing': no adapter_config.json"):
        served.add_adapter("missing", tmp_path / "nowhere")

    layer = "model.layers.0.self_attn.q_proj"
    wide = _adapter_with(adapter_dirs["a"], lora_A=torch.randn(4, 65))
    with pytest.raises(ValueError, match=rf"adapter 'wide' at layer {layer}: lora_a has shape \(4, 65\), the layer "
                                         r"needs \(4, 64\)"):
        served.add_adapter("wide", wide)
    big = _adapter_with(adapter_dirs["a"], lora_A=torch.randn(257, 64), lora_B=torch.randn(64, 257))
    with pytest.raises(ValueError, match=f"adapter 'a' at layer {layer}: rank 257 > 256"):
        served.add_adapter("a", big)  # a failed replacement keeps the adapter it would have replaced

    assert served.adapter_names == ("a", "b") and not calls
    torch.testing.assert_close(served(input_ids=ids, adapter_names=rows).logits, before, rtol=0, atol=0)


def test_adapters_changed_from_another_thread_never_change_a_generate_in_flight(adapter_dirs):
    """Mid-generate (after the second decode step), another thread removes "x" and adds a different adapter
    under the same name; the running generate keeps the old "x" (PEFT with it, row by row), the next one
    uses the new."""
    import threading

    from transformers import LogitsProcessor, LogitsProcessorList

    served = MultiLoraModel(make_tiny_llama(), {"x": adapter_dirs["a"], "b": adapter_dirs["b"]})

    def swap():
        served.remove_adapter("x")
        served.add_adapter("x", adapter_dirs["c"])

    class SwapAtStep(LogitsProcessor):
        steps = 0

        def __call__(self, input_ids, scores):
            self.steps += 1
            if self.steps == 2:
                thread = threading.Thread(target=swap)
                thread.start()
                thread.join()
            return scores

    rows, ids = ["x", "b", None], input_ids(3, length=5, seed=8)
    settings = dict(max_new_tokens=6, do_sample=False)
    out = served.generate(input_ids=ids, adapter_names=rows, logits_processor=LogitsProcessorList([SwapAtStep()]),
                          **settings)
    after = served.generate(input_ids=ids[:1], adapter_names=["x"], **settings)
    assert served.adapter_names == ("b", "x")
    references = {"x": adapter_dirs["a"], "b": adapter_dirs["b"], "new x": adapter_dirs["c"]}
    for b, (name, got) in enumerate(zip(rows + ["new x"], [*out, after[0]])):
        model = make_tiny_llama() if name is None else peft_single(make_tiny_llama(), references[name])
        with torch.no_grad():
            ref = model.generate(input_ids=ids[b % 3:b % 3 + 1], **settings)
        assert got.tolist() == ref[0].tolist(), f"row {b} ({name})"
    assert after[0].tolist() != out[0].tolist()  # the swap did change what "x" means: the test can fail


def _serving(served, dtype, adapters):
    """A MultiLoraModel of the tiny Llama in ``dtype`` serving ``adapters``: ``served`` with them (re)added, or
    a new one when ``served`` is None."""
    if served is None:
        return MultiLoraModel(make_tiny_llama(dtype), adapters)
    for name, adapter in adapters.items():
        served.add_adapter(name, adapter)
    return served


def _rounded_b(tensor, dtype, step):
    """``lora_B`` made exactly representable in ``dtype``, then scaled by ``1 + step``."""
    return tensor.to(dtype).float() * (1 + step)


@pytest.mark.parametrize("dtype, backend", [(torch.bfloat16, "reference_backend"), (torch.float16, "reference_backend"),
                                            (torch.bfloat16, "triton_backend")])
def test_low_precision_model_with_fp32_adapters_matches_peft(adapter_dirs, dtype, backend, request):
    """Issue 15: PEFT keeps the adapters of a bf16 / fp16 model in fp32 and computes their terms in fp32. The
    bank stays fp32 too: the logits match PEFT's mixed batch and its single-adapter rows, and a change of B
    below half a step of ``dtype`` (B exactly representable in it, scaled by 1 + eps/8: a bank rounded to
    ``dtype`` undoes it) moves the logits as it moves PEFT's."""
    from fastpeft.adapters import load_adapter

    request.getfixturevalue(backend)
    names, rows = ["a", "b", "c"], ["b", None, "a", "c"]
    ids = input_ids(len(rows), seed=9)
    peft_model = peft_mixed(make_tiny_llama(dtype), adapter_dirs, names)
    layers = {path: m for path, m in peft_model.named_modules() if hasattr(m, "lora_B")}
    served, logits = None, {}
    for step in (0.0, torch.finfo(dtype).eps / 8):
        adapters = {n: load_adapter(adapter_dirs[n]) for n in names}  # fp32, as PEFT saved them
        for adapter in adapters.values():
            for key, tensor in adapter.tensors.items():
                if key.endswith("lora_B.weight"):
                    adapter.tensors[key] = _rounded_b(tensor, dtype, step)
        served = _serving(served, dtype, adapters)
        with torch.no_grad():
            for path, layer in layers.items():
                for name in layer.lora_B:
                    weight = layer.lora_B[name].weight
                    assert weight.dtype == torch.float32  # PEFT's autocast_adapter_dtype
                    weight.copy_(adapters[name].tensors[f"{path}.lora_B.weight"])  # the served values
            ref = peft_model(input_ids=ids, adapter_names=[r or "__base__" for r in rows]).logits
        out = served(input_ids=ids, adapter_names=rows).logits
        assert out.dtype == ref.dtype == dtype
        assert all(bank.lora_a.dtype == torch.float32 for bank in served.bank.layers.values())
        # the kernels round each term into y once where PEFT's mixed batch rounds it first: bf16 logits drift
        # a few steps apart through the layers (the rows are held to PEFT's single-adapter forward below)
        tol = 2e-2 if backend == "reference_backend" else 5e-2
        torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
        logits[step] = out, ref
    (out0, ref0), (out1, ref1) = logits.values()
    changed, changed_peft = float((out1 != out0).double().mean()), float((ref1 != ref0).double().mean())
    assert changed_peft > 0.1 and 0.5 * changed_peft <= changed <= 2 * changed_peft, (changed, changed_peft)
    for b, name in enumerate(rows):  # PEFT's single-adapter forward rounds the term once, its mixed batch twice
        peft_model.set_adapter(name or names[0])
        with torch.no_grad(), (peft_model.disable_adapter() if name is None else contextlib.nullcontext()):
            single = peft_model(input_ids=ids[b:b + 1]).logits
        # within twice the gap between PEFT's own two paths (the extra rounding grows through the layers)
        gap = float((ref1[b:b + 1] - single).abs().max())
        assert float((out1[b:b + 1] - single).abs().max()) <= 2 * gap + 4 * torch.finfo(dtype).eps, f"row {b} ({name})"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dora_and_ia3_vectors_of_a_low_precision_model_apply_in_fp32_as_peft(adapter_dirs, dtype):
    """Issue 15: DoRA's magnitude and IA3's vectors stay fp32 on a bf16 / fp16 model and scale in fp32 with one
    final rounding, as PEFT's layers do: each row matches PEFT's single-adapter forward, and a change of the
    vectors below half a step of ``dtype`` (exactly representable, then scaled by 1 + eps/8: a scale rounded to
    ``dtype`` undoes it) moves the logits as it moves PEFT's."""
    from peft import set_peft_model_state_dict

    from fastpeft.adapters import load_adapter

    names, rows = ["dora", "ia3"], ["dora", "ia3", None]
    ids = input_ids(len(rows), seed=11)
    peft_models = {name: peft_single(make_tiny_llama(dtype), adapter_dirs[name]) for name in names}
    served, logits = None, {}
    for step in (0.0, torch.finfo(dtype).eps / 8):
        adapters = {name: load_adapter(adapter_dirs[name]) for name in names}  # fp32, as PEFT saved them
        for name, adapter in adapters.items():
            for key, tensor in adapter.tensors.items():
                if "lora_magnitude_vector" in key or "ia3_l" in key:
                    adapter.tensors[key] = _rounded_b(tensor, dtype, step)
            set_peft_model_state_dict(peft_models[name], adapter.tensors)
            assert all(p.dtype == torch.float32 for p in peft_models[name].parameters() if p.requires_grad)
        served = _serving(served, dtype, adapters)
        with torch.no_grad():
            out = served(input_ids=ids, adapter_names=rows).logits
            ref = torch.cat([peft_models[name](input_ids=ids[b:b + 1]).logits if name else
                             _base_logits(peft_models["dora"], ids[b:b + 1]) for b, name in enumerate(rows)])
        assert out.dtype == ref.dtype == dtype
        # bit-identical here (the same fp32 sums, one rounding); a bf16 step of the logits (|logit| < 1) allowed
        # for another BLAS summing rows in another order
        torch.testing.assert_close(out, ref, rtol=4e-3, atol=4e-3)
        logits[step] = out, ref
    (out0, ref0), (out1, ref1) = logits.values()
    for b, name in enumerate(rows[:2]):
        changed = float((out1[b] != out0[b]).double().mean())
        changed_peft = float((ref1[b] != ref0[b]).double().mean())
        assert changed_peft > 0.1 and 0.5 * changed_peft <= changed <= 2 * changed_peft, (name, changed, changed_peft)


def _base_logits(peft_model, ids):
    with peft_model.disable_adapter():
        return peft_model(input_ids=ids).logits


@pytest.mark.parametrize("row_counts", [(4, 4), (3, 5)])
def test_concurrent_calls_from_threads_each_serve_their_own_rows(adapter_dirs, row_counts):
    """Two threads call one MultiLoraModel at once, each with its own rows; every result equals each of its rows
    served alone (the batch travels with the call, not in the shared layers)."""
    import threading

    served = MultiLoraModel(make_tiny_llama(), {n: adapter_dirs[n] for n in ("a", "b", "c")})
    requests = []
    for t, rows in enumerate(row_counts):
        names = [("a", "b", None, "c")[(t + i) % 4] for i in range(rows)]
        requests.append((input_ids(rows, seed=20 + t), names))
    alone = [torch.cat([served(input_ids=ids[b:b + 1], adapter_names=[name]).logits for b, name in enumerate(names)])
             for ids, names in requests]
    assert (alone[0][0] - alone[0][1]).abs().amax() > 1e-2  # different adapters, different rows: the test can fail
    start = threading.Barrier(len(requests))
    wrong = []

    def serve(t):
        ids, names = requests[t]
        start.wait()
        for _ in range(10):
            try:
                out = served(input_ids=ids, adapter_names=names).logits
            except Exception as exc:  # a call that fails is as wrong as a wrong result
                wrong.append((t, repr(exc)))
                continue
            if not torch.allclose(out, alone[t], rtol=1e-5, atol=1e-5):
                wrong.append((t, float((out - alone[t]).abs().amax())))

    threads = [threading.Thread(target=serve, args=(t,)) for t in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not wrong, wrong[:5]


def test_a_batch_built_by_another_model_is_refused(adapter_dirs):
    """Same row count, another model's bank (its adapter slots mean other adapters): refused before it runs; a
    batch of this model built before an add_adapter still serves."""
    served = MultiLoraModel(make_tiny_llama(), {"a": adapter_dirs["a"], "b": adapter_dirs["b"]})
    other = MultiLoraModel(make_tiny_llama(), {"b": adapter_dirs["b"], "a": adapter_dirs["a"]})
    ids = input_ids(2)
    foreign = other.batch(["a", "b"])
    with pytest.raises(ValueError, match="not built by this MultiLoraModel"):
        served(input_ids=ids, batch=foreign)
    with pytest.raises(ValueError, match="not built by this MultiLoraModel"):
        served.generate(input_ids=ids, batch=foreign, max_new_tokens=1)
    own = served.batch(["a", "b"])
    served.add_adapter("c", adapter_dirs["c"])
    torch.testing.assert_close(served(input_ids=ids, batch=own).logits,
                               served(input_ids=ids, adapter_names=["a", "b"]).logits, rtol=0, atol=0)
