"""The accelerator codegen and executor: quantized zoo models and random linears run on the ISA
simulator bit for bit like the numpy reference (every value, final outputs included), with
the cycles the codegen predicts; DRAM layouts round-trip; the program artifact round-trips and
its parser names bad files; the host-op list; utilization on BERT-base GEMMs."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

import networkx as nx
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import tcc
from tcc.backends.accel.codegen import EPILOGUE, generate, host_places, timing
from tcc.backends.accel.codegen.layer import BUILT, TIMINGS
from tcc.backends.accel.codegen.match import LAYOUT_OPS
from tcc.backends.accel.config import AccelConfig
from tcc.backends.accel.layout import (AccelProgram, DramAllocator, DramTensor, Layout, Region, decode, dram_words, encode,
                                       from_words, pack_binary, to_words)
from tcc.frontend import split_inputs
from tcc.backends.accel.isa import ARRAY_OPS, Opcode
from tcc.ir import DType, GraphBuilder, TensorType, tensor, verify
from tcc.ir.sparsity import Blocks, Hierarchical
from tcc.runtime.accel_executor import AccelExecutor, simulate_section
from tcc.runtime.numpy_executor import NumpyExecutor

from conftest import assert_tiers_agree, built

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SMALL = AccelConfig(rows=4, cols=4, abuf_depth=64, bbuf_depth=32, obuf_depth=16, pbuf_depth=9, imem_depth=160,
                    dram_bits=32, dram_words=1 << 20)
DATA = {4: DType.I4, 8: DType.I8, 16: DType.I16}


def check_bit_exact(graph, program: AccelProgram, *inputs) -> AccelExecutor:
    """Run `graph` on the accelerator (ISA simulator) and on the numpy reference; every value the
    accelerator run computes must equal the reference's (integers bit for bit, floats from host
    ops within the tiers' float tolerance), and every section must take the cycles the codegen
    predicted."""
    cycles = []

    def run(prog, config, dram, max_cycles):
        out, n = simulate_section(prog, config, dram, max_cycles)
        cycles.append(n)
        return out, n

    accel = AccelExecutor(graph, program, run_section=run)
    got = accel.values(*inputs)
    probe = graph.replace(outputs=tuple(op.result for op in graph.ops if op.result in got))
    want = dict(zip(probe.outputs, NumpyExecutor(probe)(*inputs)))
    for name, value in want.items():
        assert_tiers_agree(got[name], value, name)
    for out, value in zip(graph.outputs, accel(*inputs)):
        assert_tiers_agree(value, want[out], out)
    predicted = [s.cycles for s in program.sections]
    assert cycles == predicted * 2 and accel.stats.section_cycles == predicted  # two runs, stats of the last
    return accel


def layers(sections) -> list[str]:
    """Each layer's last op in `sections`, as their notes name it (a chained section notes each
    layer's)."""
    return list(dict.fromkeys(note.split(":")[0].split(" -> ")[-1] for s in sections for note in s.note.split("; ")))


def accelerated(program: AccelProgram) -> list[str]:
    """The results of the requantized (or fused relu) outputs the accelerator computes."""
    return layers(program.sections)


# ---------------------------------------------------------------------------------------------
# quantized zoo models

def quantized(name: str):
    """A zoo model int8, its convolutions as linears where they become GEMMs (as the FPGA targets)."""
    model, inputs = built(name)
    graph = tcc.compile(model, inputs, pipeline="conv-as-gemm,quantize").graph
    args, kwargs = split_inputs(inputs)
    return graph, [t.numpy() for t in list(args) + list(kwargs.values())]


@pytest.mark.parametrize("name", ["bert-style", "transformer-encoder", "hf-bert", "hf-distilbert", "hf-vit",
                                  "tinybert4", "llama", "gpt2", "wav2vec2", "conformer", "swin",
                                  *(pytest.param(n, marks=pytest.mark.slow) for n in ("t5-encoder", "roberta",
                                                                                      "whisper-encoder"))])
def test_quantized_zoo_model_bit_exact(name):
    graph, inputs = quantized(name)
    program = generate(graph, AccelConfig())
    linears = [op for op in graph.ops if op.kind == "linear"]
    assert len(program.sections) >= len(linears) and len(accelerated(program)) == len(linears)
    assert not [h for h in program.host_ops if h.kind in ("linear", "requantize")]
    accel = check_bit_exact(graph, program, *inputs)
    types = graph.types
    assert accel.stats.macs == sum(math.prod(types[op.result].shape) * types[op.operands[1]].shape[1]
                                   for op in linears)
    assert 0 < accel.stats.utilization(program.config) <= 1
    assert accel.stats.instructions["gemm"] >= len(linears)
    assert accel.stats.instructions["halt"] == len(program.sections)
    # what the cost model prices is what the simulator ran: its cycles, calls and link bytes
    run = timing(graph, AccelConfig())
    assert (run.cycles, run.calls, run.link_bytes) == (accel.stats.cycles, accel.stats.calls,
                                                       accel.stats.link_bytes)


def test_quantized_model_on_a_small_array_splits_k_and_sections():
    """4x4 array, tiny buffers and program memory: split-K, several sections per layer."""
    graph, inputs = quantized("bert-style")
    program = generate(graph, SMALL)
    assert len(accelerated(program)) == sum(op.kind == "linear" for op in graph.ops)
    assert len(program.sections) > len(accelerated(program))
    assert any("K in 2 chunk(s)" in s.note for s in program.sections)  # K = 32 > BBUF / 2
    check_bit_exact(graph, program, *inputs)


def test_encoded_weights_run_dense_on_the_array():
    """Weights stored in a sparse encoding (the numpy executor computes on it) decode to dense."""
    model, inputs = built("bert-style")
    graph = tcc.compile(model, inputs, pipeline="hp-prune{sparsity=0.5,block=16x16},quantize,"
                                               "select-format{format=csr}").graph
    assert {str(t.encoding) for n, t in graph.constants if n.endswith(".weight_q")} == {"#csr"}
    program = generate(graph)
    assert len(accelerated(program)) == sum(op.kind == "linear" for op in graph.ops)
    args, kwargs = split_inputs(inputs)
    check_bit_exact(graph, program, *(t.numpy() for t in list(args) + list(kwargs.values())))


def test_chained_integer_linears_and_the_host_ops():
    """linear -> linear (integers between) -> float relu -> linear: each linear a layer; the
    relu, quantize and dequantize ops on the host with their reasons."""
    import torch
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 24), torch.nn.ReLU(),
                                torch.nn.Linear(24, 8)).eval()
    x = torch.randn(4, 16)
    graph = tcc.compile(model, (x,), pipeline="quantize").graph
    program = generate(graph)
    assert accelerated(program) == ["linear.q", "linear_1.q", "linear_2.q"]
    placed = [r for s in program.sections for r in s.ops]
    host = {h.result: h for h in program.host_ops}
    assert sorted(set(placed) | set(host)) == sorted(op.result for op in graph.ops) and not set(placed) & set(host)
    assert [(h.kind, h.result) for h in program.host_ops] == [
        ("quantize", "input.q"), ("dequantize", "linear_1"), ("relu", "relu"), ("quantize", "relu.q"),
        ("dequantize", "linear_2")]
    assert "relu on f32" in host["relu"].reason
    # the conversions at the link: the input's quantize on the way in, the dequantizes of what
    # comes back, the relu's quantize on its way to the third linear; the relu is a host op
    assert {r for r, h in host.items() if h.converted} == {"input.q", "linear_1", "relu.q", "linear_2"}
    assert "copies them to or from the accelerator" in host["input.q"].reason
    # the first two chain on chip: one call, the first's output never read back; the third's
    # input comes from the host (relu), a call of its own
    assert [layers(call) for call in program.calls()] == [["linear.q", "linear_1.q"], ["linear_2.q"]]
    assert program.on_chip == {"linear.q"} and program.sections[0].resident[0].values == ("linear.q",)
    check_bit_exact(graph, program, x.numpy())


