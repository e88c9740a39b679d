"""The accelerator as Verilog: export (`accel.v`), a testbench with the DRAM as a Verilog array
(`accel_tb.v`, from `templates/`), a Makefile for Icarus and Verilator, runners with the same
contract as `hardware.run_pyrtl`, and synthesis with yosys (`synth_xilinx`) into LUT, FF, DSP
and BRAM counts, of the accelerator or of its PE array alone in one mode (`synthesize_array`).

The testbench depends only on the config and a DRAM capacity bucket (`dram_capacity`): the
program, its length, the DRAM image, its size, the cycle limit and the file names are plusargs.
So the runners compile a simulator once per (tool, config, bucket) and reuse it: in this process,
and across processes through a cache directory (`TCC_RTL_CACHE`, else `$XDG_CACHE_HOME/tcc/rtl`
or `~/.cache/tcc/rtl`; `TCC_RTL_CACHE=off` keeps compiled simulators for this process only),
keyed by a hash of the Verilog, the testbench, the compile command and the tool's version."""

from __future__ import annotations

import atexit
import functools
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import jinja2
import numpy as np
import pyrtl

from . import isa
from .config import AccelConfig
from .hardware import DELAY_LINE, DRAM_ADDR_BITS, RTLSimulationError, _dram_image, build_array, design

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
class _RunFiles:
    """A run's inputs as written for the testbench."""
    size: int  # DRAM bytes to hand back
    dram_words: int  # words in the DRAM file
    capacity: int  # the testbench's DRAM array (`dram_capacity(dram_words)`)
    program_length: int


def _write_inputs(program, config: AccelConfig, dram, workdir: Path) -> _RunFiles:
    isa.check_program(program, config)
    image, size = _dram_image(program, config, dram)
    word = config.dram_bits // 8
    if not image:
        image = bytearray(word)  # one word: the testbench's arrays are never empty
    (workdir / DRAM_HEX).write_bytes(_hex_image(bytes(image), word))
    (workdir / PROGRAM_HEX).write_text(_hex_words([instr.encode() for instr in program], isa.INSTRUCTION_BITS))
    words = len(image) // word
    return _RunFiles(size, words, dram_capacity(words), len(program))


def _plusargs(files: _RunFiles, max_cycles: int) -> list[str]:
    return [f"+program={PROGRAM_HEX}", f"+program_length={files.program_length}", f"+dram={DRAM_HEX}",
            f"+dram_words={files.dram_words}", f"+dram_out={DRAM_OUT_HEX}",
            f"+max_cycles={_cycle_limit(max_cycles)}"]


def _cycle_limit(max_cycles: int) -> int:
    return min(max(int(max_cycles), 0), _MAX_CYCLES_LIMIT)


def write_testbench(program, config: AccelConfig, dram: np.ndarray, max_cycles: int,
                    workdir: str | os.PathLike) -> tuple[Path, int]:
    """Write accel.v, accel_tb.v, dram.hex, program.hex and the Makefile into `workdir`; returns
    (workdir, DRAM bytes to hand back). ValueError for a program `isa.check_program` rejects.
    The testbench holds only the config and the DRAM capacity; the Makefile passes the run's
    program length, DRAM words and `max_cycles` as plusargs."""
    workdir = Path(workdir)
    return workdir, _write_testbench(program, config, dram, max_cycles, workdir).size


