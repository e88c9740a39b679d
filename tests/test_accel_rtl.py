"""The accelerator's RTL against the ISA simulator (the executable spec): PyRTL simulation,
Icarus and Verilator on the exported Verilog must give the same DRAM bit for bit and the same
cycle count; yosys maps the design to a Xilinx part."""

from __future__ import annotations

import dataclasses
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
from conftest import need  # noqa: E402
from accel_programs import gemm_case, gemm_results, params, random_case, requantize, vector_case  # noqa: E402

from tcc.backends.accel import hardware, isa, verilog  # noqa: E402
from tcc.backends.accel.config import AccelConfig  # noqa: E402
from tcc.backends.accel.isa import Buffer, Instruction, Opcode, Token, pack_words, unpack_words, wrap  # noqa: E402
from tcc.ir.dtypes import DType  # noqa: E402
from tcc.ir.reference import REFERENCE  # noqa: E402
from tcc.passes.int_nonlinear import gelu_attrs, layer_norm_params, softmax_attrs  # noqa: E402
from tcc.passes.quantize import fixed_point  # noqa: E402
from tcc.runtime import rtl  # noqa: E402
from tcc.runtime.isa_sim import SimulationError, simulate  # noqa: E402
from tcc.runtime.rtl import simulators  # noqa: E402



def tiny(rows=2, cols=2, dram_bits=32, dram_latency=1, **kw) -> AccelConfig:
    base = dict(abuf_depth=32, bbuf_depth=32, obuf_depth=16, pbuf_depth=16, dram_words=4096, imem_depth=256)
    return AccelConfig(rows=rows, cols=cols, dram_bits=dram_bits, dram_latency=dram_latency, **(base | kw))


# a few configs reused across tests (each design is built and cached once per process)
CONFIGS = [tiny(2, 2, 32, 1), tiny(3, 2, 64, 2), tiny(2, 4, 32, 3), tiny(4, 4, 64, 1)]


