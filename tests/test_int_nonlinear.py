"""Integer-only nonlinearities (I-BERT): the `int_softmax`, `int_gelu` and `int_layer_norm` ops
and integer `matmul` (numpy reference == torch executor bit for bit over random shapes, values
and scales; range invariants; type rules; accuracy against fp32 with measured bounds) and the
`int-nonlinear` pass (golden IR of a small encoder layer, idempotence, masks, options, and the
digits Transformer end to end: accuracy kept, no float op inside an encoder layer)."""

from __future__ import annotations

import math
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import special

import tcc
from tcc.evaluate import evaluate
from tcc.ir import (REFERENCE, DType, GraphBuilder, TccError, TensorType, VerifyError, parse_graph, print_graph, tensor,
                    verify)
from tcc.passes import Dataset, IntNonlinear, OptionError, PassContext, format_pipeline, parse_pipeline
from tcc.passes.int_nonlinear import gelu_attrs, layer_norm_params, softmax_attrs
from tcc.runtime.numpy_executor import NumpyExecutor
from tcc.runtime import torch_executor
from tcc.runtime.torch_executor import TorchExecutor
from tcc.zoo import BertStyleLayer, digits_data, residual_stream, train_digits

from conftest import assert_tiers_agree, has_cuda

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NARROW = [DType.I4, DType.I8, DType.I16]


def _both(graph, *inputs) -> list[np.ndarray]:
    """Run `graph` on the numpy reference and the torch executor; assert they agree: integer
    values bit for bit, float ones (a final dequantize) within the tiers' tolerance."""
    want = NumpyExecutor(graph)(*inputs)
    got = TorchExecutor(graph).run([torch.from_numpy(np.array(x, copy=True)) for x in inputs])
    assert len(got) == len(want) == len(graph.outputs)
    for w, g, t, name in zip(want, got, graph.output_types, graph.outputs):
        assert w.dtype == t.dtype.numpy and g.cpu().numpy().dtype == w.dtype
        assert_tiers_agree(g.cpu().numpy(), w, name)
    return want


def one_op(kind: str, inputs: list[tuple[np.ndarray, DType]], constants: list[np.ndarray] = (), **attrs
           ) -> np.ndarray:
    """`kind` on graph inputs (array, dtype), then constants; run and checked on both executors."""
    b = GraphBuilder("g")
    names = [b.input(f"x{i}", TensorType(a.shape, dt)) for i, (a, dt) in enumerate(inputs)]
    names += [b.constant(f"c{i}", a) for i, a in enumerate(constants)]
    return _both(verify(b.finish([b.op(kind, *names, **attrs)])), *(a for a, _ in inputs))[0]


def _ints(rng: np.random.Generator, shape, dtype: DType) -> np.ndarray:
    lo, hi = dtype.value_range
    return rng.integers(lo, hi + 1, size=shape).astype(dtype.numpy)


def _scales():
    return st.floats(-16, 0).map(lambda e: 10.0 ** e / 3)


# ---------------------------------------------------------------------------------------------
# ops: bit exact on both executors, invariants

@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 5), n=st.integers(1, 40),
       dtype=st.sampled_from(NARROW + [DType.I32]), scale=st.floats(-5, 0.5).map(lambda e: 10.0 ** e),
       out_bits=st.integers(1, 15), mask=st.sampled_from([None, "full", "row", "column"]))
def test_int_softmax_bit_exact_and_in_range(seed, rows, n, dtype, scale, out_bits, mask):
    rng = np.random.default_rng(seed)
    x = _ints(rng, (rows, n), dtype)
    if rng.random() < 0.5:  # realistic: real values within +-30
        x = np.clip(np.rint(rng.uniform(-30, 30, (rows, n)) / scale), *dtype.value_range).astype(dtype.numpy)
    shape = {None: None, "full": (rows, n), "row": (1, n), "column": (rows, 1)}[mask]
    keep = None if shape is None else rng.random(shape) < 0.7
    y = one_op("int_softmax", [(x, dtype)] + ([(keep, DType.BOOL)] if keep is not None else []),
               **softmax_attrs(scale, out_bits))
    assert y.dtype == (np.int8 if out_bits <= 7 else np.int16)
    assert y.min() >= 0 and y.max() <= 2 ** out_bits - 1
    kept = np.ones((rows, n), bool) if keep is None else np.broadcast_to(keep, (rows, n))
    assert not y[~kept].any()
    sums, live = y.astype(np.int64).sum(-1), kept.any(-1)
    assert np.all(np.abs(sums[live] - 2 ** out_bits) <= n / 2 + 1) and not sums[~live].any()


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), shape=st.lists(st.integers(1, 6), min_size=1, max_size=3),
       dtype=st.sampled_from(NARROW), scale=_scales(), out_dtype=st.sampled_from(NARROW), out_scale=_scales())
