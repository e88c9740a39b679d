"""Shared helpers of the benchmark scripts: medians of repeated timings."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_seconds(fns: dict[str, Callable[[], object]], repeats: int,
                        warmup: int = 1) -> dict[str, list[float]]:
    """Each of `fns` timed `repeats` times, taking turns within every round (after `warmup`
    rounds), so that a change in the machine's load falls on all of them alike: the times by
    name, in round order (ratios of one round compare like with like)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def zoo_graph(name: str):
    """Zoo model `name` lowered at its example inputs, and a pass context whose example data
    are those inputs (calibration, and the torch executor for passes that observe or train)."""
    from tcc import zoo
    from tcc.model import example_arrays, example_dataset, lower
    from tcc.passes import PassContext
    from tcc.runtime.torch_executor import TorchExecutor
    model, inputs = zoo.build(name)
    graph, signature, examples, _source = lower(model, inputs)
    return graph, PassContext(data={"example": example_dataset(graph, example_arrays(signature, examples))},
                              torch_module=TorchExecutor)


def board_devices(target, catalog):
    """The cost model's devices for an FPGA `target`: itself and the host it leaves ops to."""
    from tcc.targets.calibration import cost_devices
    return cost_devices({target.name: target, target.device.host: catalog[target.device.host]})
