"""The accelerator ISA and its simulator: binary and assembly forms round-trip, bad programs and
configs fail with clear errors, the timing rule and the data semantics hold."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcc.backends.accel.config import AccelConfig
from tcc.backends.accel.isa import (FETCH_CYCLES, FORMATS, VECTOR_OPS, Buffer, Instruction, Opcode, Token,
                                    check_program, decode, from_binary, pack_words, parse_assembly, to_assembly,
                                    to_binary, unpack_words, wrap)
from tcc.ir.dtypes import DType
from tcc.ir.reference import REFERENCE
from tcc.runtime.isa_sim import SimulationError, simulate

TINY = AccelConfig(rows=4, cols=4, abuf_depth=64, bbuf_depth=64, obuf_depth=16, pbuf_depth=8, dram_words=256,
                   dram_bits=32, dram_latency=2, imem_depth=64)


@st.composite
def instructions(draw) -> Instruction:
    op = draw(st.sampled_from(list(Opcode)))
    args = tuple(draw(st.integers(0, (1 << f.width) - 1)) for f in FORMATS[op])
    tokens = st.integers(0, (1 << len(Token)) - 1)
    return Instruction(op, args, draw(tokens), draw(tokens))


@settings(max_examples=200, deadline=None)
@given(st.lists(instructions(), max_size=20))
def test_binary_and_assembly_round_trip(program):
    assert from_binary(to_binary(program)) == tuple(program)
    assert parse_assembly(to_assembly(program, {0: "section 0\nlinear x"})) == tuple(program)
    for instr in program:
        assert decode(instr.encode()) == instr


@settings(max_examples=300, deadline=None)
@given(instructions(), st.lists(st.integers(0, 1000), min_size=len(Buffer), max_size=len(Buffer)))
def test_relocation_moves_what_an_instruction_touches_in_each_buffer(instruction, shifts):
    """`Instruction.relocated` (the chained sections' buffer placement) moves every buffer range
    the instruction touches by that buffer's offset, and no DRAM range or accumulator bank."""
    offsets = dict(zip(Buffer, shifts))
    config = AccelConfig()
    try:
        moved = instruction.relocated(offsets)
    except ValueError:  # a field moved past its width
        return
    for (space, first, end, writes), (space2, first2, end2, writes2) in zip(instruction.accesses(config),
                                                                           moved.accesses(config), strict=True):
        shift = offsets[Buffer[space]] if space in Buffer.__members__ else 0
        assert (space2, writes2, end2 - first2) == (space, writes, end - first)
        assert end == first or (first2, end2) == (first + shift, end + shift)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 6), st.sampled_from([4, 8, 16, 32]), st.integers(0, 2**32 - 1))
