"""The static GPU check (``fastpeft.check_kernels``) and the CI gate built on it.

The gate: the main launch of each kernel family (``check_kernels.MAIN_KEYS``), compiled for sm_80 and
sm_90a with the JIT's specialisation, must compile and must not be worse than this Triton version's section of
``fastpeft/check_kernels_thresholds.json``: on the newest version there in spill bytes, registers, shared memory,
occupancy, MMA kind and loads / instructions per weight element, on older ones in spill bytes and occupancy.
The thresholds only ever tighten: when a number improves the test prints it, and the section is rewritten with
``python -m fastpeft.check_kernels --main --write-thresholds`` (all three architectures) under that Triton.

Compiling needs a process without ``TRITON_INTERPRET`` (this one runs the interpreter), so one subprocess
(``tests/check_kernels_toys.py``) compiles everything once per session and the tests read its rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

from fastpeft import check_kernels
from fastpeft.kernels import versions

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("check_kernels") / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["CUDA_VISIBLE_DEVICES"] = ""  # compiling must not need a GPU
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "check_kernels_toys.py"), str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def _rows(compiled, family=None, step=None):
    return [r for r in compiled["rows"] if (family is None or r["family"] == family) and (step is None or r["step"] == step)]


def test_main_launches_compile_and_do_not_regress(compiled):
    rows = [r for r in compiled["rows"] if r["family"] != "toy"]
    assert len(rows) == 2 * len(check_kernels.MAIN_KEYS)
    assert {r["triton"] for r in rows} == {triton.__version__}
    thresholds = json.loads(check_kernels.THRESHOLDS_PATH.read_text())
    assert check_kernels.version_key(triton.__version__) in thresholds, "no thresholds for this Triton version"
    worse, better = check_kernels.compare(rows, thresholds, triton.__version__)
    for line in better:
        print("better:", line)
    assert not worse, "\n".join(worse)


def test_thresholds_are_exactly_the_gate_on_the_versions_ci_tests():
    """A section per Triton version CI runs (the oldest supported, 3.6 and the newest), each with an entry for
    every main launch on every architecture."""
    thresholds = json.loads(check_kernels.THRESHOLDS_PATH.read_text())
    oldest, newest = versions.SUPPORTED_TRITON
    assert {"%d.%d" % v for v in (oldest, (3, 6), newest)} <= set(thresholds)
    assert all(oldest <= versions.version_tuple(v) <= newest for v in thresholds)
    expected = {f"{arch} {key}" for arch in check_kernels.ARCHES for key in check_kernels.MAIN_KEYS}
    for section in thresholds.values():
        assert set(section) == expected
        assert all(set(entry) == set(check_kernels.THRESHOLD_FIELDS) for entry in section.values())


ROW = {"arch": "sm_80", "key": "k", "compiled": True, "stack_bytes": 0, "spill_instructions": 0, "registers": 100,
       "shared_bytes": 1024, "occupancy": 0.5, "narrow_loads_per_element": 1.0, "global_per_element": 0.25,
       "instructions_per_element": 9.5, "mma_kind": "HMMA"}


def test_compare_flags_worse_numbers_and_reports_better_ones():
    row = ROW
    limit = {f: row[f] for f in check_kernels.THRESHOLD_FIELDS}
    thresholds = {"3.9": {"sm_80 k": limit}}
    assert check_kernels.compare([row], thresholds, "3.9.0") == ([], [])
    for field, value in (("stack_bytes", 8), ("registers", 101), ("shared_bytes", 2048), ("occupancy", 0.25),
                         ("narrow_loads_per_element", 1.5), ("global_per_element", 0.5),
                         ("instructions_per_element", 10.0), ("mma_kind", "none")):
        worse, _ = check_kernels.compare([{**row, field: value}], thresholds, "3.9.0")
        assert len(worse) == 1 and field in worse[0]
    worse, better = check_kernels.compare([{**row, "mma_kind": "HGMMA", "registers": 90}], thresholds, "3.9.0")
    assert not worse and len(better) == 2
    worse, _ = check_kernels.compare([{"arch": "sm_80", "key": "k", "compiled": False, "error": "boom"}],
                                     thresholds, "3.9.0")
    assert "does not compile on Triton 3.9.0: boom" in worse[0]


def test_older_versions_gate_spills_and_occupancy_only():
    limit = {f: ROW[f] for f in check_kernels.THRESHOLD_FIELDS}
    thresholds = {"3.6": {"sm_80 k": limit}, "3.9": {"sm_80 k": {**limit, "registers": 80}}}
    assert check_kernels.compare([ROW], thresholds, "3.6.0") == ([], [])  # 100 registers: 3.9's ratchet is not 3.6's
    assert len(check_kernels.compare([ROW], thresholds, "3.9.0")[0]) == 1
    worse, _ = check_kernels.compare([{**ROW, "registers": 200, "instructions_per_element": 20.0}], thresholds, "3.6.0")
    assert not worse
    for field, value in (("stack_bytes", 8), ("occupancy", 0.375)):
        worse, _ = check_kernels.compare([{**ROW, field: value}], thresholds, "3.6.0")
        assert len(worse) == 1 and field in worse[0] and "Triton 3.6" in worse[0]


def test_a_launch_without_an_entry_keeps_the_floor():
    """Launches outside the gate (the full grid with ``--check``), or a version without its own section: compiled,
    no spills, occupancy at least ``OCCUPANCY_FLOOR``; nothing else is a regression."""
    thresholds = {"3.9": {}}
    for version in ("3.9.0", "3.7.1"):
        assert check_kernels.compare([{**ROW, "registers": 255}], thresholds, version) == ([], [])
        assert "spills 8 bytes" in check_kernels.compare([{**ROW, "stack_bytes": 8}], thresholds, version)[0][0]
        assert "spills" in check_kernels.compare([{**ROW, "spill_instructions": 2}], thresholds, version)[0][0]
        low = {**ROW, "occupancy": check_kernels.OCCUPANCY_FLOOR / 2}
        assert "under the floor" in check_kernels.compare([low], thresholds, version)[0][0]


def test_check_kernels_refuses_an_unsupported_triton(monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # this process runs the interpreter; the check comes first
    monkeypatch.setattr(triton, "__version__", "3.2.0")
    assert check_kernels.main(["--main", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "check-kernels: fastpeft supports Triton 3.4-3.9; this is Triton 3.2.0"


def test_specialisation_without_pack_args_is_the_jits(compiled):
    """Triton 3.4 has no ``JITFunction._pack_args``; the check then takes the same steps itself. Where
    ``_pack_args`` exists, both give the same specialisation for every gate launch."""
    if compiled["pack_args_differences"] is None:
        pytest.skip(f"Triton {triton.__version__} has no JITFunction._pack_args to compare with")
    assert compiled["pack_args_differences"] == []


def test_spilling_toy_is_reported_as_spilling(compiled):
    for row in _rows(compiled, "toy", "spill"):
        assert row["compiled"] and row["registers"] == 255
        assert row["stack_bytes"] > 0 and row["spill_instructions"] > 0, row


def test_bf16_dot_toy_shows_tensor_core_instructions(compiled):
    by_arch = {r["arch"]: r for r in _rows(compiled, "toy", "bf16-dot")}
    assert by_arch["sm_80"]["mma_kind"] == "HMMA" and by_arch["sm_80"]["mma_count"] > 0
    assert by_arch["sm_90a"]["mma_kind"] == "HGMMA" and by_arch["sm_90a"]["mma_count"] > 0
    assert by_arch["sm_80"]["main_loop"]["found"]


def test_malformed_kernel_reports_the_compile_error(compiled):
    rows = _rows(compiled, "toy", "malformed")
    assert len(rows) == 2
    for row in rows:
        assert not row["compiled"] and "power of 2" in row["error"]


def test_specialisation_matches_the_jit(compiled):
    # the same NF4 GEMM compiled without the JIT's divisibility / ==1 specialisation: more registers and
    # the activation tile split into 16-bit loads instead of one 128-bit copy
    special = next(r for r in compiled["rows"] if r["arch"] == "sm_90a" and r["key"] == check_kernels.MAIN_KEYS[0])
    plain = compiled["unspecialised_gemm"]
    assert plain["registers"] > special["registers"] + 32
    assert special["loads_per_thread"].get("128", 0) >= 1 and "16" not in special["loads_per_thread"]
    assert plain["loads_per_thread"].get("16", 0) > 0 and "128" not in plain["loads_per_thread"]


SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E.U8 R2, desc[UR4][R4.64] ;
        /*0020*/               @P0 LDG.E.128 R8, desc[UR4][R4.64] ;
        /*0030*/                   HMMA.16816.F32.BF16 R12, R8, R10, R12 ;
        /*0040*/                   LDGSTS.E.BYPASS.128 [R3], desc[UR4][R6.64], P1 ;
        /*0050*/              @!P3 BRA 0x10 ;
        /*0060*/                   LDG.E.64 R2, desc[UR4][R4.64] ;
        /*0070*/                   STL [R1], R2 ;
        /*0080*/                   EXIT ;
        /*0090*/                   BRA 0x90;
"""


