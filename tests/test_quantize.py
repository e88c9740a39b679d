"""Integer quantization: the `quantize`, `dequantize`, `requantize` and integer `linear` ops
(hand-computed golden values; the numpy reference and the torch executor bit for bit on
integers, floats within the tiers' tolerance; an exact rational model of requantize) and the
`quantize` pass (accuracy, structure, idempotence, executors agreeing on every integer value,
options)."""

from __future__ import annotations

import dataclasses

from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tcc
from tcc.ir import (DType, GraphBuilder, PerChannel, PerTensor, REFERENCE, TccError, TensorType, VerifyError,
                    parse_graph, print_graph, tensor, verify)
from tcc.passes import Dataset, OptionError, PassContext
from tcc.passes.pipeline import PipelineError, parse_pipeline
from tcc.passes.calibrate import Observer
from tcc.passes.quantize import Quantize, fixed_point
from tcc.runtime.numpy_executor import NumpyExecutor
from tcc.runtime.torch_executor import TorchExecutor

from conftest import assert_tiers_agree, built, has_cuda

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------
# ops: golden values, checked on both executors

def _executors(graph, *inputs) -> list[np.ndarray]:
    """Run `graph` on the numpy reference and the torch executor; assert they agree: integer
    values bit for bit, float ones within the tiers' tolerance (two executors)."""
    want = NumpyExecutor(graph)(*inputs)
    got = TorchExecutor(graph).run([torch.from_numpy(np.array(x, copy=True)) for x in inputs])
    assert len(got) == len(want) == len(graph.outputs)
    for w, g, t, name in zip(want, got, graph.output_types, graph.outputs):
        assert w.dtype == t.dtype.numpy and g.numpy().dtype == w.dtype
        assert_tiers_agree(g.numpy(), w, name)
    return want


def _with_integer_values(graph):
    """`graph` with every integer value its ops compute added to its outputs, so that a float
    (dequantized) output does not hide them: they are compared bit for bit."""
    ints = tuple(op.result for op in graph.ops if not op.type.dtype.is_float and op.result not in graph.outputs)
    assert ints
    return graph.replace(outputs=graph.outputs + ints)


def one_op(kind: str, *operands: tuple[np.ndarray, DType], **attrs) -> np.ndarray:
    """`kind` applied to graph inputs holding `operands` (array, dtype); the result, checked on both executors."""
    b = GraphBuilder("g")
    names = [b.input(f"x{i}", TensorType(np.shape(a), dt)) for i, (a, dt) in enumerate(operands)]
    graph = verify(b.finish([b.op(kind, *names, **attrs)]))
    return _executors(graph, *(np.asarray(a, dt.numpy) for a, dt in operands))[0]


def f32(*values) -> tuple[np.ndarray, DType]:
    return np.array(values, np.float32), DType.F32


def ints(values, dtype: DType) -> tuple[np.ndarray, DType]:
    return np.array(values, dtype.numpy), dtype


@pytest.mark.parametrize("x, attrs, expected", [
    # exact halves round to even
    (f32(-1.25, -0.75, -0.25, 0.25, 0.75, 1.25), dict(dtype=DType.I8, scale=0.5), [-2, -2, 0, 0, 2, 2]),
    # the division is float32: f32(0.35) / f32(0.1) is exactly 3.5 (float64 would give 3.4999999)
    (f32(0.35, 0.85), dict(dtype=DType.I8, scale=0.1), [4, 8]),
    (f32(1e4, -1e4, 63.4, -64.6), dict(dtype=DType.I8, scale=0.5), [127, -128, 127, -128]),
    (f32(0.0, 0.5, -0.5, 63.0), dict(dtype=DType.I8, scale=0.5, zero_point=-3), [-3, -2, -4, 123]),
    (f32(3.4, 7.6, -8.4, -9.0, 100.0), dict(dtype=DType.I4, scale=1.0), [3, 7, -8, -8, 7]),
    (f32(1e6, -1e6, 1234.5), dict(dtype=DType.I16, scale=1.0, zero_point=1), [32767, -32768, 1235]),
    (f32(-0.0, 0.0, 1e-30, -1e-30, -3.0, 2.0), dict(dtype=DType.B1, scale=1.0), [1, 1, 1, -1, -1, 1]),
])
def test_quantize_golden(x, attrs, expected):
    out = one_op("quantize", x, **attrs)
    np.testing.assert_array_equal(out, np.array(expected, attrs["dtype"].numpy))


