"""Devices for a pruned Transformer, in the form of an FPGA co-design paper's table
(hierarchical pruning and an FPGA accelerator, speedups over a CPU, a GPU and an earlier FPGA):
the cost model's predicted latency of the zoo's TinyBERT-4 and its small Hugging Face BERT,
int8 dense and hp-pruned (one-shot, no data) at 50/75/90%, on every catalog device it can
price here, at batch 1 and at the best batch. Prints three tables:

1. Latency per device and setting: one run at batch 1 (ms), and per example at the best batch
   (the batch of `--batches` giving the least latency per example), with each FPGA's latency
   split into where it goes (the cost's parts: accelerator, host ops, host link).
2. Speedups of each FPGA over every CPU and GPU running the same setting, and over the same
   FPGA running the dense int8 model (standing in for the paper's earlier FPGA): at batch 1
   and at the best batch of each.
3. Energy per run at batch 1 (mJ) and energy efficiency (GOP/s/W: the model's dense-equivalent
   operations per joule) per device and setting: an FPGA's from its activity (the codegen's
   counts priced per operation, `backends/accel/energy.py`, plus static power and its host's
   energy), a CPU's or GPU's power x latency; and each FPGA's gain in GOP/s/W over every device.
4. The device `tcc select`'s rule (`tcc.select.choose`, accuracy not constrained) picks as the
   latency constraint at batch 1 tightens, from above the slowest point to below the fastest:
   the cheapest device meeting the constraint, then its fastest setting. The constraints are
   the devices' fastest latencies, where the choice can change; a row per change.

    .venv/bin/python benchmarks/devices.py [--models tinybert4,hf-bert] [--batches 1,4,16,64]
        [--sparsities 0.5,0.75,0.9] [--block 16x16] [--integer]

Settings are `tcc.select.default_settings()`'s (int8, and hp{50,75,90}-BLOCKxBLOCK-int8; with
`--integer` their fully integer versions, what an accelerator with the nonlinear unit runs whole);
each target prices a setting's graph after its own lowering (`price_all`, as `tcc select`).
Latencies are predictions, nothing runs on a device: the host CPU's figures are this machine's
cached calibration (`tcc calibrate`; the catalog's placeholders when none is cached: this
script never calibrates), the other CPUs' and GPUs' the catalog's, an FPGA's the accelerator's
cycles (the codegen's timing) plus its host's ops and link. A batch is the zoo's first example
repeated.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Mapping, Sequence

import torch

from tcc import zoo
from tcc.ir.analysis import flops
from tcc.model import example_arrays, example_dataset, lower
from tcc.passes import PassContext, run_pipeline
from tcc.passes.cost_model import Cost, Device
from tcc.runtime.torch_executor import TorchExecutor
from tcc.select import Point, Setting, choose, default_settings
from tcc.targets import Target, load_catalog, price_all
from tcc.targets.calibration import cost_devices

# (setting, device, batch) -> the cost of one run
Prices = dict[tuple[str, str, int], Cost]


def at_batch(inputs: Any, batch: int) -> Any:
    """The zoo's example inputs (a tuple of tensors or a dict of them) with their first example
    repeated `batch` times along dim 0."""
    def grow(x: torch.Tensor) -> torch.Tensor:
        return x[:1].expand(batch, *x.shape[1:]).contiguous()

    if isinstance(inputs, dict):
        return {name: grow(x) for name, x in inputs.items()}
    return tuple(grow(x) for x in inputs)


def pick_settings(sparsities: Sequence[float], block: str, integer: bool) -> list[Setting]:
    """The dense setting first (int8, or fully integer), then hp-pruned at each sparsity in
    `block` blocks, as `default_settings` names and spells them; an error naming the ones it
    has when one is not there."""
    offered = {s.name: s for s in default_settings()}
    names = ["int8-integer" if integer else "int8"] + [f"hp{round(100 * s)}-{block}-{'integer' if integer else 'int8'}"
                                                        for s in sparsities]
    missing = [n for n in names if n not in offered]
    if missing:
        raise SystemExit(f"not among tcc.select.default_settings(): {', '.join(missing)} "
                         f"(it has {', '.join(offered)})")
    return [offered[n] for n in names]


def price_model(name: str, batches: Sequence[int], settings: Sequence[Setting], targets: Mapping[str, Target],
                devices: Mapping[str, Device]) -> tuple[Prices, dict[tuple[str, int], int]]:
    """Every (setting, device, batch) cost of zoo model `name`: lowered at each batch size, each
    setting's pipeline run on it (quantize calibrated on the batch itself), priced by `price_all`;
    and each (setting, batch)'s dense-equivalent operations (`flops`)."""
    model, inputs = zoo.build(name)
    prices: Prices = {}
    ops = {}
    for batch in batches:
        graph, signature, examples, _source = lower(model, at_batch(inputs, batch))
        example = example_dataset(graph, example_arrays(signature, examples))
        for setting in settings:
            ctx = PassContext(data={"example": example}, torch_module=TorchExecutor)
            compressed = run_pipeline(graph, setting.passes, ctx)
            ops[setting.name, batch] = flops(compressed)
            for device, cost in price_all(compressed, targets, devices, after=setting.passes).items():
                prices[setting.name, device, batch] = cost
    return prices, ops


