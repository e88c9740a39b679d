"""The accelerator as Verilog: export (`accel.v`), a testbench with the DRAM as a Verilog array
(`accel_tb.v`, from `templates/`), the run's input files (`dram.hex`, `program.hex`), a Makefile
for Icarus and Verilator, and synthesis with yosys (`synth_xilinx`) into LUT, FF, DSP and BRAM
counts, of the accelerator or of its PE array alone in one mode (`synthesize_array`).

The testbench depends only on the config and a DRAM capacity bucket (`dram_capacity`): the
program, its length, the DRAM image, its size, the cycle limit and the file names are plusargs,
so a simulator compiled from it runs any program (`tcc.runtime.rtl`'s runners compile one per
tool, config and bucket, and reuse it)."""

from __future__ import annotations

import functools
import io
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import jinja2
import numpy as np
import pyrtl

from . import isa
from .config import AccelConfig
from .hardware import DELAY_LINE, DRAM_ADDR_BITS, build_array, design, dram_image

MODULE = "accel"
ARRAY_MODULE = "accel_array"  # the PE array alone (`array_verilog_text`)
TB_MODULE = "accel_tb"
VERILOG = "accel.v"
TESTBENCH = "accel_tb.v"
DRAM_HEX = "dram.hex"
PROGRAM_HEX = "program.hex"
DRAM_OUT_HEX = "dram_out.hex"
MAKEFILE = "Makefile"
SYNTH_SCRIPT = "synth.ys"

MIN_DRAM_WORDS = 1 << 12  # the smallest DRAM array a testbench has (see `dram_capacity`)
DEFAULT_MAX_CYCLES = 10_000_000  # the testbench's cycle limit without +max_cycles
_MAX_CYCLES_LIMIT = (1 << 63) - 1  # the testbench counts cycles in 64 bits

_TEMPLATES = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).with_name("templates")),
                                undefined=jinja2.StrictUndefined, keep_trailing_newline=True)

# the simulator command lines (run in the testbench's directory), shared by the Makefile and the
# runners; the run commands take the testbench's plusargs after them
ICARUS_COMPILE = ["iverilog", "-g2012", "-o", "accel_tb.vvp", "-s", TB_MODULE, VERILOG, TESTBENCH]
ICARUS_PRODUCT = "accel_tb.vvp"
ICARUS_RUN = ["vvp", "-n", ICARUS_PRODUCT]
VERILATOR_COMPILE = ["verilator", "--binary", "-j", "2", "-Wno-fatal", "-Wno-lint", "-Wno-style", "-Wno-MULTIDRIVEN",
                     "--top-module", TB_MODULE, "--Mdir", "obj_dir", "-o", f"V{TB_MODULE}", VERILOG, TESTBENCH]
VERILATOR_PRODUCT = f"obj_dir/V{TB_MODULE}"
VERILATOR_RUN = [f"./{VERILATOR_PRODUCT}"]


def dram_capacity(words: int) -> int:
    """DRAM words of the testbench array for an image of `words` words: the next power of two,
    at least `MIN_DRAM_WORDS`, so that images of nearby sizes share a compiled simulator."""
    return max(MIN_DRAM_WORDS, 1 << max(0, words - 1).bit_length())


def _block_verilog(block: pyrtl.Block, module: str) -> str:
    """`block` as Verilog `module` with a synchronous reset `rst` of every register but the data
    delay lines' (`hardware.DELAY_LINE`): those shift in an always block of their own, with no
    reset and no enable, so that synthesis packs them into shift registers."""
    out = io.StringIO()
    pyrtl.output_to_verilog(out, add_reset=True, block=block, module_name=module)
    registers = re.compile(r"( +always @\(posedge clk\) begin\n +if \(rst\) begin\n)(.*?)( +end else begin\n)(.*?)"
                           r"( +end\n +end\n)", re.S)
    line = re.compile(rf"^ +{DELAY_LINE}\w+ <= .*;\n", re.M)

    def split(m: re.Match) -> str:
        shifts = "".join(s.replace("            ", "        ", 1) for s in line.findall(m[4]))
        kept = m[1] + line.sub("", m[2]) + m[3] + line.sub("", m[4]) + m[5]
        return kept + (f"\n    // Delay lines (no reset)\n    always @(posedge clk) begin\n{shifts}    end\n" if shifts else "")

    text, found = registers.subn(split, out.getvalue(), count=1)
    assert found == 1, "PyRTL's register block changed shape"
    return text


