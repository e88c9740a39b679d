"""The accelerator's RTL against the ISA simulator (the executable spec): PyRTL simulation,
Icarus and Verilator on the exported Verilog must give the same DRAM bit for bit and the same
cycle count; yosys maps the design to a Xilinx part."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
from conftest import need  # noqa: E402
from accel_programs import gemm_case, gemm_results, random_case, vector_case  # noqa: E402

from tcc.backends.accel import hardware, verilog  # noqa: E402
from tcc.backends.accel.config import AccelConfig  # noqa: E402
from tcc.backends.accel.isa import Buffer, Instruction, Opcode, Token  # noqa: E402
from tcc.runtime.isa_sim import SimulationError, simulate  # noqa: E402



def tiny(rows=2, cols=2, dram_bits=32, dram_latency=1, **kw) -> AccelConfig:
    base = dict(abuf_depth=32, bbuf_depth=32, obuf_depth=16, pbuf_depth=16, dram_words=4096, imem_depth=256)
    return AccelConfig(rows=rows, cols=cols, dram_bits=dram_bits, dram_latency=dram_latency, **(base | kw))


# a few configs reused across tests (each design is built and cached once per process)
CONFIGS = [tiny(2, 2, 32, 1), tiny(3, 2, 64, 2), tiny(2, 4, 32, 3), tiny(4, 4, 64, 1)]


def same_as_spec(program, config: AccelConfig, dram: np.ndarray, runner=hardware.run_pyrtl, **kw):
    """Run the ISA simulator and `runner`; assert equal DRAM and cycles. Returns the sim's machine."""
    machine, stats = simulate(program, config, dram)
    out, cycles = runner(program, config, dram, stats.cycles + 5, **kw)
    assert cycles == stats.cycles
    assert len(out) >= len(dram)
    diff = np.nonzero(machine.dram[:len(out)] != out)[0]
    assert len(diff) == 0, f"DRAM differs at bytes {diff[:8].tolist()} (of {len(diff)})"
    return machine, stats


# ---- hand-written programs

def test_load_gemm_store_by_hand():
    cfg = CONFIGS[0]
    dram = np.arange(256, dtype=np.uint8)
    prog = [Instruction.make(Opcode.LOAD, buf=Buffer.ABUF, addr=0, count=4, dram=0),
            Instruction.make(Opcode.LOAD, signal=(Token.LD2EX,), buf=Buffer.BBUF, addr=0, count=4, dram=8),
            Instruction.make(Opcode.GEMM, wait=(Token.LD2EX,), a=0, b=0, k=4, acc=0),
            Instruction.make(Opcode.GEMM, a=1, b=2, k=2, acc=1, signal=(Token.EX2ST,)),
            Instruction.make(Opcode.STORE, wait=(Token.EX2ST,), buf=Buffer.ABUF, addr=0, count=4, dram=64),
            Instruction.make(Opcode.HALT)]
    same_as_spec(prog, cfg, dram)


@pytest.mark.parametrize("config", [tiny(1, 1, 8, 1), tiny(2, 3, 32, 2), tiny(4, 2, 64, 3, data_bits=4, acc_bits=12),
                                    tiny(2, 2, 24, 2, data_bits=16, acc_bits=32)], ids=str)
def test_gemm_by_hand(config):
    rng = np.random.default_rng(7)
    case = gemm_case(config, 5, 7, 3, rng=rng, k_chunk=3, relu=True, store_late=True)
    machine, _ = same_as_spec(case.program, config, case.dram)
    assert (gemm_results(case, machine.dram, 5, 3) == case.expected).all()


def test_vector_ops_by_hand():
    cfg = CONFIGS[1]
    ops = [(Opcode.VADD, 8, 0, 2, 3, 0), (Opcode.VMUL, 11, 1, 3, 4, 5), (Opcode.VMUL, 0, 1, 3, 4, 0),
           (Opcode.VMUL, 3, 3, 4, 2, 63), (Opcode.VRELU, 2, 2, 0, 6, 0), (Opcode.VMAX, 15, 0, 0, 8, 0),
           (Opcode.VSUM, 7, 2, 0, 5, 0)]
    case = vector_case(cfg, ops, rng=np.random.default_rng(3), words=8)
    same_as_spec(case.program, cfg, case.dram)