def test_quantize_f16_clips_exactly():
    # 32767, the top of i16, is no f16 value: clipping happens after rint, in exact arithmetic
    out = one_op("quantize", (np.array([2.5, 6e4, -6e4], np.float16), DType.F16), dtype=DType.I16, scale=1.0,
                 zero_point=-1)
    np.testing.assert_array_equal(out, np.array([1, 32767, -32768], np.int16))


def test_quantize_result_type_carries_scale_and_zero_point():
    b = GraphBuilder("g")
    q = b.op("quantize", b.input("x", tensor((2, 3))), dtype=DType.I8, scale=0.1 + 0.2, zero_point=-5)
    assert b.type_of(q) == TensorType((2, 3), DType.I8, quant=PerTensor(0.1 + 0.2, -5))


def test_dequantize_golden():
    np.testing.assert_array_equal(one_op("dequantize", ints([-128, 0, 127], DType.I8), (np.float32(0.5), DType.F32)),
                                  np.array([-64.0, 0.0, 63.5], np.float32))
    np.testing.assert_array_equal(one_op("dequantize", ints([3, 5], DType.I8), (np.float32(0.5), DType.F32),
                                         zero_point=3), np.array([0.0, 1.0], np.float32))
    per_channel = one_op("dequantize", ints([[1, 2], [3, 4]], DType.I32), f32(0.5, 2.0))
    np.testing.assert_array_equal(per_channel, np.array([[0.5, 4.0], [1.5, 8.0]], np.float32))
    half = one_op("dequantize", ints([1, -1], DType.B1), (np.float16(0.25), DType.F16))
    assert half.dtype == np.float16 and list(half) == [0.25, -0.25]


@pytest.mark.parametrize("acc, mult, shift, attrs, expected", [
    # x / 2 rounded half up: 2.5 -> 3, -2.5 -> -2, -1.5 -> -1, -3.5 -> -3
    (ints([5, -5, 3, -3, 7, -7, 4, -4], DType.I32), 1, 1, dict(dtype=DType.I8), [3, -2, 2, -1, 4, -3, 2, -2]),
    # 2^30 / 2^31 = 1/2: 7 * 1/2 = 3.5 -> 4, -7 * 1/2 = -3.5 -> -3
    (ints([7, -7, 8, -9], DType.I32), 1 << 30, 31, dict(dtype=DType.I8), [4, -3, 4, -4]),
    (ints([3, -4, 100], DType.I32), 5, 0, dict(dtype=DType.I8), [15, -20, 127]),  # shift 0: no rounding
    (ints([10, 11, -1000], DType.I32), 1, 1, dict(dtype=DType.I8, zero_point=-3), [2, 3, -128]),
    (ints([(1 << 31) - 1, -(1 << 31)], DType.I32), (1 << 31) - 1, 62, dict(dtype=DType.I8), [1, -1]),
    (ints([(1 << 40) + (1 << 19), -(1 << 40) - (1 << 19)], DType.I64), 1, 20, dict(dtype=DType.I32),
     [(1 << 20) + 1, -(1 << 20)]),
    (ints([100, 100], DType.I32), 3, 2, dict(dtype=DType.I4), [7, 7]),
])
def test_requantize_golden(acc, mult, shift, attrs, expected):
    out = one_op("requantize", acc, (np.int32(mult), DType.I32), (np.int32(shift), DType.I32), scale=1.0, **attrs)
    np.testing.assert_array_equal(out, np.array(expected, attrs["dtype"].numpy))


def test_requantize_per_channel():
    acc = ints([[8, 8, 8], [-9, -9, -9]], DType.I32)
    out = one_op("requantize", acc, ints([1, 3, 1 << 30], DType.I32), ints([2, 1, 31], DType.I32), dtype=DType.I8,
                 scale=0.1)
    np.testing.assert_array_equal(out, np.array([[2, 12, 4], [-2, -13, -4]], np.int8))  # -2.25, -13.5, -4.5


def test_requantize_rejects_shifts_outside_0_62():
    with pytest.raises(ValueError, match=r"shift must lie in \[0, 62\]"):
        REFERENCE["requantize"](np.int32([1]), np.int32(1), np.int32(63), dtype=DType.I8, scale=1.0, zero_point=0)


