"""The canonical passes (dce, fold-constants, canonicalize), conv-as-gemm and pool-late.

- golden: IR text in -> IR text out, compared exactly, with one no-change case per pass;
- each golden rewrite keeps the numpy executor's outputs (within 1e-6);
- idempotence: on every golden input and every zoo model, a second run reports no change and
  gives the same graph;
- a hypothesis property: random chains of identity and layout ops canonicalize to a graph with
  equal outputs, no identity op and no reshape-of-reshape or permute-of-permute left.
"""

from __future__ import annotations

import math
import textwrap
from functools import lru_cache

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import built
from tcc import zoo
from tcc.frontend import from_module, split_inputs
from tcc.ir import DType, Graph, GraphBuilder, parse_graph, print_graph, tensor, verify
from tcc.passes import ConvAsGemm, DeadCodeElimination, FoldConstants, Pass, PassContext, PoolLate
from tcc.passes.canonicalize import Canonicalize
from tcc.ir.reference import causal_mask
from tcc.runtime.numpy_executor import NumpyExecutor

CANONICAL: list[Pass] = [DeadCodeElimination(), FoldConstants(), Canonicalize(), ConvAsGemm(), PoolLate()]


def _text(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def _random(t, rng: np.random.Generator) -> np.ndarray:
    if t.dtype.is_float:
        return rng.standard_normal(t.shape).astype(t.dtype.numpy)
    if t.dtype is DType.BOOL:
        return rng.random(t.shape) < 0.5
    return rng.integers(0, 4, size=t.shape).astype(t.dtype.numpy)


def _parse(text: str) -> Graph:
    """The graph of `text` with random weights for its constants (seeded by the text)."""
    rng = np.random.default_rng(len(text))
    weights = {name: _random(t, rng) for name, t in parse_graph(text).constants}
    weights.update({name: np.abs(w) + 0.5 for name, w in weights.items() if name.endswith("var")})  # variances
    return parse_graph(text, weights)


def _inputs(graph: Graph, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [_random(t, rng) for _, t in graph.inputs]


def _assert_same_outputs(before: Graph, after: Graph, inputs: list[np.ndarray], tolerance: float = 1e-6) -> None:
    expected, actual = NumpyExecutor(before)(*inputs), NumpyExecutor(after)(*inputs)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.shape == e.shape and a.dtype == e.dtype
        np.testing.assert_allclose(a, e, rtol=tolerance, atol=tolerance)


# ---------------------------------------------------------------------------------------------
# golden cases: (id, pass, input text, expected text or None for "unchanged")

GOLDEN: list[tuple[str, Pass, str, str | None]] = [
    ("dce-dead-ops-and-constants", DeadCodeElimination(), """
        graph @main(%x: f32[2,4]) {
          const @w : f32[3,4]
          const @unused : f32[4]
          %a = relu(%x) : f32[2,4]
          %dead = linear(%a, @w) : f32[2,3]
          %dead2 = tanh(%dead) : f32[2,3]
          %b = neg(%a) : f32[2,4]
          return %b
        }
        """, """
        graph @main(%x: f32[2,4]) {
          %a = relu(%x) : f32[2,4]
          %b = neg(%a) : f32[2,4]
          return %b
        }
        """),
    ("dce-outputs-are-input-and-constant", DeadCodeElimination(), """
        graph @main(%x: f32[4], %y: f32[4]) {
          const @c : f32[4]
          const @d : f32[4]
          %s = add(%x, @c) : f32[4]
          %t = mul(%s, %y) : f32[4]
          return %x, @d
        }
        """, """
        graph @main(%x: f32[4], %y: f32[4]) {
          const @d : f32[4]
          return %x, @d
        }
        """),
    ("dce-no-change", DeadCodeElimination(), """
        graph @main(%x: f32[2,4]) {
          const @w : f32[3,4]
          const @b : f32[3]
          %y = linear(%x, @w, @b) : f32[2,3]
          %z = relu(%y) : f32[2,3]
          return %z, %y
        }
        """, None),
    ("fold-constant-subgraphs", FoldConstants(), """
        graph @main(%x: f32[2,3]) {
          const @w : f32[3,3]
          const @b : f32[3]
          %wt = transpose(@w) {dim0 = 0, dim1 = 1} : f32[3,3]
          %b2 = add(@b, @b) : f32[3]
          %y = matmul(%x, %wt) : f32[2,3]
          %z = add(%y, %b2) : f32[2,3]
          return %z
        }
        """, """
        graph @main(%x: f32[2,3]) {
          const @w : f32[3,3]
          const @b : f32[3]
          const @wt : f32[3,3]
          const @b2 : f32[3]
          %y = matmul(%x, @wt) : f32[2,3]
          %z = add(%y, @b2) : f32[2,3]
          return %z
        }
        """),
    ("fold-mask-from-sources", FoldConstants(), """
        graph @main(%x: f32[2,4]) {
          const @len : i64[2,1]
          %pos = arange() {end = 4} : i64[4]
          %keep = lt(%pos, @len) : bool[2,4]
          %zero = full() {shape = [], value = 0.0} : f32[]
          %y = where(%keep, %x, %zero) : f32[2,4]
          return %y
        }
        """, """
        graph @main(%x: f32[2,4]) {
          const @len : i64[2,1]
          const @keep : bool[2,4]
          %pos = arange() {end = 4} : i64[4]
          %zero = full() {shape = [], value = 0.0} : f32[]
          %y = where(@keep, %x, %zero) : f32[2,4]
          return %y
        }
        """),
    ("fold-max-elements", FoldConstants(max_elements=4), """
        graph @main(%x: f32[8]) {
          const @a : f32[8]
          const @s : f32[2]
          %big = add(@a, @a) : f32[8]
          %small = neg(@s) : f32[2]
          %y = mul(%x, %big) : f32[8]
          return %y, %small
        }
        """, """
        graph @main(%x: f32[8]) {
          const @a : f32[8]
          const @s : f32[2]
          const @small : f32[2]
          %big = add(@a, @a) : f32[8]
          %y = mul(%x, %big) : f32[8]
          return %y, @small
        }
        """),
    ("fold-no-change", FoldConstants(), """
        graph @main(%x: f32[2,4]) {
          const @w : f32[3,4]
          %one = full() {shape = [], value = 1.0} : f32[]
          %y = linear(%x, @w) : f32[2,3]
          %z = add(%y, %one) : f32[2,3]
          return %z
        }
        """, None),
    ("canonicalize-fold-bias", Canonicalize(), """
        graph @main(%x: f32[2,3,4]) {
          const @w : f32[5,4]
          const @b : f32[5]
          const @w2 : f32[6,5]
          const @b2 : f32[1,1,6]
          %y = linear(%x, @w) : f32[2,3,5]
          %z = add(%y, @b) : f32[2,3,5]
          %u = linear(%z, @w2) : f32[2,3,6]
          %v = add(@b2, %u) : f32[2,3,6]
          %y3 = linear(%x, @w) : f32[2,3,5]
          %r3 = reshape(%y3) {shape = [2, 3, 5]} : f32[2,3,5]
          %z3 = add(%r3, @b) : f32[2,3,5]
          return %v, %z3
        }
        """, """
        graph @main(%x: f32[2,3,4]) {
          const @w : f32[5,4]
          const @b : f32[5]
          const @w2 : f32[6,5]
          const @b2 : f32[1,1,6]
          const @b2.bias : f32[6]
          %y = linear(%x, @w) : f32[2,3,5]
          %z = linear(%x, @w, @b) : f32[2,3,5]
          %u = linear(%z, @w2) : f32[2,3,6]
          %v = linear(%z, @w2, @b2.bias) : f32[2,3,6]
          %y3 = linear(%x, @w) : f32[2,3,5]
          %z3 = linear(%x, @w, @b) : f32[2,3,5]
          return %v, %z3
        }
        """),
    ("canonicalize-matmul-to-linear", Canonicalize(), """
        graph @main(%x: f32[2,3,4], %h: f32[3,4]) {
          const @wt : f32[4,5]
          const @w : f32[6,4]
          const @b : f32[5]
          %m = matmul(%x, @wt) : f32[2,3,5]
          %y = add(%m, @b) : f32[2,3,5]
          %m2 = matmul(%h, @wt) : f32[3,5]
          %t = transpose(@w) {dim0 = 1, dim1 = 0} : f32[4,6]
          %n = matmul(%h, %t) : f32[3,6]
          %p = permute(@w) {dims = [1, 0]} : f32[4,6]
          %q = matmul(%x, %p) : f32[2,3,6]
          return %y, %m2, %n, %q
        }
        """, """
        graph @main(%x: f32[2,3,4], %h: f32[3,4]) {
          const @wt : f32[4,5]
          const @w : f32[6,4]
          const @b : f32[5]
          const @wt.t : f32[5,4]
          %m = linear(%x, @wt.t) : f32[2,3,5]
          %y = linear(%x, @wt.t, @b) : f32[2,3,5]
          %m2 = linear(%h, @wt.t) : f32[3,5]
          %t = transpose(@w) {dim0 = 1, dim1 = 0} : f32[4,6]
          %n = linear(%h, @w) : f32[3,6]
          %p = permute(@w) {dims = [1, 0]} : f32[4,6]
          %q = linear(%x, @w) : f32[2,3,6]
          return %y, %m2, %n, %q
        }
        """),
    ("canonicalize-drop-identities", Canonicalize(), """
        graph @main(%x: f32[2,3,4], %i: i64[3]) {
          const @c : f32[4]
          %r = reshape(%x) {shape = [2, 3, 4]} : f32[2,3,4]
          %t = transpose(%r) {dim0 = -1, dim1 = 2} : f32[2,3,4]
          %p = permute(%t) {dims = [0, 1, -1]} : f32[2,3,4]
          %e = expand(%p) {shape = [2, 3, 4]} : f32[2,3,4]
          %s = squeeze(%e) {dims = [0, 1]} : f32[2,3,4]
          %l = slice(%s) {dim = 1, end = 3} : f32[2,3,4]
          %l2 = slice(%l) {dim = -1, end = 100} : f32[2,3,4]
          %k = cast(%l2) {dtype = f32} : f32[2,3,4]
          %y = relu(%k) : f32[2,3,4]
          %ci = cast(%i) {dtype = i64} : i64[3]
          %cc = reshape(@c) {shape = [4]} : f32[4]
          return %y, %ci, %cc
        }
        """, """
        graph @main(%x: f32[2,3,4], %i: i64[3]) {
          const @c : f32[4]
          %y = relu(%x) : f32[2,3,4]
          return %y, %i, @c
        }
        """),
    ("canonicalize-collapse-chains", Canonicalize(), """
        graph @main(%x: f32[2,3,4]) {
          %a = reshape(%x) {shape = [6, 4]} : f32[6,4]
          %b = reshape(%a) {shape = [4, 6]} : f32[4,6]
          %c = reshape(%b) {shape = [24]} : f32[24]
          %t = transpose(%x) {dim0 = 0, dim1 = 2} : f32[4,3,2]
          %u = transpose(%t) {dim0 = 1, dim1 = 2} : f32[4,2,3]
          %v = permute(%u) {dims = [2, 0, 1]} : f32[3,4,2]
          %w = transpose(%x) {dim0 = 1, dim1 = -1} : f32[2,4,3]
          %z = transpose(%w) {dim0 = 2, dim1 = 1} : f32[2,3,4]
          %p = permute(%x) {dims = [1, 2, 0]} : f32[3,4,2]
          %q = permute(%p) {dims = [2, 0, 1]} : f32[2,3,4]
          %o = add(%z, %q) : f32[2,3,4]
          return %c, %v, %a, %o
        }
        """, """
        graph @main(%x: f32[2,3,4]) {
          %a = reshape(%x) {shape = [6, 4]} : f32[6,4]
          %b = reshape(%x) {shape = [4, 6]} : f32[4,6]
          %c = reshape(%x) {shape = [24]} : f32[24]
          %t = transpose(%x) {dim0 = 0, dim1 = 2} : f32[4,3,2]
          %u = permute(%x) {dims = [2, 0, 1]} : f32[4,2,3]
          %v = permute(%x) {dims = [1, 2, 0]} : f32[3,4,2]
          %w = transpose(%x) {dim0 = 1, dim1 = -1} : f32[2,4,3]
          %p = permute(%x) {dims = [1, 2, 0]} : f32[3,4,2]
          %o = add(%x, %x) : f32[2,3,4]
          return %c, %v, %a, %o
        }
        """),
    ("canonicalize-elementwise-before-moves", Canonicalize(), """
        graph @main(%x: f32[2,4,3], %y: f32[2,6]) {
          %p = permute(%x) {dims = [0, 2, 1]} : f32[2,3,4]
          %r = relu(%p) : f32[2,3,4]
          %u = unsqueeze(%y) {dim = 1} : f32[2,1,6]
          %e = expand(%u) {shape = [2, 5, 6]} : f32[2,5,6]
          %g = gelu(%e) : f32[2,5,6]
          %t = transpose(%x) {dim0 = 1, dim1 = 2} : f32[2,3,4]
          %n = neg(%t) : f32[2,3,4]
          %s = slice(%y) {dim = 1, step = 2} : f32[2,3]
          %h = tanh(%s) : f32[2,3]
          return %r, %g, %n, %t, %h
        }
        """, """
        graph @main(%x: f32[2,4,3], %y: f32[2,6]) {
          %p = permute(%x) {dims = [0, 2, 1]} : f32[2,3,4]
          %r.pre = relu(%x) : f32[2,4,3]
          %r = permute(%r.pre) {dims = [0, 2, 1]} : f32[2,3,4]
          %u = unsqueeze(%y) {dim = 1} : f32[2,1,6]
          %e = expand(%u) {shape = [2, 5, 6]} : f32[2,5,6]
          %g.pre = gelu(%y) : f32[2,6]
          %g.pre_1 = unsqueeze(%g.pre) {dim = 1} : f32[2,1,6]
          %g = expand(%g.pre_1) {shape = [2, 5, 6]} : f32[2,5,6]
          %t = transpose(%x) {dim0 = 1, dim1 = 2} : f32[2,3,4]
          %n = neg(%t) : f32[2,3,4]
          %s = slice(%y) {dim = 1, step = 2} : f32[2,3]
          %h = tanh(%s) : f32[2,3]
          return %r, %g, %n, %t, %h
        }
        """),
    ("canonicalize-no-change", Canonicalize(), """
        graph @main(%x: f32[2,4], %v: f32[4], %h: f32[2,4]) {
          const @w : f32[3,4]
          const @b : f32[3]
          const @b2 : f32[2,3]
          const @m : f32[4,3]
          %y = linear(%x, @w) : f32[2,3]
          %z = add(%y, @b) : f32[2,3]
          %y2 = linear(%x, @w) : f32[2,3]
          %z2 = add(%y2, @b2) : f32[2,3]
          %y3 = linear(%x, @w, @b) : f32[2,3]
          %z3 = add(%y3, @b) : f32[2,3]
          %y4 = linear(%h, @w) : f32[2,3]
          %z4 = add(%y4, %y) : f32[2,3]
          %y5 = linear(%h, @w) : f32[2,3]
          %z5 = add(%y5, @b) : f32[2,3]
          %r5 = relu(%y5) : f32[2,3]
          %y6 = linear(%h, @w) : f32[2,3]
          %z6 = add(@b, %y6) : f32[2,3]
          %mv = matmul(%v, @m) : f32[3]
          %t = transpose(%x) {dim0 = 0, dim1 = 1} : f32[4,2]
          %hh = matmul(%h, %t) : f32[2,2]
          %r = reshape(%t) {shape = [8]} : f32[8]
          %e = expand(%v) {shape = [2, 4]} : f32[2,4]
          %s = slice(%x) {dim = 1, step = 2} : f32[2,2]
          %c = cast(%x) {dtype = f16} : f16[2,4]
          return %z, %y, %z2, %z3, %z4, %z5, %r5, %y6, %z6, %mv, %hh, %r, %e, %s, %c
        }
        """, None),
    ("canonicalize-batch-norm-into-conv", Canonicalize(), """
        graph @main(%x: f32[2,3,8]) {
          const @w : f32[4,3,3]
          const @b : f32[4]
          const @mean : f32[4]
          const @var : f32[4]
          const @gamma : f32[4]
          const @beta : f32[4]
          %c = conv1d(%x, @w, @b) {padding = [1]} : f32[2,4,8]
          %n = batch_norm(%c, @mean, @var, @gamma, @beta) {eps = 0.001} : f32[2,4,8]
          return %n
        }
        """, """
        graph @main(%x: f32[2,3,8]) {
          const @w : f32[4,3,3]
          const @b : f32[4]
          const @mean : f32[4]
          const @var : f32[4]
          const @gamma : f32[4]
          const @beta : f32[4]
          const @w.bn : f32[4,3,3]
          const @b.bn : f32[4]
          %c = conv1d(%x, @w, @b) {padding = [1]} : f32[2,4,8]
          %n = conv1d(%x, @w.bn, @b.bn) {padding = [1]} : f32[2,4,8]
          return %n
        }
        """),
    ("conv-as-gemm-pointwise", ConvAsGemm(), """
        graph @main(%x: f32[2,3,8]) {
          const @pw : f32[4,3,1]
          const @b : f32[4]
          %y = conv1d(%x, @pw, @b) : f32[2,4,8]
          return %y
        }
        """, """
        graph @main(%x: f32[2,3,8]) {
          const @b : f32[4]
          const @pw.gemm : f32[4,3]
          %y.im2col = permute(%x) {dims = [0, 2, 1]} : f32[2,8,3]
          %y.gemm = linear(%y.im2col, @pw.gemm, @b) : f32[2,8,4]
          %y = permute(%y.gemm) {dims = [0, 2, 1]} : f32[2,4,8]
          return %y
        }
        """),
    ("conv-as-gemm-im2col-1d", ConvAsGemm(), """
        graph @main(%x: f32[2,3,9]) {
          const @w : f32[4,3,3]
          %y = conv1d(%x, @w) {stride = [2], padding = [1]} : f32[2,4,5]
          return %y
        }
        """, """
        graph @main(%x: f32[2,3,9]) {
          const @w.gemm : f32[4,9]
          %y.padded = pad(%x) {pads = [1, 1]} : f32[2,3,11]
          %y.tap0 = slice(%y.padded) {dim = 2, end = 9, step = 2} : f32[2,3,5]
          %y.tap0_1 = unsqueeze(%y.tap0) {dim = -1} : f32[2,3,5,1]
          %y.tap1 = slice(%y.padded) {dim = 2, start = 1, end = 10, step = 2} : f32[2,3,5]
          %y.tap1_1 = unsqueeze(%y.tap1) {dim = -1} : f32[2,3,5,1]
          %y.tap2 = slice(%y.padded) {dim = 2, start = 2, end = 11, step = 2} : f32[2,3,5]
          %y.tap2_1 = unsqueeze(%y.tap2) {dim = -1} : f32[2,3,5,1]
          %y.taps = cat(%y.tap0_1, %y.tap1_1, %y.tap2_1) {dim = -1} : f32[2,3,5,3]
          %y.taps_1 = permute(%y.taps) {dims = [0, 2, 1, 3]} : f32[2,5,3,3]
          %y.im2col = reshape(%y.taps_1) {shape = [2, 5, 9]} : f32[2,5,9]
          %y.gemm = linear(%y.im2col, @w.gemm) : f32[2,5,4]
          %y = permute(%y.gemm) {dims = [0, 2, 1]} : f32[2,4,5]
          return %y
        }
        """),
    ("conv-as-gemm-patches-2d", ConvAsGemm(), """
        graph @main(%x: f32[1,3,9,8]) {
          const @w : f32[5,3,4,4]
          %y = conv2d(%x, @w) {stride = [4, 4]} : f32[1,5,2,2]
          return %y
        }
        """, """
        graph @main(%x: f32[1,3,9,8]) {
          const @w.gemm : f32[5,48]
          %y.covered = slice(%x) {dim = 2, end = 8} : f32[1,3,8,8]
          %y.patches = reshape(%y.covered) {shape = [1, 3, 2, 4, 2, 4]} : f32[1,3,2,4,2,4]
          %y.patches_1 = permute(%y.patches) {dims = [0, 2, 4, 1, 3, 5]} : f32[1,2,2,3,4,4]
          %y.im2col = reshape(%y.patches_1) {shape = [1, 2, 2, 48]} : f32[1,2,2,48]
          %y.gemm = linear(%y.im2col, @w.gemm) : f32[1,2,2,5]
          %y = permute(%y.gemm) {dims = [0, 3, 1, 2]} : f32[1,5,2,2]
          return %y
        }
        """),
    ("pool-late-mean-then-select", PoolLate(), """
        graph @main(%x: f32[2,8,6]) {
          const @w : f32[4,6]
          const @b : f32[4]
          const @w2 : f32[3,4]
          %p = mean(%x) {dims = [1]} : f32[2,6]
          %y = linear(%p, @w, @b) : f32[2,4]
          %z = linear(%y, @w2) : f32[2,3]
          %c = select(%x) {dim = 1, index = 0} : f32[2,6]
          %h = linear(%c, @w) : f32[2,4]
          %t = tanh(%h) : f32[2,4]
          return %z, %t
        }
        """, """
        graph @main(%x: f32[2,8,6]) {
          const @w : f32[4,6]
          const @b : f32[4]
          const @w2 : f32[3,4]
          %y.rows = linear(%x, @w, @b) : f32[2,8,4]
          %z.rows = linear(%y.rows, @w2) : f32[2,8,3]
          %z = mean(%z.rows) {dims = [1]} : f32[2,3]
          %h.rows = linear(%x, @w) : f32[2,8,4]
          %h = select(%h.rows) {dim = 1, index = 0} : f32[2,4]
          %t = tanh(%h) : f32[2,4]
          return %z, %t
        }
        """),
    ("pool-late-no-change-features-one-batch-other-uses", PoolLate(), """
        graph @main(%x: f32[1,8,6], %v: f32[2,8,6]) {
          const @w : f32[4,6]
          const @w8 : f32[4,8]
          %c = select(%x) {dim = 1, index = 0} : f32[1,6]
          %h = linear(%c, @w) : f32[1,4]
          %f = mean(%v) {dims = [2]} : f32[2,8]
          %g = linear(%f, @w8) : f32[2,4]
          %p = mean(%v) {dims = [1]} : f32[2,6]
          %q = linear(%p, @w) : f32[2,4]
          return %h, %g, %q, %p
        }
        """, None),
    ("conv-as-gemm-no-change-depthwise-overlapping-2d", ConvAsGemm(), """
        graph @main(%x: f32[2,4,8], %x2: f32[1,4,4,4]) {
          const @dw : f32[4,1,3]
          const @w2 : f32[4,4,3,3]
          %y = conv1d(%x, @dw) {padding = [1], groups = 4} : f32[2,4,8]
          %z = conv2d(%x2, @w2) {padding = [1, 1]} : f32[1,4,4,4]
          return %y, %z
        }
        """, None),
]
GOLDEN_IDS = [case[0] for case in GOLDEN]


@pytest.mark.parametrize("case", GOLDEN, ids=GOLDEN_IDS)
def test_golden(case):
    _, p, source, expected = case
    graph = _parse(_text(source))
    result = p.run(graph, PassContext())
    verify(result.graph)
    expected_text = print_graph(graph) if expected is None else _text(expected)
    assert print_graph(result.graph) == expected_text
    assert result.changed == (expected is not None)
    _assert_same_outputs(graph, result.graph, _inputs(graph))


def test_constant_masks_become_is_causal_or_go():
    """A constant causal mask, bool or additive, the same for every batch and head, becomes
    `is_causal` (a banded one with `window`); one that keeps everything (all True, all 0) goes;
    a padding mask (differing by batch) stays."""
    source = _text("""
        graph @main(%q: f32[2,4,6,8], %k: f32[2,4,6,8], %v: f32[2,4,6,8]) {
          const @causal : bool[1,1,6,6]
          const @window : f32[6,6]
          const @padding : bool[2,1,6,6]
          const @everything : bool[2,1,6,6]
          const @zeros : f32[6,6]
          %a = scaled_dot_product_attention(%q, %k, %v, @causal) : f32[2,4,6,8]
          %b = scaled_dot_product_attention(%q, %k, %v, @window) {scale = 0.5} : f32[2,4,6,8]
          %c = scaled_dot_product_attention(%q, %k, %v, @padding) : f32[2,4,6,8]
          %d = scaled_dot_product_attention(%q, %k, %v, @everything) : f32[2,4,6,8]
          %e = scaled_dot_product_attention(%q, %k, %v, @zeros) {scale = 0.5} : f32[2,4,6,8]
          return %a, %b, %c, %d, %e
        }
        """)
    padding = np.broadcast_to(causal_mask(6, 6), (2, 1, 6, 6)).copy()
    padding[1, ..., 5] = False
    graph = parse_graph(source, {"causal": causal_mask(6, 6)[None, None], "padding": padding,
                                 "window": np.where(causal_mask(6, 6, 3), 0, -np.inf).astype(np.float32),
                                 "everything": np.ones((2, 1, 6, 6), bool), "zeros": np.zeros((6, 6), np.float32)})
    result = Canonicalize().run(graph, PassContext())
    assert print_graph(result.graph) == source.replace(
        "%v, @causal) :", "%v) {is_causal = true} :").replace(
        "%v, @window) {scale = 0.5}", "%v) {is_causal = true, scale = 0.5, window = 3}").replace(
        "%v, @everything) :", "%v) :").replace("%v, @zeros) {scale = 0.5}", "%v) {scale = 0.5}")
    _assert_same_outputs(graph, result.graph, _inputs(graph))


def test_a_mask_anded_with_one_that_keeps_everything_is_read_as_it_is():
    """Hugging Face's padding mask: `logical_and(all True [B,1,L,1], keys [B,1,1,S])` -> the keys'
    row, one for every query; a runtime or partial other side stays."""
    source = _text("""
        graph @main(%q: f32[2,4,6,8], %k: f32[2,4,6,8], %v: f32[2,4,6,8], %keys: bool[2,1,1,6], %rows: bool[2,1,6,1]) {
          const @all : bool[2,1,6,1]
          const @some : bool[2,1,6,1]
          %m = logical_and(@all, %keys) : bool[2,1,6,6]
          %a = scaled_dot_product_attention(%q, %k, %v, %m) : f32[2,4,6,8]
          %n = logical_and(%keys, @some) : bool[2,1,6,6]
          %b = scaled_dot_product_attention(%q, %k, %v, %n) : f32[2,4,6,8]
          %o = logical_and(%rows, %keys) : bool[2,1,6,6]
          %c = scaled_dot_product_attention(%q, %k, %v, %o) : f32[2,4,6,8]
          return %a, %b, %c
        }
        """)
    some = np.ones((2, 1, 6, 1), bool)
    some[1, 0, 3] = False
    graph = parse_graph(source, {"all": np.ones((2, 1, 6, 1), bool), "some": some})
    result = Canonicalize().run(graph, PassContext())
    assert print_graph(result.graph) == source.replace("(%q, %k, %v, %m)", "(%q, %k, %v, %keys)")
    inputs = _inputs(graph)
    inputs[3] = np.random.default_rng(0).random((2, 1, 1, 6)) < 0.7
    inputs[3][..., 0] = True  # no row without a key
    inputs[4] = np.ones((2, 1, 6, 1), bool)
    _assert_same_outputs(graph, result.graph, inputs)


def test_constant_adds_fold_into_one_and_a_whole_index_is_a_reshape():
    """BERT's embeddings: `(x + token types) + positions` -> `x + (token types + positions)`,
    one pass over x (also where the sum broadcasts x wider); a shared inner add stays.
    `index` with constant indices reading every element once, in order (torch.export's
    `mask[:, None, None, :]`) -> a reshape; one that repeats, drops or reorders stays."""
    source = _text("""
        graph @main(%x: f32[2,3,4], %y: f32[2,3,4], %z: f32[3,4], %mask: bool[2,6]) {
          const @types : f32[1,3,4]
          const @positions : f32[3,4]
          const @wide : f32[2,3,4]
          const @batch : i64[2,1,1,1]
          const @keys : i64[1,1,1,6]
          const @backwards : i64[1,1,1,6]
          %a = add(%x, @types) : f32[2,3,4]
          %b = add(@positions, %a) : f32[2,3,4]
          %c = add(%y, @types) : f32[2,3,4]
          %d = add(%c, @positions) : f32[2,3,4]
          %e = add(%c, %y) : f32[2,3,4]
          %f = add(%z, @positions) : f32[3,4]
          %g = add(%f, @wide) : f32[2,3,4]
          %m = index(%mask, @batch, @keys) : bool[2,1,1,6]
          %n = index(%mask, @batch, @backwards) : bool[2,1,1,6]
          return %b, %d, %e, %g, %m, %n
        }
        """)
    rng = np.random.default_rng(0)
    weights = {"types": rng.random((1, 3, 4)).astype(np.float32), "positions": rng.random((3, 4)).astype(np.float32),
               "wide": rng.random((2, 3, 4)).astype(np.float32), "batch": np.arange(2).reshape(2, 1, 1, 1),
               "keys": np.arange(6).reshape(1, 1, 1, 6), "backwards": np.arange(6)[::-1].reshape(1, 1, 1, 6).copy()}
    graph = parse_graph(source, weights)
    result = Canonicalize().run(graph, PassContext())
    text = print_graph(DeadCodeElimination().run(result.graph, PassContext()).graph)
    assert "%b = add(%x, @types.plus.positions) : f32[2,3,4]" in text and "%a =" not in text
    assert "%d = add(%c, @positions)" in text  # %c is shared
    assert "%g = add(%z, @positions.plus.wide) : f32[2,3,4]" in text
    assert "%m = reshape(%mask) {shape = [2, 1, 1, 6]} : bool[2,1,1,6]" in text
    assert "%n = index(%mask, @batch, @backwards)" in text
    inputs = _inputs(graph)
    inputs[3] = rng.random((2, 6)) < 0.5
    _assert_same_outputs(graph, result.graph, inputs)


def test_a_chain_of_moves_keeping_the_order_is_one_reshape():
    """conv-as-gemm's patch embedding then the model's flatten and transpose: `permute` [1,4,4,8]
    -> [1,8,4,4], `reshape` -> [1,8,16], `transpose` -> [1,16,8] reads every element in order:
    one reshape of the source; a chain that reorders stays."""
    source = _text("""
        graph @main(%x: f32[1,4,4,8]) {
          %a = permute(%x) {dims = [0, 3, 1, 2]} : f32[1,8,4,4]
          %b = reshape(%a) {shape = [1, 8, 16]} : f32[1,8,16]
          %c = transpose(%b) {dim0 = 1, dim1 = 2} : f32[1,16,8]
          %d = reshape(%a) {shape = [1, 8, 16]} : f32[1,8,16]
          %e = unsqueeze(%d) {dim = 0} : f32[1,1,8,16]
          return %c, %e
        }
        """)
    graph = _parse(source)
    result = Canonicalize().run(graph, PassContext())
    text = print_graph(DeadCodeElimination().run(result.graph, PassContext()).graph)
    assert "%c = reshape(%x) {shape = [1, 16, 8]} : f32[1,16,8]" in text
    assert "%e = unsqueeze(%d) {dim = 0}" in text and "%d = reshape(%a)" in text  # reorders: stays
    _assert_same_outputs(graph, result.graph, _inputs(graph))


def test_golden_inputs_print_as_written():
    """The inputs are in the printer's form, so a no-change case compares its input text."""
    for _, _, source, _ in GOLDEN:
        assert print_graph(_parse(_text(source))) == _text(source)


# ---------------------------------------------------------------------------------------------
# idempotence

def _assert_idempotent(p: Pass, graph: Graph) -> Graph:
    once = p.run(graph, PassContext())
    verify(once.graph)
    twice = p.run(once.graph, PassContext())
    assert not twice.changed, f"{p.name} changed its own output"
    assert twice.graph.same_as(once.graph)
    return once.graph


@pytest.mark.parametrize("p", CANONICAL, ids=[p.name for p in CANONICAL])
@pytest.mark.parametrize("case", GOLDEN, ids=GOLDEN_IDS)
def test_idempotent_on_golden_inputs(p, case):
    _assert_idempotent(p, _parse(_text(case[2])))


ZOO_CASES = [(name, "export") for name in zoo.ZOO] + [(name, "fx") for name, e in zoo.ZOO.items() if e.symbolic_trace]


@lru_cache(maxsize=None)
def _lowered(name: str, frontend: str) -> tuple[Graph, list[np.ndarray]]:
    model, inputs = built(name)
    graph, signature = from_module(model, inputs, frontend=frontend)
    args, kwargs = split_inputs(inputs)
    flat = list(args) + [kwargs[n] for n in signature.input_names if n in kwargs]
    return graph, [t.numpy() for t in flat]


def _layout_chains(graph: Graph) -> list[str]:
    """Results of reshape-of-reshape and transpose/permute-of-transpose/permute ops."""
    producer = graph.producer()
    layout = ("transpose", "permute")
    chains = []
    for op in graph.ops:
        inner = producer.get(op.operands[0]) if op.operands else None
        if inner is not None and ((op.kind == inner.kind == "reshape") or (op.kind in layout and inner.kind in layout)):
            chains.append(op.result)
    return chains


def _identities(graph: Graph) -> list[str]:
    types = graph.types
    found = []
    for op in graph.ops:
        if op.kind in ("reshape", "expand", "squeeze", "slice", "cast"):
            identity = types[op.operands[0]] == op.type
        elif op.kind == "transpose":
            identity = op.attr("dim0") % op.type.rank == op.attr("dim1") % op.type.rank
        elif op.kind == "permute":
            identity = [d % op.type.rank for d in op.attr("dims")] == list(range(op.type.rank))
        else:
            identity = False
        if identity:
            found.append(op.result)
    return found


@pytest.mark.parametrize("p", CANONICAL, ids=[p.name for p in CANONICAL])
@pytest.mark.parametrize("name,frontend", ZOO_CASES, ids=[f"{n}-{f}" for n, f in ZOO_CASES])
def test_idempotent_on_zoo(p, name, frontend):
    graph, inputs = _lowered(name, frontend)
    once = _assert_idempotent(p, graph)
    # a convolution as a GEMM sums in another order: float32 agrees to a few ulps of its sums
    _assert_same_outputs(graph, once, inputs, 1e-5 if isinstance(p, (ConvAsGemm, PoolLate)) else 1e-6)
    if isinstance(p, Canonicalize):
        live = DeadCodeElimination()(once)
        assert _identities(live) == [] and _layout_chains(live) == []


def test_canonicalize_fires_on_bert_style():
    """bert-style's `k.transpose(-1, -2)` of split heads becomes one permute per layer."""
    graph, _ = _lowered("bert-style", "export")
    assert _layout_chains(graph)
    after = DeadCodeElimination()(Canonicalize()(graph))
    assert len(after.ops) < len(graph.ops)


# ---------------------------------------------------------------------------------------------
# the property

def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def layout_chains(draw) -> Graph:
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=4)))
    b = GraphBuilder()
    value = b.input("x", tensor(shape))
    outputs = []
    for _ in range(draw(st.integers(1, 8))):
        s = b.type_of(value).shape
        rank = len(s)
        kind = draw(st.sampled_from(["identity", "reshape", "transpose", "permute"]))
        if kind == "reshape":
            rest, dims = math.prod(s), []
            for _ in range(draw(st.integers(0, 3))):
                dims.append(draw(st.sampled_from(_divisors(rest))))
                rest //= dims[-1]
            value = b.op("reshape", value, shape=draw(st.permutations(dims + [rest])))
        elif kind == "transpose":
            value = b.op("transpose", value, dim0=draw(st.integers(-rank, rank - 1)),
                         dim1=draw(st.integers(-rank, rank - 1)))
        elif kind == "permute":
            value = b.op("permute", value, dims=draw(st.permutations(range(rank))))
        else:
            identity = draw(st.sampled_from(["reshape", "transpose", "permute", "expand", "squeeze", "slice",
                                             "cast"]))
            d = draw(st.integers(-rank, rank - 1))
            attrs = {"reshape": {"shape": s}, "transpose": {"dim0": d, "dim1": d % rank},
                     "permute": {"dims": list(range(rank))}, "expand": {"shape": s},
                     "squeeze": {"dims": [i for i in range(rank) if s[i] != 1]},
                     "slice": {"dim": d, "end": s[d] + draw(st.integers(0, 2))}, "cast": {"dtype": DType.F32}}
            value = b.op(identity, value, **attrs[identity])
        if draw(st.booleans()):
            outputs.append(value)
    return b.finish(outputs + [value])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layout_chains(), st.integers(0, 2**16))
def test_layout_chains_canonicalize(graph, seed):
    once = _assert_idempotent(Canonicalize(), graph)
    live = DeadCodeElimination()(once)
    assert _identities(live) == []
    assert _layout_chains(live) == []
    assert len(live.ops) <= len(graph.ops)
    inputs = _inputs(graph, seed)
    for a, e in zip(NumpyExecutor(live)(*inputs), NumpyExecutor(graph)(*inputs)):
        assert a.shape == e.shape and np.array_equal(a, e)
