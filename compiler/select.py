"""Device selection under a latency and an accuracy constraint (`tcc select`, `--target auto`).

`explore` compiles the model under every compression setting (sparsity levels and block
shapes of hp-prune, binarization, int8 and fully integer quantization), measures each
setting's accuracy on the data once (fine-tuning where training data is given; settings that
extend another reuse its graph), predicts its latency and energy on every device of the
catalog with the cost model (`Target.price`), and `choose` returns the cheapest device
(then the fastest setting on it) meeting both constraints, or, when none does, the point that
comes closest. Settings run as independent jobs: on local processes by default, or on a Ray
cluster (`executor="ray"`, the optional `ray` extra).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import math
import multiprocessing
import os
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from tcc.ir.analysis import flops
from tcc.ir.errors import TccError
from tcc.ir.graph import Graph
from tcc.ir.state import DecodeStep, check_prefill
from tcc.passes import Dataset, Latency, Pass, PassContext, parse_pipeline, run_pipeline
from tcc.passes.cost_model import Device
from tcc.passes.data import task_score
from tcc.runtime.torch_executor import TorchExecutor

from .model import example_arrays, example_dataset, lower
from .targets import Target, price_all
from .targets.calibration import cost_devices

_log = logging.getLogger("tcc.select")

PREFIX = "fold-constants,canonicalize,dce"  # every setting starts from the canonical graph


@dataclass(frozen=True)
class Setting:
    """A compression setting: `steps`, pass specs applied in order after `PREFIX`; a setting
    whose steps extend another's starts from that one's graph."""

    name: str
    steps: tuple[str, ...]

    @property
    def pipeline(self) -> str:
        return ",".join((PREFIX,) + self.steps)

    @property
    def passes(self) -> tuple[Pass, ...]:
        """The setting's whole pipeline (`PREFIX`, then its steps), parsed."""
        return tuple(parse_pipeline(self.pipeline))


# convolutions quantized too, as GEMMs, and heads after pooling on every row: as the FPGAs run them
QUANTIZE = "conv-as-gemm,pool-late,canonicalize,dce,quantize"


def default_settings() -> tuple[Setting, ...]:
    """fp32 and int8 (linears and convolutions as GEMMs, then fully integer), hp-prune at
    50/75/90% in 8x8 and 16x16 blocks (fp32, int8 and fully integer: what an accelerator with
    integer nonlinearities runs whole), binarized weights (w1a8)."""
    out = [Setting("fp32", ()), Setting("int8", (QUANTIZE,)),
           Setting("int8-integer", (QUANTIZE, "int-nonlinear"))]
    for block in ("8x8", "16x16"):
        for sparsity in (0.5, 0.75, 0.9):
            prune = f"hp-prune{{block={block},sparsity={sparsity}}}"
            name = f"hp{round(100 * sparsity)}-{block}"
            out += [Setting(name, (prune,)), Setting(f"{name}-int8", (prune, QUANTIZE)),
                    Setting(f"{name}-integer", (prune, QUANTIZE, "int-nonlinear"))]
    out += [Setting("w1a8", ("binarize",)), Setting("w1a8-int8", ("binarize", QUANTIZE))]
    return tuple(out)