@pytest.mark.parametrize("x, w, bias, result_dtype, expected", [
    (ints([[1, 2, 3]], DType.I8), ints([[1, 0, -1], [127, 127, 127]], DType.I8), ints([10, -5], DType.I32),
     DType.I32, [[8, 757]]),
    (ints([[-128] * 3072], DType.I8), ints([[-128] * 3072, [127] * 3072], DType.I8), None, DType.I32,
     [[3072 * 16384, -3072 * 128 * 127]]),
    (ints([[3, -2, 5]], DType.I8), ints([[1, -1, 1], [-1, -1, -1]], DType.B1), None, DType.I32, [[10, -6]]),
    (ints([[-8, 7]], DType.I4), ints([[7, -8]], DType.I4), ints([1], DType.I32), DType.I32, [[-111]]),
    (ints([[32767] * 4], DType.I16), ints([[32767] * 4, [-32768] * 4], DType.I16), ints([1 << 40, 0], DType.I64),
     DType.I64, [[4 * 32767 ** 2 + (1 << 40), -4 * 32767 * 32768]]),
    (ints([[100, -100]], DType.I8), ints([[-32768, 32767]], DType.I16), None, DType.I64, [[-6553500]]),
])
def test_integer_linear_golden(x, w, bias, result_dtype, expected):
    out = one_op("linear", x, w, *([bias] if bias is not None else []))
    assert out.dtype == result_dtype.numpy
    np.testing.assert_array_equal(out, np.array(expected, result_dtype.numpy))


@pytest.mark.parametrize("build, message", [
    (lambda b, x, i: b.op("quantize", i, dtype=DType.I8, scale=1.0), "input must be a float tensor"),
    (lambda b, x, i: b.op("quantize", x, dtype=DType.I32, scale=1.0), "dtype must be one of i4, i8, i16, b1"),
    (lambda b, x, i: b.op("quantize", x, dtype=DType.I8, scale=0.0), "scale must be positive"),
    (lambda b, x, i: b.op("quantize", x, dtype=DType.B1, scale=1.0, zero_point=1), "zero_point 1 is outside"),
    (lambda b, x, i: b.op("quantize", x, dtype=DType.I8, scale=1.0, zero_point=128), "zero_point 128 is outside"),
    (lambda b, x, i: b.op("dequantize", i, b.constant("s", np.ones(2, np.float32))), "scale shape [2] is neither"),
    (lambda b, x, i: b.op("dequantize", x, b.constant("s", np.float32(1))), "input must be an integer tensor"),
    (lambda b, x, i: b.op("requantize", i, b.constant("m", np.int32(1)), b.constant("s", np.int32(1)),
                          dtype=DType.I8, scale=1.0), "input must be an i32 or i64 accumulator"),
    (lambda b, x, i: b.op("requantize", b.op("linear", i, b.constant("w", np.ones((4, 3), np.int8))),
                          b.constant("m", np.int64(1)), b.constant("s", np.int32(1)), dtype=DType.I8, scale=1.0),
     "multiplier must be i32"),
    (lambda b, x, i: b.op("linear", i, b.constant("w", np.ones((4, 3), np.float32))),
     "integer linear takes an i4, i8, i16 or b1 weight"),
    (lambda b, x, i: b.op("linear", i, b.constant("w", np.ones((4, 3), np.int8)), b.constant("b", np.ones(4))),
     "bias must be i32"),
    (lambda b, x, i: b.op("linear", x, b.constant("w", np.ones((4, 3), np.int8))), "operand dtypes differ"),
])
def test_type_rules_reject(build, message):
    b = GraphBuilder("g")
    x, i = b.input("x", tensor((2, 3))), b.input("i", tensor((2, 3), DType.I8))
    with pytest.raises(VerifyError) as e:
        build(b, x, i)
    assert message in str(e.value)


# ---------------------------------------------------------------------------------------------
# ops: properties

_OPERAND_DTYPES = [(DType.I8, DType.I8), (DType.I8, DType.B1), (DType.I4, DType.I4), (DType.I16, DType.I8),
                   (DType.I8, DType.I16)]


