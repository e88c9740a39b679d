"""The numpy reference semantics (`REFERENCE`, the spec) against the torch executor's kernels
(`TORCH_KERNELS`), op by op on random inputs, and the two executors against each other.

Each case gives the operand arrays and the attributes of one op. The declared result type comes
from the op table's type rule; the reference result is cast to it (as `NumpyExecutor` does), and
the torch kernel must produce that dtype and shape itself (`TorchExecutor` casts nothing).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tcc.ir import OPS, REFERENCE, DType, GraphBuilder, TensorType, tensor, verify
from tcc.runtime.numpy_executor import NumpyExecutor
from tcc.runtime.torch_dtypes import TORCH_DTYPES
from tcc.runtime.torch_executor import _CREATES_TENSORS, TORCH_KERNELS, TorchExecutor

RTOL = 1e-5
ATOL = 1e-6


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def f32(*shape, seed=0, low=None, high=None):
    rng = _rng(seed + 1000 * len(shape) + sum(shape))
    if low is not None:
        return rng.uniform(low, high, size=shape).astype(np.float32)
    return rng.standard_normal(shape).astype(np.float32)


def i64(*shape, high=5, low=None, seed=0, dtype=np.int64):
    rng = _rng(seed + 7 + sum(shape))
    return rng.integers(-high if low is None else low, high, size=shape).astype(dtype)


def bools(*shape, seed=0, p=0.5):
    return _rng(seed + 13 + sum(shape)).random(shape) < p


def _case(id_, kind, operands, **attrs):
    return pytest.param(kind, operands, attrs, id=id_)


def _mask_with_dead_row():
    m = bools(2, 1, 4, 5, seed=3, p=0.6)
    m[0, 0, 1, :] = False  # query row 1 of batch 0 attends to nothing
    m[1, 0, 3, :] = False
    m[..., 0, 0] = True
    return m


def _float_mask_with_dead_row():
    return np.where(_mask_with_dead_row(), np.float32(0.25), np.float32(-np.inf)).astype(np.float32)


_X = f32(2, 3, 4)
CASES = [
    # -- elementwise binary: floats, ints, broadcasting --------------------------------------
    _case("add-f32-bcast", "add", [f32(2, 3, 4), f32(3, 1, seed=1)]),
    _case("add-i64", "add", [i64(3, 4), i64(4, seed=2)]),
    _case("add-bool", "add", [bools(3, 4), bools(3, 4, seed=1)]),
    _case("sub-f32", "sub", [f32(3, 4), f32(3, 4, seed=1)]),
    _case("sub-i64", "sub", [i64(3, 4), i64(1, 4, seed=1)]),
    _case("mul-f32", "mul", [f32(2, 3), f32(2, 3, seed=1)]),
    _case("mul-i64-scalar", "mul", [i64(2, 3), np.array(-3, dtype=np.int64)]),
    _case("div-f32", "div", [f32(3, 4), f32(3, 4, seed=1, low=0.5, high=2.0)]),
    _case("pow-f32", "pow", [f32(3, 4, low=0.1, high=3.0), f32(3, 4, seed=1, low=-2.0, high=2.0)]),
    _case("maximum-f32", "maximum", [f32(3, 4), f32(4, seed=1)]),
    _case("minimum-i64", "minimum", [i64(3, 4), i64(3, 4, seed=1)]),
    # -- comparisons and logic ---------------------------------------------------------------
    _case("eq-i64", "eq", [i64(4, 5, high=2), i64(4, 5, high=2, seed=1)]),
    _case("ne-i64", "ne", [i64(4, 5, high=2), i64(5, high=2, seed=1)]),
    _case("lt-f32", "lt", [f32(4, 5), f32(4, 5, seed=1)]),
    _case("le-i64", "le", [i64(4, 5, high=2), i64(4, 5, high=2, seed=1)]),
    _case("gt-f32", "gt", [f32(4, 5), np.array(0.0, dtype=np.float32)]),
    _case("ge-i64", "ge", [i64(4, 5, high=2), i64(4, 5, high=2, seed=1)]),
    _case("logical_and", "logical_and", [bools(3, 4), bools(3, 4, seed=1)]),
    _case("logical_or-bcast", "logical_or", [bools(3, 4), bools(4, seed=1)]),
    _case("logical_not", "logical_not", [bools(3, 4)]),
    # -- elementwise unary -------------------------------------------------------------------
    _case("neg-f32", "neg", [f32(3, 4)]),
    _case("neg-i64", "neg", [i64(3, 4)]),
    _case("relu-f32", "relu", [f32(3, 4)]),
    _case("relu-i64", "relu", [i64(3, 4)]),
    _case("tanh", "tanh", [f32(3, 4)]),
    _case("sigmoid", "sigmoid", [f32(3, 4) * 4]),
    _case("exp", "exp", [f32(3, 4)]),
    _case("sqrt", "sqrt", [f32(3, 4, low=0.01, high=9.0)]),
    _case("rsqrt", "rsqrt", [f32(3, 4, low=0.01, high=9.0)]),
    _case("erf", "erf", [f32(3, 4) * 2]),
    _case("abs-f32", "abs", [f32(3, 4)]),
    _case("abs-i64", "abs", [i64(3, 4)]),
    _case("sign-f32", "sign", [np.array([[-2.5, 0.0, 3.0]], np.float32)]),
    _case("sign-i64", "sign", [i64(3, 4)]),
    _case("floor", "floor", [f32(3, 4) * 5]),
    _case("ceil", "ceil", [f32(3, 4) * 5]),
    _case("log", "log", [f32(3, 4, low=0.01, high=9.0)]),
    _case("cos", "cos", [f32(3, 4) * 4]),
    _case("sin", "sin", [f32(3, 4) * 4]),
    _case("silu", "silu", [f32(3, 4) * 4]),
    _case("gelu-none", "gelu", [f32(4, 8) * 3]),
    _case("gelu-exact", "gelu", [f32(4, 8) * 3], approximate="none"),
    _case("gelu-tanh", "gelu", [f32(4, 8) * 3], approximate="tanh"),
    # -- normalizations ----------------------------------------------------------------------
    _case("softmax-last", "softmax", [f32(2, 3, 5) * 3], dim=-1),
    _case("softmax-first", "softmax", [f32(2, 3, 5) * 3], dim=0),
    _case("layer_norm-affine", "layer_norm", [f32(2, 3, 8), f32(8, seed=1), f32(8, seed=2)], normalized_shape=(8,)),
    _case("layer_norm-2d-eps", "layer_norm", [f32(2, 3, 8) * 5 + 1], normalized_shape=(3, 8), eps=1e-12),
    _case("layer_norm-weight-only", "layer_norm", [f32(4, 6), f32(6, seed=3)], normalized_shape=(6,), eps=0.1),
    _case("rms_norm", "rms_norm", [f32(2, 3, 8) * 3 + 1, f32(8, seed=1)], normalized_shape=(8,)),
    _case("rms_norm-2d-no-weight", "rms_norm", [f32(2, 3, 8)], normalized_shape=(3, 8), eps=0.5),
    _case("batch_norm-affine", "batch_norm",
          [f32(2, 4, 5), f32(4, seed=1), f32(4, seed=2, low=0.5, high=2), f32(4, seed=3), f32(4, seed=4)], eps=1e-3),
    _case("batch_norm-2d-statistics-only", "batch_norm", [f32(2, 3, 2, 2), f32(3, seed=1), f32(3, seed=2, low=0.1,
                                                                                              high=1)]),
    _case("group_norm-affine", "group_norm", [f32(2, 6, 5) * 2 + 1, f32(6, seed=1), f32(6, seed=2)], num_groups=3),
    _case("group_norm-per-channel-4d", "group_norm", [f32(2, 4, 3, 3)], num_groups=4, eps=0.1),
    # -- contractions ------------------------------------------------------------------------
    _case("linear-bias", "linear", [f32(2, 3, 8), f32(5, 8, seed=1), f32(5, seed=2)]),
    _case("linear-nobias-1d", "linear", [f32(8), f32(5, 8, seed=1)]),
    _case("matmul-batched-bcast", "matmul", [f32(2, 1, 3, 4), f32(5, 4, 6, seed=1)]),
    _case("matmul-vec-mat", "matmul", [f32(4), f32(2, 4, 3, seed=1)]),
    _case("matmul-mat-vec", "matmul", [f32(2, 3, 4), f32(4, seed=1)]),
    _case("matmul-i64", "matmul", [i64(3, 4), i64(4, 2, seed=1)]),
    # -- attention ---------------------------------------------------------------------------
    _case("sdpa-plain", "scaled_dot_product_attention", [f32(2, 2, 4, 8), f32(2, 2, 5, 8, seed=1),
                                                         f32(2, 2, 5, 3, seed=2)]),
    _case("sdpa-causal", "scaled_dot_product_attention", [f32(2, 2, 4, 8), f32(2, 2, 4, 8, seed=1),
                                                          f32(2, 2, 4, 8, seed=2)], is_causal=True),
    _case("sdpa-causal-rectangular", "scaled_dot_product_attention", [f32(2, 3, 8), f32(2, 5, 8, seed=1),
                                                                      f32(2, 5, 4, seed=2)], is_causal=True),
    _case("sdpa-sliding-window", "scaled_dot_product_attention", [f32(2, 2, 6, 8), f32(2, 2, 6, 8, seed=1),
                                                                  f32(2, 2, 6, 8, seed=2)], is_causal=True, window=3),
    _case("sdpa-sliding-window-rectangular", "scaled_dot_product_attention",
          [f32(2, 5, 8), f32(2, 7, 8, seed=1), f32(2, 7, 4, seed=2)], is_causal=True, window=2),
    _case("sdpa-scale", "scaled_dot_product_attention", [f32(1, 3, 8), f32(1, 5, 8, seed=1),
                                                         f32(1, 5, 8, seed=2)], scale=0.3),
    _case("sdpa-bool-mask-dead-row", "scaled_dot_product_attention",
          [f32(2, 2, 4, 8), f32(2, 2, 5, 8, seed=1), f32(2, 2, 5, 3, seed=2), _mask_with_dead_row()]),
    _case("sdpa-float-mask-dead-row", "scaled_dot_product_attention",
          [f32(2, 2, 4, 8), f32(2, 2, 5, 8, seed=1), f32(2, 2, 5, 3, seed=2), _float_mask_with_dead_row()]),
    _case("sdpa-float-mask", "scaled_dot_product_attention",
          [f32(2, 2, 4, 8), f32(2, 2, 5, 8, seed=1), f32(2, 2, 5, 3, seed=2), f32(4, 5, seed=4)]),
    # -- convolution -------------------------------------------------------------------------
    _case("conv2d-plain", "conv2d", [f32(2, 3, 7, 6), f32(4, 3, 3, 3, seed=1)]),
    _case("conv2d-bias-stride-pad", "conv2d", [f32(2, 3, 7, 6), f32(4, 3, 3, 2, seed=1), f32(4, seed=2)],
          stride=(2, 1), padding=(1, 2)),
    _case("conv2d-groups-dilation", "conv2d", [f32(1, 4, 9, 8), f32(6, 2, 3, 3, seed=1), f32(6, seed=2)],
          stride=(1, 2), padding=(2, 1), dilation=(2, 1), groups=2),
    _case("conv2d-depthwise", "conv2d", [f32(2, 4, 5, 5), f32(4, 1, 3, 3, seed=1)], padding=(1, 1), groups=4),
    _case("conv1d-plain", "conv1d", [f32(2, 3, 9), f32(4, 3, 3, seed=1)]),
    _case("conv1d-bias-stride-pad-dilation", "conv1d", [f32(2, 1, 20), f32(4, 1, 5, seed=1), f32(4, seed=2)],
          stride=(3,), padding=(2,), dilation=(2,)),
    _case("conv1d-depthwise", "conv1d", [f32(2, 4, 7), f32(4, 1, 3, seed=1), f32(4, seed=2)], padding=(1,), groups=4),
    _case("conv1d-groups", "conv1d", [f32(1, 4, 8), f32(6, 2, 2, seed=1)], stride=(2,), groups=2),
    _case("pad-last-dims", "pad", [f32(2, 3, 4)], pads=(1, 2, 0, 1), value=-1.5),
    _case("pad-integer", "pad", [i64(2, 3)], pads=(2, 0)),
    _case("argmax-ties-first", "argmax", [np.array([[1, 3, 3], [2, 2, 0]], np.float32)], dim=1),
    _case("argmax-keepdim", "argmax", [i64(3, 4, high=9)], dim=0, keepdim=True),
    # -- indexing ----------------------------------------------------------------------------
    _case("embedding-i64", "embedding", [f32(10, 4), i64(2, 3, low=0, high=10)]),
    _case("embedding-i32", "embedding", [f32(10, 4), i64(2, 3, low=0, high=10, dtype=np.int32)]),
    _case("gather-dim1", "gather", [_X, i64(2, 5, 4, low=0, high=3)], dim=1),
    _case("gather-dim-neg", "gather", [_X, i64(2, 3, 2, low=0, high=4)], dim=-1),
    _case("gather-i32-index", "gather", [_X, i64(2, 3, 2, low=0, high=4, dtype=np.int32)], dim=2),
    _case("index-one", "index", [_X, i64(5, low=-2, high=2)]),
    _case("index-two-bcast", "index", [_X, i64(4, 1, low=0, high=2), i64(3, low=-3, high=3)]),
    _case("index-i32", "index", [_X, i64(3, low=0, high=2, dtype=np.int32)]),
    # -- shape ops ---------------------------------------------------------------------------
    _case("reshape", "reshape", [_X], shape=(4, 6)),
    _case("reshape-scalar", "reshape", [f32(1, 1)], shape=()),
    _case("permute", "permute", [_X], dims=(2, 0, 1)),
    _case("permute-neg", "permute", [_X], dims=(-1, 0, -2)),
    _case("transpose", "transpose", [_X], dim0=0, dim1=-1),
    _case("slice-basic", "slice", [_X], dim=1, start=1, end=3),
    _case("slice-step-neg-start", "slice", [f32(2, 9)], dim=-1, start=-7, end=None, step=3),
    _case("slice-end-past", "slice", [_X], dim=2, start=1, end=100, step=2),
    _case("select", "select", [_X], dim=1, index=2),
    _case("select-neg", "select", [_X], dim=-1, index=-1),
    _case("unsqueeze", "unsqueeze", [_X], dim=1),
    _case("unsqueeze-neg", "unsqueeze", [_X], dim=-1),
    _case("squeeze", "squeeze", [f32(2, 1, 3, 1)], dims=(1, -1)),
    _case("squeeze-non-unit", "squeeze", [f32(2, 1, 3)], dims=(0, 1)),
    _case("squeeze-none", "squeeze", [f32(2, 1, 3)], dims=()),
    _case("expand", "expand", [f32(3, 1)], shape=(2, 3, 4)),
    _case("cat", "cat", [f32(2, 3), f32(2, 1, seed=1), f32(2, 4, seed=2)], dim=1),
    _case("cat-i64-neg", "cat", [i64(2, 3), i64(1, 3, seed=1)], dim=-2),
    # -- reductions --------------------------------------------------------------------------
    _case("mean-all", "mean", [_X]),
    _case("mean-dims-keep", "mean", [_X], dims=(0, -1), keepdim=True),
    _case("sum-f32", "sum", [_X], dims=(1,)),
    _case("cumsum-f32", "cumsum", [_X], dim=1),
    _case("cumsum-i64-last", "cumsum", [np.array([[1, 0, 1, 1], [0, 1, 1, 0]], np.int64)], dim=-1),
    _case("sum-i64", "sum", [i64(3, 4)], dims=(-1,), keepdim=True),
    _case("sum-i32", "sum", [i64(3, 4, dtype=np.int32)], dims=(1,)),
    _case("any-all", "any", [bools(3, 4, p=0.1)]),
    _case("any-dims", "any", [bools(3, 4, 2, p=0.2)], dims=(1,), keepdim=True),
    _case("any-f32", "any", [np.where(bools(3, 4, p=0.3), f32(3, 4), 0).astype(np.float32)], dims=(0,)),
    # -- select / creation / cast ------------------------------------------------------------
    _case("where-bcast", "where", [bools(3, 4), f32(3, 4), np.array(-1.5, dtype=np.float32)]),
    _case("where-i64", "where", [bools(4), i64(3, 4), i64(3, 1, seed=1)]),
    _case("index_copy-cache", "index_copy", [f32(1, 2, 6, 3), np.array([4], np.int64), f32(1, 2, 1, 3, seed=1)], dim=2),
    _case("index_copy-rows-i64", "index_copy", [i64(5, 3), np.array([3, 0], np.int64), i64(2, 3, seed=2)], dim=-2),
    _case("arange", "arange", [], end=7),
    _case("arange-step", "arange", [], start=-3, end=10, step=4, dtype=DType.I32),
    _case("arange-neg-step-f32", "arange", [], start=5, end=-4, step=-2, dtype=DType.F32),
    _case("full-f32", "full", [], shape=(2, 3), value=0.1),
    _case("full-neg-inf", "full", [], shape=(2,), value=float("-inf")),
    _case("full-nan", "full", [], shape=(3,), value=float("nan")),
    _case("full-scalar-i64", "full", [], shape=(), value=-7.0, dtype=DType.I64),
    _case("full-bool", "full", [], shape=(2, 2), value=1.0, dtype=DType.BOOL),
    _case("cast-f32-i64-trunc", "cast", [np.array([-2.7, -1.5, -0.5, 0.0, 0.4, 1.5, 2.9, 100.99], np.float32)],
          dtype=DType.I64),
    _case("cast-f32-i32-trunc", "cast", [f32(3, 4) * 50], dtype=DType.I32),
    _case("cast-f32-bool", "cast", [np.array([0.0, -0.0, 0.1, -3.0, 1e-30, np.inf, np.nan], np.float32)],
          dtype=DType.BOOL),
    _case("cast-i64-bool", "cast", [i64(3, 4, high=2)], dtype=DType.BOOL),
    _case("cast-i64-f32", "cast", [i64(3, 4, high=1000)], dtype=DType.F32),
    _case("cast-bool-f32", "cast", [bools(3, 4)], dtype=DType.F32),
    # -- integer quantization ----------------------------------------------------------------
    _case("quantize-i8-ties-clip", "quantize", [np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 1e4, -1e4, 0.3],
                                                          np.float32) * 0.1], dtype=DType.I8, scale=0.1),
    _case("quantize-i4-zp", "quantize", [f32(3, 4)], dtype=DType.I4, scale=0.25, zero_point=-2),
    _case("quantize-i16", "quantize", [f32(3, 4) * 100], dtype=DType.I16, scale=0.01, zero_point=7),
    _case("quantize-b1", "quantize", [np.array([-1.0, -0.0, 0.0, 2.0, -1e-30], np.float32)], dtype=DType.B1,
          scale=1.0),
    _case("dequantize-per-tensor", "dequantize", [i64(3, 4, high=128, dtype=np.int8), np.array(0.1, np.float32)],
          zero_point=-5),
    _case("dequantize-per-channel-i32", "dequantize", [i64(3, 4, high=1 << 20, dtype=np.int32),
                                                       f32(4, low=1e-4, high=1e-2)]),
    _case("requantize-per-channel", "requantize",
          [i64(3, 4, high=1 << 20, dtype=np.int32), np.array([1 << 30, (1 << 31) - 1, 1 << 30, 1234567891], np.int32),
           np.array([31, 40, 0, 62], np.int32)], dtype=DType.I8, scale=0.1, zero_point=3),
    _case("requantize-i64-i16", "requantize", [i64(3, 4, high=1 << 40), np.array(1 << 20, np.int32),
                                                 np.array(35, np.int32)], dtype=DType.I16, scale=0.5),
    _case("linear-i8", "linear", [i64(2, 3, 64, high=128, dtype=np.int8), i64(5, 64, high=128, dtype=np.int8, seed=1),
                                   i64(5, high=1 << 20, dtype=np.int32)]),
    _case("linear-i8-b1", "linear", [i64(4, 32, high=128, dtype=np.int8),
                                      np.where(bools(6, 32), 1, -1).astype(np.int8)]),
    _case("linear-i16-i64", "linear", [i64(4, 32, high=1 << 15, dtype=np.int16),
                                        i64(3, 32, high=1 << 15, dtype=np.int16, seed=1), i64(3, high=1 << 40)]),
    _case("matmul-i8", "matmul", [i64(2, 3, 64, high=128, dtype=np.int8), i64(64, 5, high=128, dtype=np.int8, seed=1)]),
    _case("int-softmax-i32-mask", "int_softmax", [i64(2, 3, 6, high=1 << 20, dtype=np.int32), bools(3, 1, seed=2, p=0.7)],
          multiplier=1 << 30, shift=36, ln2=11357, b=22168, c=257578234, out_bits=7),
    _case("int-gelu-i8", "int_gelu", [i64(3, 4, high=128, dtype=np.int8)], multiplier=1518500250, shift=23,
          clip=7246, one=58092853, out_multiplier=77524160, out_shift=52, dtype=DType.I8, scale=0.03125),
    _case("int-layer-norm-i16", "int_layer_norm", [i64(3, 8, high=1 << 15, dtype=np.int16),
                                                   i64(8, high=1 << 20, dtype=np.int32, seed=1),
                                                   i64(8, high=1 << 40, seed=2)], eps=100, shift=40, dtype=DType.I8,
          scale=0.05),
]


def _case_kind(param) -> str:
    return param.values[0]


def _torch(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array, copy=True))


def _declared(kind: str, operands: list[np.ndarray], attrs: dict) -> tuple[dict, TensorType]:
    opdef = OPS[kind]
    normalized = dict(opdef.normalize_attrs(attrs))
    types = [TensorType(tuple(a.shape), DType.from_numpy(a.dtype)) for a in operands]
    return normalized, opdef.infer(types, normalized)


def test_reference_torch_and_op_table_cover_the_same_ops():
    assert set(REFERENCE) == set(OPS)
    assert set(TORCH_KERNELS) == set(OPS)


def test_every_op_has_a_semantics_case():
    assert {_case_kind(c) for c in CASES} == set(OPS)


@pytest.mark.parametrize("kind, operands, attrs", CASES)
def test_reference_matches_torch_kernel(kind, operands, attrs):
    normalized, declared = _declared(kind, operands, attrs)
    expected = np.asarray(REFERENCE[kind](*operands, **normalized)).astype(declared.dtype.numpy)
    assert expected.shape == declared.shape, f"reference gives shape {expected.shape}, type rule {declared}"

    kwargs = dict(normalized)
    if kind in _CREATES_TENSORS:
        kwargs["device"] = torch.device("cpu")
    with torch.no_grad():
        got = TORCH_KERNELS[kind](*[_torch(a) for a in operands], **kwargs)
    assert got.dtype == TORCH_DTYPES[declared.dtype], (
        f"torch kernel gives {got.dtype}, the op's declared type is {declared}")
    assert tuple(got.shape) == declared.shape
    got = got.numpy()
    if declared.dtype.is_float:
        np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL, equal_nan=True)
        assert np.array_equal(np.isnan(got), np.isnan(expected))
    else:
        np.testing.assert_array_equal(got, expected)


def test_sdpa_fully_masked_row_gives_zeros_not_nan():
    q, k, v = f32(2, 2, 4, 8), f32(2, 2, 5, 8, seed=1), f32(2, 2, 5, 3, seed=2)
    mask = _mask_with_dead_row()
    attrs = dict(OPS["scaled_dot_product_attention"].normalize_attrs({}))
    ref = REFERENCE["scaled_dot_product_attention"](q, k, v, mask, **attrs)
    got = TORCH_KERNELS["scaled_dot_product_attention"](*map(_torch, (q, k, v, mask)), **attrs).numpy()
    for out in (ref, got):
        assert np.isfinite(out).all()
        assert np.array_equal(out[0, :, 1], np.zeros((2, 3), np.float32))
        assert np.array_equal(out[1, :, 3], np.zeros((2, 3), np.float32))
        assert np.abs(out[0, :, 0]).sum() > 0  # live rows are not zeroed


def test_cast_float_to_int_truncates_toward_zero():
    x = np.array([-2.7, -0.5, 0.5, 2.7], np.float32)
    expected = np.array([-2, 0, 0, 2], np.int64)
    np.testing.assert_array_equal(REFERENCE["cast"](x, dtype=DType.I64), expected)
    np.testing.assert_array_equal(TORCH_KERNELS["cast"](_torch(x), dtype=DType.I64).numpy(), expected)


def test_gelu_approximations_differ():
    """The `approximate` attribute is honoured: the two GELUs differ (slightly) on both sides."""
    x = f32(64) * 3
    for impl, conv in ((REFERENCE["gelu"], lambda a: a), (TORCH_KERNELS["gelu"], _torch)):
        exact, tanh = np.asarray(impl(conv(x), approximate="none")), np.asarray(impl(conv(x), approximate="tanh"))
        assert 1e-6 < np.abs(exact - tanh).max() < 1e-2


# -- executors -----------------------------------------------------------------------------

def _block_graph():
    rng = np.random.default_rng(5)
    b = GraphBuilder("block")
    x = b.input("x", tensor((2, 4, 8)))
    ids = b.input("ids", tensor((2, 4), DType.I64))
    table = b.constant("embed.weight", rng.standard_normal((11, 8)).astype(np.float32))
    w1 = b.constant("layer.0.fc1.weight", rng.standard_normal((16, 8)).astype(np.float32) * 0.3)
    b1 = b.constant("layer.0.fc1.bias", rng.standard_normal(16).astype(np.float32))
    w2 = b.constant("layer.0.fc2.weight", rng.standard_normal((8, 16)).astype(np.float32) * 0.3)
    ln_w = b.constant("layer.0.ln.weight", rng.standard_normal(8).astype(np.float32))
    ln_b = b.constant("layer.0.ln.bias", rng.standard_normal(8).astype(np.float32))
    h = b.op("add", x, b.op("embedding", table, ids))
    h = b.op("layer_norm", h, ln_w, ln_b, normalized_shape=(8,), eps=1e-6)
    q = b.op("reshape", h, shape=(2, 4, 2, 4))
    q = b.op("transpose", q, dim0=1, dim1=2)
    pos = b.op("arange", end=4)
    causal = b.op("ge", b.op("unsqueeze", pos, dim=1), b.op("unsqueeze", pos, dim=0))
    attn = b.op("scaled_dot_product_attention", q, q, q, causal)
    attn = b.op("reshape", b.op("permute", attn, dims=(0, 2, 1, 3)), shape=(2, 4, 8))
    h = b.op("add", h, attn)
    m = b.op("gelu", b.op("linear", h, w1, b1), approximate="tanh")
    h = b.op("add", h, b.op("linear", m, w2))
    probs = b.op("softmax", h, dim=-1)
    pooled = b.op("mean", probs, dims=(1,))
    top = b.op("cast", b.op("gt", probs, b.op("full", shape=(), value=0.125)), dtype=DType.I64)
    count = b.op("sum", top, dims=(-1,))
    return verify(b.finish([probs, pooled, count])), rng


def test_numpy_and_torch_executors_agree():
    graph, rng = _block_graph()
    x = rng.standard_normal((2, 4, 8)).astype(np.float32)
    ids = rng.integers(0, 11, size=(2, 4)).astype(np.int64)
    want = NumpyExecutor(graph)(x, ids)
    got = TorchExecutor(graph).run([_torch(x), _torch(ids)])
    assert len(want) == len(got) == 3
    # `count` thresholds float probs at 0.125: an integer result of float work, exact only
    # because no prob lies within float rounding of the threshold (on any machine)
    assert np.abs(want[0] - 0.125).min() > 1e-4
    for w, g, t in zip(want, got, graph.output_types):
        assert w.dtype == t.dtype.numpy and w.shape == t.shape
        assert g.dtype == TORCH_DTYPES[t.dtype] and tuple(g.shape) == t.shape
        if t.dtype.is_float:
            np.testing.assert_allclose(g.numpy(), w, rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_array_equal(g.numpy(), w)
    # the graph is not trivially constant: outputs depend on the inputs
    other = NumpyExecutor(graph)(x + 1, (ids + 1) % 11)
    assert not np.allclose(other[0], want[0])


def test_torch_executor_outputs_have_declared_dtypes_for_int_reductions():
    """`sum` over i32 is declared i32 (the type rule keeps the input dtype): the torch executor
    must not hand back torch's int64 promotion."""
    b = GraphBuilder("g")
    x = b.input("x", tensor((3, 4), DType.I32))
    s = b.op("sum", x, dims=(1,))
    y = b.op("add", s, b.op("full", shape=(), value=1.0, dtype=DType.I32))
    graph = verify(b.finish([y]))
    data = np.arange(12, dtype=np.int32).reshape(3, 4)
    want = NumpyExecutor(graph)(data)[0]
    got = TorchExecutor(graph).run([_torch(data)])[0]
    assert want.dtype == np.int32
    np.testing.assert_array_equal(got.numpy(), want)
    assert got.dtype == torch.int32, f"graph output declared {graph.output_types[0]}, torch executor gives {got.dtype}"


