"""Parse errors point at the offending token: `source:line:col` (1-based) in the message, and the
same numbers on the `ParseError`."""

from __future__ import annotations

import numpy as np
import pytest

from tcc.ir import ParseError, parse_graph, print_graph

GOOD = """\
graph @main(%x: f32[2,3]) {
  const @layer.0.weight : f32[4,3]
  %y = linear(%x, @layer.0.weight) : f32[2,4]
  %p = softmax(%y) {dim = -1} : f32[2,4]
  return %p
}
"""
WEIGHTS = {"layer.0.weight": np.zeros((4, 3), np.float32)}


def edit(line_no: int, new_line: str, text: str = GOOD) -> str:
    lines = text.split("\n")
    lines[line_no - 1] = new_line
    return "\n".join(lines)


def token_at(text: str, line: int, col: int) -> str:
    return text.split("\n")[line - 1][col - 1:]


def expect(text: str, line: int, col: int, token: str, *fragments: str, source: str = "<text>") -> ParseError:
    """Parsing `text` fails at `line:col`, where `token` starts, with all `fragments` in the message."""
    assert token_at(text, line, col).startswith(token), "test bug: the expected position is not the token"
    with pytest.raises(ParseError) as info:
        parse_graph(text, WEIGHTS, source=source)
    error = info.value
    message = str(error)
    assert (error.line, error.col) == (line, col), message
    assert message.startswith(f"{source}:{line}:{col}: "), message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return error


def test_the_good_text_parses():
    g = parse_graph(GOOD, WEIGHTS)
    assert print_graph(g) == GOOD


def test_unknown_op():
    text = edit(3, "  %y = linaer(%x, @layer.0.weight) : f32[2,4]")
    expect(text, 3, 8, "linaer", "unknown op 'linaer'")


def test_undefined_value():
    text = edit(4, "  %p = softmax(%z) {dim = -1} : f32[2,4]")
    expect(text, 4, 16, "%z", "'%z' is not defined")


def test_undefined_constant():
    text = edit(3, "  %y = linear(%x, @layer.1.weight) : f32[2,4]")
    expect(text, 3, 19, "@layer.1.weight", "'@layer.1.weight' is not defined")


def test_undefined_output():
    text = edit(5, "  return %p, %q")
    expect(text, 5, 14, "%q", "'%q' is not defined")


def test_unknown_dtype_in_input():
    text = edit(1, "graph @main(%x: f33[2,3]) {")
    expect(text, 1, 17, "f33", "unknown dtype 'f33'")


def test_unknown_dtype_in_result_type():
    text = edit(4, "  %p = softmax(%y) {dim = -1} : float[2,4]")
    expect(text, 4, 33, "float", "unknown dtype 'float'")


def test_unknown_dtype_in_attribute():
    text = edit(4, "  %p = cast(%y) {dtype = int64} : i64[2,4]")
    expect(text, 4, 26, "int64", "unknown dtype 'int64'")


def test_unknown_attribute():
    text = edit(4, "  %p = softmax(%y) {axis = -1} : f32[2,4]")
    expect(text, 4, 21, "axis", "softmax has no attribute 'axis'", "takes: dim")


def test_attribute_on_an_op_without_attributes():
    text = edit(3, "  %y = linear(%x, @layer.0.weight) {bias = true} : f32[2,4]")
    expect(text, 3, 37, "bias", "linear has no attribute 'bias'", "takes: none")


@pytest.mark.parametrize("value, col, message", [
    ('"last"', 27, "expected an integer, found '\"last\"'"),
    ("1.5", 27, "expected an integer, found '1.5'"),
    ("[1]", 27, "expected an integer, found '['"),
    ("true", 27, "expected an integer, found 'true'"),
])
def test_bad_attribute_value_kind_for_int(value, col, message):
    text = edit(4, f"  %p = softmax(%y) {{dim = {value}}} : f32[2,4]")
    expect(text, 4, col, value, message)


def test_bad_attribute_value_kind_for_bool():
    text = edit(4, "  %p = scaled_dot_product_attention(%y, %y, %y) {is_causal = 1} : f32[2,4]")
    expect(text, 4, 62, "1", "expected true or false, found '1'")
    text = edit(4, "  %p = scaled_dot_product_attention(%y, %y, %y) {is_causal = yes} : f32[2,4]")
    expect(text, 4, 62, "yes", "expected true or false, found 'yes'")


def test_bad_attribute_value_kind_for_ints_and_string():
    text = edit(4, "  %p = reshape(%y) {shape = 8} : f32[8]")
    expect(text, 4, 29, "8", "expected '[', found '8'")
    text = edit(4, "  %p = gelu(%y) {approximate = tanh} : f32[2,4]")
    expect(text, 4, 32, "tanh", "expected a string, found 'tanh'")


def test_bad_attribute_value_rejected_by_the_op_table_points_at_the_op():
    text = edit(4, '  %p = gelu(%y) {approximate = "fast"} : f32[2,4]')
    expect(text, 4, 8, "gelu", "'approximate' is 'fast'", "none, tanh")
    text = edit(4, "  %p = softmax(%y) {dim = none} : f32[2,4]")
    expect(text, 4, 8, "softmax", "'dim' must not be none")