def _write_testbench(program, config: AccelConfig, dram, max_cycles: int, workdir: Path) -> _RunFiles:
    workdir.mkdir(parents=True, exist_ok=True)
    files = _write_inputs(program, config, dram, workdir)
    export_verilog(config, workdir / VERILOG)
    (workdir / TESTBENCH).write_text(testbench_text(config, files.capacity))
    (workdir / MAKEFILE).write_text(_TEMPLATES.get_template("Makefile.j2").render(
        tb=TESTBENCH, verilog=VERILOG, dram_hex=DRAM_HEX, program_hex=PROGRAM_HEX, dram_out_hex=DRAM_OUT_HEX,
        dram_capacity=files.capacity, program_length=files.program_length, dram_words=files.dram_words,
        max_cycles=_cycle_limit(max_cycles),
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


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise FileNotFoundError(f"{name} is not installed (Debian package '{name}')")
    return path


# ----------------------------------------------------------------------------------------------
# compiled simulators, reused

@dataclass(frozen=True)
class _Simulator:
    name: str
    compile: tuple[str, ...]
    product: str  # the file the compile leaves (relative to its directory): all a run needs
    run: tuple[str, ...]  # the run command before the product's path (empty: the product runs itself)
    version: tuple[str, ...]  # prints the tool's version


_ICARUS = _Simulator("icarus", tuple(ICARUS_COMPILE), ICARUS_PRODUCT, ("vvp", "-n"), ("iverilog", "-V"))
_VERILATOR = _Simulator("verilator", tuple(VERILATOR_COMPILE), VERILATOR_PRODUCT, (), ("verilator", "--version"))

CACHE_ENV = "TCC_RTL_CACHE"
CACHE_ENTRIES = 64  # compiled simulators kept in the cache directory (least recently used go first)
_lock = threading.Lock()
_built: dict[str, Path] = {}  # key -> the product, for this process
_scratch: Path | None = None  # where this process keeps products when no cache directory can be written


@functools.lru_cache(maxsize=None)
def _tool_version(command: tuple[str, ...]) -> str:
    exe = _tool(command[0])
    try:
        done = subprocess.run([exe, *command[1:]], capture_output=True, text=True, timeout=60)
        version = (done.stdout + done.stderr).strip().splitlines()[:1]
    except (OSError, subprocess.SubprocessError):
        version = []
    stat = os.stat(exe)
    return json.dumps([exe, version, stat.st_size, stat.st_mtime_ns])


def cache_dir() -> Path | None:
    """The directory compiled simulators are kept in across processes, None when off or not
    writable (they are then kept for this process only)."""
    setting = os.environ.get(CACHE_ENV)
    if setting is not None and setting.strip().lower() in ("", "0", "off", "no", "false", "none"):
        return None
    if setting:
        root = Path(setting).expanduser()
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = Path(base) / "tcc" / "rtl"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return root if root.is_dir() and os.access(root, os.W_OK | os.X_OK) else None


def _scratch_dir() -> Path:
    global _scratch
    if _scratch is None or not _scratch.is_dir():
        _scratch = Path(tempfile.mkdtemp(prefix="tcc-rtl-sims-"))
        atexit.register(shutil.rmtree, _scratch, True)
    return _scratch


def _prune(root: Path, keep: str) -> None:
    """Drop the least recently used entries past `CACHE_ENTRIES` and leftovers of interrupted
    builds (a day old)."""
    try:
        entries, now = [], time.time()
        for p in root.iterdir():
            age = now - p.stat().st_mtime
            if p.name.startswith(".") and age > 86400:
                shutil.rmtree(p, ignore_errors=True)
            elif not p.name.startswith(".") and p.name != keep:
                entries.append((p.stat().st_mtime, p))
        entries.sort()
        for _, p in entries[:max(0, len(entries) + 1 - CACHE_ENTRIES)]:
            shutil.rmtree(p, ignore_errors=True)
    except OSError:
        pass


@functools.lru_cache(maxsize=64)
def _key(sim: _Simulator, config: AccelConfig, capacity: int) -> str:
    """The cache key of a compiled simulator: a hash of everything that goes into it."""
    h = hashlib.sha256()
    for part in (sim.name, json.dumps(sim.compile), _tool_version(sim.version), verilog_text(config),
                 testbench_text(config, capacity)):
        h.update(part.encode())
        h.update(b"\0")
    return f"{sim.name}-{h.hexdigest()[:32]}"


def _compiled(sim: _Simulator, config: AccelConfig, capacity: int, timeout: float) -> tuple[Path, float]:
    """The compiled simulator for (`sim`, `config`, DRAM `capacity`) and the seconds spent
    compiling it now (0.0: reused)."""
    verilog, testbench = verilog_text(config), testbench_text(config, capacity)
    key = _key(sim, config, capacity)
    with _lock:
        product = _built.get(key)
        if product is not None and product.is_file():
            return product, 0.0
        root = cache_dir()
        if root is not None:
            product = root / key / Path(sim.product).name
            if product.is_file():
                try:
                    os.utime(root / key)
                except OSError:
                    pass
                _built[key] = product
                return product, 0.0
        build = None
        try:
            try:
                build = Path(tempfile.mkdtemp(prefix=".build-", dir=root)) if root is not None else None
            except OSError:
                root = None
            if build is None:
                build = Path(tempfile.mkdtemp(prefix="tcc-rtl-build-"))
            (build / VERILOG).write_text(verilog)
            (build / TESTBENCH).write_text(testbench)
            start = time.perf_counter()
            try:
                done = subprocess.run([_tool(sim.compile[0]), *sim.compile[1:]], cwd=build, capture_output=True,
                                      text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"{sim.compile[0]} did not finish within {timeout} s") from None
            seconds = time.perf_counter() - start
            if done.returncode or not (build / sim.product).is_file():
                raise RuntimeError(f"{sim.compile[0]} failed ({done.returncode}):\n{done.stdout[-4000:]}"
                                   f"{done.stderr[-4000:]}")
            product = None
            if root is not None:
                try:  # publish atomically: a directory holding the product, renamed into place
                    stage = Path(tempfile.mkdtemp(prefix=".stage-", dir=root))
                    os.replace(build / sim.product, stage / Path(sim.product).name)
                    try:
                        os.rename(stage, root / key)
                    except OSError:  # another process published it first
                        shutil.rmtree(stage, ignore_errors=True)
                    candidate = root / key / Path(sim.product).name
                    if candidate.is_file():
                        product = candidate
                        _prune(root, key)
                except OSError:
                    product = None
            if product is None:  # no cache directory: keep it for this process
                keep = _scratch_dir() / key
                keep.mkdir(exist_ok=True)
                src = build / sim.product
                product = keep / Path(sim.product).name
                shutil.move(str(src), product)
            _built[key] = product
            return product, seconds
        finally:
            if build is not None:
                shutil.rmtree(build, ignore_errors=True)


def _simulate(sim: _Simulator, program, config, dram, max_cycles, workdir, timeout) -> tuple[np.ndarray, int, dict]:
    owned = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="tcc-rtl-")) if owned else Path(workdir)
    try:
        # just the run's inputs, or (a directory to keep) the whole testbench to rerun with its Makefile
        files = _write_inputs(program, config, dram, workdir) if owned else \
            _write_testbench(program, config, dram, max_cycles, workdir)
        _tool(sim.compile[0])
        product, compile_s = _compiled(sim, config, files.capacity, timeout)
        if not product.is_file():  # removed from the cache meanwhile
            _built.clear()
            product, compile_s = _compiled(sim, config, files.capacity, timeout)
        timing = {"compile_s": compile_s, "cached": compile_s == 0.0}
        command = [*([_tool(sim.run[0]), *sim.run[1:]] if sim.run else []), str(product), *_plusargs(files, max_cycles)]
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
    """`hardware.run_pyrtl`'s contract on the exported Verilog in Icarus Verilog (iverilog/vvp).
    Files go to `workdir` (kept, with the Makefile) or a temporary directory (removed); the
    compiled testbench is reused (see the module's doc). `timing`, when given, receives
    compile_s (0.0 when reused), cached and run_s."""
    out, cycles, t = _simulate(_ICARUS, program, config, dram, max_cycles, workdir, timeout)
    if timing is not None:
        timing.update(t)
    return out, cycles


