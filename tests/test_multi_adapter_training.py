"""Many LoRA adapters of one PEFT model trained at once in mixed batches (fastpeft.train_adapters) against each
adapter trained alone by PEFT on its own rows, from the same initialisation and dropout seeds.

What is compared: the adapters' parameters after STEPS AdamW steps (per-adapter lr / weight decay), as the
relative error of each parameter tensor: in float64 within 1e-9 (the math is the same), in fp32 within 1e-5 or
four times PEFT's own spread, whichever is larger: PEFT trained alone on its rows each given three times (the same
loss and gradients, the roundings of a batch of another size, as the mixed batch has) against PEFT on its rows. The spread is not always below 1e-5: AdamW's first steps move
each entry by about ``lr · sign(g)``, so an entry whose gradient is within rounding of zero moves by ``lr`` either
way whatever computes it (rounding noise of 1e-7 on the gradients gives 2e-5 on such a parameter). With dropout, the multi-adapter run draws each adapter's masks from its own generator seeded
``seed_k`` (``dropout_seeds``), and PEFT's run of that adapter alone starts from ``torch.manual_seed(seed_k)``: the
tiny Llama draws no other random numbers in training (attention dropout 0), so both draw the same masks, of the
same shape (the adapter's rows), in the same layer order, and the runs are equal to rounding."""

import copy

import pytest
import torch

import fastpeft
from fastpeft.integration import multi_adapter_training

from conftest import load_tiny_llama_4bit, make_tiny_llama

peft = pytest.importorskip("peft")

STEPS = 5
ROWS, LENGTH, VOCAB = 4, 12, 128
# (rank, alpha, rsLoRA, dropout, lr, weight decay): mixed ranks and scalings, each exact in fp32 (a bank holds its
# scalings in fp32, as PEFT multiplies fp32 factors by them: an fp64 run would see the rounding of alpha / sqrt(8))
ADAPTERS = {"cust1": (2, 4.0, False, 0.1, 1e-2, 0.0), "cust2": (16, 8.0, True, 0.0, 5e-3, 0.1),
            "cust3": (4, 16.0, False, 0.2, 2e-2, 0.01)}
SEEDS = {"cust1": 11, "cust2": 12, "cust3": 13}


def _config(name, dropout=True, use_dora=False):
    rank, alpha, rslora, p, _, _ = ADAPTERS[name]
    return peft.LoraConfig(r=rank, lora_alpha=alpha, use_rslora=rslora, lora_dropout=p if dropout else 0.0,
                           target_modules="all-linear", task_type="CAUSAL_LM", use_dora=use_dora)


def _base(four_bit, tiny_llama_dir, dtype=torch.float32):
    return (load_tiny_llama_4bit(tiny_llama_dir) if four_bit else make_tiny_llama(dtype)).train()


def _randomise(model, seed):
    """B random too (PEFT starts it at zero): every factor then gets a gradient at the first step."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.1)


def _multi_model(names, four_bit, tiny_llama_dir, dropout=True, dora=(), dtype=torch.float32):
    torch.manual_seed(0)
    model = peft.get_peft_model(_base(four_bit, tiny_llama_dir, dtype), _config(names[0], dropout, names[0] in dora),
                                adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, _config(name, dropout, name in dora))
    _randomise(model, 5)
    return model


def _single_model(multi, name, four_bit, tiny_llama_dir, dropout=True, dora=(), dtype=torch.float32):
    """PEFT with adapter ``name`` alone, its parameters copied from ``multi``'s."""
    model = peft.get_peft_model(_base(four_bit, tiny_llama_dir, dtype), _config(name, dropout, name in dora),
                                adapter_name=name)
    source = dict(multi.named_parameters())
    with torch.no_grad():
        for key, param in model.named_parameters():
            if param.requires_grad:
                param.copy_(source[key])
    return model


def _batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(1, VOCAB, (ROWS * 4, 1), generator=generator)
    ids = (starts + torch.arange(LENGTH)) % VOCAB
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding on one row
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def _adapter_params(model, name):
    return {k: p.detach().clone() for k, p in model.named_parameters() if f".{name}." in k}


