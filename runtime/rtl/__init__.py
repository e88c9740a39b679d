"""The accelerator's RTL as runners, all with one contract: `run(program, config, dram,
max_cycles) -> (final DRAM bytes, cycles)`, bit for bit and cycle for cycle the ISA
simulator's. `run_pyrtl` simulates the PyRTL design (`pyrtl_sim`); `run_icarus` and
`run_verilator` run the exported Verilog and its testbench (`verilog_sim`) on simulators compiled
once per config and DRAM capacity and kept in a cache directory (`simulators`, `CACHE_ENV`).
`RTLSimulationError`: a run that did not reach `halt`."""

from .pyrtl_sim import RTLSimulationError, run_pyrtl
from .simulators import CACHE_ENV, cache_dir
from .verilog_sim import run_icarus, run_verilator

__all__ = ["CACHE_ENV", "RTLSimulationError", "cache_dir", "run_icarus", "run_pyrtl", "run_verilator"]
