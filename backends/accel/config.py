"""The accelerator description: one config drives the PyRTL generator, the codegen's tiling,
the ISA simulator's timing and the resource estimate.

The machine: an output-stationary `rows x cols` systolic array of `data_bits` multipliers with
`acc_bits` accumulators; on-chip buffers of words (`ABUF`: `rows` lanes of activations,
`BBUF`: `cols` lanes of weights, `OBUF`: `cols` lanes of results, `PBUF`: `cols` lanes of
`acc_bits` parameters); a DMA engine to DRAM moving one `dram_bits` word per cycle after
`dram_latency` cycles; a `cols`-lane vector unit.

`abuf_banks` builds ABUF as that many memories, word `a` in bank `a % abuf_banks` at index
`a // abuf_banks` (low-order interleaving: the dense array reads one word a cycle from the
right bank; the HP sparse unit reads a whole window of `bw <= abuf_banks` consecutive words
in one cycle, one word per bank, and each array column gathers its own word from it).
Optional units: `vector_unit=False` leaves the vector ALU (vadd/vmul/vrelu/vmax/vsum) out:
requant stays (it is the array's output path); `sparse_unit=False` leaves out the HP gather
(spgemm), `binary_unit=False` the XNOR-popcount mode of the PEs (bgemm), `binary_weight_group=G`
adds the W1A8 mode (wgemm: binary weights, `data_bits` activations, G of them added or
subtracted per PE and cycle, no multiplier; 0, the default, leaves it out), `nonlinear_unit=False`
(or no vector unit) the integer nonlinearities of the vector unit (wide per-lane datapaths: the largest optional
part). Programs using a missing unit's opcodes are refused for such a config."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
from dataclasses import dataclass, fields
from enum import IntEnum


class Buffer(IntEnum):
    """The on-chip buffers, by their `buf` number: ABUF activations (`rows` lanes of `data_bits`),
    BBUF weights and OBUF results (`cols` lanes of `data_bits`), PBUF parameters and raw
    accumulators (`cols` lanes of `acc_bits`); `AccelConfig` gives their depths in words."""
    ABUF = 0
    BBUF = 1
    OBUF = 2
    PBUF = 3


_BOOLS = ("vector_unit", "sparse_unit", "binary_unit", "nonlinear_unit")  # the fields that are flags, not numbers
_FLAGS = {"0": False, "1": True, "false": False, "true": True}


@dataclass(frozen=True)
class AccelConfig:
    rows: int = 16
    cols: int = 16
    data_bits: int = 8
    acc_bits: int = 32
    abuf_depth: int = 8192  # words of rows x data_bits
    bbuf_depth: int = 4096  # words of cols x data_bits
    obuf_depth: int = 1024  # words of cols x data_bits
    pbuf_depth: int = 512  # words of cols x acc_bits
    dram_bits: int = 128  # DRAM word: what the DMA moves per cycle
    dram_words: int = 1 << 25  # DRAM size in words
    dram_latency: int = 8  # cycles before a transfer's first word (DRAM reads are registered: >= 1)
    imem_depth: int = 4096  # instructions the program memory holds (a section's program at most)
    clock_mhz: float = 100.0
    abuf_banks: int = 16  # ABUF memories, low-order interleaved (a power of two, at most 128)
    vector_unit: bool = True  # the vadd/vmul/vrelu/vmax/vsum unit is present
    sparse_unit: bool = True  # the HP sparse gather (spgemm) is present
    binary_unit: bool = True  # the PEs' XNOR-popcount mode (bgemm) is present
    nonlinear_unit: bool = True  # the vector unit's vacc/vsoftmax/vlayernorm/vgelu/vresadd datapaths
    divider_steps: int = 2  # iterations a cycle of the row ops' divider and square root (1, 2, 4 or 8)
    binary_weight_group: int = 0  # wgemm: activation words a PE adds or subtracts a cycle: 2, 4, 8 (0: no W1A8 unit)

    def __post_init__(self) -> None:
        problem = self.problem()
        if problem:
            raise ValueError(problem)

    def problem(self) -> str | None:
        """Why this config describes no buildable machine (None if it does)."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _BOOLS:
                if not isinstance(value, bool):
                    return f"{f.name} must be true or false, got {value!r}"
            elif not isinstance(value, (int, float)) or isinstance(value, bool):
                return f"{f.name} must be a number, got {value!r}"
            elif not math.isfinite(value):
                return f"{f.name} must be a finite number, got {value!r}"
            elif f.type in ("int", int) and not isinstance(value, int):
                return f"{f.name} must be an integer, got {value!r}"
        positive = ("rows", "cols", "abuf_depth", "bbuf_depth", "obuf_depth", "pbuf_depth", "dram_words",
                    "imem_depth", "abuf_banks")
        for name in positive:
            if getattr(self, name) < 1:
                return f"{name} must be at least 1, got {getattr(self, name)}"
        if self.rows > 256 or self.cols > 256:
            return f"the array is at most 256 x 256, got {self.rows} x {self.cols}"
        if self.data_bits not in (4, 8, 16):
            return f"data_bits must be 4, 8 or 16 (the IR's integer types), got {self.data_bits}"
        if not 2 * self.data_bits <= self.acc_bits <= 32:
            return f"acc_bits must lie in [2 * data_bits, 32], got {self.acc_bits}"
        if self.dram_bits % 8 or not 8 <= self.dram_bits <= 4096:
            return f"dram_bits must be a multiple of 8 in [8, 4096], got {self.dram_bits}"
        if self.dram_latency < 1:
            return f"dram_latency must be at least 1, got {self.dram_latency}"
        if max(self.abuf_depth, self.bbuf_depth, self.obuf_depth, self.pbuf_depth, self.imem_depth) > 1 << 16:
            return "buffer and program memory depths are at most 65536 words (16-bit addresses)"
        if self.dram_words > 1 << 32:
            return "dram_words is at most 2^32 (32-bit addresses)"
        if self.pbuf_depth < 3:
            return f"pbuf_depth must hold a requantization group (3 words), got {self.pbuf_depth}"
        if not 1 <= self.clock_mhz <= 1000:
            return f"clock_mhz must lie in [1, 1000] (an FPGA fabric's clock), got {self.clock_mhz}"
        if self.divider_steps not in (1, 2, 4, 8):
            return f"divider_steps must be 1, 2, 4 or 8 (quotient bits a cycle of a 64-bit division), " \
                   f"got {self.divider_steps}"
        group = self.binary_weight_group
        if group not in (0, 2, 4, 8) or group > min(self.data_bits, self.abuf_banks):
            return (f"binary_weight_group must be 0 (no W1A8 unit) or 2, 4 or 8 and at most data_bits "
                    f"({self.data_bits}) and abuf_banks ({self.abuf_banks}), got {group}")
        if self.abuf_banks & (self.abuf_banks - 1):
            return f"abuf_banks must be a power of two, got {self.abuf_banks}"
        if self.abuf_banks > 128:
            return f"abuf_banks must be at most 128, got {self.abuf_banks}"
        if self.abuf_depth % self.abuf_banks:
            return (f"abuf_depth ({self.abuf_depth}) must be a multiple of abuf_banks ({self.abuf_banks}): "
                    "every bank holds abuf_depth / abuf_banks words")
        return None

    @property
    def pes(self) -> int:
        return self.rows * self.cols

    def with_overrides(self, spec: str) -> "AccelConfig":
        """This config with `KEY=VALUE,...` applied (the CLI's `--accel`); ValueError names the
        bad key or value."""
        changes: dict[str, int | float | bool] = {}
        names = {f.name: f for f in fields(self)}
        for item in filter(None, (s.strip() for s in spec.split(","))):
            key, sep, text = item.partition("=")
            key = key.strip()
            if not sep:
                raise ValueError(f"--accel: expected KEY=VALUE, got '{item}'")
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else f" (known: {', '.join(names)})"
                raise ValueError(f"--accel: unknown field '{key}'{hint}")
            if key in _BOOLS:
                flag = text.strip().lower()
                if flag not in _FLAGS:
                    raise ValueError(f"--accel: {key} must be 0, 1, true or false, got '{text.strip()}'")
                changes[key] = _FLAGS[flag]
                continue
            try:
                changes[key] = float(text) if names[key].type in ("float", float) else int(text, 0)
            except ValueError:
                raise ValueError(f"--accel: {key} must be a number, got '{text.strip()}'") from None
        try:
            return dataclasses.replace(self, **changes)
        except ValueError as e:
            raise ValueError(f"--accel: {e}") from None

    @classmethod
    def from_json(cls, data: dict) -> "AccelConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown accelerator config field '{unknown[0]}'")
        return cls(**data)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def memory_bits(self) -> int:
        """Bits of on-chip memory: the four buffers (OBUF and PBUF keep a bank per writing
        unit; PBUF's second bank, written by the vector unit, is whole words with the
        nonlinearities (vacc, vresadd), one lane with the vector ALU alone (vsum), absent
        without the vector unit) and the program memory. ABUF's banks split its words, not add
        to them."""
        vector_lanes = (self.cols if self.nonlinear_unit else 1) if self.vector_unit else 0
        words = {"ABUF": self.abuf_depth * self.rows * self.data_bits,
                 "BBUF": self.bbuf_depth * self.cols * self.data_bits,
                 "OBUF": 2 * self.obuf_depth * self.cols * self.data_bits,
                 "PBUF": self.pbuf_depth * (self.cols + vector_lanes) * self.acc_bits}
        return sum(words.values()) + self.imem_depth * 128

    def estimate_resources(self) -> dict[str, float]:
        """Xilinx 7-series / UltraScale+ resources of the generated design. DSPs are counted as
        yosys `synth_xilinx` maps the multipliers (25x18 slices): one per PE (`data_bits` up to
        18), per lane the requant/vmul multiplier (acc+1 x 33 bits), and with the
        nonlinearities three more (acc+1 squared, 64 x 32, gelu's data x 2 acc). LUT and FF
        are linear in PEs plus, per lane, the nonlinear datapaths; LUT adds the HP gather's
        delay lines, which map to shift registers (`data_bits` SRL16/SRLC32E per 32 stages of
        the `r + c` stages to PE(r, c), lines of 3 stages and more) and the gather's wider muxes beyond
        16 ABUF banks; both add tload's transposer (two tiles of `rows x rows` lanes, a register and
        a mux per bit). The coefficients are fit to yosys on the three shipped configs (8x8 without
        the nonlinearities, 16x16, 32x32 with 32 banks). BRAM36 is the memory bits at the density yosys'
        mapping reaches. `divider_steps` beyond the fitted 2 adds a 64-bit subtract and select per
        step to the divider and to the square root (yosys: +3,472 LUT from 2 to 8 on the 16x16
        config, about 580 a step). The W1A8 unit adds per PE what its array alone takes over the
        int8 array (yosys). The ninth token (`st2ld`) took about 2,200 LUT more on the 8x8 and
        16x16 configs (the constant term; within yosys' noise on the 32x32). Extrapolations are
        rough."""
        def slices(a: int, b: int) -> int:
            return math.ceil(max(a, b) / 25) * math.ceil(min(a, b) / 18)
        nonlinear = self.vector_unit and self.nonlinear_unit
        lane_dsp = slices(self.acc_bits + 1, 33) + nonlinear * (
            slices(self.acc_bits + 1, self.acc_bits + 1) + math.ceil(64 / 18) * math.ceil(32 / 25)
            + slices(self.data_bits, 2 * self.acc_bits))
        shift_registers = self.sparse_unit * self.data_bits * sum(
            math.ceil((r + c) / 32) for r in range(self.rows) for c in range(self.cols) if r + c >= 3)
        transposer = 2 * self.data_bits * self.rows * self.rows  # tload's two tile registers (a mux per bit)
        # each PE's gathered operand picks one of `abuf_banks` words: the coefficients above hold
        # 16 banks; every bank beyond adds about 0.55 LUT per PE operand bit (fpga-large's 32)
        gather = self.sparse_unit * 0.552 * self.pes * self.data_bits * max(0, self.abuf_banks - 16)
        divider = nonlinear * 580 * (self.divider_steps - 2)
        # the W1A8 unit per PE (LUT, FF, DSP): G = 2 a pair pre-added and multiplied by +-1 in a DSP
        # of its own (yosys, fpga-medium's config with it: +5,588 LUT, +1,974 FF, +256 DSP), 4 and 8
        # an adder tree in LUTs (the wgemm array alone over the int8 one: 16x16; 8x8 for 8)
        signs = {0: (0, 0, 0), 2: (22, 8, 1), 4: (114, 19, 0), 8: (267, 45, 0)}[self.binary_weight_group]
        return {"LUT": round(210.8 * self.pes + 16061 + shift_registers + nonlinear * 4555 * self.cols + transposer
                             + gather + divider + signs[0] * self.pes),
                "FF": round(85.3 * self.pes + 2475 + nonlinear * 647 * self.cols + transposer + signs[1] * self.pes),
                "DSP": self.pes * (slices(self.data_bits, self.data_bits) + signs[2]) + self.cols * lane_dsp,
                "BRAM": math.ceil(2.2 * self.memory_bits() / 36864)}

    def buffer_depth(self, buffer: Buffer) -> int:
        return getattr(self, f"{buffer.name.lower()}_depth")

    def lanes(self, buffer: Buffer) -> int:
        """Lanes of one word of `buffer`."""
        return self.rows if buffer.name == "ABUF" else self.cols

    def lane_bits(self, buffer: Buffer) -> int:
        return self.acc_bits if buffer.name == "PBUF" else self.data_bits

    def word_bits(self, buffer: Buffer) -> int:
        return self.lanes(buffer) * self.lane_bits(buffer)

    def beats(self, buffer: Buffer) -> int:
        """DRAM words per word of `buffer`: each buffer word starts a DRAM word."""
        return self._beats[buffer]

    @functools.cached_property
    def _beats(self) -> tuple[int, ...]:  # by buffer number: the schedulers ask for it per instruction
        return tuple(math.ceil(self.word_bits(b) / self.dram_bits) for b in sorted(Buffer))