@dataclass(frozen=True)
class Point:
    """One (setting, device): its accuracy on the data, predicted latency and energy per run,
    the model's dense-equivalent operations per joule (`gops_per_w`: GOP/s/W), and the device's
    price; for a decoder's decode step selected with its prefill step, the time to first token
    (`ttft_ms`: one run of the prefill step, compiled under the same setting)."""

    setting: str
    device: str
    accuracy: float
    latency_ms: float
    energy_mj: float
    price_usd: float
    parts_ms: dict[str, float]
    gops_per_w: float = 0.0
    ttft_ms: float | None = None

    def meets(self, lc_ms: float, ac: float, ttft_ms: float | None = None) -> bool:
        return self.shortfall(lc_ms, ac, ttft_ms) == 0.0

    def shortfall(self, lc_ms: float, ac: float, ttft_ms: float | None = None) -> float:
        """How far the point misses the constraints (0 when it meets them): the relative
        latency excess plus the relative accuracy shortfall (plus the time to first token's
        relative excess, under `ttft_ms`)."""
        late = max(0.0, self.ttft_ms / ttft_ms - 1) if ttft_ms is not None and self.ttft_ms is not None else 0.0
        return max(0.0, self.latency_ms / lc_ms - 1) + max(0.0, (ac - self.accuracy) / max(ac, 1e-9)) + late

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Selection:
    """The outcome: `chosen` (None when no point meets both constraints), `closest` (the best
    point then), the reason in words, every point, the exploration's wall time and what the
    points' accuracy is (the data's task's score, in words)."""

    lc_ms: float
    ac: float
    chosen: Point | None
    closest: Point
    reason: str
    points: tuple[Point, ...]
    seconds: float
    score: str = "accuracy"
    tokens_per_run: int = 0  # a decoder's step: the tokens each run makes (tokens/s = that / latency)
    ttft_ms: float | None = None  # the constraint on the time to first token (with a prefill step)

    def meets(self, point: Point) -> bool:
        """Whether `point` meets this selection's constraints."""
        return point.meets(self.lc_ms, self.ac, self.ttft_ms)

    def to_json(self) -> dict:
        best = self.chosen or self.closest
        return {"device": self.chosen.device if self.chosen else None,
                "setting": self.chosen.setting if self.chosen else None,
                "latency_ms": best.latency_ms, "accuracy": best.accuracy, "met": self.chosen is not None,
                "reason": self.reason, "lc_ms": self.lc_ms, "ac": self.ac, "ttft_ms": self.ttft_ms, "score": self.score,
                "seconds": round(self.seconds, 3), "tokens_per_run": self.tokens_per_run,
                "closest": self.closest.to_json(), "points": [p.to_json() for p in self.points]}


def accuracy(graph: Graph, data: Dataset) -> float:
    """The score of `data`'s task (top-1 accuracy, 1 - WER, token accuracy) of the graph's
    first output (torch executor, CPU)."""
    executor = TorchExecutor(graph, "cpu")
    return task_score(graph, data, executor.run, "evaluation data")


@dataclass(frozen=True)
class Prefill:
    """A decoder's prefill step beside the decode step being explored (`graph`, lowered and
    canonical, with its example inputs): a point's time to first token is one run of it compiled
    under the point's setting (one-shot: its latency follows from the setting's structure and
    types, which fine-tuning does not change)."""

    graph: Graph
    examples: Dataset


