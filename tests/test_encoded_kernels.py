"""Linears on weights in their storage encodings: one test body run on every executor (numpy
on the encoding, torch CPU, torch GPU when present) against the dense spec (numpy executor
with `encoded=False`). Integers agree bit for bit; floats within rounding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import EXECUTORS
from tcc.ir.dtypes import DType
from tcc.ir.encoding import BSR, COO, CSC, CSR, DENSE, HP, NM, Bitmap, Encoding, Packed1b
from tcc.ir.graph import GraphBuilder
from tcc.ir.types import TensorType
from tcc.ir.verifier import verify
from tcc.passes.masks import nm_mask, row_mask
from tcc.runtime.numpy_executor import NumpyExecutor
from tcc.runtime.torch_executor import TorchExecutor

SPARSE = [CSR(), CSC(), COO(), Bitmap(), BSR(2, 3), BSR(4, 4), NM(2, 4), HP(4, 4, 2), HP(3, 5, 1)]


def run_on(executor: str, graph, *inputs: np.ndarray) -> list[np.ndarray]:
    if executor == "numpy":
        return NumpyExecutor(graph)(*inputs)
    device = "cuda" if executor == "gpu" else "cpu"
    return [o.cpu().numpy() for o in TorchExecutor(graph, device).run([torch.from_numpy(x.copy()) for x in inputs])]


def linear_graph(x_type: TensorType, weight: np.ndarray, w_dtype: DType, encoding: Encoding,
                 bias: np.ndarray | None = None):
    b = GraphBuilder("g")
    x = b.input("x", x_type)
    w = b.constant("w", weight, w_dtype)
    operands = [x, w] + ([b.constant("b", bias)] if bias is not None else [])
    graph = b.finish([b.op("linear", *operands)])
    constants = tuple((n, TensorType(t.shape, t.dtype, encoding) if n == "w" else t) for n, t in graph.constants)
    return verify(graph.replace(constants=constants))


def structured(encoding: Encoding, array: np.ndarray) -> np.ndarray:
    """`array` pruned so that `encoding` can store it."""
    if isinstance(encoding, HP):
        return np.where(row_mask(array, encoding.bh, encoding.bw, encoding.row_nnz), array, 0).astype(array.dtype)
    if isinstance(encoding, NM):
        return np.where(nm_mask(array, encoding.n, encoding.m), array, 0).astype(array.dtype)
    return array


@pytest.mark.parametrize("executor", EXECUTORS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), encoding=st.sampled_from(SPARSE), rows=st.integers(1, 9),
       out=st.integers(1, 11), k=st.integers(1, 13), density=st.sampled_from([0.0, 0.3, 1.0]),
       bias=st.booleans())
def test_float_linear_on_encodings_matches_the_spec(executor, seed, encoding, rows, out, k, density, bias):
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((out, k)).astype(np.float32) * (rng.random((out, k)) < density)
    weight = structured(encoding, weight)
    graph = linear_graph(TensorType((2, rows, k), DType.F32), weight, DType.F32, encoding,
                         rng.standard_normal(out).astype(np.float32) if bias else None)
    x = rng.standard_normal((2, rows, k)).astype(np.float32)
    want = NumpyExecutor(graph, encoded=False)(x)[0]
    got = run_on(executor, graph, x)[0]
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


INT_CASES = [(DType.I8, DType.I8), (DType.I4, DType.I4), (DType.I16, DType.I8), (DType.I8, DType.B1),
             (DType.B1, DType.B1), (DType.I4, DType.B1), (DType.I16, DType.B1)]


def ints(rng, shape, dtype: DType, extreme: bool) -> np.ndarray:
    if dtype is DType.B1:
        return np.where(rng.random(shape) < 0.5, -1, 1).astype(np.int8)
    low, high = dtype.value_range
    if extreme:
        return rng.choice([low, high], size=shape).astype(dtype.numpy)
    return rng.integers(low, high, size=shape, endpoint=True).astype(dtype.numpy)


@pytest.mark.parametrize("executor", EXECUTORS)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), dtypes=st.sampled_from(INT_CASES), encoding=st.sampled_from(SPARSE),
       rows=st.integers(1, 6), out=st.integers(1, 9), k=st.sampled_from([1, 7, 63, 64, 65, 130]),
       extreme=st.booleans(), bias=st.booleans())
def test_integer_linear_on_encodings_is_bit_exact(executor, seed, dtypes, encoding, rows, out, k, extreme, bias):
    x_dtype, w_dtype = dtypes
    rng = np.random.default_rng(seed)
    weight = ints(rng, (out, k), w_dtype, extreme)
    if w_dtype is DType.B1:
        encoding = Packed1b()
    else:
        weight = structured(encoding, np.where(rng.random((out, k)) < 0.4, weight, 0).astype(weight.dtype))
    acc = DType.I64 if DType.I16 in dtypes else DType.I32
    bias_array = ints(rng, (out,), DType.I16, extreme).astype(acc.numpy) if bias else None
    graph = linear_graph(TensorType((rows, k), x_dtype), weight, w_dtype, encoding, bias_array)
    x = ints(rng, (rows, k), x_dtype, extreme)
    want = NumpyExecutor(graph, encoded=False)(x)[0]
    got = run_on(executor, graph, x)[0]
    assert got.dtype == acc.numpy
    np.testing.assert_array_equal(got, want)


def test_executors_compute_on_the_encoding_not_a_dense_copy():
    weight = np.zeros((8, 16), np.float32)
    weight[::2, ::3] = 1.0
    graph = linear_graph(TensorType((4, 16), DType.F32), weight, DType.F32, CSR())
    executor = TorchExecutor(graph)
    assert len(executor.weights) == 0 and not list(executor.buffers())  # no dense tensor of w held
    np.testing.assert_array_equal(executor.constant("w").numpy(), weight)  # decoded only when asked
    assert TorchExecutor(graph, trainable=True).weights["c0"].layout == torch.strided  # training: dense
    dense = linear_graph(TensorType((4, 16), DType.F32), weight, DType.F32, DENSE)
    assert not NumpyExecutor(dense)._kernels and NumpyExecutor(graph)._kernels