@pytest.mark.parametrize("round_trip", [False, True])
def test_a_host_op_between_two_layers_splits_the_call_only_where_a_layer_waits_for_it(round_trip):
    """A on chip, then host ops reading A's output (placed before B in the graph), then B. Where
    the host's ops only give a graph output (A's output read back), B joins A's call, reading
    A's output in place, and the host runs them after the call; where B reads what they
    compute (a round trip), B cannot join: the host runs them between the calls."""
    rng = np.random.default_rng(0)
    first, x = linear_graph(rng, (8,), 16, 16)
    b = GraphBuilder("g")
    xin = b.input("x", TensorType((8, 16), DType.I8))
    y = b.op("requantize", b.op("linear", xin, b.constant("w", first.weights["w"], DType.I8),
                                 b.constant("b", first.weights["b"], DType.I32)),
             b.constant("mult", first.weights["mult"], DType.I32), b.constant("shift", first.weights["shift"], DType.I32),
             dtype=DType.I8, scale=1.0)
    seen = b.op("dequantize", y, b.constant("scale", np.asarray(0.5, np.float32), DType.F32))
    b_input = b.op("quantize", b.op("tanh", seen), dtype=DType.I8, scale=1 / 64) if round_trip else y
    z = b.op("requantize", b.op("linear", b_input, b.constant("w2", rng.integers(-60, 61, (16, 16)), DType.I8)),
             b.constant("mult2", np.asarray(1 << 30), DType.I32), b.constant("shift2", np.asarray(38), DType.I32),
             dtype=DType.I8, scale=1.0)
    graph = verify(b.finish([seen, z]))
    program = generate(graph, SMALL)
    assert len(program.calls()) == 1 + round_trip
    if not round_trip:
        assert generate(graph, SMALL, chained=False).sections[1].resident[0].values == (y,)
    accel = check_bit_exact(graph, program, x)
    assert accel.stats.calls == 1 + round_trip


def test_the_transfers_copy_loops_apply_the_edges_ops():
    """At the model's edges the host applies ops of one value in a transfer's copy loop: a
    scale of the input before its quantize (the write's prologue), a pick of rows and a tanh
    after the read-back's dequantize (the read-back's epilogue). An op whose result another
    host op of two values reads (the exp, for the add), or that reads the input for a graph
    output (the negation), is a host op of its own. The ISA simulator equals the numpy reference."""
    rng = np.random.default_rng(1)
    first, _ = linear_graph(rng, (2, 8), 16, 16)
    b = GraphBuilder("g")
    x = b.input("x", TensorType((2, 8, 16), DType.F32))
    scaled = b.op("mul", x, b.constant("two", np.asarray(2.0, np.float32), DType.F32))
    q = b.op("quantize", scaled, dtype=DType.I8, scale=1 / 16)
    y = b.op("requantize", b.op("linear", q, *(b.constant(n, first.weights[n], first.types[n].dtype) for n in "wb")),
             b.constant("mult", first.weights["mult"], DType.I32), b.constant("shift", first.weights["shift"], DType.I32),
             dtype=DType.I8, scale=1.0)
    seen = b.op("dequantize", y, b.constant("scale", np.asarray(0.5, np.float32), DType.F32))
    picked = b.op("tanh", b.op("select", seen, dim=1, index=0))
    summed = b.op("add", b.op("exp", seen), seen)
    graph = verify(b.finish([picked, summed, b.op("neg", x)]))
    program = generate(graph, SMALL)
    kinds = {op.result: op.kind for op in graph.ops}
    reasons = {kinds[h.result]: h.reason for h in program.host_ops}
    assert {k for k, r in reasons.items() if r == EPILOGUE} == {"mul", "select", "tanh"}
    assert {kinds[h.result] for h in program.host_ops if not h.converted and not h.moved} == {"exp", "add", "neg"}
    check_bit_exact(graph, program, rng.standard_normal((2, 8, 16)).astype(np.float32))


# ---------------------------------------------------------------------------------------------
# random linears on small arrays

def linear_graph(rng, lead: tuple[int, ...], k: int, n: int, *, bits: int = 8, bias: bool = True,
                 per_channel: bool = True, relu: bool = False, mult_bits: int = 31):
    """x (integer, leading dims `lead`) -> linear -> requantize -> relu?, random constants."""
    data = DATA[bits]
    low, high = data.value_range
    whigh = min(high, 1000)  # 16-bit weights: keep the accumulator in 32 bits
    b = GraphBuilder("g")
    x = b.input("x", TensorType(lead + (k,), data))
    operands = [x, b.constant("w", rng.integers(-whigh, whigh + 1, (n, k)), data)]
    acc = DType.I64 if bits == 16 else DType.I32
    if bias:
        operands.append(b.constant("b", rng.integers(-(1 << 12), 1 << 12, n), acc))
    channels = (n,) if per_channel else ()
    mult = b.constant("mult", rng.integers(1 << (mult_bits - 1), 1 << mult_bits, channels), DType.I32)
    # a shift that lands the typical accumulator (~ sqrt(k) * 2^(2 bits - 2)) near the output's range
    typical = math.log2(math.sqrt(k) * 4 ** (bits - 1) + 1) + mult_bits - (bits - 1)
    shift = b.constant("shift", rng.integers(max(0, int(typical) - 1), int(typical) + 2, channels), DType.I32)
    y = b.op("requantize", b.op("linear", *operands), mult, shift, dtype=data, scale=1.0)
    if relu:
        y = b.op("relu", y)
    graph = verify(b.finish([y]))
    return graph, rng.integers(low, high + 1, lead + (k,)).astype(data.numpy)


configs = st.builds(
    AccelConfig, rows=st.integers(1, 6), cols=st.integers(1, 6), abuf_depth=st.sampled_from([4, 16, 40, 256]),
    bbuf_depth=st.sampled_from([1, 6, 16, 64]), obuf_depth=st.sampled_from([6, 8, 24, 64]),
    pbuf_depth=st.sampled_from([3, 7, 12]), dram_bits=st.sampled_from([8, 24, 64, 128]),
    dram_latency=st.integers(1, 12), imem_depth=st.sampled_from([48, 120, 4096]), dram_words=st.just(1 << 16),
    abuf_banks=st.sampled_from([1, 4]))