def test_missing_attribute_points_at_the_op():
    text = edit(4, "  %p = softmax(%y) : f32[2,4]")
    expect(text, 4, 8, "softmax", "missing attribute 'dim'")


def test_missing_close_paren_of_operands():
    text = edit(3, "  %y = linear(%x, @layer.0.weight : f32[2,4]")
    expect(text, 3, 35, ":", "expected ')', found ':'")


def test_missing_close_paren_of_inputs():
    text = edit(1, "graph @main(%x: f32[2,3] {")
    expect(text, 1, 26, "{", "expected ')', found '{'")


def test_missing_close_bracket_of_shape():
    text = edit(3, "  %y = linear(%x, @layer.0.weight) : f32[2,4 ")
    expect(text, 4, 3, "%p", "expected ']', found '%p'")


def test_missing_close_brace_at_end_of_input():
    text = GOOD.rstrip("\n").rstrip("}")
    expect(text, 6, 1, "", "expected '}', found end of input")


def test_declared_type_mismatching_inferred_shape():
    text = edit(3, "  %y = linear(%x, @layer.0.weight) : f32[2,5]")
    expect(text, 3, 38, "f32[2,5]", "linear: declared type f32[2,5]", "operands give f32[2,4]")


def test_declared_type_mismatching_inferred_dtype():
    text = edit(4, "  %p = softmax(%y) {dim = -1} : f16[2,4]")
    expect(text, 4, 33, "f16[2,4]", "softmax: declared type f16[2,4]", "f32[2,4]")


def test_ill_typed_op_points_at_the_op_name():
    text = edit(3, "  %y = matmul(%x, @layer.0.weight) : f32[2,4]")
    expect(text, 3, 8, "matmul", "contraction dims differ")


def test_duplicate_definition_of_a_result():
    text = edit(4, "  %y = softmax(%y) {dim = -1} : f32[2,4]").replace("return %p", "return %y")
    expect(text, 4, 3, "%y", "'y' is defined twice")


def test_duplicate_definition_of_a_result_shadowing_an_input():
    text = edit(4, "  %x = softmax(%y) {dim = -1} : f32[2,4]").replace("return %p", "return %x")
    expect(text, 4, 3, "%x", "'x' is defined twice")


def test_duplicate_definition_of_an_input():
    text = edit(1, "graph @main(%x: f32[2,3], %x: f32[2]) {")
    expect(text, 1, 27, "%x", "'x' is defined twice")


def test_duplicate_definition_of_a_constant():
    text = edit(2, "  const @layer.0.weight : f32[4,3]\n  const @layer.0.weight : f32[4,3]")
    expect(text, 3, 9, "@layer.0.weight", "'layer.0.weight' is defined twice")


def test_trailing_garbage_on_a_new_line():
    text = GOOD + "  extra\n"
    expect(text, 7, 3, "extra", "unexpected 'extra' after the graph")


def test_trailing_garbage_on_the_last_line():
    text = GOOD.rstrip("\n") + " }"
    expect(text, 6, 3, "}", "unexpected '}' after the graph")


def test_second_graph_is_trailing_garbage():
    text = GOOD + GOOD
    expect(text, 7, 1, "graph", "unexpected 'graph' after the graph")


def test_unexpected_character():
    text = edit(4, "  %p = softmax(%y) {dim = -1} : f32[2,4] $")
    expect(text, 4, 42, "$", "unexpected character '$'")


def test_comments_and_blank_lines_keep_positions():
    text = "// a model\n\n" + edit(3, "  %y = linaer(%x, @layer.0.weight) : f32[2,4]  // typo")
    expect(text, 5, 8, "linaer", "unknown op 'linaer'")


def test_tabs_count_as_one_column():
    text = edit(3, "\t%y = linaer(%x, @layer.0.weight) : f32[2,4]")
    expect(text, 3, 7, "linaer", "unknown op 'linaer'")


def test_source_name_is_in_the_message():
    text = edit(3, "  %y = linaer(%x, @layer.0.weight) : f32[2,4]")
    expect(text, 3, 8, "linaer", "unknown op", source="models/bert.tir")


def test_bad_quantization_fields():
    text = edit(1, "graph @main(%x: f32[2,3], %q: i8[3] !q(scale=0.5)) {")
    expect(text, 1, 38, "q(", "quantization takes (scale, zp) or (axis, scales, zps)")


def test_per_channel_quantization_that_does_not_fit_the_shape():
    text = edit(1, "graph @main(%x: f32[2,3], %q: i8[3] !q(axis=0, scales=[0.5, 0.25], zps=[0, 0])) {")
    expect(text, 1, 31, "i8[3]", "per-channel quantization on axis 0")


def test_unknown_encoding():
    text = edit(1, "graph @main(%x: f32[2,3] #csx) {")
    expect(text, 1, 27, "csx", "unknown encoding '#csx'")


def test_weights_that_do_not_match_are_a_parse_error():
    with pytest.raises(ParseError) as info:
        parse_graph(GOOD, {"layer.0.weight": np.zeros((3, 4), np.float32)})
    assert "layer.0.weight" in str(info.value) and "[3, 4]" in str(info.value)
