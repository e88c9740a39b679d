"""The verifier: each negative builds a graph with `Graph`/`Op` directly (bypassing the builder's
checks) holding one defect, and `verify` must raise a `VerifyError` whose message names the op
(`%result` and kind) and the problem."""

from __future__ import annotations

import numpy as np
import pytest

from tcc.ir import (OPS, DType, Graph, GraphBuilder, Op, PerChannel, PerTensor, TensorType, VerifyError, tensor,
                    verify)
from tcc.ir.graph import freeze_weights

F23 = tensor((2, 3))
X = (("x", F23),)


def graph(ops, outputs=None, inputs=X, constants=(), weights=None) -> Graph:
    ops = tuple(ops)
    outputs = outputs if outputs is not None else (ops[-1].result,) if ops else ("x",)
    return Graph("g", tuple(inputs), tuple(constants), ops, tuple(outputs), freeze_weights(weights or {}))


def op(kind, result, operands, type_, **attrs) -> Op:
    """An op with attributes normalized by the op table (so only the intended defect remains)."""
    return Op(kind, result, tuple(operands), OPS[kind].normalize_attrs(attrs), type_)


def raw(kind, result, operands, type_, attrs=()) -> Op:
    return Op(kind, result, tuple(operands), tuple(attrs), type_)


def expect(g: Graph, *fragments: str) -> str:
    with pytest.raises(VerifyError) as info:
        verify(g)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# -- positives -----------------------------------------------------------------------------

def test_valid_graph_verifies_and_is_returned():
    g = graph([op("relu", "y", ["x"], F23), op("softmax", "p", ["y"], F23, dim=-1)])
    assert verify(g) is g


def test_builder_graph_with_constants_verifies():
    b = GraphBuilder("g")
    x = b.input("x", tensor((2, 4)))
    w = b.constant("layer.0.weight", np.ones((3, 4), np.float32))
    s = b.constant("sign", np.array([1, -1, 1], np.int8), DType.B1)
    k = b.constant("nibble", np.array([-8, 7, 0], np.int8), DType.I4)
    y = b.op("linear", x, w)
    g = b.finish([y, s, k])
    assert verify(g) is g


def test_an_input_may_be_an_output():
    g = graph([], outputs=("x",))
    assert verify(g) is g


# -- op-level defects ----------------------------------------------------------------------

def test_wrong_declared_result_shape():
    g = graph([op("relu", "y", ["x"], tensor((3, 2)))])
    expect(g, "%y", "relu", "declared f32[3,2]", "f32[2,3]")


def test_wrong_declared_result_dtype():
    g = graph([op("add", "s", ["x", "x"], tensor((2, 3), DType.I64))])
    expect(g, "%s", "add", "declared i64[2,3]", "f32[2,3]")


def test_comparison_declared_float_instead_of_bool():
    g = graph([op("lt", "c", ["x", "x"], F23)])
    expect(g, "%c", "lt", "bool[2,3]")


def test_operand_used_before_definition():
    g = graph([op("relu", "a", ["b"], F23), op("neg", "b", ["x"], F23)], outputs=("a",))
    expect(g, "%a", "relu", "'b'", "not defined before use")


def test_operand_never_defined():
    g = graph([op("relu", "a", ["ghost"], F23)])
    expect(g, "%a", "relu", "'ghost'", "not defined")


def test_duplicate_result_names():
    g = graph([op("relu", "y", ["x"], F23), op("neg", "y", ["x"], F23)])
    expect(g, "'y'", "defined twice")


def test_duplicate_result_message_names_the_op():
    """The second definition is an op: its message names it like every other op error."""
    g = graph([op("relu", "y", ["x"], F23), op("neg", "y", ["x"], F23)])
    expect(g, "%y", "neg", "defined twice")


def test_result_shadowing_an_input():
    g = graph([op("relu", "x", ["x"], F23)])
    expect(g, "'x'", "defined twice")


