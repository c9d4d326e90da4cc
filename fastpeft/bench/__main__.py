"""``fastpeft bench`` / ``python -m fastpeft.bench``: time fastpeft against PEFT, bitsandbytes and the reference."""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path
from typing import Optional

import torch

SUITES = {
    "quick": dict(micro_m=[1, 7], micro_features=[(64, 128)], micro_adapters=3, rank=4, warmup=1, repeats=3,
                  min_round_ms=0.0, rotations=2, dtype="float32", llama="quick", train_batch=2, seq_len=16,
                  decode_prompt=4, decode_tokens=4, serving_adapters=[1, 2], serving_seqs=2),
    "cpu": dict(micro_m=[1, 64], micro_features=[(1024, 1024), (2816, 1024)], micro_adapters=8, rank=16, warmup=1,
                repeats=7, min_round_ms=20.0, rotations=2, dtype="float32", llama="cpu", train_batch=2, seq_len=64,
                decode_prompt=8, decode_tokens=8, serving_adapters=[1, 4, 16, 64], serving_seqs=16),
    "gpu": dict(micro_m=[1, 8, 16, 512, 4096], micro_features=[(4096, 4096), (14336, 4096), (4096, 14336)],
                micro_adapters=64, rank=16, warmup=5, repeats=20, min_round_ms=0.0, rotations=4, dtype="bfloat16",
                llama="gpu", train_batch=8, seq_len=512, decode_prompt=128, decode_tokens=64,
                serving_adapters=[1, 8, 64], serving_seqs=64),
}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _shapes(text: str) -> list:
    """``"4096x4096,14336x4096"`` (out x in) -> ``[(4096, 4096), (14336, 4096)]``."""
    try:
        return [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",") if item]
    except ValueError:
        raise argparse.ArgumentTypeError(f"features must look like 4096x4096,14336x4096 (out x in), got {text!r}")


def _ints(text: str) -> list:
    try:
        return [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


DESCRIPTION = """\
Times fastpeft against Hugging Face PEFT, bitsandbytes and fastpeft's plain-PyTorch reference: micro cases (one
LoRA, QLoRA, DoRA, IA3 or multi-LoRA layer, NF4 dequantisation) and end-to-end cases on a built-in random-weight
tiny Llama (no download) or --model: a LoRA training step, greedy decode, the same on the model loaded in NF4, and
serving many adapters in one batch.

suites (each option below overrides its suite's value):
  quick  the smallest sizes: a smoke run of seconds
  cpu    the default without CUDA: laptop-sized shapes, about 1.5 minutes
         on an idle 2-core machine
  gpu    the default with CUDA: the production kernel shapes in bf16 and a
         0.2B-parameter Llama

The implementations of a case are timed side by side, taking turns call by call; a result is the median over
rounds of the per-round time ratio to a baseline (below 1: fastpeft is faster). The console shows these ratios;
results.json, table.txt, table.md and one PNG per case in --out hold the rest."""


def _suite_values(key: str) -> str:
    """Each suite's value of ``key``, as the help text shows it: ``quick 1,7; cpu 1,64; gpu 1,8,16``."""
    def text(value):
        if isinstance(value, list):
            return ",".join("x".join(map(str, v)) if isinstance(v, tuple) else str(v) for v in value)
        return str(value)
    return "; ".join(f"{name} {text(suite[key])}" for name, suite in SUITES.items())


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    from ..cli import HelpFormatter

    parser = parser or argparse.ArgumentParser(prog="fastpeft bench", description=DESCRIPTION,
                                               formatter_class=HelpFormatter)
    parser.add_argument("--suite", choices=sorted(SUITES), help="size preset (default: gpu with CUDA, else cpu)")
    parser.add_argument("--out", type=Path, default=Path("bench-out"), help="output folder")
    parser.add_argument("--device", choices=("cuda", "cpu"), help="where to run (default: cuda when available)")
    parser.add_argument("--model", dest="model_path", metavar="PATH_OR_ID",
                        help="a Hugging Face causal-LM checkpoint for the end-to-end cases (default: the built-in "
                             "random tiny Llama)")
    parser.add_argument("--m", dest="micro_m", type=_ints, metavar="M,...",
                        help=f"micro cases: token counts M (default: {_suite_values('micro_m')})")
    parser.add_argument("--features", dest="micro_features", type=_shapes, metavar="OUTxIN,...",
                        help=f"micro cases: weight shapes out x in (default: {_suite_values('micro_features')})")
    parser.add_argument("--dtype", choices=sorted(_DTYPES),
                        help=f"dtype of weights and activations (default: {_suite_values('dtype')})")
    parser.add_argument("--rank", type=int, help=f"LoRA rank (default: {_suite_values('rank')})")
    parser.add_argument("--adapters", dest="serving_adapters", type=_ints, metavar="N,...",
                        help=f"multi-adapter cases: adapter counts to compare (default: "
                             f"{_suite_values('serving_adapters')})")
    parser.add_argument("--seqs", dest="serving_seqs", type=int, metavar="N",
                        help="multi-adapter cases: sequences in the mixed batch, sequence b using adapter "
                             f"b mod adapters (default: {_suite_values('serving_seqs')})")
    parser.add_argument("--repeats", type=int, metavar="N",
                        help="timed rounds; in each, the implementations of a case take turns call by call "
                             f"(default: {_suite_values('repeats')})")
    parser.add_argument("--min-round-ms", dest="min_round_ms", type=float, metavar="MS",
                        help="calls per round enough that the fastest implementation of a case runs this long, "
                             f"0 for one call per round (default: {_suite_values('min_round_ms')})")
    parser.add_argument("--warmup", type=int, metavar="N", help=f"untimed calls before timing (default: {_suite_values('warmup')})")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="CPU threads of torch (default on CPU: $OMP_NUM_THREADS if set, else 1, which keeps "
                             "ratios steady on a small or shared CPU; on CUDA: torch's own)")
    parser.add_argument("--clock", choices=("wall", "process"),
                        help="CPU clock: wall time, or this process's CPU time, which other programs' load does "
                             "not stretch (default: process with one thread, else wall)")
    parser.add_argument("--cases", type=lambda s: [c for c in s.split(",") if c], metavar="NAME,...",
                        help="only cases whose name contains one of these, e.g. lora.fwd,decode (default: all)")
    parser.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                        help="report the cases not started by then as skipped (default: no limit)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    return parser