def test_word_packing_round_trips(lanes, bits, seed):
    rng = np.random.default_rng(seed)
    values = rng.integers(-(1 << bits - 1), 1 << bits - 1, size=(5, lanes))
    data = pack_words(values, bits, -(-lanes * bits // 8) + 1)
    np.testing.assert_array_equal(unpack_words(data, lanes, bits), values)


@pytest.mark.parametrize("word, message", [
    (0xFF, "unknown opcode 255"),
    (int(Opcode.HALT) | 1 << 40, "halt: bits set outside its fields"),
    (int(Opcode.GEMM) | 1 << 100, "gemm: bits set outside its fields"),
])
def test_decode_rejects_bad_words(word, message):
    with pytest.raises(ValueError, match=message):
        decode(word)


def test_binary_errors_name_the_instruction():
    good = to_binary([Instruction.make(Opcode.HALT)])
    with pytest.raises(ValueError, match="bad magic"):
        from_binary(b"nonsense" + good[8:])
    with pytest.raises(ValueError, match="the header says 1 x 16"):
        from_binary(good + b"\0")
    bad = good[:16] + (0xFF).to_bytes(16, "little")
    with pytest.raises(ValueError, match="program.bin: instruction 0: unknown opcode 255"):
        from_binary(bad, "program.bin")


@pytest.mark.parametrize("text, message", [
    ("halt\nlod buf=abuf addr=0 count=1 dram=0", "p.s:2: unknown mnemonic 'lod'"),
    ("gemm a=0 b=0 k=4", "p.s:1: gemm: missing field 'acc'"),
    ("gemm a=0 b=0 k=4 acc=0 bank=0 z=1", "p.s:1: gemm: unknown field 'z'"),
    ("gemm a=0 b=0 k=x acc=0 bank=0", "p.s:1: field 'k' needs an integer, got 'x'"),
    ("gemm a=0 b=0 k=70000 acc=0 bank=0", "p.s:1: gemm: field 'k' = 70000 does not fit 16 bits"),
    ("halt wait=ld2ex|nope", "p.s:1: unknown token in 'wait=ld2ex|nope'"),
    ("load buf=qbuf addr=0 count=1 dram=0", "p.s:1: field 'buf' needs an integer, got 'qbuf'"),
    ("halt oops", "p.s:1: expected NAME=VALUE, got 'oops'"),
])
def test_assembly_errors_name_the_line(text, message):
    with pytest.raises(ValueError, match=message.replace("|", r"\|")):
        parse_assembly(text, "p.s")


def test_config_overrides_and_errors():
    config = AccelConfig().with_overrides("rows=8, cols=4,clock_mhz=150")
    assert (config.rows, config.cols, config.clock_mhz) == (8, 4, 150.0)
    for spec, message in [("rowz=8", "unknown field 'rowz'; did you mean 'rows'"), ("rows", "expected KEY=VALUE"),
                          ("rows=x", "rows must be a number, got 'x'"), ("rows=0", "rows must be at least 1"),
                          ("data_bits=5", "data_bits must be 4, 8 or 16"),
                          ("dram_bits=12", "dram_bits must be a multiple of 8")]:
        with pytest.raises(ValueError, match=message):
            AccelConfig().with_overrides(spec)


def test_config_banks_and_units():
    config = AccelConfig().with_overrides("vector_unit=0, abuf_banks=4")
    assert (config.vector_unit, config.abuf_banks) == (False, 4)
    for text, flag in [("1", True), ("true", True), ("False", False), ("0", False)]:
        assert AccelConfig().with_overrides(f"vector_unit={text}").vector_unit is flag
    for spec, message in [("vector_unit=2", "--accel: vector_unit must be 0, 1, true or false, got '2'"),
                          ("vector_unit=no", "vector_unit must be 0, 1, true or false, got 'no'"),
                          ("abuf_banks=x", "abuf_banks must be a number, got 'x'"),
                          ("abuf_banks=0", "abuf_banks must be at least 1, got 0"),
                          ("abuf_banks=6", "abuf_banks must be a power of two, got 6"),
                          ("divider_steps=3", "divider_steps must be 1, 2, 4 or 8"),
                          ("abuf_banks=256", r"abuf_banks must be at most 128, got 256"),
                          ("abuf_depth=100,abuf_banks=8", r"abuf_depth \(100\) must be a multiple of abuf_banks \(8\)"),
                          ("vector_uni=0", "unknown field 'vector_uni'; did you mean 'vector_unit'")]:
        with pytest.raises(ValueError, match=message):
            AccelConfig().with_overrides(spec)
    with pytest.raises(ValueError, match="vector_unit must be true or false, got 1"):
        AccelConfig(vector_unit=1)
    with pytest.raises(ValueError, match="abuf_banks must be a number"):
        AccelConfig(abuf_banks=True)
    # artifacts store the config as JSON; one written before these fields reads with the defaults
    assert AccelConfig.from_json(json.loads(json.dumps(config.to_json()))) == config
    old = {k: v for k, v in AccelConfig().to_json().items() if k not in ("abuf_banks", "vector_unit")}
    assert AccelConfig.from_json(old) == AccelConfig()
    # banks split ABUF's bits; without the vector unit (or its nonlinear datapaths) go the nonlinearities'
    # three multipliers per lane (15 DSPs at 8/32 bits) and PBUF's vector bank (whole words, or vsum's lane)
    assert config.with_overrides("vector_unit=1").memory_bits() == AccelConfig().memory_bits()
    full, bare, alu = AccelConfig(), AccelConfig(vector_unit=False), AccelConfig(nonlinear_unit=False)
    assert full.estimate_resources()["DSP"] - bare.estimate_resources()["DSP"] == 15 * full.cols
    assert alu.estimate_resources()["DSP"] == bare.estimate_resources()["DSP"]  # vmul shares requant's multiplier
    assert full.memory_bits() - bare.memory_bits() == full.pbuf_depth * full.cols * full.acc_bits
    assert alu.memory_bits() - bare.memory_bits() == full.pbuf_depth * full.acc_bits


def test_vector_ops_need_the_vector_unit():
    bare = dataclasses.replace(TINY, vector_unit=False)
    program = parse_assembly("vrelu dst=0 a=0 n=2\nhalt")
    assert program[0].problem(TINY) is None
    assert program[0].problem(bare) == "vrelu needs the vector unit, which this config leaves out (vector_unit=0)"
    with pytest.raises(ValueError, match=r"instruction 0 \(vrelu dst=0 a=0 n=2\): vrelu needs the vector unit"):
        check_program(program, bare)
    for op in VECTOR_OPS:
        instr = Instruction(op, (0,) * len(FORMATS[op]))
        assert instr.problem(bare).startswith(f"{op.name.lower()} needs the vector unit")
    # the rest of the ISA runs the same, to the cycle, on banked ABUF without the vector unit
    image = gemm_image(np.ones((4, 3), int), np.ones((3, 4), int), 0, 1, 0)
    want_machine, want = simulate(gemm_program(3), TINY, image)
    got_machine, got = simulate(gemm_program(3), dataclasses.replace(bare, abuf_banks=4), image)
    assert got.schedule == want.schedule and (got_machine.dram == want_machine.dram).all()


def load(buf: Buffer, addr: int, count: int, dram: int, **tokens) -> Instruction:
    return Instruction.make(Opcode.LOAD, buf=int(buf), addr=addr, count=count, dram=dram, **tokens)


def gemm_program(k: int, relu: int = 0, overlap: bool = True) -> list[Instruction]:
    """A [4, k] x [k, 4] GEMM on TINY: A at DRAM 0, B at k, params at 2k, output to 200."""
    ready = (Token.LD2AR,) if overlap else ()
    return [load(Buffer.ABUF, 0, k, 0),
            load(Buffer.BBUF, 0, k, k),
            load(Buffer.PBUF, 0, 3, 2 * k, signal=ready),
            Instruction.make(Opcode.GEMM, a=0, b=0, k=k, acc=0, bank=0, wait=ready, signal=(Token.AR2VE,)),
            Instruction.make(Opcode.REQUANT, dst=0, param=0, relu=relu, bank=0, wait=(Token.AR2VE,),
                             signal=(Token.VE2ST,)),
            Instruction.make(Opcode.STORE, buf=int(Buffer.OBUF), addr=0, count=4, dram=200, wait=(Token.VE2ST,)),
            Instruction.make(Opcode.HALT)]


def gemm_image(a: np.ndarray, b: np.ndarray, bias, mult, shift) -> bytes:
    params = np.stack([np.broadcast_to(p, 4) for p in (bias, mult, shift)])
    return b"".join(pack_words(x, bits, width).tobytes() for x, bits, width in
                    ((a.T, 8, 4), (b, 8, 4), (params, 32, 16)))


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 20), st.integers(0, 1), st.integers(0, 2**32 - 1))
def test_gemm_requant_matches_the_reference(k, relu, seed):
    rng = np.random.default_rng(seed)
    a, b = rng.integers(-128, 128, (4, k)), rng.integers(-128, 128, (k, 4))
    bias, mult, shift = rng.integers(-1000, 1000, 4), rng.integers(1 << 29, 1 << 31, 4), rng.integers(20, 40, 4)
    machine, stats = simulate(gemm_program(k, relu), TINY, gemm_image(a, b, bias, mult, shift))
    p = (a @ b + bias) * mult
    expected = np.clip((p + (1 << (shift - 1))) >> shift, -128, 127)
    expected = np.maximum(expected, 0) if relu else expected
    np.testing.assert_array_equal(unpack_words(machine.dram_words(200, 4), 4, 8), expected)
    assert stats.macs == 16 * k