def _ints(rng: np.random.Generator, shape, dtype: DType, extreme: bool) -> np.ndarray:
    if dtype is DType.B1:
        return np.where(rng.random(shape) < 0.5, 1, -1).astype(np.int8)
    lo, hi = dtype.value_range
    if extreme:  # all at the ends of the range: the largest sums
        return rng.choice(np.array([lo, hi]), size=shape).astype(dtype.numpy)
    return rng.integers(lo, hi + 1, size=shape).astype(dtype.numpy)


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), m=st.integers(1, 4), n=st.integers(1, 8),
       k=st.one_of(st.integers(1, 64), st.sampled_from([768, 3072])), dtypes=st.sampled_from(_OPERAND_DTYPES),
       per_channel=st.booleans(), extreme=st.booleans(), bias=st.booleans())
def test_integer_linear_and_requantize_bit_exact_on_both_executors(seed, m, n, k, dtypes, per_channel, extreme, bias):
    rng = np.random.default_rng(seed)
    xdt, wdt = dtypes
    b = GraphBuilder("g")
    x = b.input("x", tensor((m, k), xdt))
    w = b.constant("w", _ints(rng, (n, k), wdt, extreme), wdt)
    acc_dtype = DType.I64 if DType.I16 in dtypes else DType.I32
    operands = [x, w] + ([b.constant("b", rng.integers(-(1 << 20), 1 << 20, n), acc_dtype)] if bias else [])
    acc = b.op("linear", *operands)
    assert b.type_of(acc).dtype is acc_dtype
    channels = (n,) if per_channel else ()
    bound = k * 2 ** (xdt.bits + wdt.bits - 2) + (1 << 20)  # keep |acc * multiplier| <= 2^62
    mult_bits = min(31, 62 - bound.bit_length())
    mult = b.constant("m", rng.integers(0, 1 << mult_bits, channels), DType.I32)
    shift = b.constant("s", rng.integers(0, 63, channels), DType.I32)
    y = b.op("requantize", acc, mult, shift, dtype=DType.I8, scale=0.1)
    graph = verify(b.finish([acc, y]))
    _executors(graph, _ints(rng, (m, k), xdt, extreme))


@SETTINGS
@given(data=st.data(), wide=st.booleans(), dtype=st.sampled_from([DType.I4, DType.I8, DType.I16, DType.I32]),
       zero_point=st.integers(-8, 7))
def test_requantize_matches_exact_rational_rounding(data, wide, dtype, zero_point):
    """round-half-up(acc * m / 2^shift) = floor(acc * m / 2^shift + 1/2), in Python integers."""
    mult = data.draw(st.integers(0, (1 << 31) - 1))
    limit = (1 << 62) // max(mult, 1) if wide else 1 << 31
    accs = data.draw(st.lists(st.integers(-limit, min(limit, (1 << 63) - 1) - 1), min_size=1, max_size=16))
    shift = data.draw(st.integers(0, 62))
    lo, hi = dtype.value_range
    expected = [min(hi, max(lo, (Fraction(a * mult, 1 << shift) + Fraction(1, 2)).__floor__() + zero_point))
                for a in accs]
    acc = ints(accs, DType.I64 if wide else DType.I32)
    out = one_op("requantize", acc, (np.int32(mult), DType.I32), (np.int32(shift), DType.I32), dtype=dtype,
                 scale=1.0, zero_point=zero_point)
    assert out.tolist() == expected


@SETTINGS
@given(m=st.floats(1e-15, 1e12), bits=st.integers(16, 31))
def test_fixed_point_multipliers(m, bits):
    mult, shift = fixed_point(np.array([m]), bits)
    mult, shift = int(mult[0]), int(shift[0])
    assert 0 <= shift <= 62 and 0 <= mult < 2 ** bits
    if 0 < shift < 62:
        assert 2 ** (bits - 1) <= mult and abs(mult / 2.0 ** shift - m) <= m * 2.0 ** -(bits - 1)


# ---------------------------------------------------------------------------------------------
# the pass

def _calib(graph, n: int = 32, seed: int = 1) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    shape = graph.inputs[0][1].shape[1:]
    return Dataset((torch.randn((n,) + shape, generator=generator),), None, "calib")


def _ctx(graph, **data) -> PassContext:
    return PassContext(torch_module=TorchExecutor, data=data or {"calib": _calib(graph)})


