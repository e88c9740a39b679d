"""The accelerator executor: runs a graph whose quantized linears were compiled to accelerator
sections (an `AccelProgram`, see `tcc.backends.accel.layout`), the other ops on the host with
the numpy executor's kernels.

A call's sections (`AccelProgram.calls`: layers that chain on chip) run where its last layer
stands in the graph: the executor writes the inputs the host gives into DRAM in their layouts,
hands each section to `run_section` (the ISA simulator by default; the RTL tiers take the same
signature) and reads back the outputs the host needs (`AccelProgram.transfers`). The
intermediate values of a layer (the linear's accumulator, a fused relu's operand) are never
materialized, nor are outputs that stay on chip (`values` decodes those from DRAM)."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from tcc.backends.accel.config import AccelConfig
from tcc.backends.accel.isa import FETCH_CYCLES, Instruction, SimulationError
from tcc.backends.accel.layout import AccelProgram, Section, decode, encode
from tcc.ir.analysis import last_uses
from tcc.ir.errors import TccError
from tcc.ir.graph import Graph
from tcc.ir.reference import REFERENCE

from .isa_sim import simulate
from .numpy_executor import NumpyExecutor

RunSection = Callable[[tuple[Instruction, ...], AccelConfig, bytes, int], tuple[bytes | np.ndarray, int]]
"""`run_section(program, config, dram, max_cycles) -> (dram after the run, cycles)`."""


def simulate_section(program: tuple[Instruction, ...], config: AccelConfig, dram: bytes,
                     max_cycles: int) -> tuple[bytes, int]:
    """A `RunSection` on the ISA simulator."""
    machine, stats = simulate(program, config, dram, max_cycles=max_cycles)
    return machine.dram[:len(dram)].tobytes(), stats.cycles


def cycle_bound(program: tuple[Instruction, ...], config: AccelConfig) -> int:
    """Cycles a run of `program` cannot exceed: every instruction after the previous one ends."""
    return FETCH_CYCLES + sum(i.duration(config) + 1 for i in program)


@dataclass
class AccelStats:
    """What the accelerator did in one run of the graph."""

    cycles: int = 0
    macs: int = 0  # useful multiply-accumulates: M * N * K per linear, padding excluded
    instructions: Counter = field(default_factory=Counter)  # per mnemonic
    section_cycles: list[int] = field(default_factory=list)
    calls: int = 0  # the host's calls into the accelerator (`AccelProgram.calls`)
    link_bytes: int = 0  # bytes the calls moved between the host and DRAM, both ways
    busy: Counter = field(default_factory=Counter)  # cycles each unit was busy, by unit name

    def utilization(self, config: AccelConfig) -> float:
        """macs / (cycles * rows * cols)."""
        return self.macs / (self.cycles * config.pes) if self.cycles else 0.0

    def unit_utilization(self) -> dict[str, float]:
        """Each unit's busy cycles over the run's cycles."""
        return {unit: busy / self.cycles if self.cycles else 0.0 for unit, busy in sorted(self.busy.items())}

    def to_json(self, config: AccelConfig) -> dict:
        return {"cycles": self.cycles, "macs": self.macs, "utilization": self.utilization(config),
                "unit_utilization": self.unit_utilization(),
                "instructions": dict(sorted(self.instructions.items())), "section_cycles": list(self.section_cycles),
                "calls": self.calls, "link_bytes": self.link_bytes}


_log = logging.getLogger("tcc.accel")


class _Recorded(Exception):
    """Ends a `section_runs` run once it has recorded the sections asked for."""


class AccelExecutor(NumpyExecutor):
    """`AccelExecutor(graph, program)(*arrays) -> list of arrays`: `graph` with the layers of
    `program` (from `codegen.generate(graph, config)`) on the accelerator through
    `run_section`; `stats` describes the last run; `progress` shows a bar over the sections."""

    def __init__(self, graph: Graph, program: AccelProgram, run_section: RunSection = simulate_section,
                 progress: bool = False):
        super().__init__(graph)
        self.program, self.run_section, self.progress = program, run_section, progress
        self.stats = AccelStats()
        index = {op.result: i for i, op in enumerate(graph.ops)}
        self._calls: dict[int, tuple[Section, ...]] = {}  # the index of a call's last op -> its sections
        self._fused: set[int] = set()  # the calls' other ops
        runs_at: dict[int, int] = {}
        for call in program.calls():
            missing = [r for s in call for r in s.ops if r not in index]
            if missing:
                raise ValueError(f"the accelerator program implements '{missing[0]}', which the graph does not compute")
            positions = {index[r] for s in call for r in s.ops}
            self._calls[max(positions)] = call
            self._fused.update(positions - {max(positions)})
            runs_at.update(dict.fromkeys(positions, max(positions)))
        producer = {op.result: i for i, op in enumerate(graph.ops)}
        for i, op in enumerate(graph.ops):  # a host op reading what a call computes runs after that call
            if i not in runs_at:
                at = max((runs_at[producer[v]] for v in op.operands if producer.get(v) in runs_at), default=i)
                if at > i:
                    runs_at[i] = at
        self._order = sorted((runs_at.get(i, i), i not in self._calls, i) for i in range(len(graph.ops)))
        self._frees = last_uses(graph, runs_at)  # a call's ops read their operands where it runs

    def __call__(self, *inputs: np.ndarray) -> list[np.ndarray]:
        env = self._run(inputs, keep=False)
        return [env[name] for name in self.graph.outputs]

    def values(self, *inputs: np.ndarray) -> dict[str, np.ndarray]:
        """Every value the run computes (inputs, constants, host results, layer outputs)."""
        return self._run(inputs, keep=True)

    def section_runs(self, *inputs: np.ndarray, first: int | None = None) -> list[tuple[tuple[Instruction, ...], bytes]]:
        """Each section's program with the DRAM it starts from in a run on `inputs`, in run
        order: what another tier needs to run that section alone. With `first`, the run
        stops once that many sections are recorded."""
        runs, run_section = [], self.run_section

        def recording(program, config, dram, max_cycles):
            runs.append((program, dram))
            if first is not None and len(runs) >= first:
                raise _Recorded
            return run_section(program, config, dram, max_cycles)

        self.run_section = recording
        try:
            self(*inputs)
        except _Recorded:
            pass
        finally:
            self.run_section = run_section
        return runs

    def _run(self, inputs: tuple[np.ndarray, ...], keep: bool) -> dict[str, np.ndarray]:
        from tqdm.auto import tqdm
        self.stats = AccelStats()
        self._bar = tqdm(total=len(self.program.sections), desc="accelerator", unit="section", leave=False,
                         disable=not self.progress, dynamic_ncols=True)
        with self._bar:
            return self._run_ops(inputs, keep)

    def _run_ops(self, inputs: tuple[np.ndarray, ...], keep: bool) -> dict[str, np.ndarray]:
        dram = bytearray(self.program.dram)
        env: dict[str, np.ndarray] = dict(self.graph.weights)
        for (name, t), value in zip(self.graph.inputs, inputs, strict=True):
            env[name] = np.asarray(value, dtype=t.dtype.numpy, order="C")  # results independent of the caller's layout
        ops, order = self.graph.ops, self._order
        for at, (position, _, index) in enumerate(order):
            op = ops[index]
            if index in self._calls:
                self._call(self._calls[index], env, dram, keep)
            elif index not in self._fused:
                kernel = self._kernels.get(index, REFERENCE[op.kind])
                result = kernel(*(env[o] for o in op.operands), **op.attr_dict)
                env[op.result] = np.asarray(result).astype(op.type.dtype.numpy, copy=False)
            if not keep and (at + 1 == len(order) or order[at + 1][0] != position):  # after those deferred to it
                for name in self._frees.get(position, ()):
                    env.pop(name, None)  # a layer's intermediate values never existed
        return env

    def _call(self, sections: tuple[Section, ...], env: dict[str, np.ndarray], dram: bytearray, keep: bool) -> None:
        """Run one call: write its inputs, run its sections, read back what the host needs (with
        `keep`, decode the outputs that stay on chip too, off the link)."""
        config, types = self.program.config, self.graph.types
        self.stats.calls += 1
        inputs, outputs = self.program.transfers(sections)
        for t in inputs:
            value = env[t.values[0]]
            data = encode(t.layout, t.stored(value), config)
            dram[t.region.byte_slice(config)] = data
            self.stats.link_bytes += len(data)
        for section in sections:
            try:
                data, cycles = self.run_section(section.program, config, bytes(dram),
                                                cycle_bound(section.program, config))
            except (SimulationError, ValueError) as e:
                raise TccError(f"accelerator section {self.program.sections.index(section)} "
                               f"({', '.join(section.ops)}): {e}") from None
            dram[:] = bytes(data)[:len(dram)]  # the RTL runners may return a grown DRAM
            _log.debug("section %d (%s): %d cycles", self.program.sections.index(section), section.ops[0], cycles)
            self._bar.update()
            self.stats.cycles += cycles
            self.stats.section_cycles.append(cycles)
            self.stats.macs += section.macs
            self.stats.instructions.update(i.mnemonic for i in section.program)
            self.stats.busy.update(section.busy(config))
        on_chip = {t.region.start: t for s in sections for t in s.outputs if t not in outputs} if keep else {}
        for t in outputs + tuple(on_chip.values()):
            out, data = types[t.values[0]], bytes(dram[t.region.byte_slice(config)])
            self.stats.link_bytes += 0 if t.region.start in on_chip else len(data)
            # C order, as the numpy reference holds it: BLAS sums a transposed view in another order
            env[t.values[0]] = t.value(decode(t.layout, data, t.shape, config)).reshape(out.shape).astype(
                out.dtype.numpy, order="C")