def same_as_spec(program, config: AccelConfig, dram: np.ndarray, runner=rtl.run_pyrtl, **kw):
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
    dram[64:88] = pack_words(np.array([[5, -7], [3, 2], [2, 1]]), cfg.acc_bits, 8).reshape(-1)  # bias, mult, shift
    prog = [Instruction.make(Opcode.LOAD, buf=Buffer.ABUF, addr=0, count=4, dram=0),
            Instruction.make(Opcode.LOAD, signal=(Token.LD2AR,), buf=Buffer.BBUF, addr=0, count=4, dram=8),
            Instruction.make(Opcode.LOAD, signal=(Token.LD2VE,), buf=Buffer.PBUF, addr=0, count=3, dram=16),
            Instruction.make(Opcode.GEMM, wait=(Token.LD2AR,), a=0, b=0, k=4, acc=0, bank=1),
            Instruction.make(Opcode.GEMM, a=1, b=2, k=2, acc=1, bank=1, signal=(Token.AR2VE, Token.AR2LD)),
            Instruction.make(Opcode.STORE, wait=(Token.AR2LD,), buf=Buffer.ABUF, addr=0, count=4, dram=64),
            Instruction.make(Opcode.REQUANT, wait=(Token.AR2VE, Token.LD2VE), signal=(Token.VE2ST,), dst=2, param=0,
                             relu=0, bank=1),
            Instruction.make(Opcode.STORE, wait=(Token.VE2ST,), buf=Buffer.OBUF, addr=0, count=4, dram=72),
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
    out, cycles = rtl.run_pyrtl(prog, cfg, np.zeros(3, np.uint8), 100)
    assert len(out) == (40 + 2 * cfg.beats(Buffer.PBUF)) * cfg.dram_bits // 8
    _, stats = simulate(prog, cfg, b"")
    assert cycles == stats.cycles
    big = np.full(1000, 7, np.uint8)  # longer than the program needs: kept whole
    out, _ = rtl.run_pyrtl(prog, cfg, big.tobytes(), 100)
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
        else:  # no destination starting inside a source range (the RTL streams; see hardware/vector.py)
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


def tload_case(config: AccelConfig, rng: np.random.Generator, tiles: int, step: int, stride: int, buf: Buffer):
    """A tload of `tiles` tiles (source words `step` buffer words apart, tiles `stride` apart)
    into `buf`, then the buffer stored: the case and the words expected there (the tiles
    transposed)."""
    side, beats = config.lanes(buf), config.beats(buf)
    sources = (tiles - 1) * stride + (side - 1) * step + 1
    lo, hi = DType.I8.value_range if config.data_bits == 8 else (-(1 << config.data_bits - 1), (1 << config.data_bits - 1) - 1)
    words = rng.integers(lo, hi + 1, (sources, side))
    data = pack_words(words, config.data_bits, beats * config.dram_bits // 8).reshape(-1)
    out = sources * beats
    program = (Instruction.make(Opcode.TLOAD, signal=(Token.LD2VE,), buf=buf, addr=1, count=tiles, dram=0,
                                step=step * beats, stride=stride * beats),
               Instruction.make(Opcode.STORE, wait=(Token.LD2VE,), buf=buf, addr=1, count=tiles * side, dram=out),
               Instruction.make(Opcode.HALT))
    index = np.arange(tiles)[:, None] * stride + np.arange(side) * step  # [tile, source word]
    expected = words[index].transpose(0, 2, 1).reshape(-1, side)  # buffer word t*side + j: lane i = source i, lane j
    return program, data, out, expected


SQUARE = [tiny(2, 2, 32, 1), tiny(4, 4, 64, 1), tiny(4, 4, 16, 2), tiny(3, 3, 8, 3, data_bits=4, acc_bits=12)]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=st.sampled_from(SQUARE), tiles=st.integers(1, 3), step=st.integers(0, 3), stride=st.integers(0, 9),
       buf=st.sampled_from([Buffer.ABUF, Buffer.BBUF]), seed=st.integers(0, 2**32 - 1))
def test_tload_transposes_tiles_as_the_isa_sim_does(config, tiles, step, stride, buf, seed):
    """tload's tiles land transposed (lane i of word t*L + j = lane j of source word i), in the
    ISA simulator and the RTL alike, in the same cycles (latency, each tile's source words, and
    the last tile's columns)."""
    program, data, out, expected = tload_case(config, np.random.default_rng(seed), tiles, step, stride, buf)
    machine, stats = same_as_spec(program, config, data)
    side, beats = config.lanes(buf), config.beats(buf)
    stored = machine.dram[out * config.dram_bits // 8:(out + tiles * side * beats) * config.dram_bits // 8]
    got = unpack_words(stored.reshape(tiles * side, -1), side, config.data_bits)
    assert np.array_equal(got, expected)
    assert program[0].occupancy(config) == config.dram_latency + tiles * side * beats + side


def test_tload_is_refused_off_square_arrays_and_outside_abuf_and_bbuf():
    tload = Instruction.make(Opcode.TLOAD, buf=Buffer.ABUF, addr=0, count=1, dram=0, step=1, stride=0)
    assert "square" in tload.problem(tiny(2, 4))
    assert tload.problem(tiny(2, 2)) is None
    assert "abuf or bbuf" in dataclasses.replace(tload, args=(int(Buffer.OBUF),) + tload.args[1:]).problem(tiny(2, 2))


def sstore_case(config: AccelConfig, rng: np.random.Generator, count: int, step: int, buf: Buffer):
    """`count` words loaded into `buf`, then sstored `step` buffer words apart: the case and
    the words expected at each stride."""
    beats, lanes, bits = config.beats(buf), config.lanes(buf), config.lane_bits(buf)
    words = rng.integers(-(1 << bits - 1), 1 << bits - 1, (count, lanes))
    data = pack_words(words, bits, beats * config.dram_bits // 8).reshape(-1)
    out = count * beats
    program = (Instruction.make(Opcode.LOAD, signal=(Token.LD2VE,), buf=buf, addr=2, count=count, dram=0),
               Instruction.make(Opcode.SSTORE, wait=(Token.LD2VE,), buf=buf, addr=2, count=count, dram=out,
                                step=step * beats),
               Instruction.make(Opcode.HALT))
    return program, data, out, words


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=st.sampled_from(SQUARE + CONFIGS[1:3]), count=st.integers(1, 5), step=st.integers(1, 4),
       buf=st.sampled_from(list(Buffer)), seed=st.integers(0, 2**32 - 1))
def test_sstore_strides_words_as_the_isa_sim_does(config, count, step, buf, seed):
    """sstore writes buffer word i from DRAM word dram + i*step on, the words between left as
    they were, in the ISA simulator and the RTL alike."""
    program, data, out, words = sstore_case(config, np.random.default_rng(seed), count, step, buf)
    machine, _ = same_as_spec(program, config, data)
    beats, size = config.beats(buf), config.dram_bits // 8
    for i, word in enumerate(words):
        first = (out + i * step * beats) * size
        got = machine.dram[first:first + beats * size].reshape(1, -1)
        assert np.array_equal(unpack_words(got, config.lanes(buf), config.lane_bits(buf))[0], word)
    between = machine.dram[(out + beats) * size:(out + step * beats) * size] if count > 1 else machine.dram[:0]
    assert not between.any()


def spload_case(config: AccelConfig, rng: np.random.Generator, blocks: int, nnz: int, bw: int, canonical: bool = True):
    """spgemm's weight and index words for `blocks` blocks (random weights, indices below bw,
    skips in lane 0 of each block's last step), packed into spload's stream at DRAM 0; an
    spload of it into BBUF, then BBUF stored. With `canonical` False, the stream words are
    random bits instead. The case and the BBUF words expected (the pairs)."""
    bits, cols, beats = config.data_bits, config.cols, config.beats(Buffer.BBUF)
    steps = blocks * nnz
    pairs = np.zeros((2 * steps, cols), np.int64)
    pairs[0::2] = rng.integers(-(1 << bits - 1), 1 << bits - 1, (steps, cols))
    pairs[1::2] = rng.integers(0, bw, (steps, cols))
    pairs[2 * nnz - 1::2 * nnz, 0] += bw * rng.integers(0, (1 << bits) // bw, blocks)
    pairs[1::2] = wrap(pairs[1::2], bits)
    stream = isa.pack_sparse(pairs, nnz, bw, bits)
    if not canonical:
        stream = rng.integers(-(1 << bits - 1), 1 << bits - 1, stream.shape)
        pairs = isa.unpack_sparse(stream, steps, nnz, bw, bits)
    data = pack_words(stream, bits, beats * config.dram_bits // 8).reshape(-1)
    out = len(stream) * beats
    program = (Instruction.make(Opcode.SPLOAD, signal=(Token.LD2VE,), buf=Buffer.BBUF, addr=2, count=len(stream),
                                dram=0, steps=steps, nnz=nnz, bw=bw),
               Instruction.make(Opcode.STORE, wait=(Token.LD2VE,), buf=Buffer.BBUF, addr=2, count=2 * steps, dram=out),
               Instruction.make(Opcode.HALT))
    return program, data, out, pairs


SPARSE = [tiny(2, 2, 32, 1, abuf_depth=64, bbuf_depth=64), tiny(2, 4, 32, 3, abuf_depth=64, bbuf_depth=64),
          tiny(4, 4, 16, 2, abuf_depth=64, bbuf_depth=64),
          tiny(3, 3, 8, 3, data_bits=4, acc_bits=12, abuf_depth=64, bbuf_depth=64)]


@settings(max_examples=16, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=st.sampled_from(SPARSE), blocks=st.integers(1, 4), ib=st.integers(0, 4), nnz=st.integers(1, 16),
       canonical=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_spload_expands_the_compact_hp_stream_as_the_isa_sim_does(config, blocks, ib, nnz, canonical, seed):
    """spload's stream (weight words, and index words packing log2(bw) bits a value and each
    block's skip) lands as spgemm's weight/index word pairs, in the ISA simulator and the RTL
    alike, in a load's cycles; packing is the inverse of spload (round trip); any stream
    words, not only packed ones, expand the same in both."""
    bw = 1 << min(ib, config.abuf_banks.bit_length() - 1, config.data_bits - 1)
    nnz = min(nnz, bw)
    assume(2 + 2 * blocks * nnz <= config.bbuf_depth)
    program, data, out, pairs = spload_case(config, np.random.default_rng(seed), blocks, nnz, bw, canonical)
    machine, _ = same_as_spec(program, config, data)
    beats, size = config.beats(Buffer.BBUF), config.dram_bits // 8
    stored = machine.dram[out * size:(out + len(pairs) * beats) * size].reshape(len(pairs), -1)
    assert np.array_equal(unpack_words(stored, config.cols, config.data_bits), pairs)
    assert program[0].occupancy(config) == config.dram_latency + program[0]["count"] * beats
    # the index words hold the steps' bits, wasting less than a step's at the end of each
    ib, width = bw.bit_length() - 1, config.cols * config.data_bits
    needed, step_max = blocks * (nnz * config.cols * ib + config.data_bits - ib), config.cols * ib + config.data_bits - ib
    index_words = program[0]["count"] - blocks * nnz
    assert math.ceil(needed / width) <= index_words <= math.ceil(needed / (width - step_max + 1))


def test_spload_is_refused_with_a_count_that_is_not_its_streams():
    config = SPARSE[0]
    spload = Instruction.make(Opcode.SPLOAD, buf=Buffer.BBUF, addr=0, count=8, dram=0, steps=6, nnz=2, bw=4)
    assert isa.sparse_stream(6, 2, 4, config.cols, config.data_bits) == (-1, 0, 1, -1, 2, 3, 4, -1, 5)
    assert "count must be the stream's 9 words" in spload.problem(config)
    assert dataclasses.replace(spload, args=spload.args[:2] + (9,) + spload.args[3:]).problem(config) is None
    assert "whole blocks" in dataclasses.replace(spload, args=spload.args[:1] + (1,) + spload.args[2:]).problem(config)
    assert "sparse unit" in spload.problem(dataclasses.replace(config, sparse_unit=False))


@pytest.mark.parametrize("runner, tool", [(rtl.run_verilator, "verilator"), (rtl.run_icarus, "iverilog")])
def test_tload_sstore_and_spload_on_the_verilog_simulators(runner, tool):
    need(tool)
    config = SQUARE[2]  # two DRAM beats a buffer word
    program, data, _out, _expected = tload_case(config, np.random.default_rng(5), 3, 2, 7, Buffer.ABUF)
    same_as_spec(program, config, data, runner)
    program, data, _out, _words = sstore_case(config, np.random.default_rng(6), 4, 3, Buffer.OBUF)
    same_as_spec(program, config, data, runner)
    program, data, _out, _pairs = spload_case(SPARSE[2], np.random.default_rng(7), 3, 3, 4)
    same_as_spec(program, SPARSE[2], data, runner)


# ---- banked ABUF and machines without the optional units: other hardware, the same ISA

def variant(config: AccelConfig, **kw) -> AccelConfig:
    return dataclasses.replace(config, **kw)


VARIANTS = [variant(CONFIGS[0], abuf_banks=2), variant(CONFIGS[1], vector_unit=False, sparse_unit=False),
            variant(CONFIGS[2], abuf_banks=2, vector_unit=False, binary_unit=False),
            variant(CONFIGS[3], abuf_banks=4, nonlinear_unit=False),
            variant(CONFIGS[3], abuf_banks=1, vector_unit=False, sparse_unit=False, binary_unit=False)]


@pytest.mark.parametrize("banks", [1, 2, 4])
def test_gemm_without_the_vector_unit_on_banked_abuf(banks):
    config = variant(CONFIGS[3], abuf_banks=banks, vector_unit=False)
    names = [name for name, _words, _bits in hardware.design(config).memories]
    assert [n for n in names if n.startswith("abuf")] == (["abuf_load"] if banks == 1 else
                                                          [f"abuf_load_b{i}" for i in range(banks)])
    assert not [n for n in names if n.startswith("pbuf_vector")]  # vsum's bank went with the unit
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
    """Loads and stores at any ABUF address (every bank), array instructions from any; vector
    ops, spgemm and bgemm where their units are there."""
    test_random_programs_match_isa_sim.hypothesis.inner_test(config, length, chain, seed)


def missing_unit_program(config: AccelConfig, op: Opcode):
    """A program whose instruction 1 is `op`."""
    if op in (Opcode.SPGEMM, Opcode.BGEMM):
        fields = dict(blocks=1, nnz=1, bw=1, span=1) if op is Opcode.SPGEMM else dict(k=2)
        return [Instruction.make(Opcode.LOAD, signal=(Token.LD2AR,), buf=Buffer.ABUF, addr=0, count=2, dram=0),
                Instruction.make(op, wait=(Token.LD2AR,), a=0, b=0, acc=0, bank=0, **fields),
                Instruction.make(Opcode.HALT)], np.arange(64, dtype=np.uint8)
    if op is Opcode.VGELU:
        return [Instruction.make(Opcode.LOAD, signal=(Token.LD2VE,), buf=Buffer.OBUF, addr=0, count=2, dram=0),
                Instruction.make(op, wait=(Token.LD2VE,), dst=4, a=0, n=2, param=0),
                Instruction.make(Opcode.HALT)], np.arange(64, dtype=np.uint8)
    case = vector_case(config, [(op, 8, 0, 2, 3, 0)], rng=np.random.default_rng(0), words=8)
    return case.program, case.dram


@pytest.mark.parametrize("flag, op, register", [("vector_unit", Opcode.VADD, "ve_sum"),
                                                ("sparse_unit", Opcode.SPGEMM, "ar_sparse"),
                                                ("binary_unit", Opcode.BGEMM, "ar_binary"),
                                                ("nonlinear_unit", Opcode.VGELU, "sm_sum")])
def test_programs_of_a_missing_unit_are_refused(monkeypatch, flag, op, register):
    config = variant(CONFIGS[1], **{flag: False})
    program, dram = missing_unit_program(config, op)
    name, words = op.name.lower(), flag.replace("_", " ")
    message = rf"instruction 1 \({name} .*\): {name} needs the {words}, which this config leaves out \({flag}=0\)"
    with pytest.raises(SimulationError, match=message):
        simulate(program, config, dram)
    for runner in (rtl.run_pyrtl, rtl.run_icarus, rtl.run_verilator):  # refused before any tool runs
        with pytest.raises(ValueError, match=message):
            runner(program, config, dram, 1000)
    # and the hardware has no unit to run it: past the check, the instruction never issues
    monkeypatch.setattr(isa, "check_program", lambda program, config: None)
    with pytest.raises(rtl.RTLSimulationError):
        rtl.run_pyrtl(program, config, dram, 200)
    assert register not in verilog.verilog_text(config) and register in verilog.verilog_text(CONFIGS[1])
    bbuf = [n for n, _words, _bits in hardware.design(config).memories if n.startswith("bbuf")]
    assert bbuf == (["bbuf_load"] if flag == "sparse_unit" else ["bbuf_load_b0", "bbuf_load_b1"])  # no split


def test_pbuf_vector_bank_is_as_wide_as_its_widest_word():
    """vacc and vresadd write whole PBUF words; without them vsum's one value (in every lane) is
    all the vector unit writes, and its bank keeps one lane."""
    for flag, bits in ((True, CONFIGS[1].word_bits(Buffer.PBUF)), (False, CONFIGS[1].acc_bits)):
        memories = hardware.design(variant(CONFIGS[1], nonlinear_unit=flag)).memories
        assert [b for name, _words, b in memories if name == "pbuf_vector"] == [bits]


# ---- the array: instructions streaming back to back on two banks, spgemm, bgemm

SPARSE_CONFIGS = [tiny(2, 2, 32, 1, abuf_banks=4, abuf_depth=64, bbuf_depth=64),
                  tiny(3, 2, 64, 2, abuf_banks=8, abuf_depth=64, bbuf_depth=64),
                  tiny(2, 3, 32, 3, abuf_banks=2, abuf_depth=64, bbuf_depth=64, data_bits=4, acc_bits=12),
                  tiny(4, 4, 64, 1, abuf_depth=64, bbuf_depth=64)]  # 16 ABUF banks
# the W1A8 unit: G activation words a step from 4, 8 or 2 banks (G = the banks: no bank mux)
W1A8_CONFIGS = [dataclasses.replace(SPARSE_CONFIGS[0], binary_weight_group=2),
                dataclasses.replace(SPARSE_CONFIGS[1], binary_weight_group=4),
                dataclasses.replace(SPARSE_CONFIGS[2], binary_weight_group=2)]


@dataclasses.dataclass
class ArrayCase:
    program: list[Instruction]
    dram: np.ndarray
    params: np.ndarray  # [groups, 3, cols]: bias, multiplier, shift
    out: int  # the DRAM word of the first result: `rows` OBUF words per array instruction

    def results(self, config: AccelConfig, dram: np.ndarray, i: int) -> np.ndarray:
        """The [rows, cols] requantized result of array instruction `i`."""
        word, beats = config.dram_bits // 8, config.beats(Buffer.OBUF)
        first = (self.out + i * config.rows * beats) * word
        data = np.asarray(dram[first:first + config.rows * beats * word]).reshape(config.rows, beats * word)
        return unpack_words(data, config.cols, config.data_bits)

    def expected(self, config: AccelConfig, i: int, acc: np.ndarray) -> np.ndarray:
        """What requant and store make of array instruction `i`'s accumulators `acc`."""
        bias, mult, shift = self.params[i % len(self.params)]
        return requantize(config, acc, bias, mult, shift, relu=bool(i % 2))


def array_case(config: AccelConfig, rng: np.random.Generator, abuf: np.ndarray, bbuf: np.ndarray,
               instrs: list[tuple[Opcode, dict]]) -> ArrayCase:
    """ABUF and BBUF loaded with `abuf` / `bbuf` ([words, lanes]), PBUF with random requant
    groups; then the array instructions `instrs` ((opcode, fields but bank)) on alternating
    banks, each requantized (group i, relu for odd i) into a double-buffered OBUF slot and
    stored while the next streams through the array."""
    R, DB = config.rows, config.data_bits
    word = config.dram_bits // 8
    groups = config.pbuf_depth // 3
    params = np.stack([np.stack([rng.integers(-(1 << DB), 1 << DB, config.cols), rng.integers(1, 4, config.cols),
                                 rng.integers(0, 2 * DB + 2, config.cols)]) for _ in range(groups)])
    image, at = [], {}
    for buf, lanes in ((Buffer.ABUF, abuf), (Buffer.BBUF, bbuf), (Buffer.PBUF, params.reshape(-1, config.cols))):
        at[buf] = sum(len(x) for x in image) // word
        image.append(pack_words(np.asarray(lanes, np.int64), config.lane_bits(buf), config.beats(buf) * word)
                     .reshape(-1))
    out = sum(len(x) for x in image) // word
    program = [Instruction.make(Opcode.LOAD, buf=Buffer.ABUF, addr=0, count=len(abuf), dram=at[Buffer.ABUF]),
               Instruction.make(Opcode.LOAD, buf=Buffer.BBUF, addr=0, count=len(bbuf), dram=at[Buffer.BBUF],
                                signal=(Token.LD2AR,)),
               Instruction.make(Opcode.LOAD, buf=Buffer.PBUF, addr=0, count=3 * groups, dram=at[Buffer.PBUF],
                                signal=(Token.LD2VE,))]

    def drain(i: int) -> list[Instruction]:  # requant and store array instruction i's bank
        slot = i % 2 * R
        return [Instruction.make(Opcode.REQUANT, wait=(Token.AR2VE,) + ((Token.LD2VE,) if i == 0 else ())
                                 + ((Token.ST2VE,) if i >= 2 else ()), signal=(Token.VE2AR, Token.VE2ST),
                                 dst=slot, param=3 * (i % groups), relu=i % 2, bank=i % 2),
                Instruction.make(Opcode.STORE, wait=(Token.VE2ST,), signal=(Token.ST2VE,), buf=Buffer.OBUF, addr=slot,
                                 count=R, dram=out + i * R * config.beats(Buffer.OBUF))]

    for i, (op, fields) in enumerate(instrs):
        wait = ((Token.LD2AR,) if i == 0 else ()) + ((Token.VE2AR,) if i >= 2 else ())
        program.append(Instruction.make(op, wait=wait, signal=(Token.AR2VE,), bank=i % 2, **fields))
        if i:
            program += drain(i - 1)
    program += drain(len(instrs) - 1) + [Instruction.make(Opcode.HALT)]
    return ArrayCase(program, np.concatenate(image), params, out)


def random_lanes(rng: np.random.Generator, n: int, lanes: int, bits: int) -> np.ndarray:
    return rng.integers(-(1 << bits - 1), 1 << bits - 1, (n, lanes))


def sparse_weights(config: AccelConfig, rng: np.random.Generator, blocks: int, nnz: int, bw: int):
    """A random [span, cols] weight matrix of `blocks` kept blocks of `bw` rows with at most
    `nnz` nonzeros per column each, pruned blocks between them, and its spgemm encoding:
    [2 * blocks * nnz, cols] BBUF words, weights then local row indices (with random high bits
    the hardware ignores, but for lane 0 of a kept block's last step: the pruned blocks after
    it). Returns (weights, words, span)."""
    C, DB = config.cols, config.data_bits
    skips = rng.integers(0, min(3, (1 << DB) // bw - 1) + 1, blocks)
    skips[-1] = 0
    windows = bw * (np.arange(blocks) + np.concatenate([[0], np.cumsum(skips[:-1])]))
    span = int(windows[-1]) + bw
    dense = np.zeros((span, C), np.int64)
    words = np.zeros((2 * blocks * nnz, C), np.int64)
    for j in range(blocks):
        for c in range(C):
            rows = rng.choice(bw, nnz, replace=False)
            values = random_lanes(rng, nnz, 1, DB)[:, 0]
            noise = random_lanes(rng, nnz, 1, DB)[:, 0]
            for t in range(nnz):
                words[2 * (j * nnz + t), c] = values[t]
                words[2 * (j * nnz + t) + 1, c] = noise[t] & ~(bw - 1) | rows[t]
                dense[windows[j] + rows[t], c] = values[t]
        if j < blocks - 1:  # lane 0 of the last step carries the skip
            last = words[2 * (j * nnz + nnz - 1) + 1, 0] & (bw - 1)
            words[2 * (j * nnz + nnz - 1) + 1, 0] = (last + bw * skips[j] + (1 << DB - 1)) % (1 << DB) - (1 << DB - 1)
    return dense, words, span


def binary_product(a: np.ndarray, b: np.ndarray, bits: int) -> np.ndarray:
    """[rows, cols] sum over words of the +-1 dot products of the lanes' bits (set: +1)."""
    signs = lambda x: np.where((x[..., None] >> np.arange(bits)) & 1, 1, -1)  # noqa: E731
    return np.einsum("kri,kci->rc", signs(a), signs(b))


def test_array_streams_back_to_back_while_requant_drains_the_other_bank():
    """Dense gemms issue as soon as the previous one's operands are in (before it ends); each
    requant reads one bank while the array fills the other; cycles and results as the ISA
    simulator and numpy say."""
    config = SPARSE_CONFIGS[1]
    rng = np.random.default_rng(3)
    ks = [5, 3, 7, 1, 4]
    abuf, bbuf = random_lanes(rng, 32, config.rows, 8), random_lanes(rng, 32, config.cols, 8)
    instrs = [(Opcode.GEMM, dict(a=2 * i, b=3 * i, k=k, acc=0)) for i, k in enumerate(ks)]
    case = array_case(config, rng, abuf, bbuf, instrs)
    machine, stats = same_as_spec(case.program, config, case.dram)
    issue = {pc: stats.schedule[pc] for pc, instr in enumerate(case.program) if instr.op is Opcode.GEMM}
    gemms = sorted(issue)
    # the second gemm streams in right behind the first, long before the first ends
    (t0, end0), (t1, _) = issue[gemms[0]], issue[gemms[1]]
    assert t1 == t0 + ks[0] < end0
    # requants run while the array is busy with the next instruction
    requants = [stats.schedule[pc] for pc, instr in enumerate(case.program) if instr.op is Opcode.REQUANT]
    assert any(t < end and s < e for (t, end) in issue.values() for (s, e) in requants)
    for i, (op, f) in enumerate(instrs):
        acc = abuf[f["a"]:f["a"] + f["k"]].T @ bbuf[f["b"]:f["b"] + f["k"]]
        np.testing.assert_array_equal(case.results(config, machine.dram, i), case.expected(config, i, acc))
    same_as_spec(case.program, config, case.dram, rtl.run_verilator)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=st.sampled_from(SPARSE_CONFIGS), log_bw=st.integers(0, 4), blocks=st.integers(1, 4), data=st.data())
def test_spgemm_matches_isa_sim_and_the_dense_product(config, log_bw, blocks, data):
    """spgemm over random sparsity patterns: cycles and DRAM equal the ISA simulator's; its
    result equals a dense gemm of the weights it encodes (run right after it, on the other
    bank) and numpy's."""
    bw = min(1 << log_bw, config.abuf_banks, 1 << config.data_bits - 1)
    nnz = data.draw(st.integers(1, bw), label="nnz")
    blocks = min(blocks, config.bbuf_depth // (2 * nnz + 4 * bw), config.abuf_depth // (4 * bw))  # room for
    blocks = max(blocks, 1)  # the encoding and the dense weights of up to 3 pruned blocks after each kept one
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    dense, encoded, k = sparse_weights(config, rng, blocks, nnz, bw)
    a_at = bw * data.draw(st.integers(0, (config.abuf_depth - k) // bw), label="window")
    abuf = random_lanes(rng, config.abuf_depth, config.rows, config.data_bits)
    b_at = 2 * data.draw(st.integers(0, (config.bbuf_depth - len(encoded) - k) // 2), label="b")
    bbuf = random_lanes(rng, config.bbuf_depth, config.cols, config.data_bits)
    bbuf[b_at:b_at + len(encoded)] = encoded
    d_at = b_at + len(encoded)
    bbuf[d_at:d_at + k] = dense
    instrs = [(Opcode.SPGEMM, dict(a=a_at, b=b_at, blocks=blocks, nnz=nnz, bw=bw, span=k, acc=0)),
              (Opcode.GEMM, dict(a=a_at, b=d_at, k=k, acc=0))]
    case = array_case(config, rng, abuf, bbuf, instrs)
    machine, _ = same_as_spec(case.program, config, case.dram)
    acc = abuf[a_at:a_at + k].T @ dense
    for i in range(2):
        np.testing.assert_array_equal(case.results(config, machine.dram, i), case.expected(config, i, acc))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=st.sampled_from(SPARSE_CONFIGS), ks=st.lists(st.integers(1, 9), min_size=1, max_size=4),
       seed=st.integers(0, 2**32 - 1))
def test_bgemm_matches_isa_sim_and_the_binary_product(config, ks, seed):
    """bgemm over random binary matrices (each lane's bits: +-1 values), back to back: cycles
    and DRAM equal the ISA simulator's, results numpy's XNOR-popcount product."""
    rng = np.random.default_rng(seed)
    abuf = random_lanes(rng, config.abuf_depth, config.rows, config.data_bits)
    bbuf = random_lanes(rng, config.bbuf_depth, config.cols, config.data_bits)
    places = [(int(rng.integers(0, config.abuf_depth - k + 1)), int(rng.integers(0, config.bbuf_depth - k + 1)), k)
              for k in ks]
    case = array_case(config, rng, abuf, bbuf, [(Opcode.BGEMM, dict(a=a, b=b, k=k, acc=0)) for a, b, k in places])
    machine, _ = same_as_spec(case.program, config, case.dram)
    for i, (a, b, k) in enumerate(places):
        acc = binary_product(abuf[a:a + k], bbuf[b:b + k], config.data_bits)
        np.testing.assert_array_equal(case.results(config, machine.dram, i), case.expected(config, i, acc))


def signed_sum(a: np.ndarray, b: np.ndarray, group: int) -> np.ndarray:
    """wgemm's [rows, cols] sums: a [k * G, rows] activations, b [k, cols] weight words whose
    lane bit j is the sign of activation word i * G + j (set: +1)."""
    signs = np.where((b[:, None, :] >> np.arange(group)[None, :, None]) & 1, 1, -1)
    return np.einsum("kgr,kgc->rc", a.reshape(len(b), group, -1), signs)


def wgemm_fields(config: AccelConfig, rng: np.random.Generator) -> dict:
    group = config.binary_weight_group
    k = int(rng.integers(1, min(9, config.abuf_depth // group)))
    return dict(a=group * int(rng.integers(0, config.abuf_depth // group - k + 1)),
                b=int(rng.integers(0, config.bbuf_depth - k + 1)), k=k)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=st.sampled_from(W1A8_CONFIGS), n=st.integers(1, 4), seed=st.integers(0, 2**32 - 1))
def test_wgemm_matches_isa_sim_and_the_signed_sum(config, n, seed):
    """wgemm (W1A8) between gemms, back to back: the address steps by G and the PEs switch
    modes on the fly; cycles and DRAM equal the ISA simulator's, results numpy's signed sums."""
    rng = np.random.default_rng(seed)
    abuf = random_lanes(rng, config.abuf_depth, config.rows, config.data_bits)
    bbuf = random_lanes(rng, config.bbuf_depth, config.cols, config.data_bits)
    instrs = [(Opcode.WGEMM, dict(wgemm_fields(config, rng), acc=0)) if i % 2 == 0 else
              (Opcode.GEMM, dict(a=int(rng.integers(0, 8)), b=int(rng.integers(0, 8)), k=3, acc=0))
              for i in range(2 * n - 1)]
    case = array_case(config, rng, abuf, bbuf, instrs)
    machine, _ = same_as_spec(case.program, config, case.dram)
    group = config.binary_weight_group
    for i, (op, f) in enumerate(instrs):
        acc = signed_sum(abuf[f["a"]:f["a"] + f["k"] * group], bbuf[f["b"]:f["b"] + f["k"]], group) \
            if op is Opcode.WGEMM else abuf[f["a"]:f["a"] + 3].T @ bbuf[f["b"]:f["b"] + 3]
        np.testing.assert_array_equal(case.results(config, machine.dram, i), case.expected(config, i, acc))


def mixed_array_case(config: AccelConfig, rng: np.random.Generator) -> ArrayCase:
    """gemm, spgemm and bgemm (and wgemm where the config has it) of random shapes back to back
    (spgemm with every bw the config allows)."""
    limit = min(config.abuf_banks, 1 << config.data_bits - 1)
    abuf = random_lanes(rng, config.abuf_depth, config.rows, config.data_bits)
    bbuf = random_lanes(rng, config.bbuf_depth, config.cols, config.data_bits)
    ops = (Opcode.GEMM, Opcode.SPGEMM, Opcode.BGEMM) + ((Opcode.WGEMM,) if config.binary_weight_group else ())
    instrs = []
    for i in range(8):
        op = ops[i % len(ops)]
        if op is Opcode.WGEMM:
            instrs.append((op, dict(wgemm_fields(config, rng), acc=int(rng.integers(0, 2)))))
            continue
        if op is Opcode.SPGEMM:
            slot = config.bbuf_depth // 3 // 2 * 2  # BBUF words of each of the three spgemms' encodings
            bw = 1 << int(rng.integers(0, limit.bit_length()))
            blocks = max(1, min(int(rng.integers(1, 4)), config.abuf_depth // (4 * bw)))
            nnz = int(rng.integers(1, min(bw, slot // (2 * blocks)) + 1))
            _, encoded, span = sparse_weights(config, rng, blocks, nnz, bw)
            b = i // len(ops) * slot
            bbuf[b:b + len(encoded)] = encoded
            instrs.append((op, dict(a=bw * int(rng.integers(0, (config.abuf_depth - span) // bw + 1)), b=b,
                                    blocks=blocks, nnz=nnz, bw=bw, span=span, acc=int(rng.integers(0, 2)))))
        else:
            k = int(rng.integers(1, 10))
            instrs.append((op, dict(a=int(rng.integers(0, config.abuf_depth - k + 1)),
                                    b=int(rng.integers(0, config.bbuf_depth - k + 1)), k=k,
                                    acc=int(rng.integers(0, 2)))))
    return array_case(config, rng, abuf, bbuf, instrs)


# the default tier: a 2x2 array on 4 banks, 4-bit data on 2, the W1A8 unit on 8; the others slow
@pytest.mark.parametrize("config", [SPARSE_CONFIGS[0], pytest.param(SPARSE_CONFIGS[1], marks=pytest.mark.slow),
                                    SPARSE_CONFIGS[2], pytest.param(SPARSE_CONFIGS[3], marks=pytest.mark.slow),
                                    W1A8_CONFIGS[1]], ids=str)
def test_mixed_array_programs_on_verilator(config):
    need("verilator")
    case = mixed_array_case(config, np.random.default_rng(config.rows * 10 + config.cols))
    same_as_spec(case.program, config, case.dram)
    same_as_spec(case.program, config, case.dram, rtl.run_verilator)


def test_mixed_array_programs_on_icarus():
    need("iverilog")
    config = SPARSE_CONFIGS[2]
    case = mixed_array_case(config, np.random.default_rng(8))
    same_as_spec(case.program, config, case.dram, rtl.run_icarus)


@pytest.mark.parametrize("mode", [Opcode.GEMM, Opcode.BGEMM, Opcode.WGEMM], ids=lambda o: o.name.lower())
def test_the_array_alone_computes_its_mode(mode):
    """`build_array` (what `verilog.synthesize_array` maps): the accelerator's PEs in one mode,
    the same skew and timing: k words in, the products rows + cols - 2 cycles after the last
    (wgemm: G words a step, row r's lanes of each side by side)."""
    import pyrtl
    config = tiny(3, 2, data_bits=4, acc_bits=12, binary_weight_group=4 if mode is Opcode.WGEMM else 0)
    R, C, k, group = config.rows, config.cols, 5, max(config.binary_weight_group, 1)
    rng = np.random.default_rng(int(mode))
    a, b = random_lanes(rng, k * group, R, 4), random_lanes(rng, k, C, 4)
    steps = a.reshape(k, group, R).transpose(0, 2, 1).reshape(k, R * group)  # step i: lane r's G values
    word = lambda lanes, n: int.from_bytes(pack_words(lanes[None], 4, n).tobytes(), "little")  # noqa: E731
    sim = pyrtl.FastSimulation(tracer=None, block=hardware.build_array(config, mode))
    for i in range(k + R + C - 1):  # inspect shows cycle i's register values: the last PE's sum is there at k+R+C-2
        step = i < k
        sim.step({"a": word(steps[i], 2 * group) if step else 0, "b": word(b[i], 2) if step else 0, "valid": step,
                  "clear": i == 0, "bank": 1})
    acc = np.array([[sim.inspect("acc") >> ((R * C + r * C + c) * 12) & 0xFFF for c in range(C)] for r in range(R)])
    want = {Opcode.GEMM: lambda: a.T @ b, Opcode.BGEMM: lambda: binary_product(a, b, 4),
            Opcode.WGEMM: lambda: signed_sum(a, b, group)}[mode]()
    np.testing.assert_array_equal(acc, want & 0xFFF)
    assert sim.inspect("acc") & (1 << R * C * 12) - 1 == 0  # bank 0 untouched
    with pytest.raises(ValueError, match="modes are gemm, bgemm and wgemm"):
        hardware.build_array(config, Opcode.SPGEMM)


# ---- the nonlinearities (vacc, vresadd, vgelu, vsoftmax, vlayernorm): random rows and lengths;
# constants as the int-nonlinear pass builds them (they need 32-bit PBUF lanes) or random within
# the bounds the IR ops' docstrings give

NL_CONFIGS = [tiny(2, 2, 32, 1, obuf_depth=32, pbuf_depth=64), tiny(3, 4, 64, 2, obuf_depth=32, pbuf_depth=64),
              tiny(2, 3, 32, 3, obuf_depth=32, pbuf_depth=64, data_bits=16, acc_bits=32),
              tiny(2, 2, 24, 2, obuf_depth=32, pbuf_depth=64, data_bits=4, acc_bits=12)]
_DATA = {4: DType.I4, 8: DType.I8, 16: DType.I16}
NL_OPS = (Opcode.VACC, Opcode.VRESADD, Opcode.VGELU, Opcode.VSOFTMAX, Opcode.VLAYERNORM)


def signed_range(bits: int) -> tuple[int, int]:
    return -(1 << bits - 1), (1 << bits - 1) - 1


def draw(rng: np.random.Generator, low: int, high: int) -> int:
    """A random integer in [low, high], any width."""
    return low + int.from_bytes(rng.bytes(16), "little") % (high - low + 1)


def constant_words(config: AccelConfig, rng: np.random.Generator, values) -> np.ndarray:
    """PBUF words holding `values` in lane 0 (the constants an instruction reads), random lanes
    elsewhere."""
    words = random_lanes(rng, len(values), config.cols, config.acc_bits)
    low, high = signed_range(config.acc_bits)
    assert all(low <= v <= high for v in values), values
    words[:, 0] = values
    return words


def scaled(rng: np.random.Generator, bits: int, limit: int, signs: bool = True) -> int:
    """A random integer of `bits` bits (0 for 0), capped at `limit`, of random sign."""
    value = min(limit, draw(rng, 1 << bits - 1, (1 << bits) - 1)) if bits > 0 else 0
    return -value if signs and rng.integers(0, 2) else value


def shift_for(rng: np.random.Generator, bits_in: int, bits_out: int) -> int:
    """A shift taking values of about `bits_in` bits to about `bits_out` (give or take 2), in [0, 62]."""
    return int(np.clip(bits_in - bits_out + draw(rng, -2, 2), 0, 62))


def gelu_constants(config: AccelConfig, rng: np.random.Generator, realistic: bool) -> list[int]:
    """int_gelu's multiplier, shift, clip, one, out_multiplier, out_shift: `gelu_attrs` of random
    scales, or random with |g * out_multiplier| <= 2^62 (|g| <= 2^(data_bits-1) (2 |one| +
    clip^2)), u of about clip's size and results of about the output's."""
    DB, AB = config.data_bits, config.acc_bits
    if realistic:
        dtype = _DATA[DB]
        attrs = gelu_attrs(float(rng.uniform(1e-3, 0.2)), dtype, float(rng.uniform(1e-3, 0.2)), dtype)
        return [attrs[k] for k in ("multiplier", "shift", "clip", "one", "out_multiplier", "out_shift")]
    high = signed_range(AB)[1]
    clip_bits, mult_bits = draw(rng, 1, min(AB - 2, 20)), draw(rng, 0, AB - 2)
    clip = scaled(rng, clip_bits, high, signs=rng.random() < 0.1)
    one = scaled(rng, draw(rng, 0, AB - 1), high)
    g = (1 << DB - 1) * (2 * abs(one) + clip * clip)  # |g| at most
    limit = min(high, (1 << 62) // g)
    out_bits = draw(rng, 0, limit.bit_length())
    return [scaled(rng, mult_bits, high), shift_for(rng, DB - 1 + mult_bits, clip_bits), clip, one,
            scaled(rng, out_bits, limit), shift_for(rng, g.bit_length() + out_bits, DB - 1)]


def resadd_constants(config: AccelConfig, rng: np.random.Generator, realistic: bool) -> list[int]:
    """vresadd's m_a, s_a, m_b, s_b, m, s, out_bits: as int-nonlinear's residual add builds them
    (two inputs at random steps, a common i32 step, the sum to out_bits), or random (the inputs
    requantized to random sizes, i32 saturating included, the sum to about out_bits)."""
    DB, AB = config.data_bits, config.acc_bits
    if realistic:
        def fixed(m: float, bound: int) -> list[int]:
            mult, shift = fixed_point(np.array([m]), min(31, 62 - bound.bit_length()))
            return [int(mult[0]), int(shift[0])]

        bound = 1 << DB - 1
        s_a, s_b, s_out = (float(rng.uniform(1e-3, 0.2)) for _ in range(3))
        common = max(min(s_a, s_b), bound * max(s_a, s_b) / 2 ** 29)
        total = 2 * (math.ceil(bound * max(s_a, s_b) / common) + 1)
        return [*fixed(s_a / common, bound), *fixed(s_b / common, bound), *fixed(common / s_out, total),
                int(rng.choice([8, 16]))]
    high = signed_range(AB)[1]
    bits = draw(rng, 2, AB)
    sizes = [draw(rng, 0, 34) if rng.random() < 0.5 else draw(rng, 29, 34) for _ in range(2)]  # i32 saturates
    out = []
    for bits_in, bits_out in ((DB - 1, sizes[0]), (DB - 1, sizes[1]), (min(32, max(sizes) + 1), bits - 1)):
        mult_bits = draw(rng, min(AB - 1, max(0, bits_out - bits_in)), AB - 1)  # reaching bits_out where it can
        out += [scaled(rng, mult_bits, high), shift_for(rng, bits_in + mult_bits, bits_out)]
    return [*out, bits]


def softmax_constants(config: AccelConfig, rng: np.random.Generator, realistic: bool, spread: int) -> list[int]:
    """int_softmax's multiplier, shift, ln2, b, c, out_bits for rows of `spread`-bit values:
    `softmax_attrs` of a random scale, or random with multiplier >= 0, ln2 > 0 and 0 <= (p +
    b)^2 + c < 2^31 for p in (-ln2, 0], and differences of up to about 2^6 ln2."""
    out_bits = draw(rng, 1, config.data_bits - 1)
    if realistic:
        attrs = softmax_attrs(float(rng.uniform(1e-4, 0.02)), out_bits)
        return [attrs[k] for k in ("multiplier", "shift", "ln2", "b", "c", "out_bits")]
    high = signed_range(config.acc_bits)[1]
    half = min(high, 1 << 14)
    ln2, b = draw(rng, 1, half), draw(rng, -half, half)
    c = draw(rng, 0, min(high, (1 << 31) - 1 - max(b * b, (b - ln2 + 1) ** 2)))
    mult_bits = draw(rng, 0, config.acc_bits - 2)
    return [scaled(rng, mult_bits, high, signs=False), shift_for(rng, spread + mult_bits, ln2.bit_length() + 3),
            ln2, b, c, out_bits]


def layernorm_constants(config: AccelConfig, rng: np.random.Generator, realistic: bool, length: int, spread: int):
    """(eps, shift, weight [length], bias [length]) of int_layer_norm for rows of `spread`-bit
    values: from `layer_norm_params` (an i16 input at a random step, random gamma and beta), or
    random with |bias| <= 2^60, eps small enough for sum(c^2) + eps < 2^62, and results of
    about the output's size."""
    if realistic:
        weight, bias, attrs = layer_norm_params(float(rng.uniform(1e-3, 0.1)), DType.I16, rng.normal(1, 0.3, length),
                                                rng.normal(0, 0.5, length), float(rng.uniform(1e-6, 1e-3)),
                                                float(rng.uniform(0.01, 0.2)), _DATA[config.data_bits])
        return attrs["eps"], attrs["shift"], weight.astype(np.int64), bias
    DB, AB = config.data_bits, config.acc_bits
    high = signed_range(AB)[1]
    weight_bits = draw(rng, 0, AB - 1)
    shift = shift_for(rng, 31 + weight_bits - length.bit_length() // 2, DB - 1)
    limit = min(1 << 60, (1 << 2 * AB - 1) - 1)
    weight = np.array([scaled(rng, draw(rng, 0, weight_bits), high) for _ in range(length)], np.int64)
    bias = np.array([scaled(rng, draw(rng, 0, shift + DB), limit) for _ in range(length)], np.int64)
    return scaled(rng, draw(rng, 0, min(AB - 1, 2 * spread + 6)), high, signs=False), shift, weight, bias


def nonlinear_instruction(config: AccelConfig, rng: np.random.Generator, op: Opcode, n: int, realistic: bool,
                          pbuf_at: int = 0):
    """A random `op` over n words (vacc: rows) and the PBUF words it needs ({first word:
    lanes}), placed from PBUF word `pbuf_at` on; the OBUF inputs are whatever OBUF holds.
    Returns (fields, PBUF words, PBUF words it writes (first, end))."""
    C, AB, O = config.cols, config.acc_bits, config.obuf_depth

    def anywhere(words: int) -> int:  # in OBUF
        return int(rng.integers(0, O - words + 1))

    if op is Opcode.VACC:
        stride = int(rng.integers(0, 3))
        dst = pbuf_at + int(rng.integers(0, 4))
        writes = (dst, dst + (config.rows - 1) * stride + 1)
        return dict(dst=dst, stride=stride, bank=int(rng.integers(0, 2))), {}, writes
    if op is Opcode.VRESADD:  # half of them wide: b a stream of up to acc_bits in PBUF, after the sums
        consts = resadd_constants(config, rng, realistic)
        wide = int(rng.integers(0, 2))
        words = {pbuf_at: constant_words(config, rng, consts)}
        if wide:
            words[pbuf_at + 7 + n] = random_lanes(rng, n, C, draw(rng, 2, 16 if realistic else AB))
        return (dict(dst=pbuf_at + 7, a=anywhere(n), b=pbuf_at + 7 + n if wide else anywhere(n), n=n, param=pbuf_at,
                     wide=wide), words, (pbuf_at + 7, pbuf_at + 7 + n))
    if op is Opcode.VGELU:
        a = anywhere(n)
        dst = int(rng.choice([d for d in range(O - n + 1) if not a < d < a + n]))
        return dict(dst=dst, a=a, n=n, param=pbuf_at), {pbuf_at: constant_words(config, rng, gelu_constants(
            config, rng, realistic))}, (0, 0)
    length = int(rng.integers(1, n * C + 1))
    if op is Opcode.VSOFTMAX:  # half of them masked: random lanes, some zero (dropped), maybe all
        spread = draw(rng, 1, AB)
        consts = softmax_constants(config, rng, realistic, spread)
        masked = int(rng.integers(0, 2))
        mask = random_lanes(rng, n, C, AB) * (rng.random((n, C)) < rng.choice([0.0, 0.5, 0.9]))
        words = {pbuf_at: random_lanes(rng, n, C, spread), pbuf_at + n: constant_words(config, rng, consts)}
        if masked:
            words[pbuf_at + n + 6] = mask
        return (dict(dst=anywhere(n), a=pbuf_at, n=n, len=length, param=pbuf_at + n, masked=masked,
                     mask=pbuf_at + n + 6 if masked else int(rng.integers(0, config.pbuf_depth - n + 1))),
                words, (0, 0))
    widest = min(AB, 28)  # sum(c^2) < 24 * 2^56 < 2^61: the square root's top steps, a quarter of the time
    spread = draw(rng, 2, 16) if realistic else widest if rng.random() < 0.25 else draw(rng, 1, widest)
    eps, shift, weight, bias = layernorm_constants(config, rng, realistic, length, spread)
    lanes = np.zeros((3, n * C), np.int64)
    lanes[:, :length] = weight, wrap(bias & (1 << AB) - 1, AB), bias >> AB
    lanes[:, length:] = random_lanes(rng, 3, n * C - length, AB)
    words = np.concatenate([constant_words(config, rng, [eps, shift]), lanes.reshape(3 * n, C)])
    return (dict(dst=anywhere(n), a=pbuf_at, n=n, len=length, param=pbuf_at + n),
            {pbuf_at: random_lanes(rng, n, C, spread), pbuf_at + n: words}, (0, 0))


def vector_program(config: AccelConfig, rng: np.random.Generator, pbuf: dict, instrs, gemms: int = 0,
                   obuf: dict | None = None):
    """PBUF and OBUF full of random lanes, `pbuf` and `obuf` ({first word: lanes}) over them, loaded; with
    `gemms`, that many random gemms into accumulator banks 0, 1, 0, ...; then `instrs` ((opcode,
    fields)) back to back on the vector unit; OBUF and PBUF stored. Returns (program, DRAM)."""
    word = config.dram_bits // 8
    images = {b: random_lanes(rng, config.buffer_depth(b), config.lanes(b), config.lane_bits(b))
              for b in (Buffer.PBUF, Buffer.OBUF, *((Buffer.ABUF, Buffer.BBUF) if gemms else ()))}
    for buf, rows in ((Buffer.PBUF, pbuf), (Buffer.OBUF, obuf or {})):
        for first, words in rows.items():
            images[buf][first:first + len(words)] = words
    signals = {Buffer.OBUF: (Token.LD2VE,), Buffer.BBUF: (Token.LD2AR,)}
    program, chunks, end = [], [], 0
    for buf, lanes in images.items():
        chunks.append(pack_words(lanes, config.lane_bits(buf), config.beats(buf) * word).reshape(-1))
        program.append(Instruction.make(Opcode.LOAD, signal=signals.get(buf, ()), buf=buf, addr=0, count=len(lanes),
                                        dram=end))
        end += len(chunks[-1]) // word
    for i in range(gemms):
        k = int(rng.integers(1, 9))
        program.append(Instruction.make(Opcode.GEMM, wait=(Token.LD2AR,) if i == 0 else (),
                                        signal=(Token.AR2VE,) if i == gemms - 1 else (),
                                        a=int(rng.integers(0, config.abuf_depth - k + 1)),
                                        b=int(rng.integers(0, config.bbuf_depth - k + 1)), k=k, acc=0, bank=i % 2))
    for i, (op, fields) in enumerate(instrs):
        wait = ((Token.LD2VE,) + ((Token.AR2VE,) if gemms else ())) if i == 0 else ()
        program.append(Instruction.make(op, wait=wait, signal=(Token.VE2ST,) if i == len(instrs) - 1 else (),
                                        **fields))
    for buf in (Buffer.OBUF, Buffer.PBUF):
        program.append(Instruction.make(Opcode.STORE, wait=(Token.VE2ST,) if buf is Buffer.OBUF else (), buf=buf,
                                        addr=0, count=config.buffer_depth(buf), dram=end))
        end += config.buffer_depth(buf) * config.beats(buf)
    program.append(Instruction.make(Opcode.HALT))
    return tuple(program), np.concatenate(chunks)


def nonlinear_program(config: AccelConfig, rng: np.random.Generator, op: Opcode, n: int, realistic: bool):
    """One random `op` (vacc after two gemms)."""
    fields, pbuf, _writes = nonlinear_instruction(config, rng, op, n, realistic)
    return vector_program(config, rng, pbuf, [(op, fields)], gemms=2 if op is Opcode.VACC else 0)


def mixed_vector_program(config: AccelConfig, rng: np.random.Generator, length: int):
    """`length` vector instructions of every kind back to back (the nonlinearities, the ALU's,
    requant and vacc on two gemms' banks): each one's PBUF inputs in a range of their own, the
    PBUF words it writes after them, so nothing clobbers a later instruction's constants (one
    that would not fit PBUF is drawn again)."""
    pbuf, instrs, at = {}, [], 0
    while len(instrs) < length:
        op = Opcode(int(rng.choice([*NL_OPS, Opcode.REQUANT, Opcode.VADD, Opcode.VMUL, Opcode.VMAX, Opcode.VSUM])))
        n = int(rng.integers(1, 4))
        words, end = {}, at
        if op in NL_OPS:
            fields, words, writes = nonlinear_instruction(config, rng, op, n, bool(rng.integers(0, 2))
                                                          and config.acc_bits == 32, at)
            end = max([at, writes[1]] + [first + len(w) for first, w in words.items()])
        elif op is Opcode.REQUANT:
            fields = dict(dst=int(rng.integers(0, config.obuf_depth - config.rows + 1)), param=at,
                          relu=int(rng.integers(0, 2)), bank=int(rng.integers(0, 2)))
            words, end = {at: np.stack(params(config, config.cols, rng))}, at + 3
        else:
            a = int(rng.integers(0, config.obuf_depth - n + 1))
            b = int(rng.choice([b for b in range(config.obuf_depth - n + 1) if not b < a < b + n]))  # dst = a
            fields = dict(dst=at, a=a, n=n) if op is Opcode.VSUM else dict(dst=a, a=a, n=n)
            end += op is Opcode.VSUM
            if op in (Opcode.VADD, Opcode.VMUL):
                fields |= dict(b=b) | (dict(shift=int(rng.integers(0, 64))) if op is Opcode.VMUL else {})
        if end <= config.pbuf_depth:
            pbuf |= words
            at = end
            instrs.append((op, fields))
    return vector_program(config, rng, pbuf, instrs, gemms=2)


@pytest.mark.parametrize("op", NL_OPS, ids=lambda o: o.name.lower())
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=st.sampled_from(NL_CONFIGS), n=st.integers(1, 6), realistic=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_nonlinear_instructions_match_isa_sim(op, config, n, realistic, seed):
    """Each new vector instruction over random rows, lengths and constants: the DRAM after the
    run (both buffers stored) and the cycles equal the ISA simulator's."""
    program, dram = nonlinear_program(config, np.random.default_rng(seed), op, n, realistic and config.acc_bits == 32)
    same_as_spec(program, config, dram)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=st.sampled_from(NL_CONFIGS), length=st.integers(2, 8), seed=st.integers(0, 2**32 - 1))
@example(config=NL_CONFIGS[0], length=3, seed=309839)  # vsoftmax right after vlayernorm: its last tags
def test_mixed_vector_programs_match_isa_sim(config, length, seed):
    """The nonlinearities back to back with the ALU ops, requant and vacc: each issues as the
    previous one frees the unit and presents its first addresses a cycle ahead, and writes only
    its own words (a vsoftmax starting while the vlayernorm before it has pass-3 tags on their
    way wrote two more)."""
    program, dram = mixed_vector_program(config, np.random.default_rng(seed), length)
    same_as_spec(program, config, dram)


def test_nonlinear_results_are_the_ir_ops():
    """A vgelu, a vsoftmax and a vlayernorm with the int-nonlinear pass's constants: the RTL's
    OBUF (equal to the simulator's) is the IR's reference ops' result."""
    config = NL_CONFIGS[1]
    rng = np.random.default_rng(5)
    C, n, length = config.cols, 3, 10
    x = random_lanes(rng, 4, C, 8)
    gelu = gelu_attrs(0.05, DType.I8, 0.03, DType.I8)
    softmax = softmax_attrs(4e-3, 7)
    row = random_lanes(rng, n, C, 10)
    weight, bias, ln = layer_norm_params(0.02, DType.I16, rng.normal(1, 0.2, length), rng.normal(0, 0.3, length), 1e-5,
                                         0.05, DType.I8)
    ln_row = random_lanes(rng, n, C, 12)
    lanes = np.zeros((3, n * C), np.int64)
    lanes[:, :length] = weight, wrap(bias & 0xFFFFFFFF, 32), bias >> 32
    names = {"gelu": ("multiplier", "shift", "clip", "one", "out_multiplier", "out_shift"),
             "softmax": ("multiplier", "shift", "ln2", "b", "c", "out_bits")}
    pbuf = {0: row, 3: constant_words(config, rng, [softmax[k] for k in names["softmax"]]),
            9: constant_words(config, rng, [gelu[k] for k in names["gelu"]]), 15: ln_row,
            18: constant_words(config, rng, [ln["eps"], ln["shift"]]), 20: lanes.reshape(3 * n, C)}
    instrs = [(Opcode.VGELU, dict(dst=20, a=0, n=4, param=9)),
              (Opcode.VSOFTMAX, dict(dst=24, a=0, n=n, len=length, param=3, masked=0, mask=0)),
              (Opcode.VLAYERNORM, dict(dst=28, a=15, n=n, len=length, param=18))]
    program, dram = vector_program(config, rng, pbuf, instrs, obuf={0: x})
    machine, _ = same_as_spec(program, config, dram)
    obuf = machine.buffers[Buffer.OBUF]
    np.testing.assert_array_equal(obuf[20:24], REFERENCE["int_gelu"](x, **{k: gelu[k] for k in names["gelu"]},
                                                                      dtype=DType.I8, scale=0.03))
    want = np.zeros(n * C, np.int64)
    want[:length] = REFERENCE["int_softmax"](row.reshape(-1)[:length], **softmax)
    np.testing.assert_array_equal(obuf[24:27].reshape(-1), want)
    want[:length] = REFERENCE["int_layer_norm"](ln_row.reshape(-1)[:length], weight, bias, eps=ln["eps"],
                                                shift=ln["shift"], dtype=DType.I8, scale=1.0)
    np.testing.assert_array_equal(obuf[28:31].reshape(-1), want)


@pytest.mark.parametrize("config", [NL_CONFIGS[0], pytest.param(NL_CONFIGS[1], marks=pytest.mark.slow), NL_CONFIGS[2]],
                         ids=str)
def test_nonlinear_programs_on_verilator(config):
    need("verilator")
    rng = np.random.default_rng(config.cols * 7 + config.data_bits)
    programs = [nonlinear_program(config, rng, op, int(rng.integers(1, 7)), realistic and config.acc_bits == 32)
                for op in NL_OPS for realistic in (False, True)]
    for program, dram in [*programs, mixed_vector_program(config, rng, 10)]:
        same_as_spec(program, config, dram, rtl.run_verilator)


def test_nonlinear_programs_on_icarus():
    need("iverilog")
    config = NL_CONFIGS[0]
    for program, dram in (mixed_vector_program(config, np.random.default_rng(3), 8),
                          nonlinear_program(config, np.random.default_rng(4), Opcode.VLAYERNORM, 2, True)):
        same_as_spec(program, config, dram, rtl.run_icarus)


# ---- errors

def test_over_max_cycles_raises():
    cfg = CONFIGS[0]
    case = gemm_case(cfg, 3, 5, 3, rng=np.random.default_rng(1))
    _, stats = simulate(case.program, cfg, case.dram)
    with pytest.raises(rtl.RTLSimulationError, match="cycle"):
        rtl.run_pyrtl(case.program, cfg, case.dram, stats.cycles - 1)
    out, cycles = rtl.run_pyrtl(case.program, cfg, case.dram, stats.cycles)
    assert cycles == stats.cycles


def test_deadlock_hits_the_cycle_limit():
    prog = [Instruction.make(Opcode.GEMM, wait=(Token.VE2AR,), a=0, b=0, k=1, acc=0, bank=0),
            Instruction.make(Opcode.HALT)]
    with pytest.raises(rtl.RTLSimulationError):
        rtl.run_pyrtl(prog, CONFIGS[0], np.zeros(0, np.uint8), 200)


def test_program_is_checked_first():
    cfg = CONFIGS[0]
    with pytest.raises(ValueError, match="outside"):
        rtl.run_pyrtl([Instruction.make(Opcode.LOAD, buf=0, addr=30, count=4, dram=0),
                       Instruction.make(Opcode.HALT)], cfg, np.zeros(16, np.uint8), 100)
    with pytest.raises(ValueError, match="halt"):
        rtl.run_pyrtl([Instruction.make(Opcode.GEMM, a=0, b=0, k=1, acc=0, bank=0)], cfg, np.zeros(16, np.uint8),
                      100)


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
    machine, stats = same_as_spec(case.program, cfg, case.dram, rtl.run_icarus, workdir=tmp_path)
    if shutil.which("make"):  # the kept directory reruns by hand, with the cycle limit as a make variable
        run = subprocess.run(["make", "-s", "iverilog"], cwd=tmp_path, capture_output=True, text=True)
        assert run.returncode == 0 and f"cycles {stats.cycles}" in run.stdout
        run = subprocess.run(["make", "-s", "iverilog", "MAX_CYCLES=5"], cwd=tmp_path, capture_output=True,
                             text=True)
        assert run.returncode != 0 and "ERROR: no halt within 5 cycles" in run.stdout + run.stderr
    ops = [(Opcode.VADD, 8, 0, 2, 3, 0), (Opcode.VMUL, 11, 1, 3, 4, 5), (Opcode.VRELU, 2, 2, 0, 6, 0),
           (Opcode.VMAX, 15, 0, 0, 8, 0), (Opcode.VSUM, 7, 2, 0, 5, 0)]
    case = vector_case(cfg, ops, rng=np.random.default_rng(4), words=8)
    same_as_spec(case.program, cfg, case.dram, rtl.run_icarus)
    case = runnable_random_case(cfg, np.random.default_rng(11), 10)
    same_as_spec(case.program, cfg, case.dram, rtl.run_icarus)
    with pytest.raises(rtl.RTLSimulationError):
        rtl.run_icarus(case.program, cfg, case.dram, 5)


def test_icarus_on_banked_abuf_without_the_vector_unit():
    need("iverilog")
    config = variant(CONFIGS[3], abuf_banks=2, vector_unit=False)
    case = gemm_case(config, 6, 9, 5, rng=np.random.default_rng(13), k_chunk=4, relu=True, store_late=True)
    same_as_spec(case.program, config, case.dram, rtl.run_icarus)
    case = runnable_random_case(config, np.random.default_rng(17), 12)  # ABUF words at odd and even addresses
    same_as_spec(case.program, config, case.dram, rtl.run_icarus)


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
    same_as_spec(case.program, cfg, case.dram, rtl.run_verilator, workdir=tmp_path)
    # the same binary with a lower cycle limit fails loudly
    timing = {}
    with pytest.raises(rtl.RTLSimulationError, match="within 5 cycles"):
        rtl.run_verilator(case.program, cfg, case.dram, 5, timing=timing)
    assert timing == {} or timing["cached"]


def test_verilator_reuses_its_binary(rtl_cache, monkeypatch):
    """One compile per config and DRAM capacity: another program on another DRAM image runs the
    same binary (in this process, then from the cache directory), still equal to the ISA sim."""
    need("verilator")
    cfg = CONFIGS[2]
    rng = np.random.default_rng(21)
    first, second = gemm_case(cfg, 2, 5, 3, rng=rng), gemm_case(cfg, 4, 7, 6, rng=rng, k_chunk=3, relu=True)
    assert first.program != second.program and len(first.dram) != len(second.dram)
    rtl.run_verilator(first.program, cfg, first.dram, 10_000)  # compiles, unless an earlier test did
    compiled = {p.name for p in rtl_cache.iterdir() if p.name.startswith("verilator-")}
    for case in (second, first):
        timing = {}
        same_as_spec(case.program, cfg, case.dram, rtl.run_verilator, timing=timing)
        assert timing["cached"] and timing["compile_s"] == 0.0
    monkeypatch.setattr(simulators, "_built", {})  # a fresh process: the binary comes from the cache directory
    timing = {}
    same_as_spec(second.program, cfg, second.dram, rtl.run_verilator, timing=timing)
    assert timing["cached"] and timing["compile_s"] == 0.0
    assert {p.name for p in rtl_cache.iterdir() if p.name.startswith("verilator-")} == compiled  # no other compile


def test_unwritable_cache_keeps_simulators_in_memory(tmp_path, monkeypatch):
    need("iverilog")
    cfg = CONFIGS[0]
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv(rtl.CACHE_ENV, str(blocker / "cache"))
    monkeypatch.setattr(simulators, "_built", {})
    assert rtl.cache_dir() is None
    case = gemm_case(cfg, 2, 3, 2, rng=np.random.default_rng(2))
    timings = [{}, {}]
    for timing in timings:
        same_as_spec(case.program, cfg, case.dram, rtl.run_icarus, timing=timing)
    assert not timings[0]["cached"] and timings[1]["cached"]
    monkeypatch.setenv(rtl.CACHE_ENV, "off")
    assert rtl.cache_dir() is None


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


@pytest.mark.slow  # about a minute of yosys since the nonlinear datapaths; make test-all runs it
def test_yosys_synthesis_of_a_tiny_config():
    need("yosys")
    result = verilog.synthesize(tiny(2, 2, 32, 1, abuf_depth=512, bbuf_depth=512, obuf_depth=256, pbuf_depth=256,
                                     imem_depth=512), timeout=300)
    assert result["LUT"] > 0 and result["FF"] > 0
    assert result["DSP"] >= 4  # one per PE at least
    assert result["BRAM"] >= 4  # the buffers sit in block RAM, not in LUTs


def test_yosys_synthesis_of_the_array_alone():
    """The PE array in each mode: the MAC array takes a DSP per PE, the XNOR-popcount array none
    and data_bits binary MACs per PE and cycle."""
    need("yosys")
    config = tiny(2, 2)
    mac, xnor = (verilog.synthesize_array(config, mode, timeout=300) for mode in (Opcode.GEMM, Opcode.BGEMM))
    assert mac["DSP"] == config.pes and mac["macs_per_cycle"] == config.pes
    assert xnor["DSP"] == 0 and xnor["macs_per_cycle"] == config.pes * config.data_bits
    assert mac["LUT"] > 0 and xnor["LUT"] > 0 and mac["FF"] == xnor["FF"] > 2 * config.pes * config.acc_bits
    assert "module accel_array(" in verilog.array_verilog_text(config, Opcode.GEMM)