def test_dram_grows_to_cover_the_program():
    cfg = CONFIGS[0]
    prog = [Instruction.make(Opcode.STORE, buf=Buffer.PBUF, addr=0, count=2, dram=40), Instruction.make(Opcode.HALT)]
    out, cycles = hardware.run_pyrtl(prog, cfg, np.zeros(3, np.uint8), 100)
    assert len(out) == (40 + 2 * cfg.beats(Buffer.PBUF)) * cfg.dram_bits // 8
    _, stats = simulate(prog, cfg, b"")
    assert cycles == stats.cycles
    big = np.full(1000, 7, np.uint8)  # longer than the program needs: kept whole
    out, _ = hardware.run_pyrtl(prog, cfg, big.tobytes(), 100)
    assert len(out) == 1000 and (out[:160] == 7).all() and (out[200:] == 7).all()


# ---- generated programs

@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=st.sampled_from(CONFIGS), m=st.integers(1, 9), k=st.integers(1, 12), n=st.integers(1, 9),
       chunk=st.integers(1, 8), relu=st.booleans(), late=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_gemm_programs_match_isa_sim(config, m, k, n, chunk, relu, late, seed):
    try:
        case = gemm_case(config, m, k, n, rng=np.random.default_rng(seed), k_chunk=min(chunk, k), relu=relu,
                         store_late=late)
    except ValueError:  # the tiles do not fit this config's buffers
        assume(False)
    assume(len(case.program) <= config.imem_depth)
    machine, _ = same_as_spec(case.program, config, case.dram)
    assert (gemm_results(case, machine.dram, m, n) == case.expected).all()


@st.composite
def vector_ops(draw, depth: int):
    ops = []
    for _ in range(draw(st.integers(1, 5))):
        op = draw(st.sampled_from([Opcode.VADD, Opcode.VMUL, Opcode.VRELU, Opcode.VMAX, Opcode.VSUM]))
        n = draw(st.integers(1, 6))
        a, b = draw(st.integers(0, depth - n)), draw(st.integers(0, depth - n))
        if op is Opcode.VSUM:
            dst = draw(st.integers(0, 11))
        elif op is Opcode.VMAX:
            dst = draw(st.integers(0, depth - 1))
        else:  # no destination starting inside a source range (the RTL streams; see hardware.py)
            dst = draw(st.integers(0, depth - n).filter(
                lambda d: not a < d < a + n and not (op in (Opcode.VADD, Opcode.VMUL) and b < d < b + n)))
        ops.append((op, dst, a, b, n, draw(st.integers(0, 63))))
    return ops


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(config=st.sampled_from(CONFIGS), ops=vector_ops(16), seed=st.integers(0, 2**32 - 1))
def test_vector_programs_match_isa_sim(config, ops, seed):
    case = vector_case(config, ops, rng=np.random.default_rng(seed), words=8)
    same_as_spec(case.program, config, case.dram)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(config=st.sampled_from(CONFIGS), length=st.integers(1, 14), chain=st.sampled_from([0.5, 0.8, 1.0]),
       seed=st.integers(0, 2**32 - 1))
def test_random_programs_match_isa_sim(config, length, chain, seed):
    """Every instruction, units overlapping, token counts above one; racy programs (which the
    ISA simulator rejects) are skipped."""
    case = random_case(config, np.random.default_rng(seed), length, chain)
    try:
        simulate(case.program, config, case.dram)
    except SimulationError:
        assume(False)
    same_as_spec(case.program, config, case.dram)


# ---- banked ABUF and a machine without the vector unit: other hardware, the same ISA

def variant(config: AccelConfig, **kw) -> AccelConfig:
    return dataclasses.replace(config, **kw)


VARIANTS = [variant(CONFIGS[0], abuf_banks=2), variant(CONFIGS[1], vector_unit=False),
            variant(CONFIGS[2], abuf_banks=2, vector_unit=False), variant(CONFIGS[3], abuf_banks=4),
            variant(CONFIGS[3], abuf_banks=4, vector_unit=False)]


