"""The accelerator's PyRTL simulation as a runner: `run_pyrtl(program, config, dram, max_cycles)`
runs a program on the generated design (`tcc.backends.accel.hardware`) with the DRAM driven from
Python, and `RTLSimulationError`, what every RTL runner raises for a run that does not finish."""

from __future__ import annotations

import numpy as np
import pyrtl

from tcc.backends.accel import isa
from tcc.backends.accel.config import AccelConfig
from tcc.backends.accel.hardware import design, dram_image


class RTLSimulationError(isa.SimulationError):
    """An RTL run that did not finish: over its cycle limit (a deadlock looks the same)."""


def run_pyrtl(program, config: AccelConfig, dram: np.ndarray, max_cycles: int) -> tuple[np.ndarray, int]:
    """Run `program` on the PyRTL simulation of `config`'s accelerator (FastSimulation), DRAM
    driven from Python. Returns (final DRAM bytes, cycles): the DRAM as long as `dram` or grown
    to cover every word the program touches. ValueError for a program `isa.check_program`
    rejects; `RTLSimulationError` when `halt` has not issued within `max_cycles` cycles."""
    isa.check_program(program, config)
    d = design(config)
    image, size = dram_image(program, config, dram)
    word = config.dram_bits // 8
    nwords = len(image) // word
    sim = pyrtl.FastSimulation(tracer=None, block=d.block,
                               memory_value_map={d.imem: {i: instr.encode() for i, instr in enumerate(program)}})
    step, inspect = sim.step, sim.inspect
    inputs = {"dram_rdata": 0, "imem_we": 0, "imem_waddr": 0, "imem_wdata": 0}
    for cycle in range(max_cycles + 1):
        step(inputs)
        if inspect("done"):
            return np.frombuffer(bytes(image[:size]), np.uint8).copy(), cycle
        if inspect("dram_re"):
            addr = inspect("dram_raddr")
            inputs["dram_rdata"] = int.from_bytes(image[addr * word:(addr + 1) * word], "little") if addr < nwords else 0
        if inspect("dram_we"):
            addr = inspect("dram_waddr")
            if addr < nwords:
                image[addr * word:(addr + 1) * word] = inspect("dram_wdata").to_bytes(word, "little")
    raise RTLSimulationError(f"the PyRTL simulation did not reach halt within {max_cycles} cycles "
                             "(cycle limit, or a program that waits for a token never signalled)")
