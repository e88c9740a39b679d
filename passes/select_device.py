"""select-device: the cheapest device that runs the graph within a latency constraint, at an
accuracy constraint.

The compression is what the passes before it made. The pass prices the graph on every
candidate device of the context (`ctx.devices`: name, price and cost model; `tcc.compile`
gives the catalog's targets the cost model can price on this machine, or the one target
compiled for), measures the graph's top-1 accuracy on the `eval` data when `ac` is set, and
records in `ctx.chosen_device` the cheapest candidate (then the fastest) whose predicted
latency per run is at most `lc`; its measured notes (`ctx.measured`, apart from the log: the
host's figures are measured) list every candidate's latency. When the accuracy
misses `ac` or no candidate meets `lc`, it fails naming the closest. The graph is left as
it is, so the pass is idempotent. `tcc select` explores compression settings as well.
"""

from __future__ import annotations

from dataclasses import dataclass

from tcc.ir.errors import TccError
from tcc.ir.graph import Graph

from .base import Pass, PassContext, PassResult, option
from .data import task_score
from .options import Latency


@dataclass(frozen=True)
class SelectDevice(Pass):
    name = "select-device"
    summary = "choose the cheapest device meeting a latency (and accuracy) constraint by the cost model"

    lc: Latency | None = option(None, "latency constraint per run, with its unit (10ms, 2.5s, 800us); required")
    ac: float | None = option(None, "accuracy constraint on the eval data; none: latency alone", within="[0, 1]")

    def validate(self) -> None:
        if self.lc is None:
            raise self.fail("lc", "is required (e.g. select-device{lc=10ms,ac=0.95})")
        if not isinstance(self.lc, Latency):
            raise self.fail("lc", f"must be a Latency (e.g. Latency.parse('10ms')), got {self.lc!r}")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        if not ctx.devices:
            raise TccError(f"{self.name}: no candidate devices (compile with --target auto, or give "
                           "PassContext(devices=...))")
        if self.ac is not None:
            name, data = ctx.dataset("eval")
            if data is None:
                raise TccError(f"{self.name}: ac={self.ac:g} needs labelled evaluation data (--data)")
            module = ctx.require_torch(self.name)(graph, ctx.device)
            accuracy = task_score(graph, data, lambda inputs: module(*[x.to(ctx.device) for x in inputs]), "evaluation data")
            what = data.task.score_name
            if accuracy < self.ac:
                raise TccError(f"{self.name}: {what} {accuracy:.4f} on {data.source} is below ac={self.ac:g} on "
                               "every device: compress less")
            ctx.note(f"{what} {accuracy:.4f} on {data.source}")
        priced = sorted(((c, c.cost(graph).latency_s * 1e3) for c in ctx.devices), key=lambda p: (p[0].price_usd, p[1]))
        meeting = [(c, ms) for c, ms in priced if ms <= self.lc]
        listing = ", ".join(f"{c.name} {ms:.3g} ms" for c, ms in priced)
        if not meeting:
            fastest, ms = min(priced, key=lambda p: p[1])
            raise TccError(f"{self.name}: no device runs the graph within lc={self.lc}; the fastest, {fastest.name}, "
                           f"takes {ms:.3g} ms ({listing})")
        chosen, ms = meeting[0]
        ctx.chosen_device = chosen.name
        ctx.note(f"chose {chosen.name} (${chosen.price_usd:,.0f}, within lc={self.lc})")
        ctx.note_measured(f"{self.name}: chose {chosen.name} at {ms:.3g} ms; {listing}")
        return PassResult(graph, False)
