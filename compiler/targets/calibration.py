"""The cost model's figures of each target (`cost_devices`): the catalog's, or for the targets
the catalog marks `measured` (the host CPU; the local CUDA device) measured on this machine by
timing the torch executor (`measure`), once per machine.

The probes: a large fp32 linear (fp32 GFLOP/s), an int8 linear (int8 GOP/s), streaming adds
out of DRAM and out of cache (bandwidths); then the digits Transformer at one image, whose ops
cost about their fixed cost (fp32, int8 and fully integer: every op kind of an encoder).
Medians of several runs; the result is cached per machine (CPU model, threads, torch version, device) in
`$TCC_CACHE` or `~/.cache/tcc`, so only the first exploration on a machine pays for it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from tcc.ir.dtypes import DType
from tcc.ir.graph import Graph, GraphBuilder
from tcc.ir.types import TensorType
from tcc.passes import Dataset, PassContext, parse_pipeline, run_pipeline
from tcc.passes.cost_model import Device, cost_key, op_seconds
from tcc.runtime.torch_executor import TorchExecutor

from ..frontend import from_module
from .target import Target

_log = logging.getLogger("tcc.calibration")

def _probes() -> dict[str, tuple[Graph, list[np.ndarray], float]]:
    """name -> (graph, inputs, work: FLOPs, OPs or bytes of the probe's one op)."""
    rng = np.random.default_rng(0)
    m, k, n = 256, 1024, 1024
    out = {}
    for name, dtype in (("fp32", DType.F32), ("int8", DType.I8)):
        g = GraphBuilder(f"probe_{name}")
        x = g.input("x", TensorType((m, k), dtype))
        w = g.constant("w", rng.integers(-100, 100, (n, k)), dtype)
        out[name] = (g.finish([g.op("linear", x, w)]), [rng.integers(-100, 100, (m, k)).astype(dtype.numpy)],
                     2.0 * m * k * n)
    for name, size in (("dram", 1 << 23), ("cache", 1 << 14)):
        g = GraphBuilder(f"probe_{name}")
        a, b = g.input("a", TensorType((size,), DType.F32)), g.input("b", TensorType((size,), DType.F32))
        out[name] = (g.finish([g.op("add", a, b)]), [np.ones(size, np.float32)] * 2, 3.0 * 4 * size)
    return out


@functools.cache
def _calibration_graphs(batch: int) -> list[tuple[Graph, list[np.ndarray]]]:
    """The digits Transformer in fp32, int8 and fully integer (every op kind of an encoder) on
    `batch` images."""
    from tcc.zoo import DigitsTransformer
    torch.manual_seed(0)
    model, x = DigitsTransformer().eval(), torch.rand(batch, 8, 8)
    graph, _signature = from_module(model, (x,), "export")
    out = []
    for spec in ("fold-constants,canonicalize,dce", "quantize", "quantize,int-nonlinear"):
        ctx = PassContext(data={"example": Dataset((x,), source="the example inputs")}, torch_module=TorchExecutor)
        out.append((run_pipeline(graph, parse_pipeline(spec + ",select-format"), ctx), [x.numpy()]))
    return out


def _probe_time(graph: Graph, inputs: list[np.ndarray], device: str, repeats: int) -> float:
    return sum(TorchExecutor(graph, device).profile([torch.from_numpy(x) for x in inputs], repeats))


def run_seconds(executor: TorchExecutor, tensors: list[torch.Tensor], repeats: int) -> float:
    """Median seconds of one `executor.run(tensors)` over `repeats` runs after a warm-up
    (synchronized on CUDA)."""
    sync = torch.cuda.synchronize if executor.device_.type == "cuda" else (lambda: None)
    executor.run(tensors)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        executor.run(tensors)
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _per_kind(device: Device, batch: int, executor_device: str, repeats: int
              ) -> tuple[dict[str, list[tuple[float, bool, float]]], float]:
    """`cost_key` -> [(roofline seconds, on chip, measured seconds)] over the calibration graphs, and
    the executor's own time per op (the median over the graphs of their end-to-end time less
    the sum of their ops', per op: what timing each op alone leaves out)."""
    out: dict[str, list[tuple[float, float]]] = {}
    between = []
    for graph, inputs in _calibration_graphs(batch):
        executor, tensors = TorchExecutor(graph, executor_device), [torch.from_numpy(x) for x in inputs]
        times = executor.profile(tensors, repeats)
        between.append((run_seconds(executor, tensors, repeats) - sum(times)) / len(times))
        types = graph.types
        for (op, ideal, cached), took in zip(op_seconds(graph, device), times):
            out.setdefault(cost_key(op, types), []).append((ideal, cached, took))
    return out, max(0.0, statistics.median(between))


def _median_runs(runs: list[tuple[dict[str, list[tuple[float, bool, float]]], float]]
                 ) -> tuple[dict[str, list[tuple[float, bool, float]]], float]:
    """`_per_kind` results of the same graphs measured in several turns, each op's time the
    median over the turns."""
    first = runs[0][0]
    table = {key: [(ideal, cached, statistics.median(run[key][i][2] for run, _ in runs))
                   for i, (ideal, cached, _took) in enumerate(entries)] for key, entries in first.items()}
    return table, statistics.median(between for _, between in runs)


def measure(template: Device, device: str = "cpu", repeats: int = 3, rounds: int = 3) -> Device:
    """`template` (the catalog's entry: name, kind, price, power, on-chip memory) with its
    throughputs and bandwidths measured on the torch executor on `device` (the probes), and per
    op kind and operand dtype its fixed cost (the median time of its ops in the calibration
    graphs at one image, plus the executor's own time per op) and its factor on the roofline
    time, on chip and off (the median ratios beyond the fixed cost of its ops whose bytes fit the
    L2 cache, and of those that do not, at 64 and 512 images). Everything is measured in
    `rounds` turns of `repeats` runs, each figure the median over the turns: a burst of the
    machine's other load spoils one turn, not the figures."""
    probes = _probes()
    turns = [{name: _probe_time(g, inputs, device, repeats) for name, (g, inputs, _work) in probes.items()}
             for _ in range(rounds)]
    seconds = {name: statistics.median(turn[name] for turn in turns) for name in probes}
    rates = {name: probes[name][2] / seconds[name] / 1e9 for name in probes}
    device_ = dataclasses.replace(template, fp32_gflops=round(rates["fp32"], 2), int8_gops=round(rates["int8"], 2),
                                  dram_gbps=round(rates["dram"], 2), cache_gbps=round(rates["cache"], 2),
                                  onchip_mb=_cache_mb(device) or template.onchip_mb)
    batches = (1, 64, 512)
    turns_ = [[_per_kind(device_, batch, device, repeats) for batch in batches] for _ in range(rounds)]
    (small, between), *loaded = [_median_runs([turn[i] for turn in turns_]) for i in range(len(batches))]
    costs = []
    for key in sorted(small):
        alone = statistics.median(took for _ideal, _cached, took in small[key])
        factors = []
        for on_chip in (True, False):
            ratios = [(took - alone) / ideal for table, _ in loaded for ideal, cached, took in table.get(key, [])
                      if ideal > 0 and cached == on_chip]
            factors.append(max(0.25, statistics.median(ratios)) if ratios else None)
        on, off = (f if f is not None else (factors[1 - i] or 1.0) for i, f in enumerate(factors))
        costs.append((key, round((alone + between) * 1e6, 3), round(on, 3), round(off, 3)))
    return dataclasses.replace(device_, op_overhead_us=round(statistics.median(c[1] for c in costs), 3),
                               op_costs=tuple(costs))


def _cache_mb(device: str) -> float:
    """The CPU's per-core L2 cache in MB (sysfs), 0 when unknown or for a GPU."""
    if device != "cpu":
        return 0.0
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if (index / "level").read_text().strip() == "2":
                size = (index / "size").read_text().strip().upper()
                scale = {"K": 1e-3, "M": 1.0}.get(size[-1], 1e-6)
                return float(size.rstrip("KM")) * scale
        except (OSError, ValueError):
            continue
    return 0.0


_MEASURED = ("fp32_gflops", "int8_gops", "dram_gbps", "cache_gbps", "onchip_mb", "op_overhead_us")


def cache_file() -> Path:
    """Where measured figures are cached: `$TCC_CACHE/devices.json` (default ~/.cache/tcc)."""
    root = Path(os.environ.get("TCC_CACHE") or Path.home() / ".cache" / "tcc")
    return root / "devices.json"


def _cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine() -> dict[str, str | int | None]:
    """The machine the cost model measures: CPU model, torch's threads, the local CUDA device,
    versions and platform (machine-dependent: for an artifact's `measured/`, never its hashes)."""
    return {"cpu": _cpu_name(), "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}


def _machine_key(device: str) -> str:
    name = torch.cuda.get_device_name() if device.startswith("cuda") else _cpu_name()
    text = f"v3|{name}|{torch.get_num_threads()}|{torch.__version__}|{device}"  # v3: the calibration's method
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_cache() -> dict:
    try:
        cache = json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def is_cached(device: str = "cpu") -> bool:
    """Whether this machine's figures for `device` are measured and cached already."""
    return isinstance(_read_cache().get(_machine_key(device)), dict)


def measured(template: Device, device: str = "cpu", *, again: bool = False) -> Device:
    """`measure`, cached per machine: the figures of an earlier measurement on this machine when
    there is one (and not `again`)."""
    path, key = cache_file(), _machine_key(device)
    cache = _read_cache()
    if isinstance(cache.get(key), dict) and not again:
        try:
            return dataclasses.replace(template, **{k: cache[key][k] for k in _MEASURED},
                                       op_costs=tuple(tuple(c) for c in cache[key]["op_costs"]), measured=True)
        except (KeyError, TypeError, ValueError):
            pass
    _log.info("measuring %s's %s figures for the cost model (once per machine; cached in %s)", template.name,
              device, path)
    start = time.perf_counter()
    result = dataclasses.replace(measure(template, device), measured=True)
    _log.info("measured %s in %.1f s: fp32 %g GFLOP/s, int8 %g GOP/s, DRAM %g GB/s", template.name,
              time.perf_counter() - start, result.fp32_gflops, result.int8_gops, result.dram_gbps)
    cache[key] = {k: getattr(result, k) for k in _MEASURED} | {"op_costs": [list(c) for c in result.op_costs]}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1))
        os.replace(tmp, path)
    except OSError:  # a read-only home: measure again next time
        pass
    return result