def test_timing_rule():
    """Loads issue back to back on one unit; gemm waits for the last load's token; requant
    waits for gemm's end (its drain included); store waits for requant's token; halt waits
    for all."""
    k, lat = 8, TINY.dram_latency
    _, stats = simulate(gemm_program(k), TINY, bytes(4 * (2 * k + 12)))
    t0 = FETCH_CYCLES
    a_end = t0 + lat + k
    b_end = a_end + lat + k
    p_end = b_end + lat + 3 * 4  # 3 PBUF words of 4 x 32 bits = 4 DRAM words each
    gemm_end = p_end + k + 4 + 4 - 2
    req_end = gemm_end + 4
    store_end = req_end + lat + 4
    assert stats.schedule == [(t0, a_end), (a_end, b_end), (b_end, p_end), (p_end, gemm_end), (gemm_end, req_end),
                              (req_end, store_end), (store_end, store_end + 1)]
    assert stats.cycles == store_end + 1


def test_race_is_rejected():
    """Without the token, gemm would read BBUF while the last load is still writing it."""
    program = gemm_program(8, overlap=False)
    program[1], program[2] = program[2], program[1]
    with pytest.raises(SimulationError, match=r"instruction 3 \(gemm .*\): race on BBUF \[0, 8\) with instruction 2"):
        simulate(program, TINY, bytes(4 * 40))