@pytest.fixture(scope="module")
def encoder():
    """The zoo's nn.TransformerEncoder classifier as IR (10 linears)."""
    model, inputs = built("transformer-encoder")
    return tcc.compile(model, inputs).graph


@pytest.fixture(scope="module")
def mlp():
    """linear -> linear -> relu -> linear: chained linears and an exact activation in between."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 24), torch.nn.ReLU(),
                                torch.nn.Linear(24, 8)).eval()
    return tcc.compile(model, (torch.randn(4, 16),)).graph


def _relative_error(quantized, graph, n_batches: int = 4) -> float:
    """Max |quantized - float| over the float output's range, on fresh inputs (not the calibration set)."""
    data = _calib(graph, 4 * n_batches, seed=7)
    worst = 0.0
    for batch in data.batches(graph.inputs[0][1].shape[0]):
        x = batch.inputs[0].numpy()
        want, got = NumpyExecutor(graph)(x)[0], NumpyExecutor(quantized)(x)[0]
        worst = max(worst, float(np.abs(got - want).max() / (want.max() - want.min())))
    return worst


@pytest.mark.parametrize("bits, tolerance", [(8, 0.05), (4, 0.10), (16, 0.05)])
def test_quantized_encoder_is_close_to_float(encoder, bits, tolerance):
    q = Quantize(bits=bits)(encoder, _ctx(encoder))
    assert _relative_error(q, encoder) < tolerance
    linears = [op for op in q.ops if op.kind == "linear"]
    assert len(linears) == 10
    types = q.types
    for op in linears:
        x, w = types[op.operands[0]], types[op.operands[1]]
        assert x.dtype is DType.I8 and w.dtype is {4: DType.I4, 8: DType.I8, 16: DType.I16}[bits]
        assert isinstance(w.quant, PerChannel) and w.quant.axis == 0 and len(w.quant.scales) == w.shape[0]
        assert op.type.dtype is (DType.I64 if bits == 16 else DType.I32)
    assert not {op.operands[1] for op in encoder.ops if op.kind == "linear"} & set(q.constant_names)  # dce'd
    assert q.outputs == encoder.outputs and q.output_types == encoder.output_types


def test_pass_is_idempotent_and_round_trips(encoder):
    ctx = _ctx(encoder)
    once = Quantize()(encoder, ctx)
    assert not Quantize().run(once, ctx).changed
    assert Quantize()(once, ctx).same_as(once)
    assert parse_graph(print_graph(once), once.weights).same_as(once)
    assert "calibrated on calib (32 examples, minmax)" in ctx.log[0]


def test_encoder_integer_ops_bit_exact_on_both_executors(encoder):
    """Every integer value of the quantized encoder, as the torch executor computes it, equals the
    reference applied to the torch executor's operands (float ops between need not be bit exact)."""
    q = Quantize()(encoder, _ctx(encoder))
    integer_ops = [op for op in q.ops if op.type.dtype.is_int and op.kind in ("quantize", "linear", "requantize")]
    assert len(integer_ops) >= 25
    probed = (o for op in integer_ops for o in (*op.operands, op.result) if o not in q.constant_names)
    probe = q.replace(outputs=tuple(dict.fromkeys(probed)))
    x = _calib(encoder, 4, seed=3).inputs[0]
    values = dict(zip(probe.outputs, (v.numpy() for v in TorchExecutor(probe).run([x]))))
    values.update(q.weights)
    for op in integer_ops:
        want = REFERENCE[op.kind](*(values[o] for o in op.operands), **op.attr_dict)
        np.testing.assert_array_equal(values[op.result], np.asarray(want).astype(op.type.dtype.numpy), op.result)


@pytest.mark.parametrize("options, tolerance", [({}, 0.05), ({"bits": 4}, 0.15),
                                                ({"bits": 16, "activation_bits": 16}, 0.01), ({"activation_bits": 4}, 0.25)])
def test_quantized_mlp_bit_exact_on_both_executors(mlp, options, tolerance):
    q = Quantize(**options)(mlp, _ctx(mlp))
    kinds = [op.kind for op in q.ops]
    # the two chained linears share one integer value: no dequantize -> quantize between them
    assert kinds.count("quantize") == 2 and kinds.count("dequantize") == 2 and kinds.count("linear") == 3
    x = _calib(mlp, 4, seed=5).inputs[0].numpy()
    _executors(_with_integer_values(q), x)
    assert _relative_error(q, mlp) < tolerance