# Ops the type rules accept but that an implementation may not support. Either the type rule
# rejects them (the verifier then refuses the graph) or both implementations run them and agree:
# a graph that verifies must run on every executor.
EDGE_CASES = [
    _case("sdpa-causal-and-mask", "scaled_dot_product_attention",
          [f32(2, 2, 4, 8), f32(2, 2, 5, 8, seed=1), f32(2, 2, 5, 3, seed=2), bools(4, 5, p=0.7)], is_causal=True),
    _case("embedding-i8-indices", "embedding", [f32(10, 4), i64(2, 3, low=0, high=10, dtype=np.int8)]),
    _case("gather-i8-index", "gather", [f32(3, 4), i64(3, 2, low=0, high=4, dtype=np.int8)], dim=1),
    _case("index-i16-index", "index", [f32(3, 4), i64(2, low=0, high=3, dtype=np.int16)]),
    _case("neg-bool", "neg", [bools(3)]),
    _case("sub-bool", "sub", [bools(3), bools(3, seed=1)]),
    _case("relu-bool", "relu", [bools(3)]),
]


@pytest.mark.parametrize("kind, operands, attrs", EDGE_CASES)
def test_ops_accepted_by_the_type_rule_run_on_both_implementations(kind, operands, attrs):
    from tcc.ir.ops import OpTypeError
    try:
        _declared(kind, operands, attrs)
    except OpTypeError:
        return  # rejected up front: fine
    test_reference_matches_torch_kernel(kind, operands, attrs)