def test_a_load_of_what_a_store_wrote_waits_for_its_token():
    """st2ld: the load reads the DRAM words the store wrote once the store has ended (chained
    sections hand a layer's output to the next through DRAM within one program); without the
    token the two race."""
    values = np.array([[-3, 5, -7, 9]])
    program = [load(Buffer.OBUF, 0, 1, 0, signal=(Token.LD2VE,)),
               Instruction.make(Opcode.VRELU, dst=1, a=0, n=1, wait=(Token.LD2VE,), signal=(Token.VE2ST,)),
               Instruction.make(Opcode.STORE, buf=Buffer.OBUF, addr=1, count=1, dram=100, wait=(Token.VE2ST,),
                                signal=(Token.ST2LD,)),
               load(Buffer.ABUF, 0, 1, 100, wait=(Token.ST2LD,)), Instruction.make(Opcode.HALT)]
    dram = bytearray(4 * 256)
    dram[:4] = pack_words(values, 8, 4).tobytes()
    machine, _ = simulate(program, TINY, bytes(dram))
    np.testing.assert_array_equal(machine.buffers[Buffer.ABUF][:1], np.maximum(values, 0))
    program[2], program[3] = (dataclasses.replace(i, wait=i.wait & ~(1 << Token.ST2LD), signal=0)
                              for i in program[2:4])
    with pytest.raises(SimulationError, match=r"instruction 3 \(load .*\): race on DRAM \[100, 101\)"):
        simulate(program, TINY, bytes(dram))


@pytest.mark.parametrize("program, message", [
    ([load(Buffer.ABUF, 60, 8, 0), Instruction.make(Opcode.HALT)],
     r"instruction 0 \(load .*\): writes ABUF words \[60, 68\) outside its 64 words"),
    ([load(Buffer.ABUF, 0, 8, 250), Instruction.make(Opcode.HALT)],
     r"instruction 0 \(load .*\): reads DRAM words \[250, 258\) outside its 256 words"),
    ([Instruction.make(Opcode.GEMM, a=0, b=0, k=0, acc=0, bank=0), Instruction.make(Opcode.HALT)],
     "k must be at least 1"),
    ([Instruction.make(Opcode.HALT, wait=(Token.ST2VE,))], "deadlock, it waits for token st2ve"),
    ([load(Buffer.ABUF, 0, 1, 0)], "the program does not end with halt"),
    ([Instruction.make(Opcode.HALT)] * 65, "65 instructions, the program memory holds 64"),
])
def test_bad_programs_fail_clearly(program, message):
    with pytest.raises(SimulationError, match=message):
        simulate(program, TINY, b"")


def test_cycle_limit_and_dram_size():
    with pytest.raises(SimulationError, match="cycle limit 20 reached"):
        simulate(gemm_program(8), TINY, bytes(160), max_cycles=20)
    with pytest.raises(SimulationError, match="exceeds the DRAM"):
        simulate(gemm_program(8), TINY, bytes(4 * 257))


def test_requant_rejects_out_of_range_shift():
    image = gemm_image(np.ones((4, 2), int), np.ones((2, 4), int), 0, 1, 63)
    with pytest.raises(SimulationError, match=r"instruction 4 \(requant .*\): requant: shift lanes must lie in \[0, 62\]"):
        simulate(gemm_program(2), TINY, image)


def test_vector_ops():
    rng = np.random.default_rng(1)
    x, y = rng.integers(-128, 128, (3, 4)), rng.integers(-128, 128, (3, 4))
    image = pack_words(np.concatenate([x, y]), 8, 4).tobytes()
    ready = (Token.LD2VE,)
    program = [load(Buffer.OBUF, 0, 6, 0, signal=ready), Instruction.make(Opcode.VADD, dst=6, a=0, b=3, n=3, wait=ready),
               Instruction.make(Opcode.VMUL, dst=9, a=0, b=3, n=3, shift=4), Instruction.make(Opcode.VRELU, dst=12, a=0, n=3),
               Instruction.make(Opcode.VMAX, dst=15, a=0, n=3), Instruction.make(Opcode.VSUM, dst=0, a=3, n=3),
               Instruction.make(Opcode.HALT)]
    machine, stats = simulate(program, TINY, image)
    obuf, pbuf = machine.buffers[Buffer.OBUF], machine.buffers[Buffer.PBUF]
    np.testing.assert_array_equal(obuf[6:9], np.clip(x + y, -128, 127))
    np.testing.assert_array_equal(obuf[9:12], np.clip((x * y + 8) >> 4, -128, 127))
    np.testing.assert_array_equal(obuf[12:15], np.maximum(x, 0))
    assert (obuf[15] == x.max()).all() and (pbuf[0] == y.sum()).all()
    assert stats.instructions == {"load": 1, "vadd": 1, "vmul": 1, "vrelu": 1, "vmax": 1, "vsum": 1, "halt": 1}


def test_vector_destination_inside_a_source_is_rejected():
    program = [Instruction.make(Opcode.VADD, dst=2, a=0, b=8, n=4), Instruction.make(Opcode.HALT)]
    with pytest.raises(SimulationError, match=r"dst 2 lies inside source a \[0, 4\)"):
        simulate(program, TINY, b"")
    in_place = [Instruction.make(Opcode.VRELU, dst=0, a=0, n=4), Instruction.make(Opcode.HALT)]
    assert simulate(in_place, TINY, b"")[1].instructions["vrelu"] == 1


