"""Compiled RTL simulators (Icarus, Verilator), reused: one per (tool, config, DRAM capacity
bucket) for any program (the testbench takes the run as plusargs, `verilog.dram_capacity`), in
this process and across processes through a cache directory (`TCC_RTL_CACHE`, else
`$XDG_CACHE_HOME/tcc/rtl` or `~/.cache/tcc/rtl`; `TCC_RTL_CACHE=off` keeps compiled simulators
for this process only), keyed by a hash of the Verilog, the testbench, the compile command and
the tool's version."""

from __future__ import annotations

import atexit
import functools
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tcc.backends.accel.config import AccelConfig
from tcc.backends.accel.verilog import (ICARUS_COMPILE, ICARUS_PRODUCT, TESTBENCH, VERILATOR_COMPILE, VERILATOR_PRODUCT,
                                        VERILOG, testbench_text, tool_path, verilog_text)


@dataclass(frozen=True)
class Simulator:
    """A simulator tool: how it compiles the testbench, what that leaves, how it runs it."""
    name: str
    compile: tuple[str, ...]
    product: str  # the file the compile leaves (relative to its directory): all a run needs
    run: tuple[str, ...]  # the run command before the product's path (empty: the product runs itself)
    version: tuple[str, ...]  # prints the tool's version


ICARUS = Simulator("icarus", tuple(ICARUS_COMPILE), ICARUS_PRODUCT, ("vvp", "-n"), ("iverilog", "-V"))
VERILATOR = Simulator("verilator", tuple(VERILATOR_COMPILE), VERILATOR_PRODUCT, (), ("verilator", "--version"))

CACHE_ENV = "TCC_RTL_CACHE"
CACHE_ENTRIES = 64  # compiled simulators kept in the cache directory (least recently used go first)
_lock = threading.Lock()
_built: dict[str, Path] = {}  # key -> the product, for this process
_scratch: Path | None = None  # where this process keeps products when no cache directory can be written


@functools.lru_cache(maxsize=None)
def _tool_version(command: tuple[str, ...]) -> str:
    exe = tool_path(command[0])
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
def _key(sim: Simulator, config: AccelConfig, capacity: int) -> str:
    """The cache key of a compiled simulator: a hash of everything that goes into it."""
    h = hashlib.sha256()
    for part in (sim.name, json.dumps(sim.compile), _tool_version(sim.version), verilog_text(config),
                 testbench_text(config, capacity)):
        h.update(part.encode())
        h.update(b"\0")
    return f"{sim.name}-{h.hexdigest()[:32]}"


def _compile(sim: Simulator, config: AccelConfig, capacity: int, timeout: float) -> tuple[Path, float]:
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
                done = subprocess.run([tool_path(sim.compile[0]), *sim.compile[1:]], cwd=build, capture_output=True,
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


def compiled(sim: Simulator, config: AccelConfig, capacity: int, timeout: float) -> tuple[Path, float]:
    """The compiled simulator for (`sim`, `config`, DRAM `capacity`) and the seconds spent
    compiling it now (0.0: reused); compiled again when it left the cache meanwhile."""
    product, seconds = _compile(sim, config, capacity, timeout)
    if not product.is_file():  # removed from the cache meanwhile
        _built.clear()
        product, seconds = _compile(sim, config, capacity, timeout)
    return product, seconds