def test_sass_main_loop_and_load_widths():
    instructions = check_kernels.parse_sass(SASS)
    assert [op for _, op, _ in instructions][:3] == ["MOV", "LDG.E.U8", "LDG.E.128"]
    assert check_kernels.main_loop(instructions) == (0x10, 0x50, True)  # BRA 0x90 to itself is padding
    widths = [check_kernels._load_width(op) for _, op, _ in instructions]
    assert widths == [None, 8, 128, None, 128, None, 64, None, None, None]
    assert check_kernels.main_loop(instructions[:2]) == (0x0, 0x10, False)


# A K loop (one load) and, after it, an epilogue rank loop with more loads (the LoRA term of the GEMV):
# with no MMA in either, the main loop is the first; with MMA only in the second, the second.
SASS_TWO_LOOPS = """
        /*0000*/                   LDG.E.U8 R2, desc[UR4][R4.64] ;
        /*0010*/                   LDG.E.EF.128 R8, desc[UR4][R4.64] ;
        /*0020*/              @!P3 BRA 0x10 ;
        /*0030*/                   LDG.E.128 R8, desc[UR4][R4.64] ;
        /*0040*/                   LDG.E.128 R12, desc[UR4][R6.64] ;
        /*0050*/                   STG.E.128 desc[UR4][R6.64], R12 ;
        /*0060*/              @!P3 BRA 0x30 ;
        /*0070*/                   EXIT ;
"""


