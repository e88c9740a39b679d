"""A target and what it does: its lowering, its device for the cost model, its price of a graph
and, for an FPGA, the accelerator built for its part.

`Target.lower` is the one function that lowers a graph for a target: `tcc.compile` builds what
it returns, and pricing (the report, `tcc select`, `select-device`) prices what it returns, so
what is priced is what is built. The cost model's figures of each device come from
`tcc.targets.calibration.cost_devices` (the catalog's, or measured on this machine where the
catalog says so); `price` and `price_all` take them as a mapping by target name.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

from tcc.backends.accel.codegen import timing
from tcc.backends.accel.config import AccelConfig
from tcc.backends.accel.energy import DRAM_PJ_PER_BIT
from tcc.ir.errors import TccError
from tcc.ir.graph import Graph
from tcc.passes import Pass, PassContext, parse_pipeline, run_pipeline
from tcc.passes.cost_model import AccelRun, Cost, CycleModel, Device, accelerator, roofline

if TYPE_CHECKING:
    from tcc.passes.cost_model import Candidate

MARGIN = 0.8  # derive_accel_config uses at most this fraction of each resource of a part
ARRAY_SIZES = (64, 32, 16, 8, 4)  # the square arrays derive_accel_config tries, largest first


@functools.lru_cache(maxsize=64)
def parsed_pipeline(text: str) -> tuple[Pass, ...]:
    """A catalog pipeline's passes, parsed once per process (passes are immutable values)."""
    return tuple(parse_pipeline(text))


