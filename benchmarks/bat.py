"""The binarized accelerator per variant and array: TinyBERT-4 (the zoo's, its example batch)
compiled integer-only for fpga-medium with its array resized (`--accel rows=N,cols=N`) and with
or without the W1A8 unit, priced by the cost model (cycles: the codegen's schedule, equal to the
ISA simulator's and the RTL's; energy: from activity, `backends/accel/energy.py`).

Variants: int8 (`quantize,int-nonlinear`); W1A8 (`binarize{mode=w1a8}` first) on the int8
array, its +-1 weights on the multipliers, and on the W1A8 unit at G = 2, 4 and 8
(`binary_weight_group`); W1A1 (`binarize{mode=w1a1}`, the binary unit's bgemm). Per row:
end-to-end latency and the accelerator's part, GOP/s (the model's dense-equivalent operations
over the latency), energy per inference and GOP/s/W, and the config's estimated LUT and DSP
(`AccelConfig.estimate_resources`).

    .venv/bin/python benchmarks/bat.py [--arrays 8,16] [--model tinybert4]
"""

from __future__ import annotations

import argparse

from _common import board_devices, zoo_graph
from tcc.ir.analysis import flops
from tcc.ir.errors import TccError
from tcc.passes import parse_pipeline, run_pipeline
from tcc.targets import load_catalog

PREFIX = "fold-constants,canonicalize,dce,"
VARIANTS = (("int8", "quantize,int-nonlinear", 0), ("W1A8 on int8", "binarize{mode=w1a8},quantize,int-nonlinear", 0),
            ("W1A8 G=2", "binarize{mode=w1a8},quantize,int-nonlinear", 2),
            ("W1A8 G=4", "binarize{mode=w1a8},quantize,int-nonlinear", 4),
            ("W1A8 G=8", "binarize{mode=w1a8},quantize,int-nonlinear", 8),
            ("W1A1", "binarize{mode=w1a1},quantize,int-nonlinear", 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arrays", default="8,16", help="square array sizes (32x32 does not fit the part)")
    parser.add_argument("--model", default="tinybert4", help="zoo model")
    args = parser.parse_args()
    catalog = load_catalog()
    medium = catalog["fpga-medium"]
    devices = board_devices(medium, catalog)
    graph, ctx = zoo_graph(args.model)
    compressed = {}
    for _label, pipeline, _group in VARIANTS:
        if pipeline not in compressed:
            passes = parse_pipeline(PREFIX + pipeline)
            compressed[pipeline] = (run_pipeline(graph, passes, ctx), passes)
    ops = flops(graph)
    print(f"{args.model} ({ops / 1e6:.1f} M dense-equivalent operations a run) on fpga-medium's part, host "
          f"{medium.device.host}; arrays {args.arrays}")
    print(f"{'array':>6}  {'variant':<14}{'ms':>8}{'accel ms':>10}{'GOP/s':>8}{'mJ':>8}{'GOP/s/W':>9}"
          f"{'LUT':>9}{'DSP':>6}")
    for n in (int(v) for v in args.arrays.split(",")):
        for label, pipeline, group in VARIANTS:
            try:
                target = medium.with_accel(f"rows={n},cols={n},binary_weight_group={group}")
            except TccError as e:
                print(f"{f'{n}x{n}':>6}  {label:<14}{e}")
                continue
            g, passes = compressed[pipeline]
            cost = target.cost(target.lower(g, after=passes), devices)
            resources = target.accel.estimate_resources()
            print(f"{f'{n}x{n}':>6}  {label:<14}{cost.latency_s * 1e3:>8.3f}{cost.parts['accelerator'] * 1e3:>10.3f}"
                  f"{ops / cost.latency_s / 1e9:>8.2f}{cost.energy_j * 1e3:>8.3f}{cost.gops_per_w(ops):>9.1f}"
                  f"{resources['LUT']:>9,}{resources['DSP']:>6}", flush=True)


if __name__ == "__main__":
    main()
