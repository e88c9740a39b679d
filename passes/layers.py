"""Which weights compression passes act on: the float weight constants of `linear` ops,
chosen by a name pattern, with the kind of layer each one is in a Transformer.

Kinds come from the dataflow, not from names, so they hold for any model the frontend
lowers: `qkv` feeds attention's query/key/value, `attn_out` consumes attention's output,
`ffn1` feeds an activation function, `ffn2` consumes one; the rest are `other`. An input
projection is a linear fed from a graph input through data-movement ops only. The head is
a linear whose result reaches a graph output through data-movement and activation ops only
(a classifier or pooler; not the last FFN of an encoder, whose output passes a layer norm).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from tcc.ir.errors import TccError
from tcc.ir.graph import Graph, Op

from .base import option

LayerKind = Literal["qkv", "attn_out", "ffn1", "ffn2", "other"]
LAYER_KINDS: tuple[str, ...] = ("qkv", "attn_out", "ffn1", "ffn2", "other")

# ops that move or scale data without mixing features: looked through when classifying
_TRANSPARENT = {"reshape", "permute", "transpose", "slice", "select", "unsqueeze", "squeeze", "expand", "cat",
                "mul", "div", "add", "cast", "dequantize", "quantize", "requantize"}
_ACTIVATIONS = {"gelu", "relu", "tanh", "sigmoid"}
_ATTENTION = {"scaled_dot_product_attention", "softmax"}


@dataclass(frozen=True)
class Layer:
    """A weight constant and the linear op(s) using it."""

    weight: str
    ops: tuple[Op, ...]
    kind: LayerKind
    is_head: bool
    is_input: bool  # an input projection: fed from a graph input through data movement only


def _reaches(graph: Graph, start: str, targets: set[str], forward: bool) -> bool:
    """Whether a `targets` op is reachable from value `start` through transparent ops only."""
    producer, users = graph.producer(), graph.users()
    seen, stack = set(), [start]
    while stack:
        value = stack.pop()
        if value in seen:
            continue
        seen.add(value)
        nexts = users.get(value, []) if forward else [producer[value]] if value in producer else []
        for op in nexts:
            if op.kind in targets:
                return True
            if op.kind in _TRANSPARENT:
                stack.extend([op.result] if forward else list(op.operands))
    return False


def _kind(graph: Graph, op: Op) -> LayerKind:
    if _reaches(graph, op.result, {"scaled_dot_product_attention", "matmul"}, forward=True):
        return "qkv"
    if _reaches(graph, op.operands[0], {"scaled_dot_product_attention", "matmul"}, forward=False):
        return "attn_out"
    if _reaches(graph, op.result, _ACTIVATIONS, forward=True):
        return "ffn1"
    if _reaches(graph, op.operands[0], _ACTIVATIONS, forward=False):
        return "ffn2"
    return "other"


def _heads(graph: Graph) -> set[str]:
    """Results of linears that reach an output through transparent and activation ops only."""
    producer = graph.producer()
    heads, seen, stack = set(), set(), list(graph.outputs)
    while stack:
        value = stack.pop()
        if value in seen or value not in producer:
            continue
        seen.add(value)
        op = producer[value]
        if op.kind == "linear":
            heads.add(op.result)
        elif op.kind in _TRANSPARENT or op.kind in _ACTIVATIONS:
            stack.extend(op.operands)
    return heads


def _from_input(graph: Graph, value: str) -> bool:
    producer, inputs = graph.producer(), set(graph.input_names)
    seen, stack = set(), [value]
    while stack:
        v = stack.pop()
        if v in inputs:
            return True
        if v in seen or v not in producer or producer[v].kind not in _TRANSPARENT:
            continue
        seen.add(v)
        stack.extend(producer[v].operands)
    return False


def select_layers(graph: Graph, pattern: str, *, keep_head: bool, pass_name: str,
                  float_only: bool = True) -> list[Layer]:
    """The linear weights whose constant name matches `pattern` (a regex, searched), with
    their kinds; the head left out when `keep_head`. Errors on an invalid regex."""
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise TccError(f"{pass_name}: option 'layers' is not a valid regular expression ({e})") from None
    types = graph.types
    constants = set(graph.constant_names)
    heads = _heads(graph)
    uses: dict[str, list[Op]] = {}
    for op in graph.ops:
        if op.kind == "linear" and op.operands[1] in constants:
            uses.setdefault(op.operands[1], []).append(op)
    layers = []
    for weight, ops in uses.items():
        if not regex.search(weight) or (float_only and not types[weight].dtype.is_float):
            continue
        is_head = any(op.result in heads for op in ops)
        if keep_head and is_head:
            continue
        layers.append(Layer(weight, tuple(ops), "other" if is_head else _kind(graph, ops[0]), is_head,
                            any(_from_input(graph, op.operands[0]) for op in ops)))
    return layers


@dataclass(frozen=True)
class LayerOptions:
    """Options shared by the passes that compress chosen linear layers."""

    layers: str = option(".*", "regex on weight names: which linear layers to compress")
    keep_head: bool = option(True, "leave the classifier/pooler head uncompressed")
    keep_input: bool = option(True, "leave input projections (embeddings) uncompressed")

    def chosen_layers(self, graph: Graph, pass_name: str) -> list[Layer]:
        return [layer for layer in select_layers(graph, self.layers, keep_head=self.keep_head, pass_name=pass_name)
                if not (self.keep_input and layer.is_input)]