def test_int_gelu_bit_exact_and_sign(seed, shape, dtype, scale, out_dtype, out_scale):
    x = _ints(np.random.default_rng(seed), shape, dtype)
    y = one_op("int_gelu", [(x, dtype)], **gelu_attrs(scale, dtype, out_scale, out_dtype))
    assert y.dtype == out_dtype.numpy
    assert np.all((y == 0) | (np.sign(y) == np.sign(x)))  # GELU keeps the sign


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 4), n=st.integers(1, 64), dtype=st.sampled_from(NARROW),
       scale=_scales(), out_dtype=st.sampled_from(NARROW), out_scale=st.floats(1e-3, 1.0),
       eps=st.sampled_from([0.0, 1e-12, 1e-5, 1.0]), constant_rows=st.booleans())
def test_int_layer_norm_bit_exact(seed, rows, n, dtype, scale, out_dtype, out_scale, eps, constant_rows):
    rng = np.random.default_rng(seed)
    x = _ints(rng, (rows, 1) if constant_rows else (rows, n), dtype)
    x = np.broadcast_to(x, (rows, n)).copy()
    gamma, beta = rng.normal(0, 2, n), rng.normal(0, 1, n)
    w, b, attrs = layer_norm_params(scale, dtype, gamma, beta, eps, out_scale, out_dtype)
    y = one_op("int_layer_norm", [(x, dtype)], [w, b], **attrs)
    assert y.dtype == out_dtype.numpy
    if constant_rows:  # nothing to normalize: the bias alone
        want = np.clip(np.rint(beta / out_scale), *out_dtype.value_range)
        assert np.all(np.abs(y - want) <= 1)


_MATMUL_DTYPES = [(DType.I8, DType.I8), (DType.I4, DType.I8), (DType.B1, DType.I8), (DType.I16, DType.I8),
                  (DType.I16, DType.I16)]


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), dtypes=st.sampled_from(_MATMUL_DTYPES), m=st.integers(1, 5),
       k=st.one_of(st.integers(1, 33), st.just(768)), n=st.integers(1, 5), batch=st.sampled_from([(), (2,), (3, 1)]))
def test_integer_matmul_is_exact_on_both_executors(seed, dtypes, m, k, n, batch):
    rng = np.random.default_rng(seed)
    a, b = (np.where(rng.random(s) < 0.5, 1, -1).astype(np.int8) if dt is DType.B1 else _ints(rng, s, dt)
            for dt, s in zip(dtypes, (batch + (m, k), (k, n))))
    g = GraphBuilder("g")
    x, y = g.input("a", TensorType(a.shape, dtypes[0])), g.input("b", TensorType(b.shape, dtypes[1]))
    out = _both(verify(g.finish([g.op("matmul", x, y)])), a, b)[0]
    assert out.dtype == (np.int64 if DType.I16 in dtypes else np.int32)
    np.testing.assert_array_equal(out, np.matmul(a.astype(np.int64), b.astype(np.int64)))


@SETTINGS
@given(roots=st.lists(st.integers(0, (1 << 31) - 1), min_size=1, max_size=32),
       offsets=st.lists(st.integers(-2, 2), min_size=32, max_size=32))
def test_torch_integer_square_root_is_exact_near_every_square(roots, offsets):
    """The torch kernel's float64 root with its correction is floor(sqrt) on [0, 2^62), where
    float64 rounding matters most: next to perfect squares."""
    values = [min(max(r * r + d, 0), (1 << 62) - 1) for r, d in zip(roots, offsets)]
    got = torch_executor._isqrt(torch.tensor(values, dtype=torch.int64))
    assert got.tolist() == [math.isqrt(v) for v in values]


def test_int_layer_norm_refuses_biases_that_could_wrap():
    x, w, b = np.zeros((1, 2), np.int8), np.ones(2, np.int32), np.array([0, 2 ** 61], np.int64)
    with pytest.raises(ValueError, match=r"\|bias\| must be at most 2\^60"):
        REFERENCE["int_layer_norm"](x, w, b, eps=0, shift=0, dtype=DType.I8, scale=1.0)
    with pytest.raises(ValueError, match=r"\|bias\| must be at most 2\^60"):
        one_op("int_layer_norm", [(x, DType.I8)], [w, b], eps=0, shift=0, dtype=DType.I8, scale=1.0)


_SOFTMAX = softmax_attrs(0.01, 7)
_GELU = gelu_attrs(0.05, DType.I8, 0.05, DType.I8)