def test_main_loop_is_the_first_of_the_loops_with_the_most_mma():
    instructions = check_kernels.parse_sass(SASS_TWO_LOOPS)
    assert check_kernels.main_loop(instructions) == (0x10, 0x20, True)
    with_mma = [(a, "HMMA.16816.F32.BF16" if a == 0x40 else op, o) for a, op, o in instructions]
    assert check_kernels.main_loop(with_mma) == (0x30, 0x60, True)
    assert [check_kernels._is_global_memory(op) for _, op, _ in instructions] == [True] * 2 + [False] + [True] * 3 + [False] * 2


def test_global_memory_instructions_per_weight_element(compiled):
    # the bf16 dot toy's loop: one A and one B tile load per step, counted per element of its B (weight) tile
    rows = _rows(compiled, "toy", "bf16-dot")
    assert len(rows) == 2
    for row in rows:
        ops = sum(row["loads_per_thread"].values())
        assert ops >= 2 and row["global_per_element"] == pytest.approx(ops * 128 / (32 * 128), abs=1e-4)
        # all of them loads, none of them in the NF4 decode helpers; every loop instruction counted the same way
        assert row["global_loads_per_element"] == row["global_per_element"] and row["global_stores_per_element"] == 0
        assert row["weight_loads_per_element"] == 0 and row["packed_load_bits"] == []
        assert row["instructions_per_element"] == pytest.approx(row["main_loop"]["instructions"] * 128 / (32 * 128),
                                                                abs=1e-3)


def test_weight_loads_are_the_nf4_helpers_loads(compiled):
    """In the NF4 launches of the gate, the loads attributed to fastpeft/kernels/nf4.py are the weight's: all
    of the dequantiser's, and beside the activations in the GEMM / GEMV loops; among them the packed codes'
    (nf4_codes), every one 64 bits or wider (no 8- or 16-bit loads of packed weights)."""
    rows = {(r["arch"], r["key"]): r for r in compiled["rows"] if r["family"] != "toy"}
    for (arch, key), row in rows.items():
        if row["base"] != "nf4":
            continue
        assert 0 < row["weight_loads_per_element"] <= row["global_loads_per_element"], (arch, key)
        assert row["packed_load_bits"] and min(row["packed_load_bits"]) >= 64, (arch, key, row["packed_load_bits"])
        if key.startswith("nf4_dequant"):
            assert row["weight_loads_per_element"] == row["global_loads_per_element"]
            assert row["global_stores_per_element"] > 0
        else:  # activations too
            assert row["weight_loads_per_element"] < row["global_loads_per_element"], (arch, key)