def best_batch(prices: Prices, setting: str, device: str, batches: Sequence[int]) -> int:
    """The batch size of `batches` of least latency per example."""
    return min(batches, key=lambda b: prices[setting, device, b].latency_s / b)


def best_ms(prices: Prices, setting: str, device: str, batches: Sequence[int]) -> float:
    """The least latency per example (ms) over `batches`."""
    batch = best_batch(prices, setting, device, batches)
    return prices[setting, device, batch].latency_s / batch * 1e3


def split(cost: Cost) -> str:
    """The cost's parts as whole percentages of its latency, in the parts' order."""
    return "/".join(f"{100 * v / cost.latency_s:.0f}" for v in cost.parts.values())


def name_width(settings: Sequence[Setting]) -> int:
    """The setting column's width: the longest name and two spaces."""
    return max(len(s.name) for s in settings) + 2


def latency_table(prices: Prices, settings: Sequence[Setting], devices: Sequence[str], fpgas: Sequence[str],
                  batches: Sequence[int]) -> None:
    name = name_width(settings)
    parts = next((prices[settings[0].name, f, 1].parts for f in fpgas), {})
    print(f"{'setting':<{name}}{'device':<13}{'batch 1 ms':>11}{'best ms/ex':>12}{'at':>5}   "
          f"FPGA split, % {'/'.join(parts)}: at batch 1 | at best")
    for setting in settings:
        for device in devices:
            best = best_batch(prices, setting.name, device, batches)
            shares = (f"{split(prices[setting.name, device, 1]):>13} | {split(prices[setting.name, device, best])}"
                      if device in fpgas else "")
            print(f"{setting.name:<{name}}{device:<13}{prices[setting.name, device, 1].latency_s * 1e3:>11.3f}"
                  f"{best_ms(prices, setting.name, device, batches):>12.4f}{best:>5}   {shares}")
        print()


def speedup_table(prices: Prices, settings: Sequence[Setting], others: Sequence[str], fpgas: Sequence[str],
                  batches: Sequence[int]) -> None:
    dense = settings[0].name  # what "own dense" runs
    name = name_width(settings)
    columns = [f"vs {d}" for d in others] + [f"vs own {dense}"]
    width = max(map(len, columns)) + 2
    print(f"{'FPGA':<13}{'setting':<{name}}{'batch':<7}" + "".join(f"{c:>{width}}" for c in columns))
    for fpga in fpgas:
        for setting in settings:
            if setting.name == dense:
                continue
            for label, among in (("1", (1,)), ("best", batches)):
                mine = best_ms(prices, setting.name, fpga, among)
                ratios = ([best_ms(prices, setting.name, d, among) / mine for d in others]
                          + [best_ms(prices, dense, fpga, among) / mine])
                print(f"{fpga:<13}{setting.name:<{name}}{label:<7}" + "".join(f"{r:>{width - 1}.3g}x" for r in ratios))
        print()


def energy_table(prices: Prices, ops: Mapping[tuple[str, int], int], settings: Sequence[Setting],
                 devices: Sequence[str], fpgas: Sequence[str]) -> None:
    name = name_width(settings)
    others = [d for d in devices if d not in fpgas]
    print(f"{'setting':<{name}}{'device':<13}{'mJ':>10}{'GOP/s/W':>10}   FPGA: where the energy goes, %; "
          f"its GOP/s/W over {', '.join(others)}'s")
    for setting in settings:
        efficiency = {d: prices[setting.name, d, 1].gops_per_w(ops[setting.name, 1]) for d in devices}
        for device in devices:
            cost = prices[setting.name, device, 1]
            parts = sorted(cost.energy_parts.items(), key=lambda kv: -kv[1])
            where = " ".join(f"{k} {100 * v / cost.energy_j:.0f}" for k, v in parts if v >= 0.01 * cost.energy_j)
            gains = "  ".join(f"{efficiency[device] / efficiency[d]:.3g}x" for d in others) if device in fpgas else ""
            print(f"{setting.name:<{name}}{device:<13}{cost.energy_j * 1e3:>10.4g}{efficiency[device]:>10.4g}   "
                  f"{where}{'; ' if where else ''}{gains}")
        print()