def make_config(args: argparse.Namespace):
    from .cases import LLAMA_SIZES, BenchConfig

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    suite = dict(SUITES[args.suite or ("gpu" if device.type == "cuda" else "cpu")])
    for key in ("micro_m", "micro_features", "serving_adapters", "serving_seqs", "dtype", "rank", "repeats", "warmup",
                "min_round_ms", "clock", "model_path"):
        if getattr(args, key) is not None:
            suite[key] = getattr(args, key)
    if getattr(args, "clock", None) is None and device.type == "cpu":
        suite["clock"] = "process" if cpu_threads(args, device) == 1 else "wall"
    if suite["repeats"] < 1 or suite["warmup"] < 0 or suite["rank"] < 1 or suite["min_round_ms"] < 0:
        raise SystemExit(f"fastpeft bench: need repeats >= 1, warmup >= 0, rank >= 1, min-round-ms >= 0; got "
                         f"{suite['repeats']}, {suite['warmup']}, {suite['rank']}, {suite['min_round_ms']}")
    if suite["serving_seqs"] < 1 or min(suite["serving_adapters"], default=0) < 1:
        raise SystemExit(f"fastpeft bench: need --seqs >= 1 and adapter counts >= 1; got {suite['serving_seqs']}, "
                         f"{suite['serving_adapters']}")
    suite["dtype"] = _DTYPES[suite["dtype"]]
    suite["llama"] = LLAMA_SIZES[suite["llama"]]
    return BenchConfig(device=device, cases=args.cases, **suite)