@pytest.mark.parametrize("build, message", [
    (lambda b, f, i: b.op("int_softmax", f, **_SOFTMAX), "input must be i4, i8, i16, i32, got f32"),
    (lambda b, f, i: b.op("int_softmax", i, i, **_SOFTMAX), "mask must be bool, got i8"),
    (lambda b, f, i: b.op("int_softmax", i, b.input("m", tensor((3,), DType.BOOL)), **_SOFTMAX),
     "mask shape [3] does not broadcast to input [2, 8]"),
    (lambda b, f, i: b.op("int_softmax", i, **{**_SOFTMAX, "multiplier": 2 ** 31}),
     "attribute 'multiplier' is 2147483648, expected [0, 2147483647]"),
    (lambda b, f, i: b.op("int_softmax", i, **{**_SOFTMAX, "b": 10}), "attribute 'b' is 10, expected [11357, "),
    (lambda b, f, i: b.op("int_softmax", i, **{**_SOFTMAX, "c": 2 ** 31}), "b^2 + c must stay below 2^31"),
    (lambda b, f, i: b.op("int_softmax", i, **{**_SOFTMAX, "out_bits": 16}), "attribute 'out_bits' is 16"),
    (lambda b, f, i: b.op("int_softmax", i, **{**_SOFTMAX, "ln2": 0.5}), "attribute 'ln2' expects int, got 0.5"),
    (lambda b, f, i: b.op("int_softmax", i, multiplier=1, shift=1), "missing attribute 'ln2'"),
    (lambda b, f, i: b.op("int_softmax", b.input("s", tensor((), DType.I8)), **_SOFTMAX),
     "input needs a non-empty last dim, got shape []"),
    (lambda b, f, i: b.op("int_gelu", b.input("w", tensor((2,), DType.I32)), **_GELU), "input must be i4, i8, i16"),
    (lambda b, f, i: b.op("int_gelu", i, **{**_GELU, "dtype": DType.I32}), "dtype must be one of i4, i8, i16"),
    (lambda b, f, i: b.op("int_gelu", i, **{**_GELU, "scale": 0.0}), "scale must be positive"),
    (lambda b, f, i: b.op("int_gelu", i, **{**_GELU, "one": 2 ** 40, "out_multiplier": 2 ** 30}),
     "may exceed 2^62 for i8 input"),
    (lambda b, f, i: b.op("int_layer_norm", i, b.constant("w", np.ones(8, np.float32)),
                          b.constant("b", np.zeros(8, np.int64)), eps=0, shift=0, dtype=DType.I8, scale=1.0),
     "weight must be i32[8] (per channel of the last dim), got f32[8]"),
    (lambda b, f, i: b.op("int_layer_norm", i, b.constant("w", np.ones(8, np.int32)),
                          b.constant("b", np.zeros(4, np.int64)), eps=0, shift=0, dtype=DType.I8, scale=1.0),
     "bias must be i64[8]"),
    (lambda b, f, i: b.op("int_layer_norm", i, b.constant("w", np.ones(8, np.int32)),
                          b.constant("b", np.zeros(8, np.int64)), eps=-1, shift=0, dtype=DType.I8, scale=1.0),
     "attribute 'eps' is -1"),
    (lambda b, f, i: b.op("matmul", i, b.op("transpose", f, dim0=0, dim1=1)),
     "integer matmul takes i4, i8, i16 or b1 operands, got f32 rhs"),
])
def test_type_rules_reject(build, message):
    b = GraphBuilder("g")
    f, i = b.input("f", tensor((2, 8))), b.input("i", tensor((2, 8), DType.I8))
    with pytest.raises(VerifyError) as e:
        build(b, f, i)
    assert message in str(e.value)


# ---------------------------------------------------------------------------------------------
# ops: accuracy against fp32 on realistic ranges (deterministic data; bounds measured)

def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + special.erf(x / math.sqrt(2)))


@pytest.mark.parametrize("out_bits, sigma, bound", [
    (7, 1.0, 0.0045), (7, 3.0, 0.0045),  # half a step of 2^-7 (0.0039) plus the polynomial
    (7, 6.0, 2 ** -7 + 1e-4),  # a probability near 1 clips to 127/128
    (8, 3.0, 0.0028), (15, 6.0, 0.0009),  # 15 bits: the i-exp polynomial alone
])
def test_int_softmax_accuracy(out_bits, sigma, bound):
    """Attention scores: the i32 accumulator of i8 q.k^T at scale (4/127)^2/4, logits ~ N(0, sigma)."""
    rng = np.random.default_rng(0)
    scale = (4 / 127) ** 2 / 4
    x = np.rint(rng.normal(0, sigma, (1000, 128)) / scale).astype(np.int32)
    y = REFERENCE["int_softmax"](x, **softmax_attrs(scale, out_bits)) / 2 ** out_bits
    error = np.abs(y - _softmax(x * scale))
    print(f"int_softmax {out_bits} bits, logits sigma {sigma}: max {error.max():.5f}, mean {error.mean():.2e}")
    assert error.max() <= bound


@pytest.mark.parametrize("out_dtype", [DType.I8, DType.I16])
@pytest.mark.parametrize("limit", [2.0, 6.0, 10.0])
def test_int_gelu_accuracy(limit, out_dtype):
    """Every i8 input over [-limit, limit]; I-BERT reports i-GELU's L-infinity error as 0.018."""
    x = np.arange(-128, 128).astype(np.int8)
    scale = limit / 127
    want = _gelu(x * scale)
    out_scale = np.abs(want).max() / out_dtype.value_range[1]
    y = REFERENCE["int_gelu"](x, **gelu_attrs(scale, DType.I8, out_scale, out_dtype)) * out_scale
    error = np.abs(y - want)
    print(f"int_gelu [-{limit}, {limit}] -> {out_dtype}: max {error.max():.4f}, mean {error.mean():.4f}")
    assert error.max() <= 0.0185 + out_scale / 2