def sparse_program(blocks: int, nnz: int, bw: int, span: int, bank: int = 0) -> list[Instruction]:
    """Load ABUF (`span` words at DRAM 0) and BBUF (2 * blocks * nnz words after it), then
    one spgemm into `bank`."""
    b_words = 2 * blocks * nnz
    ready = (Token.LD2AR,)
    return [load(Buffer.ABUF, 0, span, 0), load(Buffer.BBUF, 0, b_words, span, signal=ready),
            Instruction.make(Opcode.SPGEMM, a=0, b=0, blocks=blocks, nnz=nnz, bw=bw, span=span, acc=0, bank=bank,
                             wait=ready),
            Instruction.make(Opcode.HALT)]


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.sampled_from([1, 2, 4, 8, 16]), st.data())
def test_spgemm_gathers_by_local_column_indices(blocks, bw, data):
    """spgemm == the dense product with the weight matrix its values and indices describe:
    indices taken mod bw, and the window skipping `X[0] div bw` blocks after each block's last
    step (the other lanes' high bits, and the last block's skip, are ignored)."""
    nnz = data.draw(st.integers(1, bw))
    skips = data.draw(st.lists(st.integers(0, min(3, 256 // bw - 1)), min_size=blocks, max_size=blocks))
    seed = data.draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    windows = [bw * (j + sum(skips[:j])) for j in range(blocks)]
    span = windows[-1] + bw
    a = rng.integers(-128, 128, (span, 4))  # ABUF words: [K, rows]
    values = rng.integers(-128, 128, (blocks * nnz, 4))
    index = rng.integers(-128, 128, (blocks * nnz, 4))
    last = np.arange(nnz - 1, blocks * nnz - 1, nnz)  # the last steps of all blocks but the last
    index[last, 0] = ((index[last, 0] & bw - 1) + bw * np.array(skips[:-1], np.int64) + 128) % 256 - 128
    weights = np.zeros((span, 4), np.int64)  # the dense [K, cols] equivalent
    for step in range(blocks * nnz):
        for c in range(4):
            weights[windows[step // nnz] + (index[step, c] & (bw - 1)), c] += values[step, c]
    roomy = dataclasses.replace(TINY, abuf_depth=256, bbuf_depth=128, dram_words=1024)

    def run(index: np.ndarray):
        pairs = np.stack([values, index], axis=1).reshape(-1, 4)
        image = pack_words(a, 8, 4).tobytes() + pack_words(pairs, 8, 4).tobytes()
        return simulate(sparse_program(blocks, nnz, bw, span, bank=1), roomy, image)

    machine, stats = run(index)
    np.testing.assert_array_equal(machine.acc[1], a.T @ weights)
    assert not machine.acc[0].any()
    assert stats.macs == blocks * nnz * 16
    if blocks > 1 and skips[0] < 256 // bw - 1:  # one block more skipped: the last window leaves the span
        index[nnz - 1, 0] = (index[nnz - 1, 0] + bw + 128) % 256 - 128
        with pytest.raises(SimulationError, match=rf"spgemm: block {blocks - 1}'s window .* leaves the span"):
            run(index)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12), st.integers(0, 2**32 - 1))
def test_bgemm_is_an_xnor_popcount_product(k, seed):
    """Each lane's 8 bits are 8 binary values (set: +1, clear: -1); bgemm == their +-1 product."""
    rng = np.random.default_rng(seed)
    a, b = rng.integers(-128, 128, (k, 4)), rng.integers(-128, 128, (k, 4))
    signs = lambda x: np.where((x[..., None] >> np.arange(8)) & 1, 1, -1)  # noqa: E731  [k, lanes, 8]
    want = np.einsum("kri,kci->rc", signs(a), signs(b))
    program = [load(Buffer.ABUF, 0, k, 0), load(Buffer.BBUF, 0, k, k, signal=(Token.LD2AR,)),
               Instruction.make(Opcode.BGEMM, a=0, b=0, k=k, acc=0, bank=0, wait=(Token.LD2AR,)),
               Instruction.make(Opcode.BGEMM, a=0, b=0, k=k, acc=1, bank=0), Instruction.make(Opcode.HALT)]
    machine, _ = simulate(program, TINY, pack_words(a, 8, 4).tobytes() + pack_words(b, 8, 4).tobytes())
    np.testing.assert_array_equal(machine.acc[0], 2 * want)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.sampled_from([2, 4]), st.integers(0, 2**32 - 1))
def test_wgemm_adds_or_subtracts_g_activations_by_their_weights_bits(k, group, seed):
    """W1A8: step i reads activation words a + i*G ... (one per ABUF bank) and one weight word,
    lane c's bit j the sign of column c's weight for word a + i*G + j; on a config without the
    unit the assembler refuses it, and `a` must be a multiple of G."""
    config = dataclasses.replace(TINY, binary_weight_group=group, abuf_banks=4)
    rng = np.random.default_rng(seed)
    a, bits = rng.integers(-128, 128, (k * group, 4)), rng.integers(-128, 128, (k, 4))
    signs = np.where((bits[:, None, :] >> np.arange(group)[None, :, None]) & 1, 1, -1)  # [k, G, cols]
    want = np.einsum("kgr,kgc->rc", a.reshape(k, group, 4), signs)
    program = [load(Buffer.ABUF, 0, k * group, 0), load(Buffer.BBUF, 0, k, k * group, signal=(Token.LD2AR,)),
               Instruction.make(Opcode.WGEMM, a=0, b=0, k=k, acc=0, bank=0, wait=(Token.LD2AR,)),
               Instruction.make(Opcode.WGEMM, a=0, b=0, k=k, acc=1, bank=0), Instruction.make(Opcode.HALT)]
    machine, stats = simulate(program, config, pack_words(a, 8, 4).tobytes() + pack_words(bits, 8, 4).tobytes())
    np.testing.assert_array_equal(machine.acc[0], 2 * want)
    assert stats.busy["array"] == 2 * k  # k steps each: K = k * G inputs
    with pytest.raises(ValueError, match=r"wgemm needs the binary weight group, which this config leaves out"):
        check_program(program, TINY)
    with pytest.raises(ValueError, match=rf"a must be a multiple of binary_weight_group \({group}\), got 1"):
        check_program([Instruction.make(Opcode.WGEMM, a=1, b=0, k=1, acc=0, bank=0)], config)


def test_array_pipelines_and_requant_overlaps_on_the_other_bank():
    """Array instructions occupy the array for their steps only: the next streams in behind
    (the drain overlaps); requant of bank 0 runs on the vector unit while the array fills
    bank 1; halt waits for the last drain."""
    k, drain = 8, TINY.rows + TINY.cols - 2
    program = [load(Buffer.ABUF, 0, k, 0), load(Buffer.BBUF, 0, k, 0),
               load(Buffer.PBUF, 0, 3, 0, signal=(Token.LD2AR,)),
               Instruction.make(Opcode.GEMM, a=0, b=0, k=k, acc=0, bank=0, wait=(Token.LD2AR,), signal=(Token.AR2VE,)),
               Instruction.make(Opcode.GEMM, a=0, b=0, k=k, acc=0, bank=1),
               Instruction.make(Opcode.REQUANT, dst=0, param=0, relu=0, bank=0, wait=(Token.AR2VE,)),
               Instruction.make(Opcode.HALT)]
    _, stats = simulate(program, TINY, bytes(4 * 64))
    g0, g1, req, halt = stats.schedule[3:]
    assert g1[0] == g0[0] + k and g0[1] == g0[0] + k + drain and g1[1] == g1[0] + k + drain
    assert req[0] == g0[1] < g1[1]  # requant of bank 0 overlaps the array's work on bank 1
    assert halt[0] == g1[1] and stats.busy["array"] == 2 * k


def test_requant_on_the_bank_the_array_writes_is_a_race():
    program = [Instruction.make(Opcode.GEMM, a=0, b=0, k=8, acc=0, bank=1),
               Instruction.make(Opcode.REQUANT, dst=0, param=0, relu=0, bank=1), Instruction.make(Opcode.HALT)]
    with pytest.raises(SimulationError, match=r"instruction 1 \(requant .*\): race on ACC1 \[0, 4\)"):
        simulate(program, TINY, b"")


@pytest.mark.parametrize("fields, message", [
    (dict(bw=3), r"bw must be a power of two of at most 16"),
    (dict(bw=32), r"bw must be a power of two of at most 16"),
    (dict(nnz=5), r"nnz must lie in \[1, bw\]"),
    (dict(blocks=0), r"blocks must be at least 1"),
    (dict(a=2), r"a and span must be multiples of bw \(4\) and b even"),
    (dict(span=6), r"a and span must be multiples of bw \(4\) and b even"),
    (dict(b=1), r"a and span must be multiples of bw \(4\) and b even"),
    (dict(blocks=2), r"span \(4\) must hold the blocks' windows \(2 x bw=4\)"),
    (dict(blocks=17, span=68), r"reads ABUF words \[0, 68\) outside its 64 words"),
])
def test_bad_spgemm_fails_clearly(fields, message):
    instr = Instruction.make(Opcode.SPGEMM, **({"a": 0, "b": 0, "blocks": 1, "nnz": 2, "bw": 4, "span": 4, "acc": 0,
                                               "bank": 0} | fields))
    with pytest.raises(ValueError, match=message):
        check_program([instr, Instruction.make(Opcode.HALT)], TINY)


def test_sparse_and_binary_units_are_optional():
    spgemm = parse_assembly("spgemm a=0 b=0 blocks=1 nnz=1 bw=4 span=4 acc=0 bank=0")[0]
    bgemm = parse_assembly("bgemm a=0 b=0 k=1 acc=0 bank=1")[0]
    assert spgemm.problem(TINY) is None and bgemm.problem(TINY) is None
    assert spgemm.problem(dataclasses.replace(TINY, sparse_unit=False)) == \
        "spgemm needs the sparse unit, which this config leaves out (sparse_unit=0)"
    assert bgemm.problem(dataclasses.replace(TINY, binary_unit=False)) == \
        "bgemm needs the binary unit, which this config leaves out (binary_unit=0)"
    assert spgemm.problem(dataclasses.replace(TINY, abuf_banks=2)).startswith("bw must be a power of two of at most 2")


# the integer nonlinearities: the simulator runs the IR's reference ops on the buffers' rows

WIDE = dataclasses.replace(TINY, pbuf_depth=64, obuf_depth=32)


def constant_words(values) -> np.ndarray:
    """PBUF words whose lane 0 holds each constant (the other lanes repeat it)."""
    return np.repeat(np.asarray(values, np.int64)[:, None], 4, axis=1)


def run_vector(program_tail, pbuf: np.ndarray, obuf: np.ndarray | None = None):
    """Load PBUF (and OBUF) words, run `program_tail`, return the machine."""
    image = pack_words(pbuf, 32, 16).tobytes()
    program = [load(Buffer.PBUF, 0, len(pbuf), 0, signal=(Token.LD2VE,))]
    if obuf is not None:
        program.append(load(Buffer.OBUF, 0, len(obuf), 4 * len(pbuf), signal=(Token.LD2VE,)))
        image += pack_words(obuf, 8, 4).tobytes()
    waits = (Token.LD2VE,) * (1 + (obuf is not None))
    first = dataclasses.replace(program_tail[0], wait=sum(1 << t for t in set(waits)))
    # two loads signal LD2VE twice: the first instruction takes one, a dummy vrelu the other
    extra = [Instruction.make(Opcode.VRELU, dst=31, a=31, n=1, wait=(Token.LD2VE,))] if obuf is not None else []
    return simulate(program + extra + [first, *program_tail[1:], Instruction.make(Opcode.HALT)], WIDE,
                    image)[0]


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 5), st.data())
def test_vsoftmax_is_int_softmax_over_the_row(n, data):
    from tcc.passes.int_nonlinear import softmax_attrs
    length = data.draw(st.integers(1, 4 * n))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    scale = data.draw(st.sampled_from([1e-4, 3e-3, 0.05]))
    attrs = softmax_attrs(scale, 7)
    row = rng.integers(-(1 << 20), 1 << 20, (n, 4))
    consts = [attrs[k] for k in ("multiplier", "shift", "ln2", "b", "c", "out_bits")]
    pbuf = np.concatenate([row, constant_words(consts)])
    machine = run_vector([Instruction.make(Opcode.VSOFTMAX, dst=2, a=0, n=n, len=length, param=n, masked=0, mask=0)], pbuf)
    want = np.zeros(4 * n, np.int64)
    want[:length] = REFERENCE["int_softmax"](row.reshape(-1)[:length], **attrs)
    np.testing.assert_array_equal(machine.buffers[Buffer.OBUF][2:2 + n].reshape(-1), want)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.data())
