"""The catalog of targets, shipped as data (`catalog.json`) and looked up by name."""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass
from importlib import resources

from tcc.backends.accel.config import AccelConfig
from tcc.ir.errors import TccError


@dataclass(frozen=True)
class Part:
    """An FPGA part class: its resources, the synthesis family (yosys `synth_xilinx -family`),
    off-chip bandwidth, price and power."""

    name: str
    family: str
    lut: int
    ff: int
    dsp: int
    bram36: int
    uram: int
    dram_gbps: float
    price_usd: float
    power_w: float

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Target:
    name: str
    kind: str  # cpu | gpu | fpga
    backend: str  # reference | accel
    executor: str  # the runtime executor artifacts of this target default to
    description: str
    tile: tuple[int, int]  # PE tile (rows, cols): the default block shape of pruning
    pipeline: str  # default optimisation passes, replaced by --pipeline
    lowering: str  # passes the target needs to lower, run after the optimisation passes
    formats: tuple[str, ...] | None = None  # storage encodings it executes (None: all)
    work_cost: float = 0.0  # bytes-equivalent of one unit of decode work (select-format)
    part: Part | None = None  # fpga: the part class
    accel: AccelConfig | None = None  # fpga: the accelerator built for it
    synthesis: dict | None = None  # fpga: yosys synth_xilinx of `accel` (LUT, FF, DSP, BRAM), as measured

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "backend": self.backend, "executor": self.executor,
                "description": self.description, "tile": list(self.tile), "pipeline": self.pipeline,
                "lowering": self.lowering, "formats": None if self.formats is None else list(self.formats),
                "work_cost": self.work_cost, "part": self.part and self.part.to_json(),
                "accel": self.accel and self.accel.to_json(), "synthesis": self.synthesis}


def load_catalog() -> dict[str, Target]:
    data = json.loads(resources.files(__package__).joinpath("catalog.json").read_text())
    return {name: Target(name=name, **{**fields, "tile": tuple(fields["tile"]),
                                       "formats": tuple(fields["formats"]) if fields.get("formats") else None,
                                       "part": Part(**fields["part"]) if "part" in fields else None,
                                       "accel": AccelConfig.from_json(fields["accel"]) if "accel" in fields else None})
            for name, fields in data.items()}


def get_target(name: str) -> Target:
    catalog = load_catalog()
    if name not in catalog:
        close = difflib.get_close_matches(name, catalog, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f" (known: {', '.join(catalog)})"
        raise TccError(f"unknown target '{name}'{hint}")
    return catalog[name]