@dataclass(frozen=True)
class Part:
    """An FPGA part class (the board it comes on): its resources, the synthesis family (yosys
    `synth_xilinx -family`), off-chip bandwidth, price, the board's power, the part's static
    power (drawn for a whole run) and process node (the energy model's scale of its dynamic
    energy per operation, `backends.accel.energy`); `host`: the target that runs
    the ops left to the host (the processor beside the fabric, or the server an accelerator card
    sits in), and the link between them: its bandwidth and the fixed cost of one call (AXI into
    DRAM shared with the processor; PCIe to a card's own DRAM)."""

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
    static_w: float
    process_nm: float
    link_gbps: float
    link_latency_us: float
    host: str | None = None

    def resources(self) -> dict[str, int]:
        """The resources `AccelConfig.estimate_resources` counts, by its names."""
        return {"LUT": self.lut, "FF": self.ff, "DSP": self.dsp, "BRAM": self.bram36}

    def overflow(self, needs: Mapping[str, float], margin: float = 1.0) -> tuple[str, float, int] | None:
        """The first resource of `needs` (LUT, FF, DSP, BRAM) above `margin` of the part's, as
        (resource, need, have); None when everything fits. The one test of "does it fit the
        part", for estimates and for synthesis alike."""
        for resource, have in self.resources().items():
            if needs[resource] > margin * have:
                return resource, needs[resource], have
        return None

    def check_fits(self, needs: Mapping[str, float], what: str, source: str = "estimate") -> None:
        """A TccError naming the resource when `what` (e.g. "the 16x16 accelerator") needs more
        than the part has, by `source` (the estimate, or yosys)."""
        over = self.overflow(needs)
        if over is not None:
            resource, need, have = over
            raise TccError(f"{what} does not fit {self.name}: it needs about {need:,} {resource} ({source}), "
                           f"the part has {have:,}")

    def check_dma(self, config: AccelConfig) -> None:
        """A TccError when `config`'s DMA (a `dram_bits` word per cycle at its clock) would move
        data faster than the part's DRAM: the ISA simulator's memory timing would be a fiction."""
        gbps = config.dram_bits / 8 * config.clock_mhz / 1000
        if gbps > self.dram_gbps:
            raise TccError(f"the accelerator's DMA moves {gbps:g} GB/s ({config.dram_bits}-bit words at "
                           f"{config.clock_mhz:g} MHz), more than the DRAM of {self.name} ({self.dram_gbps:g} GB/s)")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Target:
    name: str
    kind: str  # cpu | gpu | fpga
    backend: str  # reference | accel: the key of its backend in `tcc.targets.backends.BACKENDS`
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
    figures: dict | None = None  # cpu, gpu: the catalog's `device` object (DEVICE_FIELDS)
    measured: bool = False  # the cost model measures this device; `figures` are placeholders

    # -- the compiler's view ------------------------------------------------------------------
    @property
    def passes(self) -> tuple[Pass, ...]:
        """The default optimisation passes (`pipeline`, parsed)."""
        return parsed_pipeline(self.pipeline)

    @property
    def lowering_passes(self) -> tuple[Pass, ...]:
        return parsed_pipeline(self.lowering)

    def context(self, ctx: PassContext | None = None) -> PassContext:
        """`ctx` (or a new context) told this target's tile, formats and decode cost."""
        ctx = ctx or PassContext()
        ctx.tile, ctx.formats, ctx.work_cost = self.tile, self.formats, self.work_cost
        return ctx

    def lower(self, graph: Graph, ctx: PassContext | None = None, *, after: Sequence[Pass] = ()) -> Graph:
        """`graph` after this target's lowering passes (select-format: the encodings it executes),
        except those `after` (the pipeline that made the graph) already ran: a pipeline's
        `select-format{format=csr}` is not re-chosen. The graph compile builds and the graph
        every price is taken of."""
        return run_pipeline(graph, self.lowering_after(after), self.context(ctx))

    def lowering_after(self, pipeline: Sequence[Pass]) -> tuple[Pass, ...]:
        """The lowering passes that run after `pipeline`: those it does not name."""
        ran = {p.name for p in pipeline}
        return tuple(p for p in self.lowering_passes if p.name not in ran)

    def with_accel(self, overrides: str | None) -> Target:
        """This FPGA target with `overrides` (`KEY=VALUE,...`, the CLI's `--accel`) applied to its
        accelerator config (the catalog's synthesis record, of the shipped config, dropped when
        the config changes; the tile, the default prune block, follows the array); an error when
        the config no longer fits the part (estimate)."""
        if not overrides:
            return self
        if self.accel is None:
            raise TccError(f"--accel: target '{self.name}' has no accelerator (use an fpga-* target)")
        try:
            config = self.accel.with_overrides(overrides)
        except ValueError as e:
            raise TccError(str(e)) from None
        self.part.check_fits(config.estimate_resources(), f"the {config.rows}x{config.cols} accelerator")
        self.part.check_dma(config)
        return self if config == self.accel else dataclasses.replace(self, accel=config, synthesis=None,
                                                                     tile=(config.rows, config.cols))

    # -- the cost model's view ----------------------------------------------------------------
    @property
    def device(self) -> Device:
        """What the catalog says of this target for the cost model. FPGA: price, power, DRAM
        bandwidth, host and host link from the part; clock and on-chip memory from the accelerator config;
        int8 throughput 2 x rows x cols MACs per cycle; no fp32 and no per-op overhead (the
        accelerator runs whole sections); the part's static power. A measured target's figures are placeholders:
        `calibration.cost_devices` gives the measured ones."""
        if self.kind == "fpga":
            part, accel = self.part, self.accel
            return Device(name=self.name, kind=self.kind, price_usd=part.price_usd, power_w=part.power_w,
                          dram_gbps=part.dram_gbps, onchip_mb=accel.memory_bits() / 8e6, fp32_gflops=0.0,
                          int8_gops=2 * accel.rows * accel.cols * accel.clock_mhz / 1000, op_overhead_us=0.0,
                          clock_mhz=accel.clock_mhz, host=part.host, link_gbps=part.link_gbps,
                          link_latency_us=part.link_latency_us, static_w=part.static_w)
        return Device(name=self.name, kind=self.kind, **self.figures)

    def synthesis_fits(self) -> bool | None:
        """Whether the catalog's synthesis record fits the part (None: no record)."""
        if self.synthesis is None or self.part is None:
            return None
        return self.part.overflow(self.synthesis) is None

    def cost(self, lowered: Graph, devices: Mapping[str, Device]) -> Cost:
        """What one run of `lowered` (this target's lowering of a graph) costs here: the roofline
        on a CPU or GPU (its figures in `devices`); on an FPGA the accelerator's cycles plus the
        host ops on its host (in `devices`)."""
        if self.kind != "fpga":
            return roofline(lowered, devices[self.name])
        device = self.device  # never measured: it follows from the part and this target's accelerator config
        host = devices.get(device.host or "")
        if host is None:
            raise TccError(f"target '{self.name}': its host '{device.host}' cannot be priced here")
        return accelerator(lowered, device, cycle_model(self.accel, self.part.process_nm), host)

    def price(self, graph: Graph, devices: Mapping[str, Device], *, after: Sequence[Pass] = ()) -> Cost:
        """What one run of `graph` costs on this target after its lowering (`lower`)."""
        return self.cost(self.lower(graph, after=after), devices)

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "backend": self.backend, "executor": self.executor,
                "description": self.description, "tile": list(self.tile), "pipeline": self.pipeline,
                "lowering": self.lowering, "formats": None if self.formats is None else list(self.formats),
                "work_cost": self.work_cost, "part": self.part and self.part.to_json(),
                "accel": self.accel and self.accel.to_json(), "synthesis": self.synthesis,
                "measured": self.measured, "device": self.device.to_json()}


def cycle_model(config: AccelConfig, process_nm: float) -> CycleModel:
    """The accelerator's timing as the cost model's `CycleModel`: `codegen.timing`, the
    codegen's schedule of the graph (the ISA's timing, which the ISA simulator and the RTL
    reproduce cycle for cycle; no data needed), the ops it leaves to the host, the host's
    calls with the bytes they move, and the run's dynamic energy: its activity on a part of
    `process_nm` (`energy.Activity.energy_j`) and the link's bytes, which the host writes to
    or reads from DRAM."""
    def cycles(graph: Graph) -> AccelRun:
        run = timing(graph, config)
        # a moved layout op is the link's transfer; a conversion runs in the transfer's loop
        host = {h.result for h in run.host_ops if not h.moved and not h.converted}
        converted = {h.result for h in run.host_ops if h.converted}
        energy = dict(run.activity.energy_j(config, process_nm), link=run.link_bytes * 8 * DRAM_PJ_PER_BIT * 1e-12)
        return AccelRun(run.cycles, [op for op in graph.ops if op.result in host], run.calls, run.link_bytes,
                        [op for op in graph.ops if op.result in converted], energy)

    return cycles