def _job(base: Graph, chain: tuple[Setting, ...], data: Dataset, train: Dataset | None, examples: Dataset,
         targets: dict[str, Target], devices: Mapping[str, Device], seed: int, prefill: Prefill | None = None
         ) -> list[Point]:
    """Points of a chain of settings, each extending the previous one's steps: the graph is
    compiled step by step, so shared steps (a fine-tuned pruning) run once. On one thread (the
    jobs run side by side), given back after: an inline job must not change its caller's torch,
    whose thread count keys the host's calibration."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _points(base, chain, data, train, examples, targets, devices, seed, prefill)
    finally:
        torch.set_num_threads(threads)


def _points(base: Graph, chain: tuple[Setting, ...], data: Dataset, train: Dataset | None, examples: Dataset,
            targets: dict[str, Target], devices: Mapping[str, Device], seed: int, prefill: Prefill | None
            ) -> list[Point]:
    torch.manual_seed(seed)
    graphs: dict[tuple[str, ...], Graph] = {(): base}
    points = []
    ctx_data = {"example": examples} | ({"train": train} if train is not None else {})
    for setting in chain:
        done = max((k for k in graphs if setting.steps[:len(k)] == k), key=len)
        graph = graphs[done]
        for i in range(len(done), len(setting.steps)):
            ctx = PassContext(data=ctx_data, torch_module=TorchExecutor, seed=seed)
            graph = run_pipeline(graph, parse_pipeline(setting.steps[i]), ctx)
            graphs[setting.steps[:i + 1]] = graph
        acc, ops = accuracy(graph, data), flops(graph)
        first = _first_token_ms(prefill, setting, targets, devices, seed) if prefill is not None else {}
        for name, c in price_all(graph, targets, devices, after=setting.passes).items():
            points.append(Point(setting.name, name, acc, c.latency_s * 1e3, c.energy_j * 1e3,
                                targets[name].device.price_usd, {k: v * 1e3 for k, v in c.parts.items()},
                                c.gops_per_w(ops), first.get(name)))
    return points


def _first_token_ms(prefill: Prefill, setting: Setting, targets: dict[str, Target], devices: Mapping[str, Device],
                    seed: int) -> dict[str, float]:
    """Per target, one run of the prefill step compiled under `setting` (one-shot), in ms."""
    ctx = PassContext(data={"example": prefill.examples}, torch_module=TorchExecutor, seed=seed)
    graph = run_pipeline(prefill.graph, parse_pipeline(",".join(setting.steps)), ctx) if setting.steps else prefill.graph
    return {name: c.latency_s * 1e3 for name, c in price_all(graph, targets, devices, after=setting.passes).items()}


def _chains(settings: Sequence[Setting]) -> list[tuple[Setting, ...]]:
    """Settings grouped by their first step (ordered by length), one job each."""
    groups: dict[str, list[Setting]] = {}
    for s in settings:
        groups.setdefault(s.steps[0] if s.steps else "", []).append(s)
    return [tuple(sorted(g, key=lambda s: len(s.steps))) for g in groups.values()]


def explore(base: Graph, data: Dataset, targets: dict[str, Target], *, examples: Dataset,
            train: Dataset | None = None, settings: Sequence[Setting] | None = None, executor: str = "local",
            workers: int | None = None, seed: int = 0, progress: bool = False, prefill: Prefill | None = None
            ) -> list[Point]:
    """Every (setting, target) point for `base` (the lowered model), the settings' jobs on
    local processes (`executor="local"`), in this process (`"inline"`) or on Ray (`"ray"`). The
    devices are calibrated here, before the jobs load the machine."""
    devices = cost_devices(targets, on_measure=_log.info)
    targets = {name: t for name, t in targets.items() if name in devices}
    chains = _chains(settings or default_settings())
    args = [(base, chain, data, train, examples, targets, devices, seed, prefill) for chain in chains]
    _log.info("exploring %d settings in %d jobs x %d devices (%s executor)", sum(map(len, chains)), len(chains),
              len(targets), executor)
    if executor == "inline":
        results = [_job(*a) for a in args]
    elif executor == "local":
        workers = workers or min(len(chains), os.cpu_count() or 1)
        # forkserver: a child forked from this process after torch ran its thread pools computes garbage
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver")) as pool:
            futures = [pool.submit(_job, *a) for a in args]
            results = [f.result() for f in _progress(futures, progress)]
    elif executor == "ray":
        results = run_on_ray(_job, args)
    else:
        raise TccError(f"--executor: unknown executor '{executor}' (local, inline or ray)")
    return [p for chunk in results for p in chunk]


def _progress(futures: list, show: bool) -> list:
    if not show:
        return futures
    from tqdm import tqdm
    return list(tqdm(futures, desc="settings", unit="job"))


def run_on_ray(fn: Any, args: list[tuple]) -> list:
    """`fn(*a)` for each of `args` as Ray tasks (the cluster at RAY_ADDRESS, else a local
    instance), their results in order."""
    try:
        import ray
    except ImportError:
        raise TccError("--executor ray: Ray is not installed (pip install 'tcc[ray]')") from None
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False)
    remote = ray.remote(fn)
    return ray.get([remote.remote(*a) for a in args])


def choose(points: Sequence[Point], lc_ms: float, ac: float, seconds: float = 0.0, score: str = "accuracy",
           ttft_ms: float | None = None) -> Selection:
    """The cheapest device meeting the constraints (latency, accuracy, and with `ttft_ms` the
    time to first token) and on it the fastest setting that does; when none does, the point
    missing them least (`Point.shortfall`). `score`: what the points' accuracy is (the task's
    score), in words."""
    if not points:
        raise TccError("no points to choose from: the catalog or the settings are empty")
    feasible = [p for p in points if p.meets(lc_ms, ac, ttft_ms)]
    closest = min(points, key=lambda p: (p.shortfall(lc_ms, ac, ttft_ms), p.price_usd, p.latency_ms))
    first = f", time to first token <= {ttft_ms:g} ms" if ttft_ms is not None else ""
    if feasible:
        chosen = min(feasible, key=lambda p: (p.price_usd, p.latency_ms, -p.accuracy))
        cheaper = sorted({p.device for p in points if p.price_usd < chosen.price_usd})
        reason = (f"{chosen.device} (${chosen.price_usd:,.0f}) is the cheapest device meeting latency <= "
                  f"{lc_ms:g} ms{first} and {score} >= {ac:g}: {chosen.setting} runs in {chosen.latency_ms:.3g} ms"
                  + (f" (first token {chosen.ttft_ms:.3g} ms)" if ttft_ms is not None else "")
                  + f" at {score} {chosen.accuracy:.4f}" + (f"; no setting meets {'them' if first else 'both'} on "
                                                            f"{', '.join(cheaper)}" if cheaper else ""))
    else:
        chosen = None
        reason = (f"no device meets latency <= {lc_ms:g} ms{first} and {score} >= {ac:g}; closest: {closest.setting} "
                  f"on {closest.device} ({closest.latency_ms:.3g} ms"
                  + (f", first token {closest.ttft_ms:.3g} ms" if ttft_ms is not None else "")
                  + f", {score} {closest.accuracy:.4f})")
    return Selection(lc_ms, ac, chosen, closest, reason, tuple(points), seconds, score, ttft_ms=ttft_ms)


def pareto(points: Sequence[Point]) -> dict[str, list[Point]]:
    """Per device, the points no other point of that device beats in both latency and
    accuracy, by latency."""
    fronts: dict[str, list[Point]] = {}
    for device in dict.fromkeys(p.device for p in points):
        mine = sorted((p for p in points if p.device == device), key=lambda p: (p.latency_ms, -p.accuracy))
        front, best = [], -math.inf
        for p in mine:
            if p.accuracy > best:
                front.append(p)
                best = p.accuracy
        fronts[device] = front
    return fronts


@dataclass(frozen=True)
class TokenRate:
    """A decoder's throughput constraint (`--lc 20tok/s`): at least `per_s` tokens a second,
    i.e. each run of its step (batch x width tokens) within batch x width / `per_s`."""

    per_s: float

    def __str__(self) -> str:
        return f"{self.per_s:g}tok/s"


def parse_latency(text: str) -> float | TokenRate:
    """'10ms', '2.5 s', '800us' -> milliseconds (`Latency`, as select-device's `lc`), '20tok/s'
    -> a `TokenRate`; a TccError for a bare number, a negative or zero value, or an unknown
    unit."""
    raw = text.strip()
    if raw.endswith("tok/s"):
        try:
            rate = float(raw[:-len("tok/s")])
        except ValueError:
            rate = math.nan
        if not math.isfinite(rate) or rate <= 0:
            raise TccError(f"--lc is '{text}' but expects a positive token rate (e.g. 20tok/s)")
        return TokenRate(rate)
    try:
        return float(Latency.parse(text))
    except ValueError as e:
        raise TccError(f"--lc is '{text}' but {e}; or a decoder's token rate (20tok/s)") from None


def latency_bound(lc: float | TokenRate | None, graph: Graph) -> float | None:
    """The latency a run of `graph` may take under `lc`, in milliseconds: a latency as given, a
    token rate as the time its step may take to make its batch x width tokens."""
    if not isinstance(lc, TokenRate):
        return lc
    if not graph.state:
        raise TccError(f"--lc {lc}: a token rate constrains a decoder's step (a model with a KV cache); this one has "
                       "none: give a latency per run (e.g. 10ms)")
    return tokens_per_run(graph) / lc.per_s * 1e3


def tokens_per_run(graph: Graph) -> int:
    """The tokens a run of a decoder's step makes (batch x width); 0 for any other graph."""
    if not graph.state:
        return 0
    step = DecodeStep.of(graph)
    return step.batch * step.width


def parse_accuracy(text: str) -> float:
    """'0.95' or '95%' -> 0.95; a TccError outside [0, 1]."""
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise TccError(f"--ac: '{text}' is not an accuracy (e.g. 0.95 or 95%)") from None
    if not 0.0 <= value <= 1.0 or math.isnan(value):
        raise TccError(f"--ac: the accuracy constraint must lie in [0, 1], got '{text}'")
    return value


def prepare(model: Any, example_inputs: Any, data: Dataset, train: Dataset | None, what: str = "selection",
            **lower_kw) -> tuple[Graph, Dataset, Dataset, Dataset | None]:
    """`model` (anything `tcc.compile` takes) lowered and canonicalized (`PREFIX`), its example
    inputs as a dataset, and `data` and `train` fitted to it: what an exploration starts from.
    `what` names the exploration in the error for a model without example inputs."""
    base, example = lowered(model, example_inputs, what, **lower_kw)
    return base, example, data.fit(base, "evaluation data"), \
        train.fit(base, "training data") if train is not None else None


def lowered(model: Any, example_inputs: Any, what: str, **lower_kw) -> tuple[Graph, Dataset]:
    """`model` lowered and canonicalized (`PREFIX`) with its example inputs as a dataset; a
    TccError naming `what` needs them when the model has none."""
    graph, signature, examples, _source = lower(model, example_inputs, **lower_kw)
    example = example_dataset(graph, example_arrays(signature, examples))
    if example is None:
        raise TccError(f"{what} needs example inputs (the model file's, or --input-shape)")
    return canonical(graph), example


def canonical(graph: Graph) -> Graph:
    """A lowered model in the form every setting and exploration starts from (`PREFIX`)."""
    return run_pipeline(graph, parse_pipeline(PREFIX), PassContext())


def select(model: Any, data: Dataset, targets: dict[str, Target], *, lc: float | TokenRate, ac: float,
           example_inputs: Any = None, train: Dataset | None = None, settings: Sequence[Setting] | None = None,
           executor: str = "local", seed: int = 0, progress: bool = False, prefill: Any = None,
           ttft_ms: float | None = None, **lower_kw) -> Selection:
    """Explore `model` (anything `tcc.compile` takes) over `settings` x `targets` and choose
    under `lc` (milliseconds a run, or a decoder's `TokenRate`) and `ac`. For a decoder's decode
    step, `prefill` (its prefill step, as `model` is given) prices each point's time to first
    token, which `ttft_ms` bounds."""
    start = time.perf_counter()
    if ttft_ms is not None and prefill is None:
        raise TccError("--ttft bounds the time to first token of a prompt through the prefill step: give --prefill")
    base, example, data, train = prepare(model, example_inputs, data, train, **lower_kw)
    lc_ms = latency_bound(lc, base)  # before the exploration: a token rate needs a decoder's step
    wide = None
    if prefill is not None:
        if not base.state:
            raise TccError("--prefill goes with a decoder's decode step (a model with a KV cache)")
        wide = Prefill(*lowered(prefill, None, "--prefill", **lower_kw))
        check_prefill(base, wide.graph)
    points = explore(base, data, targets, examples=example, train=train, settings=settings, executor=executor,
                     seed=seed, progress=progress, prefill=wide)
    return dataclasses.replace(choose(points, lc_ms, ac, time.perf_counter() - start, data.task.score_name, ttft_ms),
                               tokens_per_run=tokens_per_run(base))


__all__ = ["Setting", "Point", "Selection", "default_settings", "explore", "choose", "pareto", "select", "prepare",
           "canonical",
           "run_on_ray",
           "parse_latency", "parse_accuracy", "accuracy", "TokenRate", "latency_bound", "tokens_per_run", "Prefill"]
