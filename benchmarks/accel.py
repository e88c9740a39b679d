"""The accelerator on BERT-base GEMMs (sequence 128) and the speed of its RTL simulators.

1. Each quantized linear of a BERT-base layer (QKV/output projections 128x768x768, FFN
   128x768x3072 and 128x3072x768) compiled for a 16x16 array (the default `AccelConfig`) and
   run on the ISA simulator (cycle-exact with the RTL): cycles against the ideal
   MACs / PEs (utilization, DMA included; target >= 90%) and against SCALE-Sim's analytic
   output-stationary count for the same GEMM and array, (R + C + K - 2) * ceil(M/R) * ceil(N/C)
   (no memory stalls), both printed.
2. RTL simulation speed: one program (a GEMM of `--rtl-gemm MxKxN`) through PyRTL's
   FastSimulation and through Verilator on the exported Verilog, cycles per second (Verilator's
   compile time printed apart; set TCC_RTL_CACHE=off to measure it). Both must end with the ISA
   simulator's DRAM and cycle count.

    .venv/bin/python benchmarks/accel.py [--rtl-gemm 64x256x64] [--skip-rtl]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from tcc.backends.accel.codegen import generate
from tcc.backends.accel.config import AccelConfig
from tcc.ir.dtypes import DType
from tcc.ir.graph import GraphBuilder
from tcc.ir.types import TensorType
from tcc.runtime.accel_executor import AccelExecutor

BERT_BASE_GEMMS = {"qkv/output projection": (128, 768, 768), "ffn up": (128, 768, 3072),
                   "ffn down": (128, 3072, 768)}


def quantized_linear(m: int, k: int, n: int, seed: int = 0):
    """A graph `requantize(linear(x: i8[m, k], w: i8[n, k], b: i32[n]))` with random values."""
    rng = np.random.default_rng(seed)
    g = GraphBuilder("gemm")
    x = g.input("x", TensorType((m, k), DType.I8))
    w = g.constant("w", rng.integers(-127, 128, (n, k)), DType.I8)
    b = g.constant("b", rng.integers(-5000, 5000, n), DType.I32)
    mult = g.constant("mult", rng.integers(1 << 30, 1 << 31, n), DType.I32)
    shift = g.constant("shift", np.full(n, 40), DType.I32)
    y = g.op("requantize", g.op("linear", x, w, b), mult, shift, dtype=DType.I8, scale=1.0)
    return g.finish([y]), rng.integers(-128, 128, (m, k)).astype(np.int8)


def scalesim_cycles(m: int, k: int, n: int, config: AccelConfig) -> int:
    """SCALE-Sim's output-stationary compute cycles: per fold R + C + T - 2, folds ceil(M/R) * ceil(N/C)."""
    return (config.rows + config.cols + k - 2) * math.ceil(m / config.rows) * math.ceil(n / config.cols)


def gemm_table(config: AccelConfig) -> None:
    print(f"GEMMs on a {config.rows}x{config.cols} array, DRAM {config.dram_bits} bits/cycle, "
          f"latency {config.dram_latency} (ISA simulator = RTL cycles)")
    print(f"{'layer':<24}{'M x K x N':>18}{'cycles':>12}{'ideal':>12}{'util':>8}{'SCALE-Sim':>12}{'ours/SS':>9}")
    utils = []
    for name, (m, k, n) in BERT_BASE_GEMMS.items():
        graph, x = quantized_linear(m, k, n)
        executor = AccelExecutor(graph, generate(graph, config))
        executor(x)
        cycles = executor.stats.cycles
        ideal = m * k * n / config.pes
        scale = scalesim_cycles(m, k, n, config)
        utils.append(ideal / cycles)
        print(f"{name:<24}{f'{m}x{k}x{n}':>18}{cycles:>12,}{int(ideal):>12,}{ideal / cycles:>8.1%}{scale:>12,}"
              f"{cycles / scale:>9.3f}")
    worst = min(utils)
    print(f"utilization including DMA: worst {worst:.1%} (target >= 90%): {'PASS' if worst >= 0.9 else 'FAIL'}")


def section_with_inputs(m: int, k: int, n: int, config: AccelConfig):
    """The (single) section of an m x k x n quantized linear and the DRAM it starts from."""
    graph, x = quantized_linear(m, k, n)
    runs = AccelExecutor(graph, generate(graph, config)).section_runs(x)
    assert len(runs) == 1, "the benchmark GEMM should compile to one section"
    return runs[0]


def rtl_speed(spec: str) -> None:
    from tcc.backends.accel.hardware import run_pyrtl
    from tcc.backends.accel.verilog import run_verilator
    from tcc.runtime.accel_executor import simulate_section

    m, k, n = (int(v) for v in spec.split("x"))
    config = AccelConfig(dram_words=1 << 20)
    program, dram = section_with_inputs(m, k, n, config)
    expected, cycles = simulate_section(program, config, dram, 10 ** 9)
    rates = {}
    for label, runner in (("PyRTL FastSimulation", run_pyrtl), ("Verilator", run_verilator)):
        timing: dict = {}
        kwargs = {"timing": timing} if runner is run_verilator else {}
        start = time.perf_counter()
        out, rtl_cycles = runner(program, config, dram, 10 ** 9, **kwargs)
        seconds = time.perf_counter() - start - timing.get("compile_s", 0.0)
        assert rtl_cycles == cycles and bytes(out)[:len(expected)] == expected, f"{label} disagrees with the ISA simulator"
        rates[label] = cycles / seconds
        compiled = f" (+ {timing['compile_s']:.1f} s compile)" if timing.get("compile_s") else ""
        print(f"{label:<22} {cycles:,} cycles in {seconds:.3f} s{compiled}: {cycles / seconds:,.0f} cycles/s")
    ratio = rates["Verilator"] / rates["PyRTL FastSimulation"]
    print(f"Verilator / PyRTL FastSimulation: {ratio:.1f}x on a {spec} GEMM, 16x16 array (start-up included)")
    long_program, long_dram = section_with_inputs(128, 768, 768, config)
    expected, cycles = simulate_section(long_program, config, long_dram, 10 ** 9)
    timing = {}
    start = time.perf_counter()
    out, rtl_cycles = run_verilator(long_program, config, long_dram, 10 ** 9, timing=timing)
    seconds = time.perf_counter() - start - timing["compile_s"]
    assert rtl_cycles == cycles and bytes(out)[:len(expected)] == expected, "Verilator disagrees with the ISA simulator"
    print(f"Verilator on a 128x768x768 GEMM: {cycles:,} cycles in {seconds:.2f} s: {cycles / seconds:,.0f} cycles/s "
          f"({cycles / seconds / rates['PyRTL FastSimulation']:.0f}x PyRTL's rate above)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rtl-gemm", default="64x256x64", help="MxKxN of the RTL speed program")
    parser.add_argument("--skip-rtl", action="store_true")
    args = parser.parse_args()
    gemm_table(AccelConfig())
    if not args.skip_rtl:
        rtl_speed(args.rtl_gemm)


if __name__ == "__main__":
    main()