def _train_multi(model, names, row_names, steps, seeds=None, accumulate=1, batches=None):
    groups = fastpeft.train_adapters(model, names, lr={n: ADAPTERS[n][4] for n in names},
                                     weight_decay={n: ADAPTERS[n][5] for n in names}, dropout_seeds=seeds)
    optimizer = torch.optim.AdamW(groups)
    ids, mask, labels = _batch()
    model.train()
    for step in range(steps):
        for micro in range(accumulate):
            rows = slice(micro * len(ids) // accumulate, (micro + 1) * len(ids) // accumulate)
            names_now = row_names if batches is None else batches[step]
            out = model(input_ids=ids[rows], attention_mask=mask[rows], labels=labels[rows],
                        adapter_names=names_now[rows])
            out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model


def _train_single(model, name, row_names, steps, seed=None, accumulate=1, batches=None, repeat=1):
    _, _, _, _, lr, decay = ADAPTERS[name]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=decay)
    ids, mask, labels = _batch()
    if seed is not None:
        torch.manual_seed(seed)
    model.train()
    for step in range(steps):
        names_now = row_names if batches is None else batches[step]
        stepped = False
        for micro in range(accumulate):
            part = range(micro * len(ids) // accumulate, (micro + 1) * len(ids) // accumulate)
            rows = torch.tensor([b for b in part if names_now[b] == name], dtype=torch.long)
            rows = rows.repeat(repeat)
            if rows.numel() == 0:
                continue
            out = model(input_ids=ids[rows], attention_mask=mask[rows], labels=labels[rows])
            out.loss.backward()
            stepped = True
        if stepped:  # an adapter absent from a step is not stepped
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model


def _errors(model, ref, name) -> dict:
    got, want = _adapter_params(model, name), _adapter_params(ref, name)
    assert got.keys() == want.keys() and got
    return {key: float((got[key] - want[key]).norm() / want[key].norm()) for key in want}


def _assert_params_close(multi, single, name, tol=1e-5, spread=None):
    for key, err in _errors(multi, single, name).items():
        bound = tol if spread is None else max(tol, 4 * spread[key])
        assert err <= bound, f"{key}: relative error {err:.2e} > {bound:.2e}"


def _row_names(names, with_base=True):
    rows = [names[b % len(names)] for b in range(ROWS * 4)]
    if with_base:
        rows[3] = rows[10] = "__base__"
    return rows


@pytest.mark.parametrize("four_bit", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("dropout", [False, True], ids=["no-dropout", "dropout"])
def test_matches_each_adapter_trained_alone(four_bit, dropout, tiny_llama_dir):
    if four_bit:
        pytest.importorskip("bitsandbytes")
    names = list(ADAPTERS)
    rows = _row_names(names)
    multi = _multi_model(names, four_bit, tiny_llama_dir, dropout)
    singles = {n: _single_model(multi, n, four_bit, tiny_llama_dir, dropout) for n in names}
    _train_multi(multi, names, rows, STEPS, seeds=SEEDS if dropout else None)
    for name in names:
        seed = SEEDS[name] if dropout else None
        _train_single(singles[name], name, rows, STEPS, seed=seed)
        spread = None
        if not dropout:  # (repeated rows would draw other masks)
            repeated_run = _single_model(_multi_model(names, four_bit, tiny_llama_dir, dropout), name, four_bit,
                                         tiny_llama_dir, dropout)
            spread = _errors(_train_single(repeated_run, name, rows, STEPS, repeat=3), singles[name], name)
        _assert_params_close(multi, singles[name], name, spread=spread)


@pytest.mark.parametrize("dropout", [False, True], ids=["no-dropout", "dropout"])
def test_float64_equals_peft(dropout):
    names = list(ADAPTERS)
    rows = _row_names(names)
    multi = _multi_model(names, False, None, dropout, dtype=torch.float64)
    singles = {n: _single_model(multi, n, False, None, dropout, dtype=torch.float64) for n in names}
    _train_multi(multi, names, rows, STEPS, seeds=SEEDS if dropout else None)
    for name in names:
        _train_single(singles[name], name, rows, STEPS, seed=SEEDS[name] if dropout else None)
        _assert_params_close(multi, singles[name], name, tol=1e-9)


def test_absent_adapter_is_not_stepped_and_accumulation():
    """An adapter with no row in a step gets no gradient (None) and AdamW leaves it alone (its weight decay too), as
    PEFT training it alone would not step it; two micro-batches accumulate as PEFT's do."""
    names = list(ADAPTERS)
    full = _row_names(names)
    without_third = [n if n != "cust3" else "__base__" for n in full]
    batches = [full, without_third, full, without_third, full]
    multi = _multi_model(names, False, None, dropout=False)
    before = _adapter_params(multi, "cust3")
    _train_multi(multi, names, full, 1, accumulate=2)  # one step with every adapter present
    stepped_once = _adapter_params(multi, "cust3")
    assert any(not torch.equal(before[k], stepped_once[k]) for k in before)
    groups = fastpeft.train_adapters(multi, names, lr=1e-2, weight_decay=0.5)
    ids, mask, labels = _batch()
    out = multi(input_ids=ids, attention_mask=mask, labels=labels, adapter_names=without_third)
    out.loss.backward()
    third = [p for g in groups if g["adapter"] == "cust3" for p in g["params"]]
    assert third and all(p.grad is None for p in third)
    assert all(p.grad is not None for g in groups if g["adapter"] != "cust3" for p in g["params"])
    torch.optim.AdamW(groups).step()
    assert all(torch.equal(a, b) for a, b in zip(_adapter_params(multi, "cust3").values(), stepped_once.values()))

    multi = _multi_model(names, False, None, dropout=False)
    singles = {n: _single_model(multi, n, False, None, dropout=False) for n in names}
    repeated = {n: _single_model(multi, n, False, None, dropout=False) for n in names}
    _train_multi(multi, names, full, STEPS, accumulate=2, batches=batches)
    for name in names:
        _train_single(singles[name], name, full, STEPS, accumulate=2, batches=batches)
        spread = _errors(_train_single(repeated[name], name, full, STEPS, accumulate=2, batches=batches, repeat=3),
                         singles[name], name)
        _assert_params_close(multi, singles[name], name, spread=spread)


def test_base_rows_and_loss():
    """``out.loss`` is the sum of each adapter's loss over its rows, ``"__base__"`` rows train nothing; a batch of
    base rows only has no loss."""
    names = list(ADAPTERS)
    rows = _row_names(names)
    multi = _multi_model(names, False, None, dropout=False)
    fastpeft.train_adapters(multi, names, lr=1e-2)
    ids, mask, labels = _batch()
    out = multi(input_ids=ids, attention_mask=mask, labels=labels, adapter_names=rows)
    assert sorted(out.adapter_losses) == names
    torch.testing.assert_close(out.loss, sum(out.adapter_losses.values()))
    with multi.disable_adapter(), torch.no_grad():
        base_logits = multi(input_ids=ids, attention_mask=mask).logits
    base_rows = [b for b, n in enumerate(rows) if n == "__base__"]
    torch.testing.assert_close(out.logits[base_rows], base_logits[base_rows], rtol=1e-6, atol=1e-6)
    only_base = multi(input_ids=ids, attention_mask=mask, labels=labels, adapter_names=["__base__"] * len(ids))
    assert only_base.loss is None and only_base.adapter_losses == {}


@pytest.mark.parametrize("dropout", [False, True], ids=["no-dropout-fp32", "dropout-fp64"])
def test_dora_in_the_mix(dropout):
    """A DoRA adapter trains beside LoRA ones (its rows through the DoRA op), equal to PEFT training it alone: in
    fp32 within PEFT's spread, with dropout (the spread run would draw other masks) in float64 within 1e-9."""
    names = list(ADAPTERS)
    rows = _row_names(names)
    dora, dtype = ("cust2",), torch.float64 if dropout else torch.float32
    multi = _multi_model(names, False, None, dropout, dora, dtype)
    singles = {n: _single_model(multi, n, False, None, dropout, dora, dtype) for n in names}
    repeated = {n: _single_model(multi, n, False, None, dropout, dora, dtype) for n in names}
    _train_multi(multi, names, rows, STEPS, seeds=SEEDS if dropout else None)
    for name in names:
        _train_single(singles[name], name, rows, STEPS, seed=SEEDS[name] if dropout else None)
        if dropout:
            _assert_params_close(multi, singles[name], name, tol=1e-9)
        else:
            spread = _errors(_train_single(repeated[name], name, rows, STEPS, repeat=3), singles[name], name)
            _assert_params_close(multi, singles[name], name, spread=spread)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing_same_as_without(reentrant):
    """With gradient checkpointing the recomputed layers see the same adapter_names and dropout masks: the run
    equals the run without."""
    names = list(ADAPTERS)
    rows = _row_names(names)
    plain = _multi_model(names, False, None, dropout=True)
    checkpointed = copy.deepcopy(plain)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    checkpointed.enable_input_require_grads()
    _train_multi(plain, names, rows, 2, seeds=SEEDS)
    _train_multi(checkpointed, names, rows, 2, seeds=SEEDS)
    for name in names:
        _assert_params_close(checkpointed, plain, name, tol=1e-6)


def test_saved_adapters_load_in_peft(tmp_path):
    names = list(ADAPTERS)
    rows = _row_names(names)
    multi = _train_multi(_multi_model(names, False, None, dropout=False), names, rows, 2)
    multi.save_pretrained(tmp_path)
    ids, mask, _ = _batch()
    multi.eval()
    for name in names:
        loaded = peft.PeftModel.from_pretrained(make_tiny_llama(), str(tmp_path / name), adapter_name=name).eval()
        multi.set_adapter(name)
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits,
                                       multi(input_ids=ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-5)


def test_compiled_model_runs_the_layers_eagerly():
    """Under torch.compile the adapted layers' training path runs outside the graph (counted): the same losses and
    gradients as eager."""
    names = list(ADAPTERS)
    rows = _row_names(names)
    eager = _multi_model(names, False, None, dropout=False)
    compiled_model = copy.deepcopy(eager)
    ids, mask, labels = _batch()
    grads = []
    for model, run in ((eager, eager), (compiled_model, torch.compile(compiled_model, backend="eager"))):
        fastpeft.train_adapters(model, names, lr=1e-2)
        model.train()
        before = sum(multi_adapter_training.COMPILE_FALLBACKS.values())
        out = run(input_ids=ids, attention_mask=mask, labels=labels, adapter_names=rows)
        out.loss.backward()
        if run is not model:
            assert sum(multi_adapter_training.COMPILE_FALLBACKS.values()) > before
        grads.append({k: p.grad for k, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], rtol=1e-5, atol=1e-7)


def test_bf16_within_peft_spread():
    """bf16 model, fp32 adapters (PEFT's autocast_adapter_dtype): the multi-adapter run is as far from PEFT's run
    as PEFT's own run of the rows given three times is (times four)."""
    names = list(ADAPTERS)
    rows = _row_names(names)
    multi = _multi_model(names, False, None, dropout=False, dtype=torch.bfloat16)
    singles = {n: _single_model(multi, n, False, None, dropout=False, dtype=torch.bfloat16) for n in names}
    repeated = {n: _single_model(multi, n, False, None, dropout=False, dtype=torch.bfloat16) for n in names}
    _train_multi(multi, names, rows, STEPS)
    for name in names:
        _train_single(singles[name], name, rows, STEPS)
        spread = _errors(_train_single(repeated[name], name, rows, STEPS, repeat=3), singles[name], name)
        errors = _errors(multi, singles[name], name)
        assert max(errors.values()) <= 4 * max(spread.values()) + 1e-3, (errors, spread)


def test_bad_input():
    names = list(ADAPTERS)
    multi = _multi_model(names, False, None, dropout=False)
    with pytest.raises(ValueError, match="unknown adapter"):
        fastpeft.train_adapters(multi, ["cust1", "nope"], lr=1e-2)
    with pytest.raises(ValueError, match="missing"):
        fastpeft.train_adapters(multi, names, lr={"cust1": 1e-2})
    with pytest.raises(TypeError, match="PEFT model"):
        fastpeft.train_adapters(make_tiny_llama(), names, lr=1e-2)
    with pytest.raises(ValueError, match="twice"):
        fastpeft.train_adapters(multi, ["cust1", "cust1"], lr=1e-2)
    fastpeft.train_adapters(multi, names, lr=1e-2)
    multi.train()
    ids, mask, labels = _batch()
    with pytest.raises(ValueError, match="entries for an input"):
        multi(input_ids=ids, labels=labels, adapter_names=["cust1"])
    with pytest.raises(ValueError, match="unknown adapters"):
        multi(input_ids=ids, labels=labels, adapter_names=["zzz"] * len(ids))


def test_example_rank_sweep(tmp_path):
    """examples/train_many_adapters.py: 8 adapters of 8 ranks in one run, every loss falls, each adapter saved
    loads in PEFT and gives the trained model's logits."""
    from conftest import load_example

    example = load_example("train_many_adapters")
    model, names = example.sweep_model(make_tiny_llama().train())
    history = example.train(model, names, steps=4)
    assert len(names) == 8 and all(history[-1][n] < history[0][n] for n in names), history
    model.save_pretrained(tmp_path)
    ids = _batch()[0][:2]
    model.eval()
    for name in (names[0], names[-1]):
        loaded = peft.PeftModel.from_pretrained(make_tiny_llama(), str(tmp_path / name), adapter_name=name).eval()
        model.set_adapter(name)
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seeded", [False, True], ids=["global-rng", "seeded"])
def test_one_adapter_on_every_row(seeded):
    """Every row with one adapter (the one-adapter op's path), with dropout from the global RNG or the adapter's
    generator: PEFT's run of it alone from the same seed."""
    rows = ["cust1"] * (ROWS * 4)
    multi = _multi_model(["cust1"], False, None, dropout=True)
    single = _single_model(multi, "cust1", False, None, dropout=True)
    if not seeded:
        torch.manual_seed(SEEDS["cust1"])
    _train_multi(multi, ["cust1"], rows, STEPS, seeds={"cust1": SEEDS["cust1"]} if seeded else None)
    _train_single(single, "cust1", rows, STEPS, seed=SEEDS["cust1"])
    _assert_params_close(multi, single, "cust1")


def test_lora_bias_runs_peft_mixed_batch_forward():
    """An adapter with lora_bias: the layer's training call runs PEFT's own mixed-batch forward (the gate says why),
    and that adapter still trains."""
    from fastpeft.integration.fused_forward import _fused_path

    names = ["cust1", "cust2"]
    torch.manual_seed(0)
    model = peft.get_peft_model(make_tiny_llama().train(), _config("cust1", False), adapter_name="cust1")
    model.add_adapter("cust2", peft.LoraConfig(r=4, target_modules="all-linear", lora_bias=True,
                                               task_type="CAUSAL_LM"))
    groups = fastpeft.train_adapters(model, names, lr=1e-2)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 3, 64)
    assert "lora_bias" in _fused_path(layer, x, (), {"adapter_names": ["cust1", "cust2"]})
    ids, mask, labels = _batch()
    model(input_ids=ids[:4], labels=labels[:4], adapter_names=["cust1", "cust2"] * 2).loss.backward()
    assert all(p.grad is not None for g in groups for p in g["params"])


@pytest.mark.parametrize("dropout", [False, True], ids=["no-dropout", "dropout"])
def test_multi_lora_model_trains_like_peft(dropout, tmp_path):
    """fastpeft.MultiLoraModel without peft in the loop: adapters loaded from PEFT's files, trained together
    (MultiLoraModel.train_adapters), equal each trained alone by PEFT; the trained adapter saves in PEFT's format and
    loads back in PEFT with the same logits."""
    names = list(ADAPTERS)
    rows = _row_names(names)
    source = _multi_model(names, False, None, dropout)
    singles = {n: _single_model(source, n, False, None, dropout) for n in names}
    source.save_pretrained(tmp_path / "start")
    served = fastpeft.MultiLoraModel(make_tiny_llama(), {n: tmp_path / "start" / n for n in names})
    groups = served.train_adapters(names, lr={n: ADAPTERS[n][4] for n in names},
                                   weight_decay={n: ADAPTERS[n][5] for n in names},
                                   dropout_seeds=SEEDS if dropout else None)
    optimizer = torch.optim.AdamW(groups)
    ids, mask, labels = _batch()
    served.train()
    row_names = [None if n == "__base__" else n for n in rows]
    for _ in range(STEPS):
        out = served(input_ids=ids, attention_mask=mask, labels=labels, adapter_names=row_names)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for name in names:
        _train_single(singles[name], name, rows, STEPS, seed=SEEDS[name] if dropout else None)
        trained = served.trained_adapter(name)
        want = {k.replace(f".{name}.", "."): p for k, p in _adapter_params(singles[name], name).items()}
        for key, value in want.items():
            err = float((trained.tensors[key] - value).norm() / value.norm())
            assert err <= 2e-5, f"{key}: relative error {err:.2e}"
    fastpeft.save_adapter(served.trained_adapter(names[1]), tmp_path / "trained")
    loaded = peft.PeftModel.from_pretrained(make_tiny_llama(), str(tmp_path / "trained")).eval()
    served.serve_trained()
    served.eval()
    torch.testing.assert_close(served(input_ids=ids[:2], adapter_names=[names[1]] * 2).logits,
                               loaded(input_ids=ids[:2]).logits, rtol=1e-5, atol=1e-5)


def test_multi_lora_model_training_bad_input(tmp_path):
    names = list(ADAPTERS)
    _multi_model(names, False, None, False).save_pretrained(tmp_path)
    served = fastpeft.MultiLoraModel(make_tiny_llama(), {n: tmp_path / n for n in names})
    with pytest.raises(KeyError, match="unknown adapter"):
        served.train_adapters(["nope"], lr=1e-2)
    with pytest.raises(ValueError, match="distinct"):
        served.train_adapters(["cust1", "cust1"], lr=1e-2)
    served.train_adapters(["cust1"], lr=1e-2)
    served.train()
    ids, _, labels = _batch()
    with pytest.raises(ValueError, match="not being trained"):
        served(input_ids=ids[:2], labels=labels[:2], adapter_names=["cust1", "cust2"])
    with pytest.raises(ValueError, match="entries for an input"):
        served(input_ids=ids[:2], labels=labels[:2], adapter_names=["cust1"])
    served.model.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        served(input_ids=ids[:2], labels=labels[:2], adapter_names=["cust1", None])