def cost_devices(catalog: dict[str, Target], *, calibrate: bool = True, again: bool = False,
                 on_measure: Callable[[str], None] | None = None) -> dict[str, Device]:
    """The cost model's figures of every target of `catalog` it can price here, by name: the
    catalog's, and for the targets it marks `measured` (the host CPU; the local CUDA device,
    left out on a machine without one) those measured on this machine: cached from an earlier
    calibration, or measured now when `calibrate` (announced to `on_measure` first: it takes a
    while, once per machine; `again`: even when cached). Without `calibrate` and a cache, the
    catalog's placeholders."""
    out = {}
    for name, target in catalog.items():
        device = target.device
        if target.measured:
            if target.kind == "gpu" and not torch.cuda.is_available():
                continue
            on = "cpu" if target.kind == "cpu" else "cuda"
            cached = is_cached(on) and not again
            if cached or calibrate:
                if on_measure is not None and not cached:
                    on_measure(f"calibrating this machine's {on} for the cost model (once per machine)")
                device = measured(device, on, again=again)
        out[name] = device
    return out


def measured_here(target: Target, catalog: dict[str, Target], devices: dict[str, Device]) -> bool:
    """Whether `devices` price `target` with figures measured on this machine (not the catalog's
    placeholders): the target's own, or an FPGA's host's."""
    if target.kind == "fpga":
        target = catalog.get(target.device.host or "", target)
    return target.name in devices and devices[target.name].measured
