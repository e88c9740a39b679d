"""The accelerator as Verilog: export (`accel.v`), a testbench with the DRAM as a Verilog array
(`accel_tb.v`, from `templates/`), a Makefile for Icarus and Verilator, runners with the same
contract as `hardware.run_pyrtl`, and synthesis with yosys (`synth_xilinx`) into LUT, FF, DSP
and BRAM counts."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import jinja2
import numpy as np
import pyrtl

from . import isa
from .config import AccelConfig
from .hardware import DRAM_ADDR_BITS, RTLSimulationError, _dram_image, design

MODULE = "accel"
TB_MODULE = "accel_tb"
VERILOG = "accel.v"
TESTBENCH = "accel_tb.v"
DRAM_HEX = "dram.hex"
PROGRAM_HEX = "program.hex"
DRAM_OUT_HEX = "dram_out.hex"
MAKEFILE = "Makefile"
SYNTH_SCRIPT = "synth.ys"

_TEMPLATES = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).with_name("templates")),
                                undefined=jinja2.StrictUndefined, keep_trailing_newline=True)

# the simulator command lines (run in the testbench's directory), shared by the Makefile and the runners
ICARUS_COMPILE = ["iverilog", "-g2012", "-o", "accel_tb.vvp", "-s", TB_MODULE, VERILOG, TESTBENCH]
ICARUS_RUN = ["vvp", "-n", "accel_tb.vvp"]
VERILATOR_COMPILE = ["verilator", "--binary", "-j", "2", "-Wno-fatal", "-Wno-lint", "-Wno-style", "-Wno-MULTIDRIVEN",
                     "--top-module", TB_MODULE, "--Mdir", "obj_dir", "-o", f"V{TB_MODULE}", VERILOG, TESTBENCH]
VERILATOR_RUN = [f"./obj_dir/V{TB_MODULE}"]


def export_verilog(config: AccelConfig, path: str | os.PathLike) -> Path:
    """Write the accelerator of `config` as Verilog module `accel` (synchronous reset `rst`)."""
    path = Path(path)
    with open(path, "w") as f:
        pyrtl.output_to_verilog(f, add_reset=True, block=design(config).block, module_name=MODULE)
    return path


def _hex_words(words: list[int], bits: int) -> str:
    digits = -(-bits // 4)
    return "".join(f"{w:0{digits}x}\n" for w in words)


def write_testbench(program, config: AccelConfig, dram: np.ndarray, max_cycles: int,
                    workdir: str | os.PathLike) -> tuple[Path, int]:
    """Write accel.v, accel_tb.v, dram.hex, program.hex and the Makefile into `workdir`; returns
    (workdir, DRAM bytes to hand back). ValueError for a program `isa.check_program` rejects."""
    isa.check_program(program, config)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    d = design(config)
    image, size = _dram_image(program, config, dram)
    word = config.dram_bits // 8
    words = [int.from_bytes(image[i:i + word], "little") for i in range(0, len(image), word)] or [0]
    (workdir / DRAM_HEX).write_text(_hex_words(words, config.dram_bits))
    (workdir / PROGRAM_HEX).write_text(_hex_words([instr.encode() for instr in program], isa.INSTRUCTION_BITS))
    export_verilog(config, workdir / VERILOG)
    text = ", ".join(f"{k}={v}" for k, v in config.to_json().items())
    (workdir / TESTBENCH).write_text(_TEMPLATES.get_template("accel_tb.v.j2").render(
        verilog=VERILOG, config_text=text, tb_module=TB_MODULE, module=MODULE, dram_hex=DRAM_HEX,
        program_hex=PROGRAM_HEX, dram_out_hex=DRAM_OUT_HEX, dram_words=len(words), dram_bits=config.dram_bits,
        program_length=len(program), max_cycles=max_cycles, imem_addr_bits=d.imem_addr_bits,
        addr_bits=DRAM_ADDR_BITS, memories=[(name, words) for name, words, _bits in d.memories]))
    (workdir / MAKEFILE).write_text(_TEMPLATES.get_template("Makefile.j2").render(
        tb=TESTBENCH, verilog=VERILOG, dram_hex=DRAM_HEX, program_hex=PROGRAM_HEX, dram_out_hex=DRAM_OUT_HEX,
        iverilog_compile=shlex.join(ICARUS_COMPILE), iverilog_run=shlex.join(ICARUS_RUN),
        verilator_compile=shlex.join(VERILATOR_COMPILE), verilator_run=shlex.join(VERILATOR_RUN),
        clean=f"obj_dir accel_tb.vvp {DRAM_OUT_HEX}"))
    return workdir, size


def hardware_files(program, config: AccelConfig, dram: bytes, max_cycles: int, part_family: str) -> dict[str, bytes]:
    """The hardware an FPGA artifact ships: the Verilog, the testbench running `program` on
    `dram` (with its hex files and Makefile) and the yosys script for `part_family`."""
    with tempfile.TemporaryDirectory(prefix="tcc-rtl-") as tmp:
        workdir = Path(tmp)
        write_testbench(program, config, np.frombuffer(dram, np.uint8), max_cycles, workdir)
        (workdir / SYNTH_SCRIPT).write_text(synth_script(part_family))
        return {f.name: f.read_bytes() for f in sorted(workdir.iterdir()) if f.is_file()}


def _read_hex(path: Path, nwords: int, bits: int) -> bytearray:
    word = bits // 8
    out = bytearray(nwords * word)
    addr = 0
    for line in path.read_text().splitlines():
        line = line.split("//", 1)[0].strip()
        if not line:
            continue
        if line.startswith("@"):
            addr = int(line[1:], 16)
            continue
        for token in line.split():
            if re.search(r"[xXzZ]", token):
                raise RTLSimulationError(f"{path.name}: DRAM word {addr} holds unknown bits ({token})")
            out[addr * word:(addr + 1) * word] = int(token, 16).to_bytes(word, "little")
            addr += 1
    return out


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise FileNotFoundError(f"{name} is not installed (Debian package '{name}')")
    return path


def _simulate(program, config, dram, max_cycles, workdir, compile_cmd, run_cmd, timeout) -> tuple[np.ndarray, int, dict]:
    owned = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="tcc-rtl-")) if owned else Path(workdir)
    try:
        _, size = write_testbench(program, config, dram, max_cycles, workdir)
        _tool(compile_cmd[0])
        timing = {}
        start = time.perf_counter()
        done = subprocess.run(compile_cmd, cwd=workdir, capture_output=True, text=True, timeout=timeout)
        timing["compile_s"] = time.perf_counter() - start
        if done.returncode:
            raise RuntimeError(f"{compile_cmd[0]} failed ({done.returncode}):\n{done.stdout[-4000:]}{done.stderr[-4000:]}")
        start = time.perf_counter()
        run = subprocess.run(run_cmd, cwd=workdir, capture_output=True, text=True, timeout=timeout)
        timing["run_s"] = time.perf_counter() - start
        output = run.stdout + run.stderr
        match = re.search(r"^cycles (\d+)$", output, re.M)
        if "ERROR: no halt" in output or match is None:
            if "ERROR: no halt" in output:
                raise RTLSimulationError(f"the {compile_cmd[0]} simulation did not reach halt within {max_cycles} "
                                         "cycles (cycle limit, or a program that waits for a token never signalled)")
            raise RuntimeError(f"{run_cmd[0]} gave no cycle count ({run.returncode}):\n{output[-4000:]}")
        word = config.dram_bits // 8
        image = _read_hex(workdir / DRAM_OUT_HEX, -(-size // word), config.dram_bits)
        return np.frombuffer(bytes(image[:size]), np.uint8).copy(), int(match.group(1)), timing
    finally:
        if owned:
            shutil.rmtree(workdir, ignore_errors=True)


def run_icarus(program, config: AccelConfig, dram: np.ndarray, max_cycles: int, workdir=None,
               timeout: float = 600) -> tuple[np.ndarray, int]:
    """`hardware.run_pyrtl`'s contract on the exported Verilog in Icarus Verilog (iverilog/vvp).
    Files go to `workdir` (kept) or a temporary directory (removed)."""
    out, cycles, _ = _simulate(program, config, dram, max_cycles, workdir, ICARUS_COMPILE, ICARUS_RUN, timeout)
    return out, cycles


def run_verilator(program, config: AccelConfig, dram: np.ndarray, max_cycles: int, workdir=None,
                  timeout: float = 600, timing: dict | None = None) -> tuple[np.ndarray, int]:
    """`hardware.run_pyrtl`'s contract on the exported Verilog built with `verilator --binary`.
    `timing`, when given, receives compile_s and run_s."""
    out, cycles, t = _simulate(program, config, dram, max_cycles, workdir, VERILATOR_COMPILE, VERILATOR_RUN, timeout)
    if timing is not None:
        timing.update(t)
    return out, cycles


# ----------------------------------------------------------------------------------------------
# synthesis

_FAMILIES = {"xc7": "xc7", "xcu": "xcu", "xcup": "xcup", "xc7z": "xc7", "zynq": "xc7", "artix7": "xc7",
             "kintex7": "xc7", "virtex7": "xc7", "ultrascale": "xcu", "ultrascale+": "xcup", "zynqmp": "xcup"}


def synth_script(part_family: str = "xc7", verilog: str = VERILOG, top: str = MODULE) -> str:
    """A yosys script mapping `verilog` to a Xilinx family (`synth_xilinx -family`: xc7, xcu,
    xcup, or a name such as zynq / zynqmp) and printing `stat`."""
    family = _FAMILIES.get(part_family.lower())
    if family is None:
        raise ValueError(f"unknown part family '{part_family}' (known: {', '.join(sorted(_FAMILIES))})")
    return (f"# Generated by tcc: map the accelerator to {family} and count its cells\n"
            f"read_verilog {verilog}\n"
            f"synth_xilinx -family {family} -top {top}\n"
            "stat\n")


_LUTS = {f"LUT{i}": 1 for i in range(1, 7)} | {
    # distributed RAM and shift registers occupy LUTs too ("LUT as memory")
    "RAM32X1S": 1, "RAM32X1D": 2, "RAM32M": 4, "RAM32M16": 8, "RAM64X1S": 1, "RAM64X1D": 2, "RAM64M": 4,
    "RAM64M8": 8, "RAM128X1S": 2, "RAM128X1D": 4, "RAM256X1S": 4, "RAM256X1D": 8, "RAM512X1S": 8,
    "SRL16E": 1, "SRLC16E": 1, "SRLC32E": 1}
_FFS = {"FDRE", "FDSE", "FDCE", "FDPE", "FDRE_1", "FDSE_1", "FDCE_1", "FDPE_1", "LDCE", "LDPE"}
_DSPS = {"DSP48E1", "DSP48E2", "DSP48A1", "DSP48"}
_BRAMS = {"RAMB36E1": 1.0, "RAMB36E2": 1.0, "RAMB18E1": 0.5, "RAMB18E2": 0.5, "RAMB36": 1.0, "RAMB18": 0.5}


def parse_stat(text: str) -> dict:
    """LUT, FF, DSP, BRAM (in RAMB36 units) and URAM out of yosys `stat` output (its last report),
    plus `cells`: every cell type with its count."""
    reports = text.split("Printing statistics")
    if len(reports) < 2:
        raise ValueError("no `stat` report in the yosys output")
    cells: dict[str, int] = {}
    for line in reports[-1].splitlines():
        m = re.match(r"^\s+([A-Za-z_$][\w$]*)\s+(\d+)\s*$", line)
        if m:
            cells[m.group(1)] = cells.get(m.group(1), 0) + int(m.group(2))
    return {"LUT": sum(n * _LUTS[c] for c, n in cells.items() if c in _LUTS),
            "FF": sum(n for c, n in cells.items() if c in _FFS),
            "DSP": sum(n for c, n in cells.items() if c in _DSPS),
            "BRAM": sum(n * _BRAMS[c] for c, n in cells.items() if c in _BRAMS),
            "URAM": cells.get("URAM288", 0) + cells.get("URAM288_BASE", 0),
            "cells": cells}


def synthesize(config: AccelConfig, timeout: float = 600, part_family: str = "xc7", workdir=None) -> dict:
    """Synthesize `config`'s accelerator with yosys `synth_xilinx`: {"LUT", "FF", "DSP", "BRAM",
    "cells", "seconds"}. RuntimeError when yosys fails or runs past `timeout` seconds."""
    owned = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="tcc-synth-")) if owned else Path(workdir)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        export_verilog(config, workdir / VERILOG)
        (workdir / SYNTH_SCRIPT).write_text(synth_script(part_family))
        start = time.perf_counter()
        try:
            done = subprocess.run([_tool("yosys"), "-q", "-l", "yosys.log", "-s", SYNTH_SCRIPT], cwd=workdir,
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"yosys did not finish within {timeout} s") from None
        if done.returncode:
            raise RuntimeError(f"yosys failed ({done.returncode}):\n{done.stdout[-4000:]}{done.stderr[-4000:]}")
        result = parse_stat((workdir / "yosys.log").read_text())
        result["seconds"] = time.perf_counter() - start
        return result
    finally:
        if owned:
            shutil.rmtree(workdir, ignore_errors=True)
