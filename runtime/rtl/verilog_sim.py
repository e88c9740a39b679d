"""The exported Verilog as a runner: `run_icarus` and `run_verilator` have `run_pyrtl`'s contract
(final DRAM bytes and cycles) and run the testbench of `tcc.backends.accel.verilog` on a
simulator compiled once per config and DRAM capacity (`simulators`)."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from tcc.backends.accel.config import AccelConfig
from tcc.backends.accel.verilog import (DRAM_HEX, DRAM_OUT_HEX, PROGRAM_HEX, RunFiles, cycle_limit, tool_path,
                                        write_inputs, write_testbench)

from .pyrtl_sim import RTLSimulationError
from .simulators import ICARUS, VERILATOR, Simulator, compiled


def _plusargs(files: RunFiles, max_cycles: int) -> list[str]:
    return [f"+program={PROGRAM_HEX}", f"+program_length={files.program_length}", f"+dram={DRAM_HEX}",
            f"+dram_words={files.dram_words}", f"+dram_out={DRAM_OUT_HEX}",
            f"+max_cycles={cycle_limit(max_cycles)}"]


def _read_hex(path: Path, nwords: int, bits: int) -> bytearray:
    """The first `nwords` words of a `$writememh` file as little-endian bytes (missing words 0).
    RTLSimulationError for a word with unknown (x/z) bits."""
    word = bits // 8
    text = path.read_text()
    if "//" in text:
        text = re.sub(r"//[^\n]*", "", text)
    tokens = text.split()
    if re.search(r"[xXzZ]", text):
        addr = 0
        for token in tokens:
            if token.startswith("@"):
                addr = int(token[1:], 16)
                continue
            if re.search(r"[xXzZ]", token):
                raise RTLSimulationError(f"{path.name}: DRAM word {addr} holds unknown bits ({token})")
            addr += 1
    out = bytearray(nwords * word)
    if "@" not in text and all(len(t) == 2 * word for t in tokens[:nwords]):  # the usual case: one word a line
        n = min(nwords, len(tokens))
        out[:n * word] = np.frombuffer(bytes.fromhex("".join(tokens[:n])), np.uint8).reshape(n, word)[:, ::-1].tobytes()
        return out
    addr = 0
    for token in tokens:
        if token.startswith("@"):
            addr = int(token[1:], 16)
            continue
        if addr < nwords:
            out[addr * word:(addr + 1) * word] = (int(token, 16) & ((1 << bits) - 1)).to_bytes(word, "little")
        addr += 1
    return out


def _simulate(sim: Simulator, program, config, dram, max_cycles, workdir, timeout) -> tuple[np.ndarray, int, dict]:
    owned = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="tcc-rtl-")) if owned else Path(workdir)
    try:
        # just the run's inputs, or (a directory to keep) the whole testbench to rerun with its Makefile
        files = write_inputs(program, config, dram, workdir) if owned else \
            write_testbench(program, config, dram, max_cycles, workdir)
        tool_path(sim.compile[0])
        product, compile_s = compiled(sim, config, files.capacity, timeout)
        timing = {"compile_s": compile_s, "cached": compile_s == 0.0}
        command = [*([tool_path(sim.run[0]), *sim.run[1:]] if sim.run else []), str(product),
                   *_plusargs(files, max_cycles)]
        start = time.perf_counter()
        run = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=timeout)
        timing["run_s"] = time.perf_counter() - start
        output = run.stdout + run.stderr
        match = re.search(r"^cycles (\d+)$", output, re.M)
        if "ERROR: no halt" in output:
            raise RTLSimulationError(f"the {sim.compile[0]} simulation did not reach halt within {max_cycles} "
                                     "cycles (cycle limit, or a program that waits for a token never signalled)")
        if match is None or run.returncode:
            raise RuntimeError(f"{Path(command[0]).name} gave no cycle count ({run.returncode}):\n{output[-4000:]}")
        word = config.dram_bits // 8
        image = _read_hex(workdir / DRAM_OUT_HEX, -(-files.size // word), config.dram_bits)
        return np.frombuffer(bytes(image[:files.size]), np.uint8).copy(), int(match.group(1)), timing
    finally:
        if owned:
            shutil.rmtree(workdir, ignore_errors=True)


def run_icarus(program, config: AccelConfig, dram: np.ndarray, max_cycles: int, workdir=None,
               timeout: float = 600, timing: dict | None = None) -> tuple[np.ndarray, int]:
    """`run_pyrtl`'s contract on the exported Verilog in Icarus Verilog (iverilog/vvp). Files go
    to `workdir` (kept, with the Makefile) or a temporary directory (removed); the compiled
    testbench is reused (`simulators`). `timing`, when given, receives
    compile_s (0.0 when reused), cached and run_s."""
    out, cycles, t = _simulate(ICARUS, program, config, dram, max_cycles, workdir, timeout)
    if timing is not None:
        timing.update(t)
    return out, cycles


def run_verilator(program, config: AccelConfig, dram: np.ndarray, max_cycles: int, workdir=None,
                  timeout: float = 600, timing: dict | None = None) -> tuple[np.ndarray, int]:
    """`run_pyrtl`'s contract on the exported Verilog built with `verilator --binary`, built once
    per config and DRAM capacity (`simulators`). `timing`, when given,
    receives compile_s (0.0 when reused), cached and run_s."""
    out, cycles, t = _simulate(VERILATOR, program, config, dram, max_cycles, workdir, timeout)
    if timing is not None:
        timing.update(t)
    return out, cycles