def test_vlayernorm_is_int_layer_norm_with_split_biases(n, data):
    length = data.draw(st.integers(1, 4 * n))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    row = rng.integers(-(1 << 15), 1 << 15, (n, 4))
    weight = rng.integers(-(1 << 30), 1 << 30, (n, 4))
    bias = rng.integers(-(1 << 60), 1 << 60, (n, 4))  # 64-bit: low and high 32-bit halves
    eps, shift = int(rng.integers(0, 1 << 20)), int(rng.integers(20, 40))
    low, high = wrap(bias & 0xFFFFFFFF, 32), bias >> 32
    pbuf = np.concatenate([row, constant_words([eps, shift]), weight, low, high])
    machine = run_vector([Instruction.make(Opcode.VLAYERNORM, dst=0, a=0, n=n, len=length, param=n)], pbuf)
    want = np.zeros(4 * n, np.int64)
    want[:length] = REFERENCE["int_layer_norm"](row.reshape(-1)[:length], weight.reshape(-1)[:length],
                                                bias.reshape(-1)[:length], eps=eps, shift=shift, dtype=DType.I8,
                                                scale=1.0)
    np.testing.assert_array_equal(machine.buffers[Buffer.OBUF][:n].reshape(-1), want)


def test_vgelu_vresadd_and_vacc():
    from tcc.passes.int_nonlinear import gelu_attrs
    rng = np.random.default_rng(0)
    x, y = rng.integers(-128, 128, (3, 4)), rng.integers(-128, 128, (3, 4))
    attrs = gelu_attrs(0.05, DType.I8, 0.03, DType.I8)
    names = ("multiplier", "shift", "clip", "one", "out_multiplier", "out_shift")
    residual = [1 << 30, 29, 1, 0, 3 << 28, 33, 16]  # a scaled by 2, b as is, the sum by 3/32 to i16
    stream = rng.integers(-(1 << 15), 1 << 15, (3, 4))  # a wide vresadd's b: an i16 stream in PBUF
    pbuf = np.concatenate([constant_words([attrs[k] for k in names]), constant_words(residual), stream])
    machine = run_vector([Instruction.make(Opcode.VGELU, dst=8, a=0, n=3, param=0),
                          Instruction.make(Opcode.VRESADD, dst=20, a=0, b=3, n=3, param=6, wide=0),
                          Instruction.make(Opcode.VRESADD, dst=24, a=0, b=13, n=3, param=6, wide=1)],
                         pbuf, np.concatenate([x, y]))
    obuf, pbuf_out = machine.buffers[Buffer.OBUF], machine.buffers[Buffer.PBUF]
    np.testing.assert_array_equal(obuf[8:11], REFERENCE["int_gelu"](x, **{k: attrs[k] for k in names},
                                                                     dtype=DType.I8, scale=0.03))
    np.testing.assert_array_equal(pbuf_out[20:23], np.clip((((2 * x + y) * 3 << 28) + (1 << 32)) >> 33,
                                                           -(1 << 15), (1 << 15) - 1))
    np.testing.assert_array_equal(pbuf_out[24:27], np.clip((((2 * x + stream) * 3 << 28) + (1 << 32)) >> 33,
                                                           -(1 << 15), (1 << 15) - 1))
    k = 5
    program = [load(Buffer.ABUF, 0, k, 0), load(Buffer.BBUF, 0, k, k, signal=(Token.LD2AR,)),
               Instruction.make(Opcode.GEMM, a=0, b=0, k=k, acc=0, bank=1, wait=(Token.LD2AR,), signal=(Token.AR2VE,)),
               Instruction.make(Opcode.VACC, dst=3, stride=2, bank=1, wait=(Token.AR2VE,)),
               Instruction.make(Opcode.HALT)]
    a, b = rng.integers(-128, 128, (k, 4)), rng.integers(-128, 128, (k, 4))
    machine, stats = simulate(program, WIDE, pack_words(a, 8, 4).tobytes() + pack_words(b, 8, 4).tobytes())
    np.testing.assert_array_equal(machine.buffers[Buffer.PBUF][3:11:2], a.T @ b)
    assert stats.schedule[3][1] - stats.schedule[3][0] == 4  # rows cycles


