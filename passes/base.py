"""The pass base: one class per pass, options as dataclass fields, one signature
`run(graph, ctx) -> PassResult`. Passes are idempotent: running one twice equals once.

Options are declared with `option(default, help, within=...)`; their annotations drive the
pipeline text parser (`passes.pipeline`) and `tcc passes`. A numeric option's `within` is its
range, written as an interval (`[0, 1)`, `(0, inf)`); every float option must be finite and in
its range. A pass checks other rules in `validate()`; bad values raise `OptionError`, which
names the pass and the option. A pass whose result holds NaN weights (or Inf where it found
finite ones) fails, naming the constant: no pass hands on garbage silently.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Protocol

from tcc.ir.analysis import non_finite
from tcc.ir.errors import TccError
from tcc.ir.graph import Graph
from tcc.ir.verifier import verify

from .cost_model import Candidate
from .data import Dataset


_log = logging.getLogger("tcc.passes")


class OptionError(TccError):
    """A pass option with a value the pass cannot use."""

    def __init__(self, pass_name: str, option: str, message: str):
        super().__init__(f"{pass_name}: option '{option}' {message}")
        self.pass_name, self.option = pass_name, option


@dataclass(frozen=True)
class Range:
    """The finite values a numeric option may take, from `low` to `high` (either end may be
    infinite), each end included or not: written as an interval, `[0, 1)`, `(0, inf)`."""

    low: float
    high: float
    low_closed: bool
    high_closed: bool

    @classmethod
    def parse(cls, text: str) -> "Range":
        match = re.fullmatch(r"([\[(])\s*(-inf|[-+\d.e]+)\s*,\s*(inf|[-+\d.e]+)\s*([\])])", text.strip())
        if not match:
            raise ValueError(f"'{text}' is not an interval such as [0, 1) or (0, inf)")
        return cls(float(match[2]), float(match[3]), match[1] == "[", match[4] == "]")

    def __str__(self) -> str:
        """The rule in words: `>= 0`, `> 0` for a range open above, else `in [0, 1)`."""
        if self.high == math.inf and self.low > -math.inf:
            return f"{'>=' if self.low_closed else '>'} {self.low:g}"
        return f"in {'[' if self.low_closed else '('}{self.low:g}, {self.high:g}{']' if self.high_closed else ')'}"

    def __contains__(self, value: float) -> bool:
        return (math.isfinite(value) and (self.low <= value if self.low_closed else self.low < value)
                and (value <= self.high if self.high_closed else value < self.high))


def option(default: Any, help: str, *, within: str | None = None,
           check: Callable[[Any], str | None] | None = None) -> Any:
    """Declare a pass option: a dataclass field with a default, one line of help and, for a
    number, the interval it must lie in (`within="[0, 1)"`); `check(value)` says what is wrong
    with a value (None: nothing), when the pass is made."""
    return field(default=default, metadata={"help": help, **({"range": Range.parse(within)} if within else {}),
                                            **({"check": check} if check else {})})


class TorchModuleFactory(Protocol):
    """Builds the differentiable torch executor of a graph (provided by the driver, so that
    passes depend on `ir` only). `weight_transforms` map constant names to modules applied
    to the weight on every forward (masks, straight-through binarization);
    `activation_transforms` map value names to modules applied to the value right after it
    is computed (observers, fake quantization). Their parameters train with the weights."""

    def __call__(self, graph: Graph, device: str = "cpu", trainable: bool = False, *,
                 weight_transforms: dict | None = None, activation_transforms: dict | None = None) -> Any: ...


@dataclass
class PassContext:
    """What passes may read besides the graph.

    - `data`: named datasets (`train`, `calib`, `eval`, `example`), see `passes.data`;
    - `tile`: the target's PE tile (rows, cols), the default block shape of pruning;
    - `formats`: the storage encodings the target executes (None: all); `work_cost`: what one
      unit of decode work costs in bytes when choosing formats (0: memory alone counts);
    - `torch_module`: the torch executor factory, needed by passes that train or calibrate;
    - `progress`: show progress bars on long work; `verify_each`: verify after every pass;
    - `devices`: the candidates of `select-device`, which records its choice in `chosen_device`;
    - `log`: one line per pass that ran, with the notes the pass made (`note`); `measured`:
      notes whose figures depend on this machine (`note_measured`), kept out of `log` (and out
      of an artifact's hashed part)."""

    verify_each: bool = True
    data: dict[str, Dataset] = field(default_factory=dict)
    tile: tuple[int, int] = (16, 16)
    formats: tuple[str, ...] | None = None
    work_cost: float = 0.0
    torch_module: TorchModuleFactory | None = None
    device: str = "cpu"
    progress: bool = False
    seed: int = 0
    devices: tuple[Candidate, ...] = ()
    chosen_device: str | None = None
    log: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    measured: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        """Record a fact about the running pass for the report (joined into its log line)."""
        self.notes.append(text)

    def note_measured(self, text: str) -> None:
        """Record a figure that depends on this machine (a prediction from measured device
        figures), apart from the log."""
        self.measured.append(text)

    def dataset(self, *names: str) -> tuple[str, Dataset] | tuple[None, None]:
        """The first of the named datasets present, as (name, dataset)."""
        for name in names:
            if name in self.data:
                return name, self.data[name]
        return None, None

    def require_torch(self, pass_name: str) -> TorchModuleFactory:
        if self.torch_module is None:
            raise TccError(f"{pass_name} needs the torch executor: run it through tcc.compile or give "
                           "PassContext(torch_module=tcc.runtime.torch_executor.TorchExecutor)")
        return self.torch_module

    def progress_bar(self, iterable: Iterable | None = None, *, total: int | None = None, desc: str = ""):
        from tqdm.auto import tqdm
        return tqdm(iterable, total=total, desc=desc, disable=not self.progress, leave=False, dynamic_ncols=True)


@dataclass(frozen=True)
class PassResult:
    graph: Graph
    changed: bool


@dataclass(frozen=True)
class Pass:
    """Base of every pass. Subclasses set `name` and `summary` and declare options as fields."""

    name: ClassVar[str]
    summary: ClassVar[str]

    def __post_init__(self) -> None:
        for f in self.options():
            value, limits = getattr(self, f.name), f.metadata.get("range")
            if (check := f.metadata.get("check")) is not None and (problem := check(value)) is not None:
                raise self.fail(f.name, problem)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if limits is not None and value not in limits:
                raise self.fail(f.name, f"must be {limits}, got {value}")
            if not math.isfinite(value):
                raise self.fail(f.name, f"must be a finite number, got {value}")
        self.validate()

    def validate(self) -> None:
        """Raise `OptionError` for option values the pass cannot use."""

    def fail(self, option_name: str, message: str) -> OptionError:
        return OptionError(self.name, option_name, message)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    @classmethod
    def options(cls) -> list[dataclasses.Field]:
        """Option fields: the pass's own first, then those of shared option groups."""
        fields = [f for f in dataclasses.fields(cls) if f.init]
        own = cls.__dict__.get("__annotations__", {})
        return [f for f in fields if f.name in own] + [f for f in fields if f.name not in own]

    def changed_options(self) -> dict[str, Any]:
        """Options whose value differs from the default, in declaration order."""
        return {f.name: getattr(self, f.name) for f in self.options() if getattr(self, f.name) != f.default}

    def __call__(self, graph: Graph, ctx: PassContext | None = None) -> Graph:
        ctx = ctx or PassContext()
        ctx.notes = []
        start = time.perf_counter()
        result = self.run(graph, ctx)
        self._check_finite(graph, result.graph)
        if ctx.verify_each:
            verify(result.graph)
        line = f"{self.name}: {'changed' if result.changed else 'no change'}"
        ctx.log.append(line + "".join(f"; {n}" for n in ctx.notes))
        ctx.notes = []
        _log.info("pass %s (%.2f s, %d ops)", ctx.log[-1], time.perf_counter() - start, len(result.graph.ops))
        return result.graph

    def _check_finite(self, before: Graph, after: Graph) -> None:
        """A TccError naming the first constant this pass left holding NaN, or +-Inf where it
        found the constant finite (new constants may hold -Inf: folded attention masks)."""
        old = before.weights
        for name, array in after.weights.items():
            if old.get(name) is array or non_finite(array) is None:
                continue
            problem = non_finite(array, inf=name in old and non_finite(old[name]) is None)
            if problem:
                raise TccError(f"{self.name}: produced non-finite weights: constant '{name}' holds {problem}")


def run_pipeline(graph: Graph, passes: Iterable[Pass], ctx: PassContext,
                 on_pass: Callable[[Pass], None] | None = None) -> Graph:
    """Run `passes` in order; `on_pass` is told before each one starts."""
    for p in passes:
        if on_pass is not None:
            on_pass(p)
        graph = p(graph, ctx)
    return graph