@pytest.mark.parametrize("out_dtype", [DType.I8, DType.I16])
@pytest.mark.parametrize("n", [64, 768])
def test_int_layer_norm_accuracy(n, out_dtype):
    """Residual-stream rows: offsets, spreads from 0.3 to 4 and three outlier channels, in i16."""
    rng = np.random.default_rng(0)
    x, scale = residual_stream(1000, n, rng)
    gamma, beta = rng.uniform(0.5, 1.5, n), rng.normal(0, 0.3, n)
    want = REFERENCE["layer_norm"](x * scale, gamma, beta, normalized_shape=(n,), eps=1e-5)
    out_scale = np.abs(want).max() / out_dtype.value_range[1]
    w, b, attrs = layer_norm_params(scale, DType.I16, gamma, beta, 1e-5, out_scale, out_dtype)
    error = np.abs(REFERENCE["int_layer_norm"](x, w, b, **attrs) * out_scale - want)
    print(f"int_layer_norm N={n} -> {out_dtype}: max {error.max():.5f}, mean {error.mean():.2e}")
    assert error.max() <= 0.006 + out_scale / 2  # the rest: the mean rounded to an integer step


# ---------------------------------------------------------------------------------------------
# the pass: golden IR of a small encoder layer (attention, residual, layer norm, GELU)

LAYER = """
    graph @layer(%x: f32[1,4,8]) {
      const @qkv.weight_q : i8[24,8]
      const @qkv.multiplier : i32[]
      const @qkv.shift : i32[]
      const @qkv.output_scale : f32[]
      const @out.weight_q : i8[8,8]
      const @out.multiplier : i32[]
      const @out.shift : i32[]
      const @out.output_scale : f32[]
      const @norm.weight : f32[8]
      const @norm.bias : f32[8]
      const @ffn.weight_q : i8[16,8]
      const @ffn.multiplier : i32[]
      const @ffn.shift : i32[]
      const @ffn.output_scale : f32[]
      %x.q = quantize(%x) {dtype = i8, scale = 0.03125} : i8[1,4,8] !q(scale=0.03125, zp=0)
      %qkv.acc = linear(%x.q, @qkv.weight_q) : i32[1,4,24]
      %qkv.q = requantize(%qkv.acc, @qkv.multiplier, @qkv.shift) {dtype = i8, scale = 0.0625} : i8[1,4,24] !q(scale=0.0625, zp=0)
      %qkv = dequantize(%qkv.q, @qkv.output_scale) : f32[1,4,24]
      %heads = reshape(%qkv) {shape = [1, 4, 3, 2, 4]} : f32[1,4,3,2,4]
      %split = permute(%heads) {dims = [2, 0, 3, 1, 4]} : f32[3,1,2,4,4]
      %q = select(%split) {dim = 0, index = 0} : f32[1,2,4,4]
      %k = select(%split) {dim = 0, index = 1} : f32[1,2,4,4]
      %v = select(%split) {dim = 0, index = 2} : f32[1,2,4,4]
      %attn = scaled_dot_product_attention(%q, %k, %v) : f32[1,2,4,4]
      %merged = permute(%attn) {dims = [0, 2, 1, 3]} : f32[1,4,2,4]
      %context = reshape(%merged) {shape = [1, 4, 8]} : f32[1,4,8]
      %context.q = quantize(%context) {dtype = i8, scale = 0.0625} : i8[1,4,8] !q(scale=0.0625, zp=0)
      %out.acc = linear(%context.q, @out.weight_q) : i32[1,4,8]
      %out.q = requantize(%out.acc, @out.multiplier, @out.shift) {dtype = i8, scale = 0.0625} : i8[1,4,8] !q(scale=0.0625, zp=0)
      %out = dequantize(%out.q, @out.output_scale) : f32[1,4,8]
      %residual = add(%x, %out) : f32[1,4,8]
      %norm = layer_norm(%residual, @norm.weight, @norm.bias) {normalized_shape = [8]} : f32[1,4,8]
      %norm.q = quantize(%norm) {dtype = i8, scale = 0.03125} : i8[1,4,8] !q(scale=0.03125, zp=0)
      %ffn.acc = linear(%norm.q, @ffn.weight_q) : i32[1,4,16]
      %ffn.q = requantize(%ffn.acc, @ffn.multiplier, @ffn.shift) {dtype = i8, scale = 0.0625} : i8[1,4,16] !q(scale=0.0625, zp=0)
      %ffn = dequantize(%ffn.q, @ffn.output_scale) : f32[1,4,16]
      %act = gelu(%ffn) : f32[1,4,16]
      %act.q = quantize(%act) {dtype = i8, scale = 0.03125} : i8[1,4,16] !q(scale=0.03125, zp=0)
      return %act.q
    }
    """

