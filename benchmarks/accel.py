"""The accelerator on BERT-base GEMMs (sequence 128) and the speed of its RTL simulators.

Every figure is on fpga-medium's accelerator (16x16 int8 array, 200 MHz) and counted by the
ISA simulator, whose cycles equal the RTL's.

1. Dense utilization with overlap: each quantized linear of a BERT-base layer (QKV/output
   projections 128x768x768, FFN 128x768x3072 and 128x3072x768): cycles against the ideal
   MACs / PEs (DMA included; target >= 95%) and against SCALE-Sim's analytic
   output-stationary count for the same GEMM and array, (R + C + K - 2) * ceil(M/R) * ceil(N/C)
   (no memory stalls).
2. HP sparse speedup: the same GEMMs with HP weights (16x16 blocks, hp-prune's split of 50%,
   75% and 90% between the levels) on the sparse unit, against the dense weights on the same
   array: target >= 0.85 / (1 - s). HP on the wire: on each FPGA target at its default block,
   a 768x768 HP weight's DRAM bytes (spload's compact stream) against its `#hp` bytes (target
   <= 1.1x) and against the weight/index word pairs the sparse unit reads.
3. Binary unit: the PE array alone (`hardware.build_array`) synthesized by yosys `synth_xilinx`
   in its int8 mode and in its XNOR-popcount mode: binary MACs per cycle per LUT against int8
   MACs per cycle per LUT (the int8 array's multipliers sit in DSPs, counted apart).
   The W1A8 unit (wgemm, `binary_weight_group` G = 2, 4, 8): the BERT-base GEMMs with +-1
   weights on fpga-medium's config with the unit against the same GEMMs on its int8 array
   (target: cycles <= 0.5x), and the array alone in wgemm mode against the int8 array, yosys
   (target: LUT + DSP no more than the int8 array's).
4. End to end: a TinyBERT-shaped encoder layer (hidden 312, 12 heads, FFN 1200, GELU,
   sequence 128) compiled integer-only (`quantize,int-nonlinear`: attention, softmax, GELU,
   residual adds and layer norms on the accelerator) dense int8, HP-pruned and binarized:
   accelerator cycles of each against the busiest unit's (the overlap the schedule leaves;
   target <= 1.15x), the ops left on the host, and where the vector unit's cycles go (by
   instruction: requant, the nonlinearities' rows).
5. RTL simulation speed: one program (a GEMM of `--rtl-gemm MxKxN`) through PyRTL's
   FastSimulation and through Verilator on the exported Verilog, cycles per second (Verilator's
   compile time printed apart; set TCC_RTL_CACHE=off to measure it). Both must end with the ISA
   simulator's DRAM and cycle count.

    .venv/bin/python benchmarks/accel.py [--rtl-gemm 64x256x64] [--skip-rtl] [--arrays 8x8,16x16]
"""

from __future__ import annotations

import argparse
import math
import time
from collections import Counter

import dataclasses

import numpy as np

from tcc.backends.accel.codegen import generate
from tcc.backends.accel.config import AccelConfig, Buffer
from tcc.backends.accel.isa import Opcode, Unit
from tcc.ir.dtypes import DType
from tcc.ir.graph import GraphBuilder
from tcc.ir.sparsity import Hierarchical
from tcc.ir.types import TensorType
from tcc.ir.verifier import verify
from tcc.passes.hp_prune import HPPrune
from tcc.runtime.accel_executor import AccelExecutor
from tcc.targets import get_target

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


def cycles_of(graph, x, config: AccelConfig) -> int:
    executor = AccelExecutor(graph, generate(graph, config))
    executor(x)
    return executor.stats.cycles


def gemm_table(config: AccelConfig) -> None:
    print(f"Dense GEMMs on a {config.rows}x{config.cols} array, DRAM {config.dram_bits} bits/cycle, "
          f"latency {config.dram_latency} (ISA simulator = RTL cycles)")
    print(f"{'layer':<24}{'M x K x N':>18}{'cycles':>12}{'ideal':>12}{'util':>8}{'SCALE-Sim':>12}{'ours/SS':>9}")
    utils = []
    for name, (m, k, n) in BERT_BASE_GEMMS.items():
        cycles = cycles_of(*quantized_linear(m, k, n), config)
        ideal = m * k * n / config.pes
        scale = scalesim_cycles(m, k, n, config)
        utils.append(ideal / cycles)
        print(f"{name:<24}{f'{m}x{k}x{n}':>18}{cycles:>12,}{int(ideal):>12,}{ideal / cycles:>8.1%}{scale:>12,}"
              f"{cycles / scale:>9.3f}")
    worst = min(utils)
    print(f"utilization with overlap, DMA included: worst {worst:.1%} (target >= 95%): "
          f"{'PASS' if worst >= 0.95 else 'FAIL'}")