@functools.lru_cache(maxsize=8)
def verilog_text(config: AccelConfig) -> str:
    """The accelerator of `config` as Verilog module `accel` (synchronous reset `rst`)."""
    return _block_verilog(design(config).block, MODULE)


def export_verilog(config: AccelConfig, path: str | os.PathLike) -> Path:
    """Write the accelerator of `config` as Verilog module `accel` (synchronous reset `rst`)."""
    path = Path(path)
    path.write_text(verilog_text(config))
    return path


@functools.lru_cache(maxsize=32)
def testbench_text(config: AccelConfig, dram_words: int) -> str:
    """The testbench of `config` with a DRAM array of `dram_words` words: nothing of a run in it
    (see the template's header for the plusargs)."""
    d = design(config)
    text = ", ".join(f"{k}={v}" for k, v in config.to_json().items())
    return _TEMPLATES.get_template("accel_tb.v.j2").render(
        verilog=VERILOG, config_text=text, tb_module=TB_MODULE, module=MODULE, dram_hex=DRAM_HEX,
        program_hex=PROGRAM_HEX, dram_out_hex=DRAM_OUT_HEX, dram_words=dram_words, dram_bits=config.dram_bits,
        imem_depth=config.imem_depth, default_max_cycles=DEFAULT_MAX_CYCLES, imem_addr_bits=d.imem_addr_bits,
        addr_bits=DRAM_ADDR_BITS, memories=[(name, words) for name, words, _bits in d.memories])