def run_verilator(program, config: AccelConfig, dram: np.ndarray, max_cycles: int, workdir=None,
                  timeout: float = 600, timing: dict | None = None) -> tuple[np.ndarray, int]:
    """`hardware.run_pyrtl`'s contract on the exported Verilog built with `verilator --binary`,
    built once per config and DRAM capacity (see the module's doc). `timing`, when given,
    receives compile_s (0.0 when reused), cached and run_s."""
    out, cycles, t = _simulate(_VERILATOR, program, config, dram, max_cycles, workdir, timeout)
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
    return _synthesize(verilog_text(config), MODULE, timeout, part_family, workdir)


@functools.lru_cache(maxsize=8)
def array_verilog_text(config: AccelConfig, mode: isa.Opcode) -> str:
    """The PE array of `config` alone in `mode` (`hardware.build_array`: gemm or bgemm) as
    Verilog module `accel_array` (synchronous reset `rst`)."""
    return _block_verilog(build_array(config, mode), ARRAY_MODULE)


def synthesize_array(config: AccelConfig, mode: isa.Opcode, timeout: float = 600, part_family: str = "xc7",
                     workdir=None) -> dict:
    """Synthesize `config`'s PE array alone in `mode` (gemm: `data_bits` multiply-accumulate,
    bgemm: XNOR-popcount) like `synthesize`, adding "macs_per_cycle": rows x cols for gemm,
    rows x cols x data_bits binary MACs for bgemm."""
    result = _synthesize(array_verilog_text(config, mode), ARRAY_MODULE, timeout, part_family, workdir)
    result["macs_per_cycle"] = config.pes * (config.data_bits if mode is isa.Opcode.BGEMM else 1)
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
