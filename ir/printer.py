"""The IR's text form. `parse_graph(print_graph(g))` gives back a graph equal to `g`.

    graph @main(%x: f32[1,8,64]) {
      const @fc.weight : f32[10,64]
      %y = linear(%x, @fc.weight) : f32[1,8,10]
      %p = softmax(%y) {dim = -1} : f32[1,8,10]
      return %p
    }

A graph with state (`tcc.ir.state`) names, after `return`, which input becomes which output:

      state %key_cache_0 -> return[1] {role = "kv.key", layer = 0, seq_dim = 2}
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from .dtypes import DType
from .ops import OPS
from .state import State

if TYPE_CHECKING:  # graph.py imports this module (Graph.__str__): the dependency goes one way
    from .graph import Graph


def format_attr(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, DType):
        return value.value
    if isinstance(value, tuple):
        return "[" + ", ".join(format_attr(v) for v in value) + "]"
    raise TypeError(f"cannot print attribute value {value!r}")


def format_state_attrs(state: State) -> str:
    shown = [("role", state.role.value), ("layer", state.layer), ("seq_dim", state.seq_dim)]
    return ", ".join(f"{k} = {format_attr(v)}" for k, v in shown if v is not None)


def print_graph(graph: Graph) -> str:
    constants = set(graph.constant_names)

    def ref(name: str) -> str:
        return ("@" if name in constants else "%") + name

    params = ", ".join(f"%{name}: {t}" for name, t in graph.inputs)
    lines = [f"graph @{graph.name}({params}) {{"]
    lines += [f"  const @{name} : {t}" for name, t in graph.constants]
    for op in graph.ops:
        specs = OPS[op.kind].attrs
        shown = [f"{k} = {format_attr(v)}" for k, v in op.attrs if specs[k].required or v != specs[k].default]
        attrs = f" {{{', '.join(shown)}}}" if shown else ""
        lines.append(f"  %{op.result} = {op.kind}({', '.join(map(ref, op.operands))}){attrs} : {op.type}")
    lines.append(f"  return {', '.join(map(ref, graph.outputs))}")
    lines += [f"  state %{s.input} -> return[{s.output}] {{{format_state_attrs(s)}}}" for s in graph.state]
    lines.append("}")
    return "\n".join(lines) + "\n"