# the layer's float parts in integers: layout ops on i8, q.k^T in i32 straight into int_softmax
# (the 1/sqrt(4) folded into its multiplier), P.v requantized to the scale out_proj reads, the
# residual x + out at x's step in i32 then i16, the layer norm and GELU at the scales their
# readers quantize to; the residual's i16 scale is calibrated (x + out is exact in f32)
LAYER_INT = """
    graph @layer(%x: f32[1,4,8]) {
      const @qkv.weight_q : i8[24,8]
      const @qkv.multiplier : i32[]
      const @qkv.shift : i32[]
      const @out.weight_q : i8[8,8]
      const @out.multiplier : i32[]
      const @out.shift : i32[]
      const @ffn.weight_q : i8[16,8]
      const @ffn.multiplier : i32[]
      const @ffn.shift : i32[]
      const @attn.i.multiplier : i32[]
      const @attn.i.shift : i32[]
      const @residual.out.multiplier : i32[]
      const @residual.out.shift : i32[]
      const @residual.i.multiplier : i32[]
      const @residual.i.shift : i32[]
      const @norm.weight_q : i32[8]
      const @norm.bias_q : i64[8]
      %x.q = quantize(%x) {dtype = i8, scale = 0.03125} : i8[1,4,8] !q(scale=0.03125, zp=0)
      %qkv.acc = linear(%x.q, @qkv.weight_q) : i32[1,4,24]
      %qkv.q = requantize(%qkv.acc, @qkv.multiplier, @qkv.shift) {dtype = i8, scale = 0.0625} : i8[1,4,24] !q(scale=0.0625, zp=0)
      %heads.i = reshape(%qkv.q) {shape = [1, 4, 3, 2, 4]} : i8[1,4,3,2,4] !q(scale=0.0625, zp=0)
      %split.i = permute(%heads.i) {dims = [2, 0, 3, 1, 4]} : i8[3,1,2,4,4] !q(scale=0.0625, zp=0)
      %q.i = select(%split.i) {dim = 0, index = 0} : i8[1,2,4,4] !q(scale=0.0625, zp=0)
      %k.i = select(%split.i) {dim = 0, index = 1} : i8[1,2,4,4] !q(scale=0.0625, zp=0)
      %v.i = select(%split.i) {dim = 0, index = 2} : i8[1,2,4,4] !q(scale=0.0625, zp=0)
      %attn.kt.i = transpose(%k.i) {dim0 = -2, dim1 = -1} : i8[1,2,4,4] !q(scale=0.0625, zp=0)
      %attn.scores.acc = matmul(%q.i, %attn.kt.i) : i32[1,2,4,4]
      %attn.probs.i = int_softmax(%attn.scores.acc) {multiplier = 1073741824, shift = 25, ln2 = 11357, b = 22168, c = 257578234} : i8[1,2,4,4] !q(scale=0.0078125, zp=0)
      %attn.acc = matmul(%attn.probs.i, %v.i) : i32[1,2,4,4]
      %attn.i = requantize(%attn.acc, @attn.i.multiplier, @attn.i.shift) {dtype = i8, scale = 0.0625} : i8[1,2,4,4] !q(scale=0.0625, zp=0)
      %merged.i = permute(%attn.i) {dims = [0, 2, 1, 3]} : i8[1,4,2,4] !q(scale=0.0625, zp=0)
      %context.i = reshape(%merged.i) {shape = [1, 4, 8]} : i8[1,4,8] !q(scale=0.0625, zp=0)
      %out.acc = linear(%context.i, @out.weight_q) : i32[1,4,8]
      %out.q = requantize(%out.acc, @out.multiplier, @out.shift) {dtype = i8, scale = 0.0625} : i8[1,4,8] !q(scale=0.0625, zp=0)
      %residual.x.wide = cast(%x.q) {dtype = i32} : i32[1,4,8]
      %residual.out.wide = cast(%out.q) {dtype = i32} : i32[1,4,8]
      %residual.out = requantize(%residual.out.wide, @residual.out.multiplier, @residual.out.shift) {dtype = i32, scale = 0.03125} : i32[1,4,8] !q(scale=0.03125, zp=0)
      %residual.sum = add(%residual.x.wide, %residual.out) : i32[1,4,8]
      %residual.i = requantize(%residual.sum, @residual.i.multiplier, @residual.i.shift) {dtype = i16, scale = 0.00011900453785499226} : i16[1,4,8] !q(scale=0.00011900453785499226, zp=0)
      %norm.i = int_layer_norm(%residual.i, @norm.weight_q, @norm.bias_q) {eps = 5649, shift = 54, dtype = i8, scale = 0.03125} : i8[1,4,8] !q(scale=0.03125, zp=0)
      %ffn.acc = linear(%norm.i, @ffn.weight_q) : i32[1,4,16]
      %ffn.q = requantize(%ffn.acc, @ffn.multiplier, @ffn.shift) {dtype = i8, scale = 0.0625} : i8[1,4,16] !q(scale=0.0625, zp=0)
      %act.i = int_gelu(%ffn.q) {multiplier = 1518500250, shift = 23, clip = 7246, one = 58092853, out_multiplier = 77524160, out_shift = 52, dtype = i8, scale = 0.03125} : i8[1,4,16] !q(scale=0.03125, zp=0)
      return %act.i
    }
    """