def test_wide_accumulators_cannot_overflow_requantize():
    """i16 x i16 over K = 3072 reaches |acc| ~ 2^41.6: the pass narrows the multiplier so that
    acc * multiplier stays within int64 and the output is still right."""
    rng = np.random.default_rng(0)
    w = np.where(rng.random((2, 3072)) < 0.5, 1.0, -1.0).astype(np.float32)  # every row at full scale
    b = GraphBuilder("wide")
    x = b.input("x", tensor((1, 3072)))
    graph = verify(b.finish([b.op("linear", x, b.constant("fc.weight", w))]))
    inputs = torch.from_numpy(np.stack([w[0], -w[1]]))  # acc = +-3072 * 32767^2 in channels 0 and 1
    q = Quantize(bits=16, activation_bits=16)(graph, _ctx(graph, calib=Dataset((inputs,), None, "calib")))
    mult = q.weights["fc.multiplier"]
    assert int(mult.max()) * 3072 * 2 ** 30 <= 2 ** 62 and mult.min() >= 2 ** 18
    for row in inputs.numpy():
        want = NumpyExecutor(graph)(row[None])[0]
        got = _executors(q, row[None])[0]
        np.testing.assert_allclose(got, want, rtol=1e-3)


def test_printed_ir_of_one_linear(mlp):
    text = print_graph(Quantize(layers="^v0")(mlp, _ctx(mlp)))
    for line in ("%input.q = quantize(%input) {dtype = i8, scale = ",
                 "%linear.acc = linear(%input.q, @v0.weight_q, @v0.bias_q) : i32[4,32]",
                 "%linear.q = requantize(%linear.acc, @v0.multiplier, @v0.shift) {dtype = i8, scale = ",
                 "%linear = dequantize(%linear.q, @v0.output_scale) : f32[4,32]",
                 "%linear_1 = linear(%linear, @v1.weight, @v1.bias) : f32[4,24]"):
        assert line in text, text


def test_layers_regex_selects_linears_and_later_runs_chain_to_them(mlp):
    ctx = _ctx(mlp)
    partial = Quantize(layers=r"^v0\.")(mlp, ctx)
    assert {op.operands[1] for op in partial.ops if op.kind == "linear"} == {"v0.weight_q", "v1.weight", "v3.weight"}
    full = Quantize()(partial, ctx)
    assert all(not full.types[op.operands[1]].dtype.is_float for op in full.ops if op.kind == "linear")
    assert sum(op.kind == "quantize" for op in full.ops) == 2  # v1 reads v0's integer output
    _executors(_with_integer_values(full), _calib(mlp, 4, seed=5).inputs[0].numpy())