@pytest.mark.parametrize("banks", [1, 2, 4])
def test_gemm_without_the_vector_unit_on_banked_abuf(banks):
    config = variant(CONFIGS[3], abuf_banks=banks, vector_unit=False)
    names = [name for name, _words, _bits in hardware.design(config).memories]
    assert [n for n in names if n.startswith("abuf")] == (["abuf_load"] if banks == 1 else
                                                          [f"abuf_load_b{i}" for i in range(banks)])
    assert not [n for n in names if n.startswith("pbuf_compute")]  # vsum's bank went with the unit
    case = gemm_case(config, 7, 11, 6, rng=np.random.default_rng(banks), k_chunk=5, relu=True, store_late=True)
    machine, _ = same_as_spec(case.program, config, case.dram)
    assert (gemm_results(case, machine.dram, 7, 6) == case.expected).all()


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=st.sampled_from(VARIANTS), m=st.integers(1, 9), k=st.integers(1, 12), n=st.integers(1, 9),
       chunk=st.integers(1, 8), relu=st.booleans(), late=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_gemm_programs_on_variants_match_isa_sim(config, m, k, n, chunk, relu, late, seed):
    test_gemm_programs_match_isa_sim.hypothesis.inner_test(config, m, k, n, chunk, relu, late, seed)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(config=st.sampled_from(VARIANTS), length=st.integers(1, 14), chain=st.sampled_from([0.5, 0.8, 1.0]),
       seed=st.integers(0, 2**32 - 1))
def test_random_programs_on_variants_match_isa_sim(config, length, chain, seed):
    """Loads and stores at any ABUF address (every bank), gemms from any; vector ops where the
    unit is there."""
    test_random_programs_match_isa_sim.hypothesis.inner_test(config, length, chain, seed)


def test_vector_programs_are_refused_without_the_vector_unit(monkeypatch):
    config = variant(CONFIGS[1], vector_unit=False)
    case = vector_case(config, [(Opcode.VADD, 8, 0, 2, 3, 0)], rng=np.random.default_rng(0), words=8)
    message = r"instruction 1 \(vadd .*\): vadd needs the vector unit, which this config leaves out \(vector_unit=0\)"
    with pytest.raises(SimulationError, match=message):
        simulate(case.program, config, case.dram)
    for runner in (hardware.run_pyrtl, verilog.run_icarus, verilog.run_verilator):  # refused before any tool runs
        with pytest.raises(ValueError, match=message):
            runner(case.program, config, case.dram, 1000)
    # and the hardware has no unit to run it: past the check, the vadd never issues
    monkeypatch.setattr(hardware.isa, "check_program", lambda program, config: None)
    with pytest.raises(hardware.RTLSimulationError):
        hardware.run_pyrtl(case.program, config, case.dram, 200)
    assert "ex_sum" not in verilog.verilog_text(config) and "ex_sum" in verilog.verilog_text(CONFIGS[1])


# ---- errors

def test_over_max_cycles_raises():
    cfg = CONFIGS[0]
    case = gemm_case(cfg, 3, 5, 3, rng=np.random.default_rng(1))
    _, stats = simulate(case.program, cfg, case.dram)
    with pytest.raises(hardware.RTLSimulationError, match="cycle"):
        hardware.run_pyrtl(case.program, cfg, case.dram, stats.cycles - 1)
    out, cycles = hardware.run_pyrtl(case.program, cfg, case.dram, stats.cycles)
    assert cycles == stats.cycles


def test_deadlock_hits_the_cycle_limit():
    prog = [Instruction.make(Opcode.GEMM, wait=(Token.ST2EX,), a=0, b=0, k=1, acc=0), Instruction.make(Opcode.HALT)]
    with pytest.raises(hardware.RTLSimulationError):
        hardware.run_pyrtl(prog, CONFIGS[0], np.zeros(0, np.uint8), 200)


def test_program_is_checked_first():
    cfg = CONFIGS[0]
    with pytest.raises(ValueError, match="outside"):
        hardware.run_pyrtl([Instruction.make(Opcode.LOAD, buf=0, addr=30, count=4, dram=0),
                            Instruction.make(Opcode.HALT)], cfg, np.zeros(16, np.uint8), 100)
    with pytest.raises(ValueError, match="halt"):
        hardware.run_pyrtl([Instruction.make(Opcode.GEMM, a=0, b=0, k=1, acc=0)], cfg, np.zeros(16, np.uint8), 100)


def test_build_leaves_the_working_block_alone():
    import pyrtl
    before = pyrtl.working_block()
    hardware.build(CONFIGS[0])
    assert pyrtl.working_block() is before