def _text(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def _layer():
    """The golden layer with seeded integer weights, and calibration data of 16 examples."""
    rng = np.random.default_rng(0)
    weights = {f"{n}.weight_q": rng.integers(-127, 128, s).astype(np.int8)
               for n, s in (("qkv", (24, 8)), ("out", (8, 8)), ("ffn", (16, 8)))}
    weights |= {"norm.weight": rng.uniform(0.5, 1.5, 8).astype(np.float32),
                "norm.bias": rng.normal(0, 0.1, 8).astype(np.float32)}
    for name in ("qkv", "out", "ffn"):  # acc * 2^30 / 2^42: the accumulators / 4096 into i8
        weights |= {f"{name}.multiplier": np.int32(1 << 30), f"{name}.shift": np.int32(42),
                    f"{name}.output_scale": np.float32(0.0625)}
    graph = parse_graph(_text(LAYER), weights)
    calib = Dataset((torch.from_numpy(rng.normal(0, 1, (16, 4, 8)).astype(np.float32)),), None, "calib")
    return graph, calib


def _ctx(data: Dataset) -> PassContext:
    return PassContext(torch_module=TorchExecutor, data={"calib": data})


def test_golden_encoder_layer():
    graph, calib = _layer()
    assert print_graph(graph) == _text(LAYER)
    ctx = _ctx(calib)
    out = IntNonlinear()(graph, ctx)
    assert print_graph(out) == _text(LAYER_INT)
    assert ctx.log == ["int-nonlinear: changed; calibrated on calib (16 examples, minmax); attention decomposed; "
                       "1 add, 1 gelu, 1 layer_norm, 2 matmul, 1 softmax to integers (softmax 7-bit, residual i16)"]
    assert parse_graph(print_graph(out), out.weights).same_as(out)
    x = calib.inputs[0][:1].numpy()
    got = _both(out, x)[0]
    want = NumpyExecutor(graph)(x)[0]  # float softmax, layer norm and GELU between integer linears
    assert np.abs(got.astype(np.int64) - want).max() <= 1


def test_a_linear_reading_the_first_token_shares_the_norms_integers():
    """BERT's pooler: `linear(select(layer_norm(x), 1, 0))` beside the norm's own output. quantize
    gives the select the norm's whole range, int-nonlinear gives the norm that scale: the
    linear reads the norm's integers, selected, with no rescale (no cast, no requantize) between."""
    class Pooled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.norm, self.pool = torch.nn.Linear(16, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 16)

        def forward(self, x):
            h = self.norm(self.inp(x))  # quantized before the norm: int-nonlinear calibrates the norm anew
            return h, torch.tanh(self.pool(h[:, 0]))

    torch.manual_seed(0)
    model, x = Pooled().eval(), torch.randn(4, 6, 16)
    graph = tcc.compile(model, (x,), pipeline="quantize,int-nonlinear").graph
    producer = graph.producer()
    linear = [op for op in graph.ops if op.kind == "linear"][1]
    selected = producer[linear.operands[0]]
    assert selected.kind == "select" and producer[selected.operands[0]].kind == "int_layer_norm"
    assert not any(op.kind in ("cast", "requantize") and op.result.startswith("select") for op in graph.ops)
    want = model(x)
    got = NumpyExecutor(graph)(x.numpy())
    assert np.abs(got[1] - want[1].detach().numpy()).max() < 0.05


def test_scores_divided_by_a_python_float_reach_int_softmax():
    """`softmax(q @ k^T / math.sqrt(d))` written out by hand: export makes the divisor a `full`
    scalar (a source fold-constants leaves inline), which folds into the softmax's input scale
    like a constant: the attention is integer end to end, with no float op left in the layer."""
    torch.manual_seed(0)
    layer, x = BertStyleLayer(16, 2, 32).eval(), torch.randn(2, 5, 16)
    graph = tcc.compile(layer, (x,), pipeline="quantize,int-nonlinear").graph
    kinds = [op.kind for op in graph.ops]
    assert kinds.count("int_softmax") == 1 and kinds.count("int_layer_norm") == 2
    assert not {"div", "softmax", "full", "layer_norm", "gelu"} & set(kinds)
    want = layer(x).detach().numpy()
    assert np.abs(NumpyExecutor(graph)(x.numpy())[0] - want).max() < 0.25


class _Embedded(torch.nn.Module):
    """Token embeddings plus learned positions, then (`pre_norm`) a layer norm of the sum, or
    (post-norm) a linear of it."""

    def __init__(self, pre_norm: bool):
        super().__init__()
        self.pre_norm = pre_norm
        self.tokens, self.positions = torch.nn.Embedding(50, 16), torch.nn.Parameter(0.1 * torch.randn(6, 16))
        self.norm, self.out = torch.nn.LayerNorm(16), torch.nn.Linear(16, 16)

    def forward(self, ids):
        h = self.tokens(ids) + self.positions
        return self.out(self.norm(h) if self.pre_norm else h)


@pytest.mark.parametrize("pre_norm", [True, False])
def test_embeddings_plus_positions_into_a_norm_are_integer(pre_norm):
    """`layer_norm(embedding(W, ids) + P)`: the gather reads W quantized to i8 at one step, P is
    an i32 constant at the sum's step (the vector unit's residual add with a constant operand),
    close to float. Without a norm reading the sum (post-norm) the add stays float."""
    torch.manual_seed(0)
    model, ids = _Embedded(pre_norm).eval(), torch.randint(0, 50, (3, 6))
    graph = tcc.compile(model, (ids,), pipeline="quantize,int-nonlinear").graph
    producer, types = graph.producer(), graph.types
    gathers = [op for op in graph.ops if op.kind == "embedding"]
    assert len(gathers) == 1 and types[gathers[0].operands[0]].dtype is (DType.I8 if pre_norm else DType.F32)
    adds = [op for op in graph.ops if op.kind == "add"]
    assert len(adds) == 1
    if pre_norm:
        constant = next(o for o in adds[0].operands if o in graph.weights)
        assert types[constant].dtype is DType.I32 and producer[adds[0].operands[0]].kind == "cast"
        assert "layer_norm" not in {op.kind for op in graph.ops}
    else:
        assert types[adds[0].result].dtype is DType.F32
    want = model(ids).detach().numpy()
    assert np.abs(NumpyExecutor(graph)(ids.numpy())[0] - want).max() < 0.1


def test_pass_is_idempotent():
    graph, calib = _layer()
    ctx = _ctx(calib)
    once = IntNonlinear()(graph, ctx)
    again = IntNonlinear().run(once, ctx)
    assert not again.changed and again.graph is once
    assert IntNonlinear()(once, ctx).same_as(once)


def test_nothing_to_convert_needs_no_data():
    b = GraphBuilder("g")
    x = b.input("x", tensor((2, 3)))
    graph = b.finish([b.op("softmax", b.op("tanh", x), dim=-1)])  # a float softmax with no integer input
    ctx = PassContext()
    assert IntNonlinear()(graph, ctx) is graph
    assert ctx.log == ["int-nonlinear: no change; left float: 1 softmax (input not integer)"]


def test_ops_option_picks_what_to_convert():
    graph, calib = _layer()
    out = IntNonlinear(ops="softmax;matmul")(graph, _ctx(calib))
    kinds = [op.kind for op in out.ops]
    assert "int_softmax" in kinds and kinds.count("matmul") == 2
    assert {"layer_norm", "gelu", "add"} <= set(kinds) and "int_layer_norm" not in kinds and "int_gelu" not in kinds


def _attention_graph(additive: bool):
    """Attention over i8 q, k, v (quantize -> dequantize) with a bool mask, or an additive float one."""
    b = GraphBuilder("attn")
    qkv = []
    for name in "qkv":
        x = b.op("quantize", b.input(name, tensor((2, 2, 5, 4))), dtype=DType.I8, scale=0.05)
        qkv.append(b.op("dequantize", x, b.constant(f"{name}.scale", np.float32(0.05))))
    if not additive:
        mask = b.input("mask", tensor((2, 1, 5, 5), DType.BOOL))
        return b.finish([b.op("scaled_dot_product_attention", *qkv, mask)])
    scores = b.op("matmul", qkv[0], b.op("transpose", qkv[1], dim0=-2, dim1=-1))
    probs = b.op("softmax", b.op("add", scores, b.input("bias", tensor((2, 1, 5, 5)))), dim=-1)
    return b.finish([b.op("matmul", probs, qkv[2])])


def test_masked_attention_is_integer_and_close_to_float():
    graph = _attention_graph(additive=False)
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(0, 1.5, (2, 2, 5, 4)).astype(np.float32) for _ in range(3))
    mask = rng.random((2, 1, 5, 5)) < 0.6
    mask[..., 0] = True
    data = Dataset(tuple(torch.from_numpy(a) for a in (q, k, v, mask)), None, "calib")
    out = IntNonlinear()(graph, _ctx(data))
    mask[0, 0, 2] = False  # a fully masked row: zeros, as the fused op gives
    (softmax,) = [op for op in out.ops if op.kind == "int_softmax"]
    assert softmax.operands[1] == "mask" and not any(op.type.dtype.is_float for op in out.ops[:-1])
    # the integer value the final dequantize reads is compared bit for bit too
    probe = out.replace(outputs=out.outputs + (out.ops[-1].operands[0],))
    got, want = _both(probe, q, k, v, mask)[0], NumpyExecutor(graph)(q, k, v, mask)[0]
    assert np.abs(got - want).max() < 0.1 and not got[0, :, 2].any()