def test_duplicate_input_and_constant_names():
    g = graph([], outputs=("x",), constants=(("x", F23),), weights={"x": np.zeros((2, 3), np.float32)})
    expect(g, "constant 'x'", "defined twice")
    g = Graph("g", (("x", F23), ("x", F23)), (), (), ("x",), {})
    expect(g, "input 'x'", "defined twice")


def test_empty_name():
    g = graph([op("relu", "", ["x"], F23)], outputs=("x",))
    expect(g, "''", "not a valid name")


def test_linear_with_mismatched_features():
    w = tensor((4, 5))
    g = graph([op("linear", "y", ["x", "fc.weight"], tensor((2, 4)))], constants=(("fc.weight", w),),
              weights={"fc.weight": np.zeros((4, 5), np.float32)})
    expect(g, "%y", "linear", "input features", "(3,)", "[4, 5]")


def test_linear_with_wrong_bias():
    g = graph([op("linear", "y", ["x", "w", "b"], tensor((2, 4)))],
              constants=(("w", tensor((4, 3))), ("b", tensor((3,)))),
              weights={"w": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float32)})
    expect(g, "%y", "linear", "bias shape [3] is not [4]")


def test_matmul_contraction_mismatch():
    g = graph([op("matmul", "m", ["x", "x"], tensor((2, 3)))])
    expect(g, "%m", "matmul", "contraction dims differ", "[2, 3] @ [2, 3]")


def test_operand_dtype_mismatch():
    g = graph([op("add", "s", ["x", "i"], F23)], inputs=X + (("i", tensor((2, 3), DType.I64)),))
    expect(g, "%s", "add", "dtypes differ", "f32", "i64")


def test_float_only_op_on_ints():
    g = graph([op("exp", "e", ["i"], tensor((2,), DType.I64))], inputs=(("i", tensor((2,), DType.I64)),))
    expect(g, "%e", "exp", "must be a float tensor", "i64")


def test_bad_attribute_type():
    g = graph([raw("softmax", "p", ["x"], F23, (("dim", "1"),))])
    expect(g, "%p", "softmax", "'dim'", "expects int", "'1'")
    g = graph([raw("softmax", "p", ["x"], F23, (("dim", 1.0),))])
    expect(g, "%p", "softmax", "'dim'", "expects int")
    g = graph([raw("softmax", "p", ["x"], F23, (("dim", True),))])
    expect(g, "%p", "softmax", "'dim'", "expects int")


def test_bad_attribute_choice():
    g = graph([raw("gelu", "y", ["x"], F23, (("approximate", "fast"),))])
    expect(g, "%y", "gelu", "'approximate'", "'fast'", "none, tanh")


def test_unknown_attribute():
    g = graph([raw("softmax", "p", ["x"], F23, (("dim", -1), ("axis", 0)))])
    expect(g, "%p", "softmax", "unknown attribute 'axis'")


def test_missing_required_attribute():
    g = graph([raw("softmax", "p", ["x"], F23, ())])
    expect(g, "%p", "softmax", "missing attribute 'dim'")


def test_none_for_a_non_optional_attribute():
    g = graph([raw("softmax", "p", ["x"], F23, (("dim", None),))])
    expect(g, "%p", "softmax", "'dim'", "none")


def test_attributes_not_in_normalized_form():
    # defaults left out: the op table fills them, so the op's attrs are not canonical
    g = graph([raw("layer_norm", "n", ["x"], F23, (("normalized_shape", (3,)),))])
    expect(g, "%n", "layer_norm", "normalized form")
    # declaration order swapped
    g = graph([raw("transpose", "t", ["x"], tensor((3, 2)), (("dim1", 1), ("dim0", 0)))])
    expect(g, "%t", "transpose", "normalized form")


def test_unknown_op_kind():
    g = graph([raw("frobnicate", "f", ["x"], F23)])
    expect(g, "%f", "frobnicate", "unknown op 'frobnicate'")


