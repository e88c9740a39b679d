"""dce: remove ops and constants that no output depends on."""

from __future__ import annotations

from dataclasses import dataclass

from tcc.ir.analysis import live_values
from tcc.ir.graph import Graph

from .base import Pass, PassContext, PassResult


@dataclass(frozen=True)
class DeadCodeElimination(Pass):
    name = "dce"
    summary = "remove ops and constants no output depends on"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        live = live_values(graph)
        ops = tuple(op for op in graph.ops if op.result in live)
        constants = tuple((n, t) for n, t in graph.constants if n in live)
        if len(ops) == len(graph.ops) and len(constants) == len(graph.constants):
            return PassResult(graph, False)
        weights = {n: graph.weights[n] for n, _ in constants}
        return PassResult(graph.replace(ops=ops, constants=constants, weights=weights), True)
