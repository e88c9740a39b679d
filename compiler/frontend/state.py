"""A lowered program's written buffers as the graph's state (`tcc.ir.state`).

torch.export gives a step that writes buffers (a static KV cache's `index_copy_`) in its
functional form: the buffer is read as an input and its new value is an extra output. Here
each such pair becomes a `State`; a buffer no returned value depends on, now or in a later
step (transformers' `cumulative_length` counters), is dropped; a cache's role (keys or values
of which attention layer) and sequence dim are read from what the graph does with it.
"""

from __future__ import annotations

from typing import Sequence

from tcc.ir.analysis import live_values
from tcc.ir.graph import Graph
from tcc.ir.state import State, StateRole
from tcc.ir.verifier import verify
from tcc.passes import DeadCodeElimination, PassContext

# ops that move a cache's elements without computing on them, between its write and attention
_MOVES = frozenset({"reshape", "expand", "unsqueeze", "squeeze", "slice", "select", "cast", "transpose",
                    "permute", "index", "cat"})
_ATTENTION = "scaled_dot_product_attention"


def with_state(graph: Graph, pairs: Sequence[tuple[str, int]]) -> Graph:
    """`graph` whose input `pairs[i][0]` becomes output `pairs[i][1]` after a step; the state
    inputs and outputs follow the others. Dead state is dropped, roles and dims are inferred."""
    first = min(index for _, index in pairs)
    live = live_values(graph, graph.outputs[:first])
    kept: list[tuple[str, int]] = []
    while True:  # a state is live if what is returned depends on it, now or in a later step
        grown = [(name, index) for name, index in pairs if name in live and (name, index) not in kept]
        if not grown:
            break
        kept += grown
        live |= live_values(graph, [graph.outputs[index] for _, index in grown])
    kept.sort(key=lambda pair: pair[1])
    outputs = graph.outputs[:first] + tuple(graph.outputs[index] for _, index in kept)
    dropped = {name for name, _ in pairs} - {name for name, _ in kept}
    pruned = DeadCodeElimination()(graph.replace(outputs=outputs), PassContext())
    carried = [name for name, _ in kept]
    inputs = dict(pruned.inputs)
    pruned = pruned.replace(inputs=tuple((n, t) for n, t in pruned.inputs if n not in dropped and n not in carried)
                            + tuple((n, inputs[n]) for n in carried))
    state = tuple(_describe(pruned, name, first + i) for i, (name, _) in enumerate(kept))
    return verify(pruned.replace(state=state))


def _describe(graph: Graph, name: str, output: int) -> State:
    """The state of input `name` (next value: output `output`): a cache when the value written
    reaches an attention op's key or value through moves alone."""
    producer, users = graph.producer(), graph.users()
    written = producer.get(graph.outputs[output])
    seq_dim = written.attr("dim") if written is not None and written.kind == "index_copy" else None
    layers = {op.result: i for i, op in enumerate(op for op in graph.ops if op.kind == _ATTENTION)}
    todo, seen = [graph.outputs[output]], set()
    while todo:
        value = todo.pop()
        if value in seen:
            continue
        seen.add(value)
        for op in users.get(value, ()):
            if op.kind == _ATTENTION and value in op.operands[1:3]:
                role = StateRole.KEY if op.operands[1] == value else StateRole.VALUE
                return State(name, output, role, layers[op.result], seq_dim)
            if op.kind in _MOVES:
                todo.append(op.result)
    return State(name, output, seq_dim=seq_dim)