@pytest.mark.parametrize("kind, operands, message", [
    ("relu", ["x", "x"], "takes 1 operands (input), got 2"),
    ("add", ["x"], "takes 2 operands (lhs, rhs), got 1"),
    ("linear", ["x"], "takes 2 to 3 operands (input, weight, bias?), got 1"),
    ("where", ["x", "x", "x", "x"], "takes 3 operands"),
    ("cat", [], "takes at least 1 operands"),
])
def test_operand_count_wrong(kind, operands, message):
    attrs = {"dim": 0} if kind == "cat" else {}
    g = graph([op(kind, "r", operands, F23, **attrs)])
    expect(g, "%r", kind, message)


def test_attribute_out_of_range_for_operand():
    g = graph([op("softmax", "p", ["x"], F23, dim=2)])
    expect(g, "%p", "softmax", "dim 2 out of range for rank 2")
    g = graph([op("select", "s", ["x"], tensor((2,)), dim=1, index=3)])
    expect(g, "%s", "select", "index 3 out of range")
    g = graph([op("reshape", "r", ["x"], tensor((4,)), shape=(4,))])
    expect(g, "%r", "reshape", "cannot reshape [2, 3]")


@pytest.mark.parametrize("kind, operands, attrs, message", [
    ("conv1d", ["x", "x"], {}, "input and weight must be rank 3 (NCL, OIL), got 2 and 2"),
    ("conv1d", ["x3", "w3"], {"groups": 2}, "channels do not fit: input [1, 2, 3], weight [4, 2, 2], groups 2"),
    ("conv1d", ["x3", "w3"], {"stride": (1, 1)}, "stride [1, 1] is not 1 positive int(s)"),
    ("conv1d", ["x3", "w3"], {"dilation": (3,)}, "kernel [2] does not fit input [3]"),
    ("batch_norm", ["x3", "c3", "c3"], {}, "per-channel operand shape [3] is not [2]"),
    ("group_norm", ["x3"], {"num_groups": 3}, "2 channels are not divisible into 3 groups"),
    ("rms_norm", ["x3", "c3"], {"normalized_shape": (2, 3)}, "weight shape [3] is not normalized_shape [2, 3]"),
    ("pad", ["x"], {"pads": (1, 1, 1)}, "pads [1, 1, 1] are not non-negative (before, after) pairs for rank 2"),
    ("pad", ["x"], {"pads": (0, -1)}, "are not non-negative"),
    ("argmax", ["x"], {"dim": 2}, "dim 2 out of range for rank 2"),
    ("scaled_dot_product_attention", ["x", "x", "x"], {"window": 2}, "window 2 needs is_causal and must be >= 1"),
])
def test_new_family_ops_name_their_type_errors(kind, operands, attrs, message):
    """The rules of the ops issue 19 added (convolution, channel and RMS norms, pad, argmax)."""
    inputs = X + (("x3", tensor((1, 2, 3))), ("w3", tensor((4, 2, 2))), ("c3", tensor((3,))))
    g = graph([op(kind, "r", operands, F23, **attrs)], inputs=inputs)
    expect(g, "%r", kind, message)


def test_error_names_the_first_bad_op_in_a_chain():
    g = graph([op("relu", "a", ["x"], F23), op("exp", "b", ["a"], tensor((3, 3))), op("neg", "c", ["b"], tensor((3,)))])
    message = expect(g, "%b", "exp")
    assert "%c" not in message


# -- graph-level defects -------------------------------------------------------------------

def test_output_not_defined():
    g = graph([op("relu", "y", ["x"], F23)], outputs=("y", "z"))
    expect(g, "output 'z'", "not defined")


def test_no_outputs():
    g = graph([op("relu", "y", ["x"], F23)], outputs=())
    expect(g, "no outputs")


def test_constant_weight_shape_mismatch():
    g = graph([], outputs=("x",), constants=(("layer.0.weight", F23),),
              weights={"layer.0.weight": np.zeros((3, 2), np.float32)})
    expect(g, "constant 'layer.0.weight'", "weight shape [3, 2]", "f32[2,3]")