def test_source_lines_map_instructions_to_their_innermost_line():
    line_info = """
        //## File "/x/fastpeft/kernels/nf4_matmul.py", line 130
        /*0240*/               @P0 BRA `(.L_x_0) ;
        //## File "/x/fastpeft/kernels/nf4.py", line 56 inlined at "/x/fastpeft/kernels/nf4_matmul.py", line 131
        /*0250*/                   LDG.E.64 R2, desc[UR14][R2.64] ;
        /*0260*/                   LDG.E R29, desc[UR14][R6.64] ;
.L_x_0:
        //## File "/x/fastpeft/kernels/nf4_matmul.py", line 157
        /*0270*/                   LDG.E.EL R106, desc[UR10][R4.64] ;
"""
    assert check_kernels.source_lines(line_info) == {
        0x240: ("/x/fastpeft/kernels/nf4_matmul.py", 130), 0x250: ("/x/fastpeft/kernels/nf4.py", 56),
        0x260: ("/x/fastpeft/kernels/nf4.py", 56), 0x270: ("/x/fastpeft/kernels/nf4_matmul.py", 157)}


def test_packed_code_lines_are_nf4_codes_source():
    import inspect
    from fastpeft.kernels import nf4

    lines = check_kernels._packed_code_lines()
    source = inspect.getsource(nf4).splitlines()
    body = "\n".join(source[line - 1] for line in lines)
    assert "def nf4_codes(" in body and "tl.load(packed_ptr" in body  # the packed loads, and nothing else's
    assert "absmax" not in body and "def nf4_scales" not in body


def test_occupancy_from_registers_shared_memory_and_warps():
    # the NF4 GEMM: 128 registers, 56 KB + 1 KB, 4 warps — sm_80 fits two blocks by shared memory
    assert check_kernels.occupancy("sm_80", 128, 57344 + 1024, 4) == (0.125, "smem", 2)
    assert check_kernels.occupancy("sm_90a", 138, 58368, 4) == (0.1875, "regs", 3)
    assert check_kernels.occupancy("sm_89", 32, 0, 4) == (1.0, "warps", 12)  # 48 warps per SM
    assert check_kernels.occupancy("sm_89", 32, 200 * 1024, 4) == (0.0, "none", 0)


def test_mixed_precision_rows_plan_fp32_adapters_beside_bf16_activations():
    """``bf16+fp32`` (a bf16 model with PEFT's fp32 adapters): the launches get bf16 activations and fp32
    rank-r intermediates, as ``fastpeft.ops`` passes them (multi-LoRA: an fp32 bank and fp32 ``h``)."""
    import torch

    cases = check_kernels.production_grid(("sm_80",), dtypes=("bf16+fp32",), tokens=(1, 16), shapes=((4096, 4096),),
                                          ranks=(16,))
    assert {c.family for c in cases} == {"qlora", "dora", "ia3", "multi_lora", "multi_lora_grad"}
    for family, step in (("qlora", "fwd"), ("multi_lora", "prefill-shrink"), ("multi_lora", "decode-expand")):
        case = next(c for c in cases if c.family == family and c.step == step and c.tokens in (16, 64, 8192))
        dtypes = {t.dtype for t in case.args if isinstance(t, torch.Tensor) and t.is_floating_point()}
        assert {torch.bfloat16, torch.float32} <= dtypes, case.key


def test_no_jitted_function_has_a_constexpr_default():
    """Triton 3.3-3.6 fails to compile a string ``tl.constexpr`` left at its default (an ``AttributeError`` inside
    the code generator), so no ``@triton.jit`` function of ``fastpeft.kernels`` gives its constexprs defaults: a
    caller that forgot one fails on every version, here, instead of on those alone."""
    import importlib
    import inspect
    import pkgutil

    import fastpeft.kernels

    jitted = []
    for module_info in pkgutil.iter_modules(fastpeft.kernels.__path__):
        module = importlib.import_module(f"fastpeft.kernels.{module_info.name}")
        jitted += [obj for obj in vars(module).values()
                   if type(obj).__name__ in ("JITFunction", "InterpretedFunction") and obj.fn.__module__ == module.__name__]
    assert len(jitted) >= 10
    defaults = [f"{fn.fn.__module__}.{fn.fn.__name__}({name})" for fn in jitted
                for name, param in inspect.signature(fn.fn).parameters.items()
                if "constexpr" in str(param.annotation) and param.default is not inspect.Parameter.empty]
    assert not defaults, defaults