def cpu_threads(args: argparse.Namespace, device: torch.device) -> Optional[int]:
    """The torch CPU threads a run uses: ``--threads``, else on CPU ``$OMP_NUM_THREADS`` when set, else 1; None (torch's
    own choice) on CUDA without ``--threads``. One thread on CPU: the cases are small, and with several threads each
    call waits for the slowest of them, so that a busy core elsewhere on the machine stretches one implementation's
    calls and not the other's (the cpu suite's train_step and decode cases on a 2-core host at load average 7-9:
    948 s with 2 threads, 81 s with 1, ``fastpeft bench --cases train_step,decode --threads N --clock wall``)."""
    if getattr(args, "threads", None) is not None:
        if args.threads < 1:
            raise SystemExit(f"fastpeft bench: need --threads >= 1, got {args.threads}")
        return args.threads
    if device.type != "cpu":
        return None
    omp = os.environ.get("OMP_NUM_THREADS", "")
    return int(omp) if omp.isdigit() and int(omp) >= 1 else 1


def _progress(total: int):
    """A tqdm bar on stderr, or None (then each job prints a line)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="job", file=sys.stderr, dynamic_ncols=True)


# Implementations every other one of a case is compared with (``vs`` in the results: median per-round time ratios)
BASELINES = ("peft", "reference", "hf", "bnb")


def group_key(job) -> tuple:
    """The implementations timed side by side: one case at one shape; the multi-adapter decode case over every
    adapter count (its growth from 1 to 64 adapters is a ratio too)."""
    from .report import shape_label

    return job.case, "all adapter counts" if job.case == "multi_lora_decode" else shape_label(job.params)


def group_jobs(jobs: list) -> dict:
    """``{group_key: [job, ...]}`` in the jobs' order."""
    groups: dict = {}
    for job in jobs:
        groups.setdefault(group_key(job), []).append(job)
    return groups


def run_group(jobs: list, cfg, roofline: Optional[dict], memory: bool = True, on_setup=None) -> list:
    """One result per job of a group (:func:`group_jobs`): every implementation built and warmed up, then timed side
    by side (:func:`fastpeft.bench.timing.measure_interleaved`: ``cfg.repeats`` rounds), with ``vs``, its median
    per-round time ratio to each baseline implementation of the same shape (:data:`BASELINES`). ``memory``: then each
    built again alone for its peak memory (the others freed: a peak with them resident would count their models
    too). An implementation whose package is missing is skipped with the reason; one that raises is reported with
    its error and the others go on. ``on_setup(job)`` is called before each build (progress)."""
    from .cases import Unavailable
    from .roofline import roofline_fraction
    from .timing import measure_interleaved, peak_memory, ratio, summarise

    results, prepared = [], {}
    for n, job in enumerate(jobs):
        results.append(result_head(job))
        if on_setup is not None:
            on_setup(job)
        try:
            prepared[n] = _build(job, cfg)
        except Unavailable as exc:
            results[n]["skipped"] = str(exc)
        except Exception as exc:  # one broken implementation must not lose a long run: reported, exit status 1
            results[n]["error"] = f"{type(exc).__name__}: {exc}"
    try:
        samples, calls, clock = measure_interleaved({n: p.run for n, p in prepared.items()}, cfg.device, 0, cfg.repeats,
                                                    cfg.min_round_ms, cfg.clock)
    except Exception as exc:  # raised only once timed (after a clean warm-up): no time of this group stands
        for n in prepared:
            results[n]["error"] = f"{type(exc).__name__} while timed beside the others: {exc}"
        prepared, samples = {}, {}
    for n, p in prepared.items():
        timing = summarise(samples[n], clock)
        results[n].update(median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms,
                          repeats=timing.repeats, clock=timing.clock, calls_per_round=calls, samples_ms=samples[n])
        if p.tokens:
            results[n]["tokens_per_s"] = p.tokens / (timing.median_ms * 1e-3)
        if p.flops is not None:
            results[n]["flops"], results[n]["bytes_moved"] = p.flops, p.bytes_moved
        if roofline is not None:
            results[n]["roofline"] = roofline_fraction(p.flops, p.bytes_moved, timing.median_ms * 1e-3, roofline)
        if p.note:
            results[n]["note"] = p.note
    for n in prepared:
        if results[n]["impl"] not in BASELINES:
            results[n]["vs"] = {results[b]["impl"]: ratio(samples[n], samples[b]) for b in prepared
                                if results[b]["impl"] in BASELINES and results[b]["shape"] == results[n]["shape"]}
    timed, p = list(prepared), None
    prepared.clear()
    for n in timed if memory else ():
        _free(cfg.device)
        try:
            p = _build(jobs[n], cfg)
            results[n]["peak_mem_bytes"], results[n]["peak_mem_source"] = peak_memory(lambda: p.run(0), cfg.device)
            del p
        except Exception as exc:
            results[n]["error"] = f"{type(exc).__name__} when built again for its peak memory: {exc}"
    _free(cfg.device)
    return results


