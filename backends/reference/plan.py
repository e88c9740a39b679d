"""The reference backend's plan: the schedule the CPU/GPU runtime executes, with the values
each step frees and the peak bytes of live activations. Stored in an artifact as `plan.json`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from tcc.ir.analysis import last_uses
from tcc.ir.errors import TccError
from tcc.ir.graph import Graph

PLAN_VERSION = 1


@dataclass(frozen=True)
class Step:
    result: str
    kind: str
    free: tuple[str, ...]


@dataclass(frozen=True)
class ReferencePlan:
    device: str
    steps: tuple[Step, ...]
    peak_activation_bytes: int

    def to_json(self) -> str:
        return json.dumps({"version": PLAN_VERSION, **asdict(self)}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "ReferencePlan":
        data = json.loads(text)
        if data.get("version") != PLAN_VERSION:
            raise TccError(f"plan.json: unsupported plan version {data.get('version')!r}")
        steps = tuple(Step(s["result"], s["kind"], tuple(s["free"])) for s in data["steps"])
        return cls(data["device"], steps, int(data["peak_activation_bytes"]))

    def check_against(self, graph: Graph) -> None:
        """Raise if the plan does not schedule exactly the graph's ops in a valid order."""
        if [(s.result, s.kind) for s in self.steps] != [(op.result, op.kind) for op in graph.ops]:
            raise TccError("plan.json does not match the graph: the artifact is inconsistent")


def build_plan(graph: Graph, device: str) -> ReferencePlan:
    """Schedule the ops in graph order, freeing each value after its last use."""
    frees = last_uses(graph)
    types = graph.types
    live = sum(t.dense_bytes for _, t in graph.inputs)
    peak = live
    steps = []
    for index, op in enumerate(graph.ops):
        live += op.type.dense_bytes
        peak = max(peak, live)
        freed = frees.get(index, ())
        live -= sum(types[name].dense_bytes for name in freed)
        steps.append(Step(op.result, op.kind, freed))
    return ReferencePlan(device, tuple(steps), peak)