@SETTINGS
@given(config=configs, lead=st.lists(st.integers(1, 9), min_size=1, max_size=3).map(tuple),
       k=st.integers(1, 80), n=st.integers(1, 30), relu=st.booleans(), bias=st.booleans(),
       per_channel=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_random_linear_bit_exact(config, lead, k, n, relu, bias, per_channel, seed):
    graph, x = linear_graph(np.random.default_rng(seed), lead, k, n, bias=bias, per_channel=per_channel, relu=relu)
    program = generate(graph, config)
    if not program.sections:  # a program memory too small for one tile, or a DRAM too small for the tensors
        assert "program memory" in program.host_ops[0].reason or "the DRAM is full" in program.host_ops[0].reason
        return
    assert accelerated(program) == [graph.outputs[0]] and all(len(s.program) <= config.imem_depth
                                                              for s in program.sections)
    accel = check_bit_exact(graph, program, x)
    assert accel.stats.macs == math.prod(lead) * k * n


@pytest.mark.parametrize("bits, acc_bits, mult_bits", [(4, 32, 31), (4, 16, 14), (16, 32, 31)])
def test_other_data_widths(bits, acc_bits, mult_bits):
    config = dataclasses.replace(SMALL, data_bits=bits, acc_bits=acc_bits)
    graph, x = linear_graph(np.random.default_rng(bits), (3, 7), 37, 11, bits=bits, relu=True, mult_bits=mult_bits)
    program = generate(graph, config)
    assert accelerated(program) == [graph.outputs[0]]
    check_bit_exact(graph, program, x)


def test_banks_and_the_vector_unit_leave_the_codegen_alone():
    """The codegen emits no vector op and addresses ABUF by word: the same program runs on banked
    ABUF without the vector unit."""
    config = dataclasses.replace(SMALL, abuf_banks=2, vector_unit=False)
    graph, x = linear_graph(np.random.default_rng(5), (3, 7), 37, 11, relu=True)
    program = generate(graph, config)
    assert [s.program for s in program.sections] == [s.program for s in generate(graph, SMALL).sections]
    check_bit_exact(graph, program, x)


def test_linears_the_array_cannot_run_exactly_stay_on_the_host():
    b = GraphBuilder("g")
    x = b.input("x", TensorType((4, 8), DType.I8))
    xf = b.input("xf", tensor((4, 8)))
    w = b.constant("w", np.ones((4, 8)), DType.I8)
    wide = b.constant("wide", np.full((4, 8), 300), DType.I16)
    one = b.constant("one", np.array(1 << 30), DType.I32)
    shift = b.constant("shift", np.array(33), DType.I32)
    req = dict(dtype=DType.I8, scale=1.0)
    float_linear = b.op("linear", xf, b.constant("wf", np.ones((4, 8), np.float32)))
    shared = b.op("linear", x, w)  # its accumulator is also an output
    zero_point = b.op("requantize", b.op("linear", x, w), one, shift, dtype=DType.I8, scale=1.0, zero_point=3)
    to_i16 = b.op("requantize", b.op("linear", x, w), one, shift, dtype=DType.I16, scale=1.0)
    too_wide = b.op("requantize", b.op("linear", x, wide), one, shift, **req)
    weight_input = b.op("requantize", b.op("linear", x, b.op("cast", w, dtype=DType.I8)), one, shift, **req)
    good = b.op("requantize", b.op("linear", x, w), one, shift, **req)
    graph = verify(b.finish([float_linear, shared, b.op("requantize", shared, one, shift, **req), zero_point, to_i16,
                             too_wide, weight_input, good]))
    program = generate(graph)
    assert accelerated(program) == [good]
    reasons = {h.result: h.reason for h in program.host_ops if h.kind in ("linear", "requantize")}
    producer = graph.producer()
    linear_of = {v: producer[v].operands[0] for v in (zero_point, to_i16, too_wide, weight_input)}
    assert "input is f32" in reasons[float_linear]
    assert "other ops than one requantize" in reasons[shared]
    assert "zero point 3" in reasons[linear_of[zero_point]] and "to i16" in reasons[linear_of[to_i16]]
    assert "do not fit i8" in reasons[linear_of[too_wide]]
    assert "not a constant" in reasons[linear_of[weight_input]]
    assert reasons[zero_point] == "it requantizes a product the host runs"
    check_bit_exact(graph, program, np.arange(32, dtype=np.int8).reshape(4, 8), np.ones((4, 8), np.float32))


# ---------------------------------------------------------------------------------------------
# layouts and the artifact

@SETTINGS
@given(layout=st.sampled_from(list(Layout)), shape=st.tuples(st.integers(1, 20), st.integers(1, 20)),
       rows=st.integers(1, 5), cols=st.integers(1, 5), dram_bits=st.sampled_from([8, 16, 56, 128]),
       seed=st.integers(0, 1000))
def test_layouts_round_trip(layout, shape, rows, cols, dram_bits, seed):
    config = AccelConfig(rows=rows, cols=cols, dram_bits=dram_bits)
    bits = config.lane_bits(layout.buffer)
    array = np.random.default_rng(seed).integers(-(1 << bits - 1), 1 << bits - 1, shape)
    want = array
    if layout is Layout.BINARY_ACTIVATIONS:  # +-1 values, read back packed
        array = np.where(array >= 0, 1, -1)
        want = pack_binary(array, config.data_bits)
        assert (((want[:, :, None] >> np.arange(8)) & 1).reshape(len(want), -1)[:, :shape[1]] == (array > 0)).all()
    words = to_words(layout, array, config)
    assert words.shape[1] == config.lanes(layout.buffer)
    np.testing.assert_array_equal(from_words(layout, words, shape, config), want)
    data = encode(layout, array, config)
    assert len(data) == dram_words(layout, shape, config) * dram_bits // 8
    np.testing.assert_array_equal(decode(layout, data, shape, config), want)


@SETTINGS
@given(lead=st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple), width=st.integers(1, 7),
       seed=st.integers(0, 1000))
def test_row_orders_round_trip(lead, width, seed):
    """`DramTensor.rows`: the value's row r lies at stored row rows[r]; `value` undoes `stored`,
    and the identity order changes nothing."""
    rng = np.random.default_rng(seed)
    value = rng.integers(-100, 100, lead + (width,))
    count = int(np.prod(lead))
    rows = tuple(int(r) for r in rng.permutation(count))
    t = DramTensor(("v",), Layout.ROWS, (count, width), Region(0, 0), rows)
    stored = t.stored(value)
    assert stored.shape == (count, width)
    for r in range(count):
        np.testing.assert_array_equal(stored[rows[r]], value.reshape(count, width)[r])
    np.testing.assert_array_equal(t.value(stored).reshape(value.shape), value)
    plain = DramTensor(("v",), Layout.ROWS, (count, width), Region(0, 0))
    np.testing.assert_array_equal(plain.stored(value), value.reshape(count, width))


def test_layouts_put_words_where_the_codegen_loads_them():
    config = AccelConfig(rows=2, cols=3, dram_bits=8)  # ABUF word: 2 bytes, BBUF word: 3 bytes
    x = np.arange(15).reshape(5, 3)  # [M=5, K=3]: 3 row blocks of 3 words
    words = to_words(Layout.ACTIVATIONS, x, config)
    np.testing.assert_array_equal(words[3 * 2 + 1], [x[4, 1], 0])  # block 2, word k=1: rows 4 and (pad) 5
    assert dram_words(Layout.ACTIVATIONS, x.shape, config) == 9 * 2
    y = np.arange(10).reshape(2, 5)  # [M=2, N=5]: 2 column blocks of M words
    np.testing.assert_array_equal(to_words(Layout.OUTPUTS, y, config)[2 + 0], [3, 4, 0])
    with pytest.raises(ValueError, match="do not fit 8-bit lanes"):
        encode(Layout.WEIGHTS, np.array([[128]]), config)
    allocator = DramAllocator(dataclasses.replace(config, dram_words=10))
    assert allocator.allocate(4) == Region(0, 4) and allocator.allocate(6) == Region(4, 6)
    with pytest.raises(ValueError, match="0 are left"):
        allocator.allocate(1)


@pytest.fixture(scope="module")
def small_program():
    graph, _ = quantized("bert-style")
    return generate(graph, SMALL)


def test_artifact_round_trip(small_program, tmp_path):
    files = small_program.to_files()
    assert set(files) == {"program.bin", "program.s", "dram.bin", "sections.json"}
    assert AccelProgram.from_files(files) == small_program
    small_program.save(tmp_path / "accel")
    assert AccelProgram.load(tmp_path / "accel") == small_program
    listing = files["program.s"].decode()
    assert listing.startswith("# section 0: linear.acc -> linear.q: M=32 K=32 N=32")
    assert listing.count("# section ") == len(small_program.sections)
    assert listing.count("\nhalt\n") == len(small_program.sections)


def test_artifact_round_trip_keeps_row_orders():
    """A sequence-first value stored batch-first (`DramTensor.rows`) reads back as it was; a
    `rows` that is not an order of the tensor's rows is refused, naming where it is."""
    model, inputs = built("transformer-encoder")
    program = generate(tcc.compile(model, inputs, pipeline="quantize,int-nonlinear").graph, ROOMY)
    files = program.to_files()
    assert AccelProgram.from_files(files) == program
    at = next((i, j) for i, s in enumerate(program.sections) for j, t in enumerate(s.outputs) if t.rows)

    def repeat_a_row(meta):
        rows = meta["sections"][at[0]]["outputs"][at[1]]["rows"]
        rows[1] = rows[0]

    with pytest.raises(ValueError, match=rf"sections\[{at[0]}\].outputs\[{at[1]}\].rows: not an order"):
        AccelProgram.from_files(corrupt_json(files, repeat_a_row))