def _hex_words(words: list[int], bits: int) -> str:
    digits = -(-bits // 4)
    return "".join(f"{w:0{digits}x}\n" for w in words)


def _hex_image(image: bytes, word: int) -> bytes:
    """Little-endian words of `word` bytes as hex lines (most significant digit first)."""
    n = len(image) // word
    digits = np.frombuffer(np.frombuffer(image, np.uint8, n * word).reshape(n, word)[:, ::-1].tobytes().hex()
                           .encode(), np.uint8).reshape(n, 2 * word)
    lines = np.empty((n, 2 * word + 1), np.uint8)
    lines[:, :-1] = digits
    lines[:, -1] = ord("\n")
    return lines.tobytes()


@dataclass
class RunFiles:
    """A run's inputs as written for the testbench."""
    size: int  # DRAM bytes to hand back
    dram_words: int  # words in the DRAM file
    capacity: int  # the testbench's DRAM array (`dram_capacity(dram_words)`)
    program_length: int


def write_inputs(program, config: AccelConfig, dram, workdir: Path) -> RunFiles:
    """Write the run's `dram.hex` and `program.hex` into `workdir`. ValueError for a program
    `isa.check_program` rejects."""
    isa.check_program(program, config)
    image, size = dram_image(program, config, dram)
    word = config.dram_bits // 8
    if not image:
        image = bytearray(word)  # one word: the testbench's arrays are never empty
    (workdir / DRAM_HEX).write_bytes(_hex_image(bytes(image), word))
    (workdir / PROGRAM_HEX).write_text(_hex_words([instr.encode() for instr in program], isa.INSTRUCTION_BITS))
    words = len(image) // word
    return RunFiles(size, words, dram_capacity(words), len(program))


def cycle_limit(max_cycles: int) -> int:
    """`max_cycles` as the testbench's cycle limit (a 64-bit count)."""
    return min(max(int(max_cycles), 0), _MAX_CYCLES_LIMIT)


def write_testbench(program, config: AccelConfig, dram: np.ndarray, max_cycles: int,
                    workdir: str | os.PathLike) -> RunFiles:
    """Write accel.v, accel_tb.v, dram.hex, program.hex and the Makefile into `workdir`; returns
    what the run's files hold (`RunFiles`: its `size`, the DRAM bytes to hand back). ValueError
    for a program `isa.check_program` rejects. The testbench holds only the config and the DRAM
    capacity; the Makefile passes the run's program length, DRAM words and `max_cycles` as
    plusargs."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    files = write_inputs(program, config, dram, workdir)
    export_verilog(config, workdir / VERILOG)
    (workdir / TESTBENCH).write_text(testbench_text(config, files.capacity))
    (workdir / MAKEFILE).write_text(_TEMPLATES.get_template("Makefile.j2").render(
        tb=TESTBENCH, verilog=VERILOG, dram_hex=DRAM_HEX, program_hex=PROGRAM_HEX, dram_out_hex=DRAM_OUT_HEX,
        dram_capacity=files.capacity, program_length=files.program_length, dram_words=files.dram_words,
        max_cycles=cycle_limit(max_cycles),
        iverilog_product=ICARUS_PRODUCT, iverilog_compile=shlex.join(ICARUS_COMPILE),
        iverilog_run=shlex.join(ICARUS_RUN), verilator_product=VERILATOR_PRODUCT,
        verilator_compile=shlex.join(VERILATOR_COMPILE), verilator_run=shlex.join(VERILATOR_RUN),
        clean=f"obj_dir {ICARUS_PRODUCT} {DRAM_OUT_HEX}"))
    return files


def hardware_files(program, config: AccelConfig, dram: bytes, max_cycles: int, part_family: str) -> dict[str, bytes]:
    """The hardware an FPGA artifact ships: the Verilog, the testbench running `program` on
    `dram` (with its hex files and Makefile) and the yosys script for `part_family`."""
    with tempfile.TemporaryDirectory(prefix="tcc-rtl-") as tmp:
        workdir = Path(tmp)
        write_testbench(program, config, np.frombuffer(dram, np.uint8), max_cycles, workdir)
        (workdir / SYNTH_SCRIPT).write_text(synth_script(part_family))
        return {f.name: f.read_bytes() for f in sorted(workdir.iterdir()) if f.is_file()}


def tool_path(name: str) -> str:
    """The path of the program `name`; FileNotFoundError naming its Debian package when missing."""
    path = shutil.which(name)
    if path is None:
        raise FileNotFoundError(f"{name} is not installed (Debian package '{name}')")
    return path


# ----------------------------------------------------------------------------------------------
# synthesis

FAMILIES = {"xc7": "xc7", "xcu": "xcu", "xcup": "xcup", "xc7z": "xc7", "zynq": "xc7", "artix7": "xc7",
             "kintex7": "xc7", "virtex7": "xc7", "ultrascale": "xcu", "ultrascale+": "xcup", "zynqmp": "xcup"}


def synth_script(part_family: str = "xc7", verilog: str = VERILOG, top: str = MODULE) -> str:
    """A yosys script mapping `verilog` to a Xilinx family (`synth_xilinx -family`: xc7, xcu,
    xcup, or a name such as zynq / zynqmp) and printing `stat`."""
    family = FAMILIES.get(part_family.lower())
    if family is None:
        raise ValueError(f"unknown part family '{part_family}' (known: {', '.join(sorted(FAMILIES))})")
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
    return _synthesize(verilog_text(config), MODULE, timeout, part_family, workdir)


@functools.lru_cache(maxsize=8)
def array_verilog_text(config: AccelConfig, mode: isa.Opcode) -> str:
    """The PE array of `config` alone in `mode` (`hardware.build_array`: gemm, bgemm or wgemm)
    as Verilog module `accel_array` (synchronous reset `rst`)."""
    return _block_verilog(build_array(config, mode), ARRAY_MODULE)


def synthesize_array(config: AccelConfig, mode: isa.Opcode, timeout: float = 600, part_family: str = "xc7",
                     workdir=None) -> dict:
    """Synthesize `config`'s PE array alone in `mode` (gemm: `data_bits` multiply-accumulate,
    bgemm: XNOR-popcount, wgemm: the W1A8 unit's adds and subtracts) like `synthesize`, adding
    "macs_per_cycle": rows x cols for gemm, rows x cols x data_bits binary MACs for bgemm,
    rows x cols x `binary_weight_group` binary-weight MACs for wgemm."""
    result = _synthesize(array_verilog_text(config, mode), ARRAY_MODULE, timeout, part_family, workdir)
    per_pe = {isa.Opcode.BGEMM: config.data_bits, isa.Opcode.WGEMM: config.binary_weight_group}.get(mode, 1)
    result["macs_per_cycle"] = config.pes * per_pe
    return result


def _synthesize(text: str, top: str, timeout: float, part_family: str, workdir) -> dict:
    owned = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="tcc-synth-")) if owned else Path(workdir)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / VERILOG).write_text(text)
        (workdir / SYNTH_SCRIPT).write_text(synth_script(part_family, top=top))
        start = time.perf_counter()
        try:
            done = subprocess.run([tool_path("yosys"), "-q", "-l", "yosys.log", "-s", SYNTH_SCRIPT], cwd=workdir,
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