def test_a_linear_before_a_relu_takes_the_relus_range():
    """A linear whose outputs are mostly negative, then a relu, then another linear: the first
    linear is requantized at the relu's range (what the second one quantizes its input to, so the
    integers flow through unchanged), not its own wider one."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    with torch.no_grad():
        model[0].bias.fill_(-1.0)
    x = torch.randn(32, 8)
    graph = tcc.compile(model, (x,), pipeline="quantize").graph
    requantized = next(op for op in graph.ops if op.kind == "requantize").attr("scale")
    quantized = [op for op in graph.ops if op.kind == "quantize"][1].attr("scale")
    with torch.no_grad():
        h = model[0](x)
    assert requantized == quantized == pytest.approx(h.relu().max().item() / 127, rel=1e-5)  # eager vs executor
    assert requantized < h.abs().max().item() / 127


def test_percentile_calibration_clips_outliers(mlp):
    scales = {}
    for calibration in ("minmax", "percentile"):
        q = Quantize(calibration=calibration, percentile=90.0)(mlp, _ctx(mlp))
        scales[calibration] = [op.attr("scale") for op in q.ops if op.kind in ("quantize", "requantize")]
    assert all(p < m for p, m in zip(scales["percentile"], scales["minmax"]))


def test_observer_counts_only_valid_rows():
    observer = Observer(batch=4, keep=True)
    observer.valid = 2
    value = torch.tensor([[1.0, -2.0], [0.5, 0.0], [100.0, 0.0], [-100.0, 0.0]])
    assert observer(value) is value
    observer(value.reshape(4, 1, 2).expand(4, 3, 2).reshape(12, 2))  # batch-major [B*S, H]
    assert observer.amax == 2.0 and sum(v.size for v in observer.values) == 4 + 12


def test_calibration_falls_back_to_training_then_example_data(mlp):
    for key in ("train", "example"):
        ctx = _ctx(mlp, **{key: dataclasses.replace(_calib(mlp, 8), source=key)})
        Quantize()(mlp, ctx)
        assert f"calibrated on {key} (8 examples, minmax)" in ctx.log[0]
    with pytest.raises(TccError, match="quantize needs calibration data: give --calib-data or --train-data"):
        Quantize()(mlp, PassContext(torch_module=TorchExecutor))


@pytest.mark.parametrize("options, option", [
    ({"bits": 3}, "bits"), ({"bits": 32}, "bits"), ({"activation_bits": 2}, "activation_bits"),
    ({"percentile": 0.0}, "percentile"), ({"percentile": 100.5}, "percentile"), ({"layers": "(fc"}, "layers"),
])
def test_bad_options_name_the_option(options, option):
    with pytest.raises(OptionError) as e:
        Quantize(**options)
    assert e.value.option == option and f"option '{option}'" in str(e.value)


def test_pipeline_text_reads_the_options():
    registry = {"quantize": Quantize}
    (q,) = parse_pipeline("quantize{bits=4,calibration=percentile,percentile=99.9,layers=fc}", registry)
    assert (q.bits, q.calibration, q.percentile, q.layers) == (4, "percentile", 99.9, "fc")
    with pytest.raises(PipelineError, match="option 'calibration'"):
        parse_pipeline("quantize{calibration=max}", registry)
    with pytest.raises(PipelineError, match="option 'bits' must be 4, 8 or 16, got 5"):
        parse_pipeline("quantize{bits=5}", registry)


@pytest.mark.gpu
@pytest.mark.skipif(not has_cuda(), reason="no CUDA device")
def test_quantized_mlp_bit_exact_on_cuda(mlp):
    q = _with_integer_values(Quantize()(mlp, _ctx(mlp)))
    x = _calib(mlp, 4, seed=5).inputs[0]
    want = NumpyExecutor(q)(x.numpy())
    got = TorchExecutor(q, "cuda").run([x])
    assert len(got) == len(want) == len(q.outputs)
    for g, w, name in zip(got, want, q.outputs):  # integers bit for bit, the dequantized output within the tiers
        assert_tiers_agree(g.cpu().numpy(), w, name)


def test_binarized_accumulators_are_requantized_to_integers():
    """After binarize, quantize puts a requantize (alpha * s_x folded into the per-channel
    multiplier) between each b1 linear's accumulator and its dequantize, so the accelerator
    can run those layers; the outputs move by at most a few output steps; idempotent."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(32, 2, 64, batch_first=True, dropout=0.0).eval()
    x = torch.randn(1, 8, 32)
    binary = tcc.compile(layer, (x,), pipeline="binarize{mode=w1a8}").graph
    artifact = tcc.compile(layer, (x,), pipeline="binarize{mode=w1a8},quantize,quantize")
    graph = artifact.graph
    types, users = graph.types, graph.users()
    b1 = [op for op in graph.ops if op.kind == "linear" and types[op.operands[1]].dtype is DType.B1]
    # all four: the attention in_proj read straight from the input is no input projection
    assert len(b1) == 4 and all([u.kind for u in users[op.result]] == ["requantize"] for op in b1)
    assert all(types[users[op.result][0].result].dtype is DType.I8 for op in b1)
    assert artifact.manifest["pass_log"][2].startswith("quantize: no change")
    # the FFN's first layer requantizes straight to the step of the binarized layer after its
    # relu (that layer's input quantizer): the relu's integers feed it as they are, with no
    # second requantize between them
    integer = tcc.compile(layer, (x,), pipeline="binarize{mode=w1a8},quantize,int-nonlinear").graph
    producer, consumers = integer.producer(), integer.users()
    relu = next(op for op in integer.ops if op.kind == "relu")
    assert producer[relu.operands[0]].kind == "requantize" and [u.kind for u in consumers[relu.result]] == ["linear"]
    before, after = (NumpyExecutor(g)(x.numpy())[0] for g in (binary, graph))
    assert np.abs(after - before).max() < 0.1 * np.abs(before).max()