def hp_weight(n: int, k: int, sparsity: float, block: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Random int8 [n, k] HP weights split between the levels as hp-prune splits `sparsity`
    (row_nnz per row of a kept block, the rest as whole blocks removed at random)."""
    row_nnz, density, keep = HPPrune(sparsity=sparsity).plan(block)
    keep = keep if keep is not None else min(1.0, density * block / row_nnz)
    w = np.zeros((n // block, k // block, block, block), np.int64)
    kept = rng.random((n // block, k // block)) < keep
    columns = np.argsort(rng.random(kept.shape + (block, block)), axis=-1)[..., :row_nnz]
    values = rng.integers(1, 128, columns.shape) * rng.choice([-1, 1], columns.shape)
    np.put_along_axis(w, columns, values, axis=-1)
    w[~kept] = 0
    return w.swapaxes(1, 2).reshape(n, k), row_nnz


def with_hp_weight(graph, sparsity: float, block: int):
    """`quantized_linear`'s graph with its weight `w` replaced by random HP weights of that
    sparsity in `block` x `block` blocks (`hp_weight`, seed 0), typed `~hp`: (graph, weights,
    row_nnz)."""
    n, k = graph.types["w"].shape
    weight, row_nnz = hp_weight(n, k, sparsity, block, np.random.default_rng(0))
    constants = tuple((name, dataclasses.replace(t, sparsity=Hierarchical(block, block, row_nnz)))
                      if name == "w" else (name, t) for name, t in graph.constants)
    sparse = verify(graph.replace(weights=dict(graph.weights) | {"w": weight.astype(np.int8)}, constants=constants))
    return sparse, weight, row_nnz


def hp_table(config: AccelConfig, sparsities=(0.5, 0.75, 0.9)) -> None:
    block = config.cols
    print(f"\nHP sparse unit ({block}x{block} blocks) against the dense array, same GEMMs")
    print(f"{'M x K x N':>16}{'sparsity':>10}{'row_nnz':>9}{'dense':>12}{'hp':>12}{'speedup':>9}{'target':>8}")
    ratios = []
    for m, k, n in BERT_BASE_GEMMS.values():
        graph, x = quantized_linear(m, k, n)
        dense = cycles_of(graph, x, config)
        for s in sparsities:
            sparse, weight, row_nnz = with_hp_weight(graph, s, block)
            cycles = cycles_of(sparse, x, config)
            actual = 1 - np.count_nonzero(weight) / weight.size
            target = 0.85 / (1 - actual)
            ratios.append(dense / cycles / target)
            print(f"{f'{m}x{k}x{n}':>16}{actual:>10.1%}{row_nnz:>9}{dense:>12,}{cycles:>12,}{dense / cycles:>8.2f}x"
                  f"{target:>7.2f}x")
    worst = min(ratios)
    print(f"speedup / target: worst {worst:.3f} (target >= 1): {'PASS' if worst >= 1 else 'FAIL'}")


def wire_table(sparsities=(0.5, 0.75, 0.9), k: int = 768, n: int = 768) -> None:
    """HP on the wire: a k x n HP weight at each FPGA target's default block (its PE tile): its
    bytes in the DRAM image (spload's compact stream) against its `#hp` bytes, and against the
    weight and index word pairs spgemm reads (the stream before spload: an 8-bit index a value)."""
    from tcc.targets.backends import weights_on_the_wire

    print(f"\nHP on the wire: a {n}x{k} weight at each FPGA's default block, DRAM bytes against #hp bytes (target <= 1.1x)")
    print(f"{'target':<13}{'encoding':>16}{'DRAM':>10}{'#hp':>10}{'ratio':>8}{'pairs':>10}{'pairs/#hp':>11}")
    worst = 0.0
    for name in ("fpga-small", "fpga-medium", "fpga-large"):
        config = get_target(name).accel
        block = config.cols
        graph, _x = quantized_linear(config.rows, k, n)
        for s in sparsities:
            sparse, _weight, _row_nnz = with_hp_weight(graph, s, block)
            program = generate(sparse, config)
            (wire,) = weights_on_the_wire(sparse, program)
            word = config.beats(Buffer.BBUF) * config.dram_bits // 8
            pairs = word * sum({i["dram"]: 2 * i["steps"] for section in program.sections for i in section.program
                                if i.op is Opcode.SPLOAD}.values())
            worst = max(worst, wire["ratio"])
            print(f"{name:<13}{wire['encoded']:>16}{wire['dram_bytes']:>10,}{wire['encoded_bytes']:>10,}"
                  f"{wire['ratio']:>7.3f}x{pairs:>10,}{pairs / wire['encoded_bytes']:>10.2f}x")
    print(f"DRAM / #hp: worst {worst:.3f}x (target <= 1.1x): {'PASS' if worst <= 1.1 else 'FAIL'}")


def binary_table(shapes: str) -> None:
    from tcc.backends.accel.verilog import synthesize_array

    print("\nBinary unit against the int8 array: the PE array alone, yosys synth_xilinx (xc7)")
    print(f"{'array':>7}{'mode':>8}{'LUT':>9}{'FF':>9}{'DSP':>6}{'MACs/cycle':>12}{'MACs/cycle/LUT':>16}")
    for shape in shapes.split(","):
        rows, cols = (int(v) for v in shape.split("x"))
        config = AccelConfig(rows=rows, cols=cols)
        per_lut = {}
        for mode, label in ((Opcode.GEMM, "int8"), (Opcode.BGEMM, "binary")):
            r = synthesize_array(config, mode)
            per_lut[label] = r["macs_per_cycle"] / r["LUT"]
            print(f"{shape:>7}{label:>8}{r['LUT']:>9,}{r['FF']:>9,}{r['DSP']:>6}{r['macs_per_cycle']:>12,}"
                  f"{per_lut[label]:>16.3f}")
        print(f"{shape:>7}  binary / int8 MACs per cycle per LUT: {per_lut['binary'] / per_lut['int8']:.2f}x")


def sign_linear(m: int, k: int, n: int):
    """`quantized_linear` with +-1 weights (what binarize{mode=w1a8},quantize gives the array)."""
    graph, x = quantized_linear(m, k, n)
    signs = np.where(np.asarray(graph.weights["w"]) >= 0, 1, -1).astype(np.int8)
    return graph.replace(weights=dict(graph.weights, w=signs)), x


def w1a8_table(config: AccelConfig, synthesize: bool) -> None:
    from tcc.backends.accel.verilog import synthesize_array

    groups = (2, 4, 8)
    print("\nW1A8 unit (wgemm): BERT-base GEMMs with +-1 weights, cycles against the int8 array's "
          "(target <= 0.5x)")
    print(f"{'layer':<24}{'int8':>12}" + "".join(f"{f'G={g}':>16}" for g in groups))
    for name, (m, k, n) in BERT_BASE_GEMMS.items():
        graph, x = sign_linear(m, k, n)
        base = cycles_of(graph, x, config)
        cells = [cycles_of(graph, x, dataclasses.replace(config, binary_weight_group=g)) for g in groups]
        print(f"{name:<24}{base:>12,}" + "".join(f"{c:>10,} {c / base:.2f}x" for c in cells))
    if not synthesize:
        return
    print(f"\nthe {config.rows}x{config.cols} array alone, yosys synth_xilinx (xc7): resources per mode "
          "(target: LUT + DSP <= the int8 array's)")
    int8 = synthesize_array(config, Opcode.GEMM)
    print(f"{'mode':<10}{'LUT':>9}{'FF':>9}{'DSP':>6}{'MACs/cycle':>12}{'LUT+DSP':>10}{'vs int8':>9}")
    for label, r in [("int8", int8)] + [(f"W1A8 G={g}", synthesize_array(
            dataclasses.replace(config, binary_weight_group=g), Opcode.WGEMM)) for g in groups]:
        total = r["LUT"] + r["DSP"]
        print(f"{label:<10}{r['LUT']:>9,}{r['FF']:>9,}{r['DSP']:>6}{r['macs_per_cycle']:>12,}{total:>10,}"
              f"{total / (int8['LUT'] + int8['DSP']):>8.2f}x")


def encoder_layer_table(config: AccelConfig) -> None:
    """A TinyBERT-shaped encoder layer, whole on the accelerator (integer nonlinearities on the
    vector unit), dense int8 against HP-pruned and binarized versions."""
    import torch

    import tcc

    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(312, 12, 1200, batch_first=True, dropout=0.0, activation="gelu").eval()
    x = torch.randn(1, 128, 312)
    print("\nTinyBERT-shaped encoder layer (312 hidden, 12 heads, FFN 1200, GELU, sequence 128), every arithmetic op "
          "integer (quantize, int-nonlinear)")
    print(f"{'version':<22}{'cycles':>12}{'vs dense':>10}{'sections':>10}{'vs busiest unit':>22}{'apart':>12}"
          "   array instructions; ops left to the host")
    dense, vector_rows, array_busy = None, {}, {}
    for name, pipeline in (("dense int8", ""), ("HP 75% (one-shot)", "hp-prune{sparsity=0.75},"),
                           ("HP 90% (one-shot)", "hp-prune{sparsity=0.9},"), ("binarized W1A8", "binarize{mode=w1a8},"),
                           # one-shot W1A1 of the attention projections leaves the attention all zeros (no
                           # range for int-nonlinear to calibrate): they stay int8 here, as trained BMT keeps them
                           ("W1A1 (QKV kept i8)", "binarize{mode=w1a1,layers=out_proj|linear},")):
        graph = tcc.compile(layer, (x,), pipeline=pipeline + "quantize,int-nonlinear").graph
        program = generate(graph, config)
        executor = AccelExecutor(graph, program)
        executor(x.numpy())
        cycles = executor.stats.cycles
        dense = dense or cycles
        array = sorted(k for k in executor.stats.instructions if k in ("gemm", "spgemm", "bgemm"))
        host = sorted({h.kind for h in program.host_ops})
        busy = Counter()
        for section in program.sections:
            busy.update(section.busy(config))
        array_busy[name] = busy[Unit.ARRAY.value]
        unit = max(busy, key=busy.get)  # end to end against the busiest unit's cycles: the overlap left (target 1.15x)
        apart = sum(s.cycles for s in generate(graph, config, chained=False).sections)  # the layers one by one
        print(f"{name:<22}{cycles:>12,}{dense / cycles:>9.2f}x{len(program.sections):>10}"
              f"{f'{cycles / busy[unit]:.2f}x ({unit})':>22}{apart / cycles:>11.2f}x   {', '.join(array)}; "
              f"{', '.join(host)}")
        vector_rows[name] = Counter()
        for section in program.sections:
            for instruction in section.program:
                if instruction.unit is Unit.VECTOR and instruction.op is not Opcode.HALT:
                    vector_rows[name][instruction.mnemonic] += instruction.occupancy(config)
    kinds = sorted({k for rows in vector_rows.values() for k in rows}, key=lambda k: -vector_rows["dense int8"][k])
    print("\nwhere the vector unit's busy cycles go (share of its cycles; its cycles against the array's)")
    print(f"{'version':<22}{'vector':>10}{'/ array':>9}" + "".join(f"{k:>12}" for k in kinds))
    for name, rows in vector_rows.items():
        total = sum(rows.values())
        print(f"{name:<22}{total:>10,}{total / array_busy[name]:>8.2f}x" + "".join(f"{rows[k] / total:>12.1%}"
                                                                                  for k in kinds))


def section_with_inputs(m: int, k: int, n: int, config: AccelConfig):
    """The (single) section of an m x k x n quantized linear and the DRAM it starts from."""
    graph, x = quantized_linear(m, k, n)
    runs = AccelExecutor(graph, generate(graph, config)).section_runs(x)
    assert len(runs) == 1, "the benchmark GEMM should compile to one section"
    return runs[0]


def rtl_speed(spec: str) -> None:
    from tcc.runtime.rtl import run_pyrtl, run_verilator
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
    parser.add_argument("--skip-rtl", action="store_true", help="skip the RTL speed and the yosys runs")
    parser.add_argument("--arrays", default="8x8", help="array shapes of the binary-unit synthesis, e.g. 8x8,16x16")
    args = parser.parse_args()
    config = get_target("fpga-medium").accel
    gemm_table(config)
    hp_table(config)
    wire_table()
    encoder_layer_table(config)
    w1a8_table(config, not args.skip_rtl)
    if not args.skip_rtl:
        binary_table(args.arrays)
        rtl_speed(args.rtl_gemm)


if __name__ == "__main__":
    main()