def sweep(prices: Prices, settings: Sequence[Setting], targets: Mapping[str, Target]) -> None:
    name = name_width(settings)
    points = [Point(s.name, d, 1.0, c.latency_s * 1e3, c.energy_j * 1e3, t.device.price_usd,
                    {k: v * 1e3 for k, v in c.parts.items()})
              for s in settings for d, t in targets.items() for c in (prices[s.name, d, 1],)]
    # the choice can only change where a constraint passes a device's fastest latency
    fastest = sorted({min(p.latency_ms for p in points if p.device == d) for d in targets}, reverse=True)
    constraints = [max(p.latency_ms for p in points) * 1.25, *fastest, fastest[-1] * 0.8]
    print(f"{'LC ms':>10}  {'device':<13}{'price $':>8}  {'setting':<{name}}{'latency ms':>11}")
    last = None
    for lc in constraints:
        selection = choose(points, lc, 0.0)
        p = selection.chosen or selection.closest
        if (p.device, p.setting, selection.chosen is None) == last:
            continue
        last = (p.device, p.setting, selection.chosen is None)
        note = "" if selection.chosen else "  (none meets it: the closest)"
        print(f"{lc:>10.3f}  {p.device:<13}{p.price_usd:>8,.0f}  {p.setting:<{name}}{p.latency_ms:>11.3f}{note}")


def number_list(text: str, kind: type) -> list:
    return [kind(x) for x in text.split(",") if x.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tinybert4,hf-bert", help="zoo models, comma-separated")
    parser.add_argument("--batches", default="1,4,16,64", help="batch sizes of the best batch (1 always added)")
    parser.add_argument("--sparsities", default="0.5,0.75,0.9", help="hp-prune sparsities (default_settings' levels)")
    parser.add_argument("--block", default="16x16", help="hp-prune block shape (default_settings': 8x8 or 16x16)")
    parser.add_argument("--integer", action="store_true",
                        help="the fully integer settings (int-nonlinear: softmax, layer norm, GELU on the vector unit)")
    args = parser.parse_args()
    batches = sorted({1, *number_list(args.batches, int)})
    settings = pick_settings(number_list(args.sparsities, float), args.block, args.integer)
    catalog = load_catalog()
    devices = cost_devices(catalog, calibrate=False)
    targets = {name: t for name, t in catalog.items() if name in devices}
    fpgas = [name for name, t in targets.items() if t.kind == "fpga"]
    others = [name for name in targets if name not in fpgas]
    measured = ", ".join(name for name, d in devices.items() if d.measured) or "none (no cached calibration)"
    print(f"cost model predictions; figures measured on this machine: {measured}, the catalog's for the rest; "
          f"batches {', '.join(map(str, batches))}; settings {', '.join(s.name for s in settings)}")
    print(f"    .venv/bin/python benchmarks/devices.py {' '.join(sys.argv[1:])}".rstrip())
    for name in (m.strip() for m in args.models.split(",")):
        start = time.perf_counter()
        prices, ops = price_model(name, batches, settings, targets, devices)
        print(f"\n== {name}: priced {len(prices)} (setting, device, batch) points in "
              f"{time.perf_counter() - start:.1f} s")
        print("\n1. latency: one run at batch 1; per example at the best batch (`at`)\n")
        latency_table(prices, settings, list(targets), fpgas, batches)
        print("2. speedup of each FPGA over each device running the same setting, and over itself on "
              f"{settings[0].name} (per example)\n")
        speedup_table(prices, settings, others, fpgas, batches)
        print("3. energy per run and efficiency at batch 1 (FPGAs: from activity; CPUs, GPUs: power x time)\n")
        energy_table(prices, ops, settings, list(targets), fpgas)
        print("4. device chosen per latency constraint LC at batch 1 (tcc.select.choose, accuracy "
              "unconstrained: the cheapest device meeting LC, then its fastest setting)\n")
        sweep(prices, settings, targets)


if __name__ == "__main__":
    main()