def test_softmax_behind_an_additive_float_mask_stays_float():
    graph = _attention_graph(additive=True)
    rng = np.random.default_rng(0)
    data = Dataset(tuple(torch.from_numpy(rng.normal(0, 1, (8, 2, 5, 4)).astype(np.float32)) for _ in "qkv") + (
        torch.zeros(8, 1, 5, 5),), None, "calib")
    ctx = _ctx(data)
    out = IntNonlinear()(graph, ctx)
    assert "softmax" in [op.kind for op in out.ops]
    assert ctx.log[0].endswith("left float: 1 softmax (input not integer)")


@pytest.mark.parametrize("options, option", [
    ({"ops": "softmax;tanh"}, "ops"), ({"ops": ""}, "ops"), ({"softmax_bits": 0}, "softmax_bits"),
    ({"softmax_bits": 16}, "softmax_bits"), ({"residual_bits": 12}, "residual_bits"), ({"percentile": 0.0}, "percentile"),
])
def test_bad_options_name_the_option(options, option):
    with pytest.raises(OptionError) as e:
        IntNonlinear(**options)
    assert e.value.option == option and f"int-nonlinear: option '{option}'" in str(e.value)


def test_pipeline_text():
    passes = parse_pipeline("quantize,int-nonlinear{ops=softmax;gelu,softmax_bits=8,calibration=percentile}")
    assert [p.name for p in passes] == ["quantize", "int-nonlinear"]
    p = passes[1]
    assert (p.kinds, p.softmax_bits, p.calibration) == ({"softmax", "gelu"}, 8, "percentile")
    assert parse_pipeline(format_pipeline(passes)) == passes


