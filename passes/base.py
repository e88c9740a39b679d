"""The pass base: one class per pass, options as dataclass fields, one signature
`run(graph, ctx) -> PassResult`. Passes are idempotent: running one twice equals once."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from tcc.ir.graph import Graph
from tcc.ir.verifier import verify


@dataclass
class PassContext:
    """What passes may read besides the graph: options, data sets, and whether to verify
    the graph after each pass. `log` collects one line per pass that ran."""

    verify_each: bool = True
    data: dict[str, Any] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PassResult:
    graph: Graph
    changed: bool


@dataclass(frozen=True)
class Pass:
    name: ClassVar[str]
    summary: ClassVar[str]

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def __call__(self, graph: Graph, ctx: PassContext | None = None) -> Graph:
        ctx = ctx or PassContext()
        result = self.run(graph, ctx)
        if ctx.verify_each:
            verify(result.graph)
        ctx.log.append(f"{self.name}: {'changed' if result.changed else 'no change'}")
        return result.graph