def corrupt_json(files: dict, edit) -> dict:
    import json
    meta = json.loads(files["sections.json"])
    edit(meta)
    return dict(files, **{"sections.json": json.dumps(meta).encode()})


@pytest.mark.parametrize("problem, message", [
    (lambda f: {k: v for k, v in f.items() if k != "dram.bin"}, "dram.bin: missing"),
    (lambda f: dict(f, **{"program.bin": f["program.bin"][:-3]}), "program.bin: .* bytes of instructions"),
    (lambda f: dict(f, **{"program.s": f["program.s"].replace(b"gemm a=0", b"gemm a=1", 1)}),
     "program.s: instruction .* differs from program.bin"),
    (lambda f: dict(f, **{"program.s": b"frob x=1\n"}), "program.s:1: unknown mnemonic 'frob'"),
    (lambda f: dict(f, **{"sections.json": b"{"}), "sections.json: not JSON"),
    (lambda f: dict(f, **{"dram.bin": f["dram.bin"] + b"\0"}), "sections.json: dram_bytes is"),
    (lambda f: corrupt_json(f, lambda m: m.update(version=7)), "sections.json: version 7"),
    (lambda f: corrupt_json(f, lambda m: m["config"].update(rows=0)), "sections.json: config: rows must be"),
    (lambda f: corrupt_json(f, lambda m: m["sections"][1].update(offset=3)), r"sections.json: sections\[1\]: "
                                                                             "instructions"),
    (lambda f: corrupt_json(f, lambda m: m["sections"][0].pop("ops")), r"sections.json: sections\[0\].ops: missing"),
    (lambda f: corrupt_json(f, lambda m: m["sections"][0]["inputs"][0].update(layout="diagonal")),
     r"sections.json: sections\[0\].inputs\[0\].layout: unknown layout 'diagonal'"),
    (lambda f: corrupt_json(f, lambda m: m["sections"][0]["outputs"][0].update(region=[1 << 30, 4])),
     r"sections.json: sections\[0\].outputs\[0\].region: words .* outside"),
    (lambda f: corrupt_json(f, lambda m: m["sections"][0]["outputs"][0].update(shape=[1, 1])),
     r"sections.json: sections\[0\].outputs\[0\].region: .* words, its layout needs"),
    (lambda f: corrupt_json(f, lambda m: m["host_ops"][0].update(kind=3)),
     r"sections.json: host_ops\[0\].kind: expected str, got int"),
])
def test_artifact_parse_errors_name_the_file(small_program, problem, message):
    with pytest.raises(ValueError, match=message):
        AccelProgram.from_files(problem(small_program.to_files()))


def test_load_names_a_missing_file(small_program, tmp_path):
    small_program.save(tmp_path)
    (tmp_path / "sections.json").unlink()
    with pytest.raises(ValueError, match="sections.json: missing"):
        AccelProgram.load(tmp_path)


def test_executor_rejects_a_program_of_another_graph(small_program):
    graph, _ = linear_graph(np.random.default_rng(0), (2,), 3, 4)
    with pytest.raises(ValueError, match="'linear.acc', which the graph does not compute"):
        AccelExecutor(graph, small_program)


# ---------------------------------------------------------------------------------------------
# utilization on BERT-base GEMMs (16 x 16, default AccelConfig)

@pytest.mark.parametrize("m, k, n", [(128, 768, 768), (128, 768, 3072), (128, 3072, 768)])
def test_bert_base_gemm_utilization(m, k, n):
    """>= 90% of the array's peak, DMA included; SCALE-Sim's output-stationary count
    ((R + C + T - 2) cycles per fold, no DMA, no requantization) for comparison."""
    config = AccelConfig()
    graph, x = linear_graph(np.random.default_rng(0), (m,), k, n)
    program = generate(graph, config)
    accel = AccelExecutor(graph, program)
    np.testing.assert_array_equal(accel(x)[0], NumpyExecutor(graph)(x)[0])
    stats = accel.stats
    r, c = config.rows, config.cols
    scale_sim = (r + c + k - 2) * math.ceil(m / r) * math.ceil(n / c)
    print(f"\nM={m} K={k} N={n}: {stats.cycles} cycles, utilization {stats.utilization(config):.4f}; "
          f"SCALE-Sim OS {scale_sim} cycles ({m * n * k / (scale_sim * r * c):.4f}); "
          f"{len(program.sections)} section(s), {dict(stats.instructions)}")
    assert stats.macs == m * n * k and stats.cycles == sum(s.cycles for s in program.sections)
    assert stats.utilization(config) >= 0.90
    assert stats.cycles <= 1.03 * scale_sim
    assert stats.instructions["gemm"] == m // r * n // c * math.ceil(k / (config.bbuf_depth // 2))  # split-K


# ---------------------------------------------------------------------------------------------
# sparse and binary weights: the HP sparse unit, block skipping, the binary unit

def structured(graph, weight: str, structure):
    """`graph` with `structure` in the type of constant `weight` (the verifier checks it holds)."""
    constants = tuple((n, dataclasses.replace(t, sparsity=structure) if n == weight else t) for n, t in graph.constants)
    return verify(graph.replace(constants=constants))


def hp_weight(rng, n: int, k: int, bh: int, bw: int, row_nnz: int, block_density: float) -> np.ndarray:
    """A random int8 [n, k] with ~hp(bh, bw, row_nnz): blocks kept with `block_density`, each
    row of a kept block with min(row_nnz, width) non-zeros."""
    w = np.zeros((n, k), np.int64)
    for i in range(0, n, bh):
        for j in range(0, k, bw):
            if rng.random() >= block_density:
                continue
            width = min(bw, k - j)
            for r in range(i, min(n, i + bh)):
                cols = j + rng.choice(width, min(row_nnz, width), replace=False)
                w[r, cols] = rng.choice([v for v in range(-128, 128) if v], len(cols))
    return w


def sparse_linear(rng, lead, k, n, weight):
    graph, x = linear_graph(rng, lead, k, n, relu=True)
    weights = dict(graph.weights) | {"w": weight.astype(np.int8)}
    return graph.replace(weights=weights), x


@SETTINGS
@given(lead=st.sampled_from([(3,), (2, 5), (9,)]), k=st.integers(1, 40), n=st.integers(1, 13),
       bh=st.sampled_from([1, 2, 4, 8]), bw=st.sampled_from([1, 2, 4, 8]), data=st.data())
def test_hp_weights_run_on_the_sparse_unit_bit_exact(lead, k, n, bh, bw, data):
    """HP weights of any block shape, row_nnz and block sparsity: spgemm over the kept blocks
    only, gathering by local indices; bit-exact with the reference, cycles as predicted."""
    row_nnz = data.draw(st.integers(1, bw))
    density = data.draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 16)))
    graph, x = sparse_linear(rng, lead, k, n, hp_weight(rng, n, k, bh, bw, row_nnz, density))
    graph = structured(graph, "w", Hierarchical(bh, bw, row_nnz))
    config = dataclasses.replace(SMALL, abuf_banks=8)
    program = generate(graph, config)
    assert accelerated(program) == [graph.outputs[0]]
    assert all(", hp, " in s.note for s in program.sections)
    ops = {i.op for s in program.sections for i in s.program}
    assert Opcode.SPGEMM in ops and Opcode.GEMM not in ops
    accel = check_bit_exact(graph, program, x)
    assert accel.stats.macs == math.prod(lead) * np.count_nonzero(graph.weights["w"])