def test_needs_calibration_data():
    graph, _ = _layer()
    with pytest.raises(TccError, match="int-nonlinear needs calibration data"):
        IntNonlinear()(graph, PassContext(torch_module=TorchExecutor))


@pytest.mark.gpu
@pytest.mark.skipif(not has_cuda(), reason="no CUDA device")
def test_golden_layer_bit_exact_on_cuda():
    graph, calib = _layer()
    out = IntNonlinear()(graph, _ctx(calib))
    x = calib.inputs[0][:4]
    want = [NumpyExecutor(out)(row[None].numpy())[0] for row in x]
    got = [TorchExecutor(out, "cuda").run([row[None]])[0].cpu().numpy() for row in x]
    for w, g in zip(want, got):
        np.testing.assert_array_equal(g, w)


# ---------------------------------------------------------------------------------------------
# end to end: the digits Transformer

@pytest.fixture(scope="module")
def digits():
    """fp32, int8-linear and fully integer artifacts of the digits Transformer (seed 0), and the test data."""
    x_train, x_test, y_train, y_test = digits_data()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: one thread is fastest, and steady on a loaded machine
    try:
        model = train_digits(x_train, y_train, seed=0)
        train = Dataset((x_train,), y_train, "train")
        artifacts = {spec: tcc.compile(model, (x_train[:64],), pipeline=spec, train_data=train)
                     for spec in (None, "quantize", "quantize,int-nonlinear")}
    finally:
        torch.set_num_threads(threads)
    return artifacts, Dataset((x_test,), y_test, "test")


def test_digits_accuracy_is_kept(digits):
    artifacts, test = digits
    accuracy = {spec: evaluate(a, test)["accuracy"] for spec, a in artifacts.items()}
    print(f"digits test accuracy (450 images, seed 0): fp32 {accuracy[None]:.3f}, int8 linears "
          f"{accuracy['quantize']:.3f}, fully integer {accuracy['quantize,int-nonlinear']:.3f}")
    # measured on seeds 0-2 (benchmarks/nonlinear.py): equal to int8 linears, fp32 -0.0 to +0.3 pt
    assert accuracy["quantize,int-nonlinear"] >= accuracy[None] - 0.01
    full = artifacts["quantize,int-nonlinear"]
    # the head reads a float mean (summation order is the executor's): a near tie may go either way
    assert abs(evaluate(full, test, on="numpy")["accuracy"] - accuracy["quantize,int-nonlinear"]) <= 1 / len(test)
    log = full.manifest["pass_log"][1]
    assert log.startswith("int-nonlinear: changed; calibrated on train (1347 examples, minmax)")
    assert "5 add, 4 layer_norm, 4 matmul, 2 relu, 2 softmax to integers" in log  # the positions' add too


def test_digits_encoder_layers_have_no_float_op(digits):
    """From each layer's input quantize to the dequantize after it, every value is an integer."""
    graph = digits[0]["quantize,int-nonlinear"].graph
    ops = graph.ops
    kinds = [op.kind for op in ops]
    assert kinds.count("int_softmax") == 2 and kinds.count("int_layer_norm") == 4
    for layer in (0, 1):
        uses = [i for i, op in enumerate(ops) if any(o.startswith(f"encoder.layers.{layer}.") for o in op.operands)]
        start = max(i for i in range(uses[0]) if kinds[i] == "quantize")
        end = min(i for i in range(uses[-1], len(ops)) if kinds[i] == "dequantize")
        assert ops[start].type.dtype is DType.I8 and graph.types[ops[start].operands[0]].dtype.is_float
        floats = [op.result for op in ops[start + 1:end] if not op.type.dtype.is_int]
        assert not floats, f"layer {layer}: float values {floats}"


def test_digits_integer_values_bit_exact_on_both_executors(digits):
    artifacts, test = digits
    graph = artifacts["quantize,int-nonlinear"].graph
    probed = tuple(op.result for op in graph.ops if op.kind in ("int_softmax", "int_layer_norm", "matmul"))
    probe = graph.replace(outputs=probed)
    x = test.inputs[0][:64]
    _both(probe, x.numpy())