# ---- Verilog

def test_verilog_export_and_testbench_files(tmp_path):
    cfg = CONFIGS[0]
    case = gemm_case(cfg, 2, 3, 2, rng=np.random.default_rng(0))
    verilog.write_testbench(case.program, cfg, case.dram, 1000, tmp_path)
    text = (tmp_path / "accel.v").read_text()
    assert re.search(r"^module accel\(", text, re.M)
    for port in ("dram_raddr", "dram_rdata", "dram_we", "dram_waddr", "dram_wdata", "imem_we", "done"):
        assert port in text
    make = (tmp_path / "Makefile").read_text()
    assert "iverilog:" in make and "verilator:" in make and "\n\tvvp" in make
    words = len((tmp_path / "dram.hex").read_text().split())
    assert f"PROGRAM_LENGTH ?= {len(case.program)}\n" in make and f"DRAM_WORDS ?= {words}\n" in make
    assert "MAX_CYCLES ?= 1000\n" in make and "+max_cycles=$(MAX_CYCLES)" in make
    assert len((tmp_path / "program.hex").read_text().split()) == len(case.program)
    # nothing of the run is compiled in: another program on a DRAM of another size in the same
    # capacity bucket gets the same testbench
    tb = (tmp_path / "accel_tb.v").read_text()
    other = gemm_case(cfg, 3, 5, 4, rng=np.random.default_rng(1), relu=True)
    verilog.write_testbench(other.program, cfg, np.concatenate([other.dram, np.ones(300, np.uint8)]), 7,
                            tmp_path / "other")
    assert (tmp_path / "other" / "accel_tb.v").read_text() == tb
    assert verilog.dram_capacity(1) == verilog.dram_capacity(verilog.MIN_DRAM_WORDS) == verilog.MIN_DRAM_WORDS
    assert verilog.dram_capacity(verilog.MIN_DRAM_WORDS + 1) == 2 * verilog.MIN_DRAM_WORDS


def test_icarus_matches_isa_sim(tmp_path):
    need("iverilog")
    cfg = CONFIGS[1]
    case = gemm_case(cfg, 4, 7, 5, rng=np.random.default_rng(5), k_chunk=3, relu=True)
    machine, stats = same_as_spec(case.program, cfg, case.dram, verilog.run_icarus, workdir=tmp_path)
    if shutil.which("make"):  # the kept directory reruns by hand, with the cycle limit as a make variable
        run = subprocess.run(["make", "-s", "iverilog"], cwd=tmp_path, capture_output=True, text=True)
        assert run.returncode == 0 and f"cycles {stats.cycles}" in run.stdout
        run = subprocess.run(["make", "-s", "iverilog", "MAX_CYCLES=5"], cwd=tmp_path, capture_output=True,
                             text=True)
        assert run.returncode != 0 and "ERROR: no halt within 5 cycles" in run.stdout + run.stderr
    ops = [(Opcode.VADD, 8, 0, 2, 3, 0), (Opcode.VMUL, 11, 1, 3, 4, 5), (Opcode.VRELU, 2, 2, 0, 6, 0),
           (Opcode.VMAX, 15, 0, 0, 8, 0), (Opcode.VSUM, 7, 2, 0, 5, 0)]
    case = vector_case(cfg, ops, rng=np.random.default_rng(4), words=8)
    same_as_spec(case.program, cfg, case.dram, verilog.run_icarus)
    case = runnable_random_case(cfg, np.random.default_rng(11), 10)
    same_as_spec(case.program, cfg, case.dram, verilog.run_icarus)
    with pytest.raises(hardware.RTLSimulationError):
        verilog.run_icarus(case.program, cfg, case.dram, 5)


def test_icarus_on_banked_abuf_without_the_vector_unit():
    need("iverilog")
    config = variant(CONFIGS[3], abuf_banks=2, vector_unit=False)
    case = gemm_case(config, 6, 9, 5, rng=np.random.default_rng(13), k_chunk=4, relu=True, store_late=True)
    same_as_spec(case.program, config, case.dram, verilog.run_icarus)
    case = runnable_random_case(config, np.random.default_rng(17), 12)  # ABUF words at odd and even addresses
    same_as_spec(case.program, config, case.dram, verilog.run_icarus)


