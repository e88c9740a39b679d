"""The cost model: what a graph costs on a device (latency, energy), without running it there.

- `Device`: what the model knows of a device: sustained throughputs, memory bandwidth, the
  fixed cost of one op (dispatch, kernel launch), price and power. Built from the target
  catalog (`tcc.targets`); the host CPU's and the local CUDA device's figures are measured.
- CPU and GPU latency: a roofline per op (`roofline`): each op takes the longer of its
  arithmetic at the device's sustained rate and its memory traffic at the device's bandwidth,
  plus the device's fixed cost per op. Pruned weights in a sparse encoding count their
  non-zeros only.
- FPGA latency: the board as a system. The accelerator's cycles come from a `CycleModel` the
  caller supplies (the backend's timing, which equals the ISA simulator's and the RTL's), plus
  the host ops on the board's host processor (the roofline again), plus the host's calls into
  the accelerator over the host link (AXI on a Zynq, PCIe for a card): a fixed latency per call
  and the bytes each call moves at the link's bandwidth. The conversions the host applies to
  the values it copies (quantize on the way in, dequantize on the way out) cost their roofline
  time on the host, without a per-op fixed cost: they run in the transfer's copy loop.
- Energy: on a CPU or GPU, power x latency. On an FPGA, from activity: the accelerator's work
  counted and priced per operation by the backend (`AccelRun.energy`: the array's MACs, buffer
  and DRAM accesses, the vector unit's lane operations, the host link's transfers), plus the
  part's static power for the whole run, plus the host processor's power while it computes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable


from tcc.ir.encoding import Dense
from tcc.ir.analysis import nonzeros, op_flops
from tcc.ir.graph import Graph, Op
from tcc.ir.ops import MOVES  # data movement the executors do as views: no bytes move

KINDS = ("cpu", "gpu", "fpga")


@dataclass(frozen=True)
class Device:
    """What the cost model knows of one device. Throughputs are sustained (what the executors
    reach on large matrix products), not datasheet peaks."""

    name: str
    kind: str  # cpu | gpu | fpga
    price_usd: float
    power_w: float
    dram_gbps: float  # off-chip memory bandwidth, GB/s
    onchip_mb: float  # caches / block RAM, MB
    fp32_gflops: float  # sustained fp32 multiply-adds x 2 per second / 1e9 (cpu, gpu)
    int8_gops: float  # sustained int8 operations per second / 1e9
    op_overhead_us: float  # fixed cost of one op: dispatch, kernel launch
    clock_mhz: float = 0.0
    host: str | None = None  # fpga: the device that runs the ops left to the host
    link_gbps: float = 0.0  # fpga: the host link's bandwidth, GB/s (AXI into shared DRAM, PCIe)
    link_latency_us: float = 0.0  # fpga: fixed cost of one call of the host into the accelerator
    static_w: float = 0.0  # fpga: the part's static power, drawn for the whole run
    cache_gbps: float = 0.0  # bandwidth when an op's bytes fit `onchip_mb` (0: dram_gbps)
    # measured per op kind (`cost_key`: kind and operand dtype, or kind alone): (key, fixed cost
    # in us, factor on the roofline time when the op's bytes fit `onchip_mb`, factor when they
    # do not); else (op_overhead_us, 1, 1): what the executor's kernels cost beyond the ideal
    op_costs: tuple[tuple[str, float, float, float], ...] = ()
    measured: bool = False  # the figures were measured on this machine (else: the catalog's)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got '{self.kind}'")
        for name in ("price_usd", "power_w", "dram_gbps", "onchip_mb", "fp32_gflops", "int8_gops",
                     "op_overhead_us", "clock_mhz", "cache_gbps", "link_gbps", "link_latency_us", "static_w"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        for name in ("price_usd", "power_w", "dram_gbps") + (("fp32_gflops",) if self.kind != "fpga" else ()):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.kind == "fpga" and self.link_gbps <= 0:
            raise ValueError(f"link_gbps must be > 0 for an fpga (its host link), got {self.link_gbps!r}")

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class Cost:
    """Predicted latency (seconds) and energy (joules) of one run of a graph on a device, with
    the latency split by where it goes (`parts`: e.g. accelerator, host ops, per op kind) and,
    on an FPGA, the energy by where it goes (`energy_parts`: the accelerator's components,
    the link, static, host)."""

    device: str
    latency_s: float
    energy_j: float
    parts: dict[str, float] = field(default_factory=dict)
    energy_parts: dict[str, float] = field(default_factory=dict)

    def gops_per_w(self, ops: int) -> float:
        """Energy efficiency of a run of `ops` operations: GOP/s/W, i.e. GOP per joule."""
        return ops / self.energy_j / 1e9 if self.energy_j > 0 else 0.0


@dataclass(frozen=True)
class AccelRun:
    """One run of a graph on an accelerator as its cycle model sees it: the accelerator's
    `cycles`, the ops it leaves to the host, the host's `calls` into the accelerator (each
    starts a run of sections) with the bytes they move across the host link, both ways, the
    conversions (`converted`: quantize, dequantize, cast, and the ops of one value applied
    with them at the model's edges) the host applies in those transfers' copy loops, and the dynamic energy of the run by component in joules (`energy`: the
    accelerator's activity priced by the backend, and the link's transfers)."""

    cycles: int
    host_ops: list[Op]
    calls: int
    link_bytes: int
    converted: list[Op] = field(default_factory=list)
    energy: dict[str, float] = field(default_factory=dict)


CycleModel = Callable[[Graph], AccelRun]  # the backend's timing of a graph


@dataclass(frozen=True)
class Candidate:
    """A device `select-device` may choose: its name, its price (cheaper is preferred) and what
    one run of a graph costs there (the driver wires the catalog, the measured host and the
    accelerator's timing, after the device's own lowering)."""

    name: str
    price_usd: float
    cost: Callable[[Graph], Cost]


_PRODUCTS = frozenset({"linear", "matmul", "scaled_dot_product_attention", "conv1d", "conv2d"})
_GATHERS = frozenset({"embedding", "gather", "index"})  # read the rows they gather of their table, not all of it


def _stored_bytes(graph: Graph) -> dict[str, int]:
    """Bytes of each constant in its encoding."""
    return {name: -(-t.encoding.footprint(graph.weights[name], t.dtype)[0] // 8) for name, t in graph.constants}


def _density(graph: Graph, name: str) -> float:
    array = graph.weights[name]
    return nonzeros(array) / array.size if array.size else 1.0


SPARSE_EFFICIENCY = 0.3  # sparse kernels (CSR / BSR) reach about this fraction of the dense rate per non-zero


def op_seconds(graph: Graph, device: Device, ops: list[Op] | None = None) -> list[tuple[Op, float, bool]]:
    """Each op's roofline time without its fixed cost, and whether its bytes fit on chip: the
    longer of its arithmetic (`op_flops`: integer products at `int8_gops`, the rest at
    `fp32_gflops`; a linear whose weight is stored sparse counts its non-zeros, at
    `SPARSE_EFFICIENCY` of the dense rate) and its memory traffic (operands and result, a
    constant in its encoded size, views none, a gather only the rows it reads; at `cache_gbps`
    when they fit `onchip_mb`, else `dram_gbps`)."""
    types, constants = graph.types, set(graph.constant_names)
    stored = _stored_bytes(graph)
    out = []
    for op in graph.ops if ops is None else ops:
        work = op_flops(op, types)
        integer = op.kind in _PRODUCTS and not types[op.operands[0]].dtype.is_float
        rate = (device.int8_gops if integer else device.fp32_gflops) * 1e9
        weight = op.operands[1] if op.kind == "linear" else None
        if weight in constants and not isinstance(types[weight].encoding, Dense):
            work *= _density(graph, weight) / SPARSE_EFFICIENCY
        if op.kind in MOVES:
            moved = 0
        elif op.kind in _GATHERS:  # the gathered rows of the table (the result's bytes), the indices, the result
            moved = 2 * op.type.dense_bytes + sum(types[v].dense_bytes for v in op.operands[1:])
        else:
            moved = op.type.dense_bytes + sum(stored[v] if v in constants else types[v].dense_bytes
                                              for v in op.operands)
        cached = device.cache_gbps and moved <= device.onchip_mb * 1e6
        bandwidth = (device.cache_gbps if cached else device.dram_gbps) * 1e9
        out.append((op, max(work / rate if work else 0.0, moved / bandwidth), bool(cached)))
    return out


def cost_key(op: Op, types: dict) -> str:
    """The key of an op's measured costs: its kind and its first operand's dtype (an executor's
    int8 linear and fp32 linear are different kernels), e.g. `linear:i8`."""
    return f"{op.kind}:{types[op.operands[0]].dtype.value}" if op.operands else op.kind


def roofline(graph: Graph, device: Device, ops: list[Op] | None = None) -> Cost:
    """Latency of `ops` (default: every op of `graph`) on a CPU or GPU `device`: per op its
    `op_seconds` times its kind's factor (on chip or off) plus its kind's fixed cost
    (`Device.op_costs`).
    `parts`: seconds by op kind."""
    if device.kind == "fpga":
        raise ValueError(f"{device.name}: the roofline models CPUs and GPUs; an FPGA needs its cycle model")
    costs = {key: (fixed, on_chip, off_chip) for key, fixed, on_chip, off_chip in device.op_costs}
    types = graph.types
    parts: dict[str, float] = {}
    for op, seconds, cached in op_seconds(graph, device, ops):
        fixed, on_chip, off_chip = costs.get(cost_key(op, types), costs.get(op.kind, (device.op_overhead_us, 1, 1)))
        parts[op.kind] = parts.get(op.kind, 0.0) + fixed * 1e-6 + (on_chip if cached else off_chip) * seconds
    total = sum(parts.values())
    return Cost(device.name, total, total * device.power_w, parts)


def accelerator(graph: Graph, device: Device, cycles: CycleModel, host: Device) -> Cost:
    """Latency of `graph` on an FPGA `device`, the board as a system: the accelerator's cycles at
    its clock (from `cycles`, the backend's timing), the ops it leaves to the host on `host`'s
    roofline (the board's processor), and the host's calls over the link (`link_latency_us`
    each, their bytes at `link_gbps`). Energy: the run's dynamic energy (`AccelRun.energy`),
    the part's static power for the whole latency, the host's power while it computes."""
    if device.kind != "fpga" or device.clock_mhz <= 0:
        raise ValueError(f"{device.name}: an accelerator cost needs an fpga device with a clock")
    run = cycles(graph)
    on_chip = run.cycles / (device.clock_mhz * 1e6)
    on_host = roofline(graph, host, run.host_ops).latency_s if run.host_ops else 0.0
    on_host += sum(seconds for _, seconds, _ in op_seconds(graph, host, run.converted))  # no dispatch of their own
    on_link = run.calls * device.link_latency_us * 1e-6 + run.link_bytes / (device.link_gbps * 1e9)
    latency = on_chip + on_host + on_link
    energy = dict(run.energy, static=device.static_w * latency, host=on_host * host.power_w)
    return Cost(device.name, latency, sum(energy.values()), {"accelerator": on_chip, "host": on_host, "link": on_link},
                energy)