def test_constant_weight_dtype_mismatch():
    g = graph([], outputs=("x",), constants=(("layer.0.weight", F23),),
              weights={"layer.0.weight": np.zeros((2, 3), np.float64)})
    expect(g, "constant 'layer.0.weight'", "float64", "f32")
    g = graph([], outputs=("x",), constants=(("w", tensor((2,), DType.I4)),),
              weights={"w": np.zeros(2, np.int16)})
    expect(g, "constant 'w'", "int16", "i4")


def test_constant_without_weight():
    g = graph([], outputs=("x",), constants=(("w", F23),), weights={})
    expect(g, "constant 'w'", "no weight")


def test_weight_without_constant():
    g = graph([], outputs=("x",), weights={"stray.weight": np.zeros(2, np.float32)})
    expect(g, "'stray.weight'", "no constant declaration")


def test_b1_weight_with_a_zero():
    g = graph([], outputs=("x",), constants=(("sign", tensor((4,), DType.B1)),),
              weights={"sign": np.array([1, -1, 0, 1], np.int8)})
    expect(g, "constant 'sign'", "b1", "+1/-1")


def test_b1_weight_with_a_two():
    g = graph([], outputs=("x",), constants=(("sign", tensor((2,), DType.B1)),),
              weights={"sign": np.array([1, 2], np.int8)})
    expect(g, "constant 'sign'", "b1")


def test_i4_weight_out_of_range():
    for bad in (8, -9):
        g = graph([], outputs=("x",), constants=(("nib", tensor((2,), DType.I4)),),
                  weights={"nib": np.array([0, bad], np.int8)})
        expect(g, "constant 'nib'", "i4", "[-8, 7]")


def test_b1_and_i4_edge_values_are_fine():
    g = graph([], outputs=("x",), constants=(("s", tensor((2,), DType.B1)), ("n", tensor((2,), DType.I4))),
              weights={"s": np.array([1, -1], np.int8), "n": np.array([-8, 7], np.int8)})
    assert verify(g) is g


# -- quantized values through shape ops ----------------------------------------------------

def _per_channel(shape, axis, dtype=DType.I8) -> TensorType:
    n = shape[axis]
    return TensorType(shape, dtype, quant=PerChannel(axis, tuple(0.1 * (i + 1) for i in range(n)), (0,) * n))


@pytest.mark.parametrize("kind, attrs, result_shape", [
    ("select", {"dim": 0, "index": 1}, (3,)),
    ("slice", {"dim": 1, "start": 0, "end": 2}, (2, 2)),
    ("reshape", {"shape": (6,)}, (6,)),
    ("transpose", {"dim0": 0, "dim1": 1}, (3, 2)),
    ("unsqueeze", {"dim": 0}, (1, 2, 3)),
])
def test_shape_ops_on_per_channel_quantized_values_verify(kind, attrs, result_shape):
    """A per-channel quantized i8 weight [2,3] (axis 1) sliced, selected or reshaped is a valid
    graph; the result is declared plain i8. The type rule must not crash on the operand's quant."""
    w = _per_channel((2, 3), 1)
    g = graph([op(kind, "r", ["w"], tensor(result_shape, DType.I8), **attrs)], inputs=(),
              constants=(("w", w),), weights={"w": np.ones((2, 3), np.int8)})
    assert verify(g) is g


def test_per_tensor_quantized_values_through_shape_ops_verify():
    w = TensorType((2, 3), DType.I8, quant=PerTensor(0.5, 3))
    g = graph([op("reshape", "r", ["w"], tensor((6,), DType.I8), shape=(6,)),
               op("transpose", "t", ["w"], tensor((3, 2), DType.I8), dim0=0, dim1=1)],
              outputs=("r", "t"), inputs=(), constants=(("w", w),), weights={"w": np.ones((2, 3), np.int8)})
    assert verify(g) is g


def test_transpose_does_not_keep_a_stale_per_channel_axis():
    """Inferred types of permuting ops must not claim the quantization axis is still axis 0."""
    w = _per_channel((2, 2), 0)
    inferred = OPS["transpose"].infer([w], {"dim0": 0, "dim1": 1})
    assert inferred.quant is None or inferred.quant.axis % 2 == 1, inferred