def result_head(job) -> dict:
    """What every result row starts with: the job's case, implementation, parameters and shape label."""
    from .report import shape_label

    return {"case": job.case, "impl": job.impl, "params": job.params, "shape": shape_label(job.params)}


def _build(job, cfg):
    """``job``'s implementation, built and warmed up (``cfg.warmup`` calls)."""
    prepared = job.setup(cfg)
    for i in range(cfg.warmup):
        prepared.run(i)
    return prepared


def _free(device: torch.device) -> None:
    """On CUDA, drop what the last implementation left (PEFT models hold reference cycles) before the next one's peak
    memory is measured (on CPU the process's resident set is not given back, and a collection costs seconds)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def run(args: argparse.Namespace, argv: list) -> dict:
    """Run every job; write ``results.json``, the tables (``table.txt``, ``table.md``) and plots to ``args.out``; print
    the headline ratios and the files written. The torch thread count is :func:`cpu_threads`' for the run and restored
    after it."""
    from transformers.utils import logging as transformers_logging

    cfg = make_config(args)
    threads, threads_before = cpu_threads(args, cfg.device), torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    # the end-to-end cases save and load their tiny model: transformers' own bars would interleave with the run's
    bars_before = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        return _run(args, argv, cfg)
    finally:
        torch.set_num_threads(threads_before)
        if bars_before:
            transformers_logging.enable_progress_bar()


def _run(args: argparse.Namespace, argv: list, cfg) -> dict:
    from . import report
    from .cases import all_jobs
    from .roofline import measure_roofline

    args.out.mkdir(parents=True, exist_ok=True)
    jobs = all_jobs(cfg)
    print(report.run_line(cfg, len(jobs), args.suite or ("gpu" if cfg.device.type == "cuda" else "cpu")),
          file=sys.stderr)
    roofline = measure_roofline(cfg.device) if cfg.device.type == "cuda" else None
    bar = _progress(len(jobs))
    done = 0

    def on_setup(job):
        nonlocal done
        done += 1
        if bar is not None:
            bar.set_description(f"{job.case} {job.impl}")
            bar.update()
        else:
            print(f"[{done}/{len(jobs)}] {job.case} {job.impl} {report.shape_label(job.params)}", file=sys.stderr)

    start = time.monotonic()
    results = []
    for group in group_jobs(jobs).values():
        if args.time_budget is not None and time.monotonic() - start > args.time_budget:
            results += [{**result_head(job), "skipped": f"time budget of {args.time_budget:.0f} s spent"}
                        for job in group]
            done += len(group)
            if bar is not None:
                bar.update(len(group))
        else:
            results += run_group(group, cfg, roofline, on_setup=on_setup)
    if bar is not None:
        bar.close()
    out = {**report.metadata(cfg, ["fastpeft", "bench", *argv], roofline), "results": results}
    (args.out / "table.txt").write_text(report.table(out) + "\n")
    json_path = report.write_json(out, args.out)
    (args.out / "table.md").write_text(report.markdown_table(out, json_path.as_posix()) + "\n")
    plots = []
    if not args.no_plots:
        try:
            plots = report.write_plots(out, args.out)
        except ImportError:
            print("no plots: matplotlib is not installed (pip install 'fastpeft[bench]')")
    print(report.headline(out))
    print(f"\n{len(results)} jobs in {time.monotonic() - start:.0f} s. Files in {args.out}/:")
    print(report.files_legend(plots))
    return out


def exit_status(out: dict) -> int:
    """1 (after naming each on stderr) when an implementation raised, else 0."""
    errors = [r for r in out["results"] if "error" in r]
    for r in errors:
        print(f"ERROR in {r['case']} {r['impl']} {r['shape']}: {r['error']}", file=sys.stderr)
    return 1 if errors else 0


def main(argv: Optional[list] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return exit_status(run(build_parser().parse_args(argv), argv))


if __name__ == "__main__":
    sys.exit(main())