def test_hp_skips_pruned_blocks_and_rows():
    """75% HP sparsity (half the blocks, half of each row) on a 4x4 array: a quarter of the dense
    array steps, and fewer cycles than the same weights run dense (this tiny layer is bound by
    its DMA; benchmarks/accel.py measures the speedup on BERT-base shapes)."""
    rng = np.random.default_rng(0)
    w = hp_weight(rng, 16, 64, 4, 4, 2, 0.5)
    graph, x = sparse_linear(rng, (16,), 64, 16, w)
    hp = structured(graph, "w", Hierarchical(4, 4, 2))
    config = dataclasses.replace(SMALL, abuf_banks=4, bbuf_depth=64)
    sparse, dense = generate(hp, config), generate(graph, config)
    steps = lambda p: sum(i.steps() for s in p.sections for i in s.program if i.op in ARRAY_OPS)  # noqa: E731
    kept = int(np.count_nonzero(w.reshape(4, 4, 16, 4).any(axis=(1, 3))))  # kept 4x4 blocks
    assert steps(sparse) == kept * 2 * 4 and steps(dense) == 64 * 4 * 4  # per row block: 2 steps a block
    assert sum(s.cycles for s in sparse.sections) < sum(s.cycles for s in dense.sections)
    check_bit_exact(hp, sparse, x)


@SETTINGS
@given(k=st.integers(1, 40), n=st.integers(1, 13), bh=st.sampled_from([1, 4, 5]), bw=st.sampled_from([1, 3, 4, 16]),
       density=st.sampled_from([0.0, 0.4, 1.0]), seed=st.integers(0, 2 ** 16))