def runnable_random_case(config: AccelConfig, rng: np.random.Generator, length: int, tries: int = 20):
    """The first random program the ISA simulator accepts (no race, no deadlock)."""
    for _ in range(tries):
        case = random_case(config, rng, length)
        try:
            simulate(case.program, config, case.dram)
        except SimulationError:
            continue
        return case
    pytest.fail(f"no runnable random program in {tries} tries")


def test_verilator_matches_isa_sim(tmp_path):
    need("verilator")
    cfg = CONFIGS[2]
    case = gemm_case(cfg, 3, 6, 5, rng=np.random.default_rng(9), k_chunk=4, store_late=True)
    same_as_spec(case.program, cfg, case.dram, verilog.run_verilator, workdir=tmp_path)
    # the same binary with a lower cycle limit fails loudly
    timing = {}
    with pytest.raises(hardware.RTLSimulationError, match="within 5 cycles"):
        verilog.run_verilator(case.program, cfg, case.dram, 5, timing=timing)
    assert timing == {} or timing["cached"]


def test_verilator_reuses_its_binary(rtl_cache, monkeypatch):
    """One compile per config and DRAM capacity: another program on another DRAM image runs the
    same binary (in this process, then from the cache directory), still equal to the ISA sim."""
    need("verilator")
    cfg = CONFIGS[2]
    rng = np.random.default_rng(21)
    first, second = gemm_case(cfg, 2, 5, 3, rng=rng), gemm_case(cfg, 4, 7, 6, rng=rng, k_chunk=3, relu=True)
    assert first.program != second.program and len(first.dram) != len(second.dram)
    verilog.run_verilator(first.program, cfg, first.dram, 10_000)  # compiles, unless an earlier test did
    for case in (second, first):
        timing = {}
        same_as_spec(case.program, cfg, case.dram, verilog.run_verilator, timing=timing)
        assert timing["cached"] and timing["compile_s"] == 0.0
    monkeypatch.setattr(verilog, "_built", {})  # a fresh process: the binary comes from the cache directory
    timing = {}
    same_as_spec(second.program, cfg, second.dram, verilog.run_verilator, timing=timing)
    assert timing["cached"] and timing["compile_s"] == 0.0
    assert len([p for p in rtl_cache.iterdir() if p.name.startswith("verilator-")]) == 1


def test_unwritable_cache_keeps_simulators_in_memory(tmp_path, monkeypatch):
    need("iverilog")
    cfg = CONFIGS[0]
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv(verilog.CACHE_ENV, str(blocker / "cache"))
    monkeypatch.setattr(verilog, "_built", {})
    assert verilog.cache_dir() is None
    case = gemm_case(cfg, 2, 3, 2, rng=np.random.default_rng(2))
    timings = [{}, {}]
    for timing in timings:
        same_as_spec(case.program, cfg, case.dram, verilog.run_icarus, timing=timing)
    assert not timings[0]["cached"] and timings[1]["cached"]
    monkeypatch.setenv(verilog.CACHE_ENV, "off")
    assert verilog.cache_dir() is None


def test_synth_script_and_stat_parsing():
    script = verilog.synth_script("zynq")
    assert "synth_xilinx -family xc7 -top accel" in script and "stat" in script
    with pytest.raises(ValueError, match="part family"):
        verilog.synth_script("ice40")
    stat = """
Printing statistics.
   Number of cells:                 12
     DSP48E1                         2
     FDRE                           30
     FDSE                            2
     LUT2                            5
     LUT6                            7
     RAM64M                          1
     RAMB18E1                        1
     RAMB36E1                        3
"""
    got = verilog.parse_stat(stat)
    assert (got["LUT"], got["FF"], got["DSP"], got["BRAM"]) == (16, 32, 2, 3.5)


def test_yosys_synthesis_of_a_tiny_config():
    need("yosys")
    result = verilog.synthesize(tiny(2, 2, 32, 1, abuf_depth=512, bbuf_depth=512, obuf_depth=256, pbuf_depth=256,
                                     imem_depth=512), timeout=300)
    assert result["LUT"] > 0 and result["FF"] > 0
    assert result["DSP"] >= 4  # one per PE at least
    assert result["BRAM"] >= 4  # the buffers sit in block RAM, not in LUTs
