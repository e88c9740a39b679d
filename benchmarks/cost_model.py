"""The cost model's fidelity and speed.

    .venv/bin/python benchmarks/cost_model.py [--repeats 15] [--rounds 5] [--threads N] [--skip-bert]

1. Host CPU: predicted latency (the roofline with this machine's measured figures) against the
   torch executor's measured latency (median of `--repeats` runs) on models and batch sizes
   the calibration did not see: the zoo's transformer-encoder and the digits Transformer at
   32, 200 and 450 images (it calibrates on 1, 64 and 512), fp32, int8 and fully integer.
   Target: within 25%.
2. FPGA: the accelerator cycles the cost model uses (the codegen's timing) against the ISA
   simulator running the program on data: equal by construction, checked here on the digits
   model for the three FPGA targets.
3. Speed: seconds to price one (model, setting, device) point of a BERT-base-shaped model
   (12 layers, 768 hidden, sequence 128) on each device.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import tcc
from tcc.backends.accel.codegen import generate
from tcc.passes.cost_model import roofline
from tcc.runtime.accel_executor import AccelExecutor
from tcc.runtime.torch_executor import TorchExecutor
from tcc.targets import load_catalog
from tcc.targets.calibration import cost_devices, run_seconds
from tcc.zoo import DigitsTransformer, build

PIPELINES = {"fp32": None, "int8": "quantize", "integer": "quantize,int-nonlinear"}


def host_fidelity(repeats: int, rounds: int) -> None:
    catalog = load_catalog()
    host = cost_devices(catalog)["cpu"]
    print(f"host CPU figures (measured, {torch.get_num_threads()} threads): fp32 {host.fp32_gflops:g} GFLOP/s, "
          f"int8 {host.int8_gops:g} GOP/s, DRAM {host.dram_gbps:g} GB/s, cache {host.cache_gbps:g} GB/s, "
          f"default op cost {host.op_overhead_us:g} us")
    torch.manual_seed(0)
    cases = [("transformer-encoder", *build("transformer-encoder"))]
    digits = DigitsTransformer().eval()
    cases += [(f"digits, {b} images", digits, (torch.rand(b, 8, 8),)) for b in (32, 200, 450)]
    runs = []
    for name, model, inputs in cases:
        inputs = inputs if isinstance(inputs, tuple) else (inputs,)
        for label, spec in PIPELINES.items():
            if name == "transformer-encoder" and label == "integer":
                continue
            graph = tcc.compile(model, inputs, pipeline=spec).graph
            runs.append((name, label, graph, TorchExecutor(graph, "cpu"), [torch.as_tensor(x) for x in inputs]))
    # rounds over all cases in turn: a burst of the machine's other load spoils one round, not a case
    measured = [[run_seconds(executor, tensors, repeats) for *_, executor, tensors in runs] for _ in range(rounds)]
    print(f"{'model':<28}{'pipeline':<10}{'measured ms':>12}{'predicted ms':>14}{'ratio':>8}")
    worst = 0.0
    for (name, label, graph, *_), times in zip(runs, zip(*measured)):
        real = statistics.median(times) * 1e3
        predicted = roofline(graph, host).latency_s * 1e3
        worst = max(worst, abs(predicted / real - 1))
        print(f"{name:<28}{label:<10}{real:>12.3f}{predicted:>14.3f}{predicted / real:>8.2f}")
    print(f"worst error {worst:.0%} (target <= 25%): {'PASS' if worst <= 0.25 else 'FAIL'}")


def fpga_cycles() -> None:
    catalog = load_catalog()
    torch.manual_seed(0)
    x = torch.rand(16, 8, 8)
    graph = tcc.compile(DigitsTransformer().eval(), (x,), pipeline="quantize").graph
    for name in ("fpga-small", "fpga-medium", "fpga-large"):
        config = catalog[name].accel
        executor = AccelExecutor(graph, generate(graph, config))
        executor(x.numpy())
        predicted = catalog[name].cost(graph, cost_devices(catalog)).parts["accelerator"] * config.clock_mhz * 1e6
        print(f"{name}: cost model {round(predicted):,} cycles, ISA simulator {executor.stats.cycles:,}")


def bert_speed() -> None:
    catalog = load_catalog()
    devices = cost_devices(catalog)
    model, inputs = build("bert-base")
    for label, spec in (("fp32", None), ("int8", "quantize")):
        graph = tcc.compile(model, inputs, pipeline=spec).graph
        for name, target in catalog.items():
            if name not in devices:
                continue
            start = time.perf_counter()
            c = target.cost(graph, devices)
            first = time.perf_counter() - start
            print(f"BERT-base {label:<5} on {name:<12} {c.latency_s * 1e3:10.2f} ms predicted; priced in {first:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15, help="runs per measurement (median)")
    parser.add_argument("--rounds", type=int, default=5, help="measurements per case, taken in turn (median)")
    parser.add_argument("--threads", type=int, help="torch's CPU threads (default: torch's choice)")
    parser.add_argument("--skip-bert", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    host_fidelity(args.repeats, args.rounds)
    fpga_cycles()
    if not args.skip_bert:
        bert_speed()


if __name__ == "__main__":
    main()