def test_nonlinear_timing_and_errors():
    vs = Instruction.make(Opcode.VSOFTMAX, dst=0, a=0, n=5, len=20, param=5, masked=0, mask=0)
    vl = Instruction.make(Opcode.VLAYERNORM, dst=0, a=0, n=5, len=20, param=5)
    assert (vs.duration(WIDE), vl.duration(WIDE)) == (3 * 5 + 38, 6 * 5 + 83)
    assert Instruction.make(Opcode.VSOFTMAX, dst=0, a=0, n=5, len=21, param=5, masked=0, mask=0).problem(WIDE) == \
        "len must be in [1, n * cols] = [1, 20], got 21"
    assert vl.accesses(WIDE)[1] == ("PBUF", 5, 5 + 2 + 15, False)  # eps, shift, weights, two bias halves
    bad = constant_words([1, 1, 1, 1, 1, 8])  # out_bits 8 does not fit an 8-bit lane's positive range
    with pytest.raises(SimulationError, match=r"vsoftmax: out_bits must lie in \[1, 7\], got 8"):
        run_vector([Instruction.make(Opcode.VSOFTMAX, dst=0, a=0, n=1, len=4, param=1, masked=0, mask=0)],
                   np.concatenate([np.zeros((1, 4), np.int64), bad]))


@pytest.mark.parametrize("fields", [dict(binary_weight_group=3), dict(binary_weight_group=1),
                                    dict(binary_weight_group=8, abuf_banks=4),
                                    dict(binary_weight_group=8, data_bits=4, acc_bits=16)])
def test_a_w1a8_group_the_machine_cannot_build_is_refused_by_name(fields):
    with pytest.raises(ValueError, match=r"binary_weight_group must be 0 \(no W1A8 unit\) or 2, 4 or 8 and at most "
                                         r"data_bits \(\d+\) and abuf_banks \(\d+\), got \d"):
        AccelConfig(**fields)
    with pytest.raises(ValueError, match=r"--accel: binary_weight_group must be"):
        AccelConfig().with_overrides(",".join(f"{k}={v}" for k, v in fields.items()))
