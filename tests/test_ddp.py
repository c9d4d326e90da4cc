"""DistributedDataParallel over fastpeft layers: 2 CPU processes on the gloo backend, each with half the batch,
end with the gradients of one process on the whole batch (accelerated PEFT LoRA dense and 4-bit, injected DoRA)."""

import gc
import importlib.util
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastpeft

from conftest import load_tiny_llama_4bit, make_tiny_llama

peft = pytest.importorskip("peft")

WORLD = 2
TOKENS = torch.randint(1, 128, (4, 8), generator=torch.Generator().manual_seed(1))
CASES = ["accelerate-lora", "inject-dora", "accelerate-lora-4bit"]
WORKER_TIMEOUT_S = 300  # about 15 s on 2 CPU cores


def _model(case, tiny_llama_dir):
    torch.manual_seed(0)  # the same adapter initialisation in every process
    base = load_tiny_llama_4bit(tiny_llama_dir) if case.endswith("4bit") else make_tiny_llama()
    base.train()  # bitsandbytes' eval-mode CPU path repacks 4-bit weights
    if case.startswith("inject"):
        fastpeft.inject(base, r=4, init_lora_weights=False, use_dora="dora" in case)
        return base
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    fastpeft.accelerate(model)
    return model


def _grads(model, tokens):
    model(input_ids=tokens, labels=tokens).loss.backward()
    module = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.requires_grad}


def _worker(rank, init_file, tiny_llama_dir, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for case in CASES:
            if case.endswith("4bit") and not _has_bitsandbytes():
                continue
            ddp = torch.nn.parallel.DistributedDataParallel(_model(case, tiny_llama_dir))
            results[case] = _grads(ddp, TOKENS[rank::WORLD])  # equal shards: DDP's mean is the batch mean
            # Free DDP's Reducer while the process group is still registered: if the Reducer drops the
            # group's last reference, ~ProcessGroupGloo joins its worker thread with the GIL held while
            # that thread may need the GIL to free its last work (torch 2.13; a hang seen here), whereas
            # destroy_process_group releases the GIL first.
            del ddp
            gc.collect()
        if rank == 0:
            torch.save(results, out_file)
    finally:
        dist.destroy_process_group()


def _has_bitsandbytes():
    return importlib.util.find_spec("bitsandbytes") is not None


def test_ddp_gradients_equal_single_process(tmp_path, tiny_llama_dir):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    workers = mp.spawn(_worker, args=(str(tmp_path / "init"), str(tiny_llama_dir), str(tmp_path / "grads.pt")),
                       nprocs=WORLD, join=False)
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    while not workers.join(timeout=1):  # raises if a worker failed
        if time.monotonic() > deadline:  # a hang fails this test instead of stalling the whole run
            for process in workers.processes:
                process.kill()
            pytest.fail(f"the DDP workers did not finish in {WORKER_TIMEOUT_S} s")
    results = torch.load(tmp_path / "grads.pt")
    assert set(results) == set(CASES if _has_bitsandbytes() else CASES[:-1])
    for case, grads in results.items():
        expected = _grads(_model(case, tiny_llama_dir), TOKENS)
        assert grads.keys() == expected.keys() and grads, case
        for name, grad in grads.items():
            torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{case} {name}: {m}")