def test_block_sparse_weights_skip_blocks_on_the_dense_array(k, n, bh, bw, density, seed):
    rng = np.random.default_rng(seed)
    w = rng.integers(-128, 128, (n, k)) * np.kron(rng.random((-(-n // bh), -(-k // bw))) < density,
                                                    np.ones((bh, bw), int))[:n, :k]
    graph, x = sparse_linear(rng, (7,), k, n, w)
    graph = structured(graph, "w", Blocks(bh, bw))
    program = generate(graph, SMALL)
    assert all(", blocks, " in s.note for s in program.sections)
    check_bit_exact(graph, program, x)
    tiles = [w[t:t + 4] for t in range(0, n, 4)]
    kept = sum(sum(min(bw, k - j) for j in range(0, k, bw) if tile[:, j:j + bw].any()) or min(bw, k) for tile in tiles)
    steps = sum(i.steps() for s in program.sections for i in s.program if i.op is Opcode.GEMM)
    assert steps <= 2 * kept  # two row blocks; an empty tile keeps its first block (to clear the bank)


def binary_linear(rng, lead, k, n):
    """+-1 activations and weights (b1) -> linear -> requantize."""
    b = GraphBuilder("g")
    x = b.input("x", TensorType(lead + (k,), DType.B1))
    w = b.constant("w", rng.choice([-1, 1], (n, k)), DType.B1)
    bias = b.constant("b", rng.integers(-20, 20, n), DType.I32)
    mult = b.constant("mult", rng.integers(1 << 30, 1 << 31, n), DType.I32)
    shift = b.constant("shift", np.full(n, 33), DType.I32)
    y = b.op("requantize", b.op("linear", x, w, bias), mult, shift, dtype=DType.I8, scale=1.0)
    return verify(b.finish([y])), rng.choice([-1, 1], lead + (k,)).astype(np.int8)


@SETTINGS
@given(lead=st.sampled_from([(3,), (2, 5)]), k=st.integers(1, 70), n=st.integers(1, 9), seed=st.integers(0, 2 ** 16))
def test_binary_layers_run_xnor_popcount_bit_exact(lead, k, n, seed):
    graph, x = binary_linear(np.random.default_rng(seed), lead, k, n)
    program = generate(graph, SMALL)
    assert all(", binary, " in s.note for s in program.sections)
    ops = [i.op for s in program.sections for i in s.program]
    assert Opcode.BGEMM in ops and Opcode.GEMM not in ops
    assert sum(i.steps() for s in program.sections for i in s.program if i.op is Opcode.BGEMM) == \
        math.ceil(math.prod(lead) / 4) * math.ceil(n / 4) * math.ceil(k / 8)  # 8 binary values per lane
    check_bit_exact(graph, program, x)


def test_without_the_units_the_same_layers_run_dense():
    rng = np.random.default_rng(3)
    graph, x = sparse_linear(rng, (6,), 24, 8, hp_weight(rng, 8, 24, 4, 4, 1, 0.5))
    hp = structured(graph, "w", Hierarchical(4, 4, 1))
    bare = dataclasses.replace(SMALL, sparse_unit=False, binary_unit=False, abuf_banks=4)
    program = generate(hp, bare)
    assert all(", blocks, " in s.note for s in program.sections)  # the HP blocks still skip, densely
    check_bit_exact(hp, program, x)
    graph, x = binary_linear(rng, (5,), 20, 6)
    program = generate(graph, bare)
    assert all(", dense, " in s.note for s in program.sections)
    check_bit_exact(graph, program, x)


# ---------------------------------------------------------------------------------------------
# attention and the integer nonlinearities on the vector unit

ROOMY = dataclasses.replace(SMALL, abuf_depth=256, bbuf_depth=128, obuf_depth=128, pbuf_depth=128, imem_depth=400)


def test_integer_encoder_layers_run_on_the_accelerator():
    """After quantize and int-nonlinear, everything arithmetic in the encoder layers runs on the
    accelerator: linears, Q K^T -> int_softmax, P V -> requantize, residual add -> int_layer_norm,
    and the layers chain on chip, layout ops included (`nn.MultiheadAttention` works sequence
    first: its linears read their inputs as they lie, P V writes the merge batch-first). Left
    to the host: float <-> integer conversions and the mean pooling before the head; no
    rescale (the FFN's first linear takes its relu's range, the one the second linear reads)."""
    model, inputs = built("transformer-encoder")
    graph = tcc.compile(model, inputs, pipeline="quantize,int-nonlinear").graph
    program = generate(graph, ROOMY)
    placed = {r for s in program.sections for r in s.ops}
    on_chip = Counter(op.kind for op in graph.ops if op.result in placed)
    assert on_chip["int_softmax"] == 2 and on_chip["int_layer_norm"] == 4 and on_chip["matmul"] == 4
    host = Counter(h.kind for h in program.host_ops)
    assert set(host) <= {"quantize", "dequantize", "add", "mean", "cast", "requantize"} | set(LAYOUT_OPS)
    # the positions' add after the embedding linear: the linear's section adds them (vadd)
    assert host["cast"] == host["requantize"] == host["add"] == 0
    assert not [h for h in program.host_ops if h.kind in LAYOUT_OPS]
    assert [[s.ops[-1] for s in call][-1] for call in program.calls()] == ["layer_norm_3.i", "linear_9.q"]
    assert any(t.rows for s in program.sections for t in s.outputs)  # sequence-first values stored batch-first
    run = timing(graph, ROOMY)
    priced = cycle_model_host(graph, ROOMY)
    assert {op.result for op in priced} == {h.result for h in program.host_ops if not h.moved and not h.converted}
    # the input's quantize, the dequantizes of what comes back, the requantizes on the way in:
    # conversions in the transfers; the mean pooling is the one float op on the host
    assert {h.kind for h in program.host_ops if h.converted} == {"quantize", "dequantize"}
    assert {op.kind for op in priced} == {"mean"}
    assert run.host_ops == program.host_ops
    args, kwargs = split_inputs(inputs)
    accel = check_bit_exact(graph, program, *(t.numpy() for t in list(args) + list(kwargs.values())))
    assert {"vsoftmax", "vlayernorm", "vresadd", "vacc", "tload"} <= set(accel.stats.instructions)
    # layers chain on chip: a norm's rows feed the next linears and residual, a linear's outputs
    # the next linear, softmax's probabilities P V, by tload where they lie (never read back)
    chained = {t.values[0] for s in program.sections for t in s.resident}
    assert chained and chained.isdisjoint(t.values[0] for s in program.sections for t in s.inputs)
    assert program.on_chip and program.on_chip <= chained
    assert accel.stats.calls == len(program.calls()) < len({s.ops for s in program.sections})


def test_pre_norm_residual_stream_stays_on_chip():
    """ViT's pre-norm blocks keep their residual stream in i16 (no norm after the add): each
    residual add reads the stream as PBUF rows (a wide vresadd), writes the next one there and
    stores it for the next add, which reads it where it lies; the stream never crosses the link
    and no host op stands between calls. Bit for bit the numpy reference."""
    model, inputs = built("hf-vit")
    graph = tcc.compile(model, inputs, pipeline="quantize,int-nonlinear").graph
    program = generate(graph, ROOMY)
    types = graph.types
    streams = [op.result for op in graph.ops if op.kind == "requantize" and op.type.dtype is DType.I16]
    assert len(streams) == 4  # two residual adds in each of the two layers
    placed = {r for s in program.sections for r in s.ops}
    assert set(streams) <= placed
    assert not [h for h in program.host_ops if h.kind in ("add", "requantize") and types[h.result].dtype.is_int]
    assert set(host_places(graph, program).values()) <= {"edge", "addressing"}
    kept = {t.values[0] for s in program.sections for t in s.outputs if t.layout is Layout.PBUF_ROWS}
    assert set(streams[:-1]) <= kept <= set(streams)  # the last one only the final norm reads
    inputs_ = {t.values[0] for s in program.sections for t in s.inputs}
    assert inputs_.isdisjoint(streams) and set(streams[:-1]) <= program.on_chip
    wide = [i for s in program.sections for i in s.program if i.op is Opcode.VRESADD and i["wide"]]
    assert wide and all(types[v].dtype is DType.I16 for v in streams)
    args, kwargs = split_inputs(inputs)
    check_bit_exact(graph, program, *(t.numpy() for t in list(args) + list(kwargs.values())))


def test_host_ops_are_placed_at_the_edges_or_between_calls():
    """`host_places`: the integer encoder's input quantize and its output's dequantize are the
    model's edges; the mean pooling before the head (and its conversions) reads one call's
    output and feeds the next (between); no layout op is left to the host (the layers chain on
    chip). Checked against the dataflow: an op is between exactly when a section output reaches
    it and it reaches a section input, through host ops."""
    model, inputs = built("transformer-encoder")
    graph = tcc.compile(model, inputs, pipeline="quantize,int-nonlinear").graph
    program = generate(graph, ROOMY)
    places = host_places(graph, program)
    kinds = {h.result: h.kind for h in program.host_ops}
    assert set(places) == set(kinds) and set(places.values()) == {"edge", "between"}
    assert {kinds[r] for r, p in places.items() if p == "between"} == {"dequantize", "quantize", "mean"}
    assert [places[op.result] for op in graph.ops if op.kind == "quantize" and op.operands[0] in graph.input_names] \
        == ["edge"]
    assert [places[v] for v in graph.outputs] == ["edge"]
    # the oracle: paths in the dataflow through host ops only
    flow = nx.DiGraph((v, op.result) for op in graph.ops if op.result in places for v in op.operands)
    outputs = {t.values[0] for s in program.sections for t in s.outputs} & set(flow)
    inputs = {t.values[0] for s in program.sections for t in s.inputs} & set(flow)
    for r, p in places.items():
        if p != "addressing":
            fed = any(nx.has_path(flow, o, r) for o in outputs)
            feeds = any(nx.has_path(flow, r, i) for i in inputs)
            assert (p == "between") == (fed and feeds), (r, p, fed, feeds)


def cycle_model_host(graph, config):
    """The host ops the cost model prices (`targets.cycle_model`)."""
    from tcc.targets import cycle_model
    return cycle_model(config, 16)(graph).host_ops


def attention_graph(rng, lead, m, k, n, softmax: bool, gelu: bool = False, mask: tuple[int, ...] | None = None):
    """x [lead, m, k] @ y [lead, k, n] (both i8 inputs) -> int_softmax (with `mask`, a bool input
    of that shape: [.., 1 or m, n]), or -> requantize (-> int_gelu)."""
    from tcc.passes.int_nonlinear import gelu_attrs, softmax_attrs
    b = GraphBuilder("g")
    x = b.input("x", TensorType(lead + (m, k), DType.I8))
    y = b.input("y", TensorType(lead + (k, n), DType.I8))
    keep = b.input("keep", TensorType(mask, DType.BOOL)) if softmax and mask is not None else None
    acc = b.op("matmul", x, y)
    if softmax:
        out = b.op("int_softmax", acc, *([keep] if keep else []),
                   **softmax_attrs(float(rng.choice([1e-4, 1e-3, 1e-2])), 7))
    else:
        mult = b.constant("mult", np.asarray(int(rng.integers(1 << 30, 1 << 31))), DType.I32)
        shift = b.constant("shift", np.asarray(math.ceil(math.log2(math.sqrt(k) * 2 ** 14)) + 31 - 7), DType.I32)
        out = b.op("requantize", acc, mult, shift, dtype=DType.I8, scale=1.0)
        if gelu:
            out = b.op("int_gelu", out, **gelu_attrs(0.05, DType.I8, 0.04, DType.I8))
    graph = verify(b.finish([out]))
    inputs = [rng.integers(-128, 128, lead + shape).astype(np.int8) for shape in ((m, k), (k, n))]
    return graph, inputs + ([rng.random(mask) < rng.choice([0.3, 0.7, 1.0])] if keep else [])


@SETTINGS
@given(lead=st.sampled_from([(1,), (3,), (2, 2)]), m=st.integers(1, 9), k=st.integers(1, 20), n=st.integers(1, 11),
       softmax=st.booleans(), gelu=st.booleans(), masked=st.sampled_from([None, "row", "rows", "heads"]),
       seed=st.integers(0, 2 ** 16))
def test_random_attention_products_bit_exact(lead, m, k, n, softmax, gelu, masked, seed):
    """Products into requantize (-> int_gelu) or int_softmax, the softmax masked (a bool input
    over the keys: one row for every query, a row per query, per leading index or broadcast
    over the last one like a padding mask over heads), bit for bit."""
    shape = {None: None, "row": (1, n), "rows": lead + (m, n), "heads": lead[:-1] + (1, 1, n)}[masked]
    graph, inputs = attention_graph(np.random.default_rng(seed), lead, m, k, n, softmax, gelu, shape)
    program = generate(graph, ROOMY)
    assert not program.host_ops, program.host_ops
    accel = check_bit_exact(graph, program, *inputs)
    assert accel.stats.macs == math.prod(lead) * m * k * n
    assert ("vsoftmax" in accel.stats.instructions) == softmax
    assert ("vgelu" in accel.stats.instructions) == (gelu and not softmax)


def test_linear_with_fused_int_gelu():
    from tcc.passes.int_nonlinear import gelu_attrs
    rng = np.random.default_rng(4)
    x = rng.integers(-128, 128, (5, 3, 24)).astype(np.int8)
    builder = GraphBuilder("g")
    xi = builder.input("x", TensorType((5, 3, 24), DType.I8))
    w = builder.constant("w", rng.integers(-128, 128, (10, 24)), DType.I8)
    mult = builder.constant("mult", rng.integers(1 << 30, 1 << 31, 10), DType.I32)
    shift = builder.constant("shift", np.full(10, 38), DType.I32)
    y = builder.op("requantize", builder.op("linear", xi, w), mult, shift, dtype=DType.I8, scale=1.0)
    y = builder.op("int_gelu", y, **gelu_attrs(0.05, DType.I8, 0.04, DType.I8))
    graph = verify(builder.finish([y]))
    program = generate(graph, ROOMY)
    assert accelerated(program) == [graph.outputs[0]] and not program.host_ops
    check_bit_exact(graph, program, x)


@SETTINGS
@given(rows=st.integers(1, 40), n=st.integers(1, 30), rescale=st.sampled_from([(True, False), (False, True),
                                                                                 (True, True)]),
       seed=st.integers(0, 2 ** 16))
def test_random_residual_layer_norms_bit_exact(rows, n, rescale, seed):
    """cast (-> requantize) of two i8 tensors, add, requantize to i16, int_layer_norm to i8:
    vresadd and vlayernorm row by row; rows of any length (lanes past it padded)."""
    from tcc.passes.int_nonlinear import layer_norm_params
    rng = np.random.default_rng(seed)
    b = GraphBuilder("g")
    a, c = (b.input(name, TensorType((rows, n), DType.I8)) for name in ("a", "c"))
    sides = []
    for value, scaled in zip((a, c), rescale):
        wide = b.op("cast", value, dtype=DType.I32)
        if scaled:
            wide = b.op("requantize", wide, b.constant(f"{value}.m", np.asarray(int(rng.integers(1 << 29, 1 << 31))),
                                                       DType.I32),
                        b.constant(f"{value}.s", np.asarray(30), DType.I32), dtype=DType.I32, scale=1.0)
        sides.append(wide)
    total = b.op("add", *sides)
    narrow = b.op("requantize", total, b.constant("m", np.asarray(1 << 30), DType.I32),
                  b.constant("s", np.asarray(28), DType.I32), dtype=DType.I16, scale=1.0)
    weight, bias, attrs = layer_norm_params(0.02, DType.I16, rng.uniform(0.5, 1.5, n), rng.normal(0, 0.2, n), 1e-5,
                                            0.03, DType.I8)
    out = b.op("int_layer_norm", narrow, b.constant("w", weight, DType.I32), b.constant("bias", bias, DType.I64),
               **attrs)
    graph = verify(b.finish([out]))
    program = generate(graph, ROOMY)
    assert not program.host_ops and all("layer norm" in s.note for s in program.sections)
    check_bit_exact(graph, program, *(rng.integers(-128, 128, (rows, n)).astype(np.int8) for _ in range(2)))


@SETTINGS
@given(lead=st.sampled_from([(), (2,), (2, 3)]), rows=st.integers(1, 40), n=st.integers(1, 30),
       dtype=st.sampled_from([DType.I8, DType.I16]), seed=st.integers(0, 2 ** 16))
def test_random_layer_norms_alone_bit_exact(lead, rows, n, dtype, seed):
    """int_layer_norm of an integer input alone (a pre-norm block's, the embeddings'): its rows
    loaded into PBUF in chunks, vlayernorm each, bit for bit; the rows it spans split into
    sections where the program memory says so."""
    from tcc.passes.int_nonlinear import layer_norm_params
    rng = np.random.default_rng(seed)
    b = GraphBuilder("g")
    x = b.input("x", TensorType(lead + (rows, n), dtype))
    weight, bias, attrs = layer_norm_params(0.02, dtype, rng.uniform(0.5, 1.5, n), rng.normal(0, 0.2, n), 1e-5,
                                            0.03, DType.I8)
    out = b.op("int_layer_norm", x, b.constant("w", weight, DType.I32), b.constant("bias", bias, DType.I64), **attrs)
    graph = verify(b.finish([out]))
    program = generate(graph, ROOMY)
    assert not program.host_ops and all(s.note.endswith("layer norm on the vector unit, " + s.note.split(", ")[-1])
                                        for s in program.sections)
    low, high = dtype.value_range
    accel = check_bit_exact(graph, program, rng.integers(low, high + 1, lead + (rows, n)).astype(dtype.numpy))
    assert accel.stats.instructions["vlayernorm"] == math.prod(lead) * rows
    assert timing(graph, ROOMY).cycles == accel.stats.cycles


def test_without_the_nonlinear_unit_the_nonlinearities_stay_on_the_host():
    rng = np.random.default_rng(2)
    bare = dataclasses.replace(ROOMY, nonlinear_unit=False)
    graph, inputs = attention_graph(rng, (2,), 5, 7, 6, softmax=True)
    program = generate(graph, bare)
    assert not program.sections and "leaves out" in program.host_ops[0].reason
    graph, inputs = attention_graph(rng, (2,), 5, 7, 6, softmax=False, gelu=True)
    program = generate(graph, bare)
    assert [h.kind for h in program.host_ops] == ["int_gelu"]  # the product and its requantize still run
    check_bit_exact(graph, program, *inputs)


@SETTINGS
@given(config=configs, lead=st.sampled_from([(1,), (7,), (40,), (3, 30)]), k=st.integers(1, 40),
       n=st.integers(1, 40), kind=st.sampled_from(["dense", "hp", "blocks", "binary", "softmax", "gelu"]),
       seed=st.integers(0, 2 ** 16))
@example(config=dataclasses.replace(SMALL, rows=2, abuf_depth=16, imem_depth=48), lead=(15,), k=3, n=12,
         kind="dense", seed=0)  # sections alike but for the last row block's rows
def test_timing_gives_every_sections_cycles_as_generate(config, lead, k, n, kind, seed):
    """`timing` builds no weight and no DRAM image: the cycles, host ops, calls and bytes are
    those of the sections `generate` builds, on configs whose small program memories cut layers
    into many sections: from the layers generate built, timed afresh (sections alike scheduled
    once, the programs a chain needs built then), and from timings before."""
    rng = np.random.default_rng(seed)
    if kind in ("softmax", "gelu"):  # products of two values, on a config with room for the scores
        config = dataclasses.replace(config, obuf_depth=256, pbuf_depth=256)
        graph, _ = attention_graph(rng, lead[:1], min(k, 12), n, min(n, 12), kind == "softmax", kind == "gelu")
    elif kind == "binary":
        graph, _ = binary_linear(rng, lead, k, n)
    elif kind == "dense":
        graph, _ = linear_graph(rng, lead, k, n)
    else:
        structure = Hierarchical(2, 4, 2) if kind == "hp" else Blocks(2, 4)
        weight = hp_weight(rng, n, k, 2, 4, 2 if kind == "hp" else 4, 0.5)
        graph = structured(sparse_linear(rng, lead, k, n, weight)[0], "w", structure)
    BUILT.clear()
    program = generate(graph, config)
    for fresh in (False, True, False):  # the layers as generate built them; timed afresh; timed before
        if fresh:
            BUILT.clear()
            TIMINGS.clear()
        run = timing(graph, config)
        assert run.cycles == sum(s.cycles for s in program.sections)
        assert (run.host_ops, run.calls, run.link_bytes) == (program.host_ops, len(program.calls()),
                                                             program.link_bytes())


@pytest.mark.parametrize("pipeline", ["quantize,int-nonlinear", "hp-prune{sparsity=0.75,block=8x8},quantize"])
def test_a_layer_alike_one_built_before_takes_its_sections(monkeypatch, pipeline):
    """The encoder's second layer, alike the first (shapes, plan, tiling, reads), takes the
    first one's sections with their DRAM addresses moved to its own tensors: the program is the
    one building every layer gives, instruction for instruction."""
    import torch
    from tcc.backends.accel.codegen import layer
    from tcc.zoo import DigitsTransformer
    torch.manual_seed(0)
    graph = tcc.compile(DigitsTransformer().eval(), (torch.rand(8, 8, 8),), pipeline=pipeline).graph
    config = AccelConfig(rows=8, cols=8)
    built = []
    original = layer._build
    monkeypatch.setattr(layer, "_build", lambda *args: built.append(1) or original(*args))
    BUILT.clear()
    reusing = generate(graph, config)
    reused = len(built)

    class Empty(dict):
        def __contains__(self, key):
            return False

    monkeypatch.setattr(layer, "BUILT", Empty())
    built.clear()
    assert generate(graph, config).to_files() == reusing.to_files() and reused < len(built)


@pytest.mark.parametrize("pipeline", ["quantize", "hp-prune{sparsity=0.75,block=8x8},quantize,int-nonlinear"])
def test_timing_is_generates_without_building_it(pipeline):
    """The cost model's fast path: the cycles and host ops `generate` gives, with sections of a
    layer signature seen before (the encoder's second layer) reusing the first one's timings."""
    import torch
    from tcc.zoo import DigitsTransformer
    torch.manual_seed(0)
    graph = tcc.compile(DigitsTransformer().eval(), (torch.rand(8, 8, 8),), pipeline=pipeline).graph
    config = AccelConfig(rows=8, cols=8)
    program = generate(graph, config)
    BUILT.clear()
    TIMINGS.clear()
    run = timing(graph, config)
    assert run.cycles == sum(s.cycles for s in program.sections) > 0 and run.host_ops == program.host_ops
    # the timing's sections carry their data and calls: layers that chain on chip share a call
    # (the fully integer encoder's norm -> linear and linear -> linear)
    layers = len({s.ops for s in program.sections})
    assert 0 < run.calls == len(program.calls()) <= layers
    assert (run.calls < layers) == ("int-nonlinear" in pipeline)
    assert run.link_bytes == program.link_bytes() > 0
    linears = sum(op.kind == "linear" for op in graph.ops)
    # the two layers' linears that read alike share signatures (the first QKV projection's
    # activations come from the host, the second's from the layer norm on chip)
    assert 0 < sum(key[1] == "linear" for key in TIMINGS) < linears - 2


# ---------------------------------------------------------------------------------------------
# layout ops as addressing: operands read in place

def _found(shape: tuple[int, ...], layout: Layout, index: np.ndarray):
    source = DramTensor(("y",), layout, shape, Region(0, dram_words(layout, shape, ROOMY)))
    return source, index, ()


def test_a_head_of_a_projection_is_read_from_the_tiles_holding_it():
    """Q's heads ([3, 8, 6] of a [8, 18] projection, heads not whole 4-lane tiles): per head,
    the tiles its channels touch, the gemm starting `shift` words into the slot."""
    from tcc.backends.accel.codegen.addressing import Piece, activations
    index = np.arange(8 * 18).reshape(8, 3, 6).transpose(1, 0, 2)  # the head split
    place = activations(_found((8, 18), Layout.OUTPUTS, index), 3, 8, 6, 1, ROOMY)
    assert place.shifts == (0, 0, 2, 2, 0, 0) and place.row_blocks == 2
    assert place.pieces[2] == (Piece(0, 0, 1, 2, 0, 1),) and place.pieces[5] == (Piece(0, 0, 3, 2, 4, 1),)
    assert place.words == 8
    assert activations(_found((8, 18), Layout.OUTPUTS, index), 3, 8, 6, 4, ROOMY) is None  # an HP window's alignment


def test_a_batch_of_a_sequence_first_output_is_read_rows_apart():
    """A sequence-first [S*B, N] output read per batch ([B, S, N]): a row block's rows are every
    B-th source row, tload's step; a row block mixing two batches is refused."""
    from tcc.backends.accel.codegen.addressing import Piece, activations
    index = np.arange(8 * 2 * 4).reshape(8, 2, 4).transpose(1, 0, 2)
    place = activations(_found((16, 4), Layout.OUTPUTS, index), 2, 8, 4, 1, ROOMY)
    assert place.pieces[1] == (Piece(0, 0, 0, 1, 8, 2),) and place.pieces[3] == (Piece(0, 0, 0, 1, 9, 2),)
    mixed = index.transpose(1, 0, 2).reshape(16, 4)  # back to [S*B, N] as rows of one product: fine, step 1
    assert activations(_found((16, 4), Layout.OUTPUTS, mixed), 1, 16, 4, 1, ROOMY).pieces[0][0].step == 1
    interleaved = np.arange(16 * 4).reshape(2, 8, 4).transpose(1, 0, 2).reshape(16, 4)  # rows from two tensors' halves
    assert activations(_found((2, 8, 4), Layout.OUTPUTS, interleaved), 1, 16, 4, 1, ROOMY) is None


def test_merged_heads_are_read_a_tload_per_head_each_over_the_last_ones_tail():
    from tcc.backends.accel.codegen.addressing import Piece, activations
    index = np.arange(3 * 8 * 6).reshape(3, 8, 6).transpose(1, 0, 2).reshape(8, 18)  # the head merge
    place = activations(_found((3, 8, 6), Layout.OUTPUTS, index), 1, 8, 18, 1, ROOMY)
    assert place.pieces[0] == (Piece(0, 0, 0, 2, 0, 1), Piece(6, 1, 0, 2, 0, 1), Piece(12, 2, 0, 2, 0, 1))
    assert place.shifts == (0, 0) and place.words == 20
    shuffled = index[:, ::-1].copy()  # channels reversed: no run of consecutive source channels
    assert activations(_found((3, 8, 6), Layout.OUTPUTS, shuffled), 1, 8, 18, 1, ROOMY) is None
    rows_swapped = index[::-1].copy()  # row i is not the source's row i
    assert activations(_found((3, 8, 6), Layout.OUTPUTS, rows_swapped), 1, 8, 18, 1, ROOMY) is None


def test_attention_heads_stay_on_chip_and_layers_share_calls():
    """torch's encoder layer, heads not whole tiles (6 channels on a 4x4 array): Q's and K's
    heads, the head merge and the residual's transpose back become the sections' addressing
    (tloads and loads in place); V's heads stay the host's (its lanes would have to move), and
    so do the reshapes it shares with Q and K. Bit for bit the numpy reference."""
    import torch
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(24, 4, 32, batch_first=True, dropout=0.0).eval()
    x = torch.randn(1, 8, 24)
    graph = tcc.compile(layer, (x,), pipeline="quantize,int-nonlinear").graph
    program = generate(graph, ROOMY)
    kinds = {op.result: op.kind for op in graph.ops}
    addressing = Counter(kinds[r] for s in program.sections for r in set(s.ops) if kinds[r] in LAYOUT_OPS)
    assert addressing["select"] == 2 and addressing["permute"] == 1 and addressing["transpose"] >= 4
    host = {h.result for h in program.host_ops}
    assert not host & {r for s in program.sections for r in s.ops}
    shared = [op for op in graph.ops if op.kind == "squeeze"]  # the in-projection's q, k, v split, read by V too
    assert shared and all(op.result in host for op in shared)
    accel = check_bit_exact(graph, program, x.numpy())
    assert accel.stats.instructions["tload"] > 0 and accel.stats.calls == len(program.calls()) < 4


def _requantized_linear(b: GraphBuilder, x: str, rng, k: int, n: int, name: str) -> str:
    """linear (random i8 weight) -> requantize to i8, constants named after `name`."""
    w = b.constant(f"{name}.w", rng.integers(-40, 41, (n, k)), DType.I8)
    mult = b.constant(f"{name}.mult", np.asarray(1 << 30), DType.I32)
    shift = b.constant(f"{name}.shift", np.asarray(36), DType.I32)
    return b.op("requantize", b.op("linear", x, w), mult, shift, dtype=DType.I8, scale=1.0)


@SETTINGS
@given(m=st.sampled_from([3, 4, 8]), a=st.integers(1, 6), c=st.integers(1, 6),
       perm=st.permutations([0, 1, 2]), seed=st.integers(0, 2 ** 16))
def test_any_layout_between_two_layers_runs_bit_exact(m, a, c, perm, seed):
    """Two linears with a reshape and a permute between them: whatever the permute, the second
    reads the first's output in place where tloads can, else the host re-lays it out; either
    way every value equals the numpy reference, and the layout ops are the sections' own only
    when the second reads in place."""
    rng = np.random.default_rng(seed)
    b = GraphBuilder("g")
    x = b.input("x", TensorType((m, 8), DType.I8))
    y = _requantized_linear(b, x, rng, 8, a * c, "first")
    shape = [(m, a, c)[p] for p in perm]
    moved = b.op("permute", b.op("reshape", y, shape=[m, a, c]), dims=list(perm))
    z = _requantized_linear(b, moved, rng, shape[-1], 5, "second")
    graph = verify(b.finish([z]))
    program = generate(graph, ROOMY)
    second = program.sections[-1]
    assert (moved in second.ops) == bool(second.resident)
    check_bit_exact(graph, program, rng.integers(-128, 128, (m, 8)).astype(np.int8))