def _lowering_key(target: Target) -> tuple:
    """What `Target.lower` depends on: targets alike in it lower a graph alike."""
    return target.lowering, target.formats, target.work_cost


def price_all(graph: Graph, targets: Mapping[str, Target], devices: Mapping[str, Device], *,
              after: Sequence[Pass] = ()) -> dict[str, Cost]:
    """What one run of `graph` costs on each of `targets` that `devices` can price, each after its
    own lowering (targets that lower alike share it)."""
    lowered: dict[tuple, Graph] = {}
    out = {}
    for name, target in targets.items():
        if name not in devices:
            continue
        key = _lowering_key(target)
        if key not in lowered:
            lowered[key] = target.lower(graph, after=after)
        out[name] = target.cost(lowered[key], devices)
    return out


def candidates(offered: Mapping[str, Target], devices: Mapping[str, Device], *,
               after: Sequence[Pass] = ()) -> tuple[Candidate, ...]:
    """`select-device`'s candidates: the `offered` targets `devices` can price, each pricing a graph
    after its own lowering (`Target.price`); candidates that lower alike share the lowering of
    the graph they were last given."""
    from tcc.passes.cost_model import Candidate
    last: dict[tuple, tuple[Graph, Graph]] = {}  # lowering -> (a graph, that graph lowered)

    def pricing(target: Target):
        def price(graph: Graph) -> Cost:
            key = _lowering_key(target)
            if key not in last or last[key][0] is not graph:
                last[key] = (graph, target.lower(graph, after=after))
            return target.cost(last[key][1], devices)
        return price

    return tuple(Candidate(name, t.device.price_usd, pricing(t)) for name, t in offered.items() if name in devices)


# ----------------------------------------------------------------------------------------------
# accelerator configs derived from a part


def _family_interface(part: Part) -> dict:
    """Clock and DRAM port of a derived config when no template gives them: those of the
    shipped configs of the family (7-series: fpga-small; UltraScale+: fpga-medium)."""
    if part.family.lower() in ("xc7", "xc7z", "zynq", "artix7", "kintex7", "virtex7"):
        return {"clock_mhz": 100.0, "dram_bits": 64, "dram_latency": 20}
    return {"clock_mhz": 200.0, "dram_bits": 128, "dram_latency": 30}


def scaled_config(n: int, *, nonlinear_unit: bool = True, **interface) -> AccelConfig:
    """An `n x n` array with buffers scaled like the shipped configs: per row, 1,024 ABUF,
    512 BBUF, 128 OBUF, 32 PBUF words and 512 instructions (capped at 65,536 words); ABUF in
    `n` banks (at least 16), so the sparse unit gathers the default HP block, the PE tile."""
    cap = 1 << 16
    return AccelConfig(rows=n, cols=n, abuf_depth=min(1024 * n, cap), bbuf_depth=min(512 * n, cap),
                       obuf_depth=min(128 * n, cap), pbuf_depth=min(32 * n, cap), imem_depth=min(512 * n, cap),
                       abuf_banks=max(16, min(n, 128)), nonlinear_unit=nonlinear_unit, **interface)


def fits(config: AccelConfig, part: Part, margin: float = MARGIN) -> bool:
    """Whether `config`'s estimated resources stay within `margin` of each of the part's."""
    return part.overflow(config.estimate_resources(), margin) is None


def derive_accel_config(part: Part, *, margin: float = MARGIN, template: AccelConfig | None = None) -> AccelConfig:
    """The largest square array (a power of two from 4 to 64 a side, buffers scaled with it,
    `scaled_config`) whose `estimate_resources()` uses at most `margin` of each of the part's
    LUT, FF, DSP and BRAM36 (URAM is not counted: yosys maps the buffers to BRAM), with the
    integer nonlinearities where they fit and without them otherwise. Clock and DRAM port come
    from `template` (e.g. a shipped config for the part) or the family's defaults."""
    interface = ({k: getattr(template, k) for k in ("clock_mhz", "dram_bits", "dram_latency")}
                 if template is not None else _family_interface(part))
    for n in ARRAY_SIZES:
        for nonlinear in (True, False):
            config = scaled_config(n, nonlinear_unit=nonlinear, **interface)
            if fits(config, part, margin):
                return config
    smallest = scaled_config(ARRAY_SIZES[-1], nonlinear_unit=False, **interface)
    over, need, have = part.overflow(smallest.estimate_resources(), margin)
    raise TccError(f"part {part.name}: not even a {ARRAY_SIZES[-1]}x{ARRAY_SIZES[-1]} array fits "
                   f"{margin:.0%} of its {over} ({need:,} needed, {have:,} on the part)")
