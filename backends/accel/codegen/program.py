"""A graph's accelerator program: `generate` (every layer `match` finds, compiled to sections;
the other ops host ops with their reason) and `timing` (its cycles without building it)."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
from dataclasses import dataclass

import numpy as np

from tcc.ir.graph import Graph
from tcc.ir.ops import OPS

from ..config import AccelConfig
from ..energy import Activity
from ..layout import AccelProgram, DramAllocator, DramTensor, HostOp, Region, Section
from .addressing import ADDRESSING, merge_heads, source
from .chain import chain
from .layer import compile_layer, compile_residual
from .match import LAYOUT_OPS, MATCHERS, Residual, Unsupported, host_reason, residual_operands


def generate(graph: Graph, config: AccelConfig | None = None, chained: bool = True) -> AccelProgram:
    """Compile the quantized linear chains of `graph` to accelerator sections for `config`
    (default `AccelConfig()`); every other op is a host op with its reason. `chained`: the
    sections of a call run as one program where they fit the program memory (`chain`), else
    each layer's sections one after another."""
    return _generate(graph, config or AccelConfig(), timing=False, chained=chained)


@dataclass(frozen=True)
class Timing:
    """What `generate` would build, without building it: the cycles of all its sections (the
    ISA timing, equal to the ISA simulator's and the RTL's), its host ops, the host's calls
    into the accelerator (`AccelProgram.calls`) with the bytes they move (`link_bytes`), and
    what the sections' instructions do (`activity`: the energy model's counts)."""

    cycles: int
    host_ops: tuple[HostOp, ...]
    calls: int
    link_bytes: int
    activity: Activity


def timing(graph: Graph, config: AccelConfig, chained: bool = True) -> Timing:
    """`generate`'s cycles, host ops and calls without its weights and DRAM image: the cost
    model's fast path. Layers alike one built before take its sections (`layer.BUILT`), and
    chained groups alike one scheduled before its schedule (`chain.CHAINED`)."""
    program = _generate(graph, config, timing=True, chained=chained)
    return Timing(sum(s.cycles for s in program.sections), program.host_ops, len(program.calls()),
                  program.link_bytes(), sum((s.activity for s in program.sections), Activity()))


@contextlib.contextmanager
def _without_cycle_collection():
    """The builders allocate hundreds of thousands of small objects, none in a reference cycle
    (refcounting frees them): the cyclic collector's passes over every live object of the
    process would cost as much as building."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _generate(graph: Graph, config: AccelConfig, timing: bool, chained: bool = True) -> AccelProgram:
    with _without_cycle_collection():
        return _generate_sections(graph, config, timing, chained)


def _generate_sections(graph: Graph, config: AccelConfig, timing: bool, chained: bool) -> AccelProgram:
    allocator = DramAllocator(config)
    sections: list[Section] = []
    images: list[tuple[Region, bytes]] = []
    why: dict[str, str] = {}
    placed: set[str] = set()
    resident: dict[str, DramTensor] = {}  # the sections' outputs so far, by value
    users, producer = graph.users(), graph.producer()
    rows = residual_operands(graph, users, config)
    for op in graph.ops:
        if op.kind not in MATCHERS or op.result in placed:
            continue
        layer = MATCHERS[op.kind](op, graph, users, config)
        if isinstance(layer, str):
            why[op.result] = layer
            continue
        start = allocator.used
        try:
            if isinstance(layer, Residual):
                same = {v: found for v in (layer.a, layer.b) if v and (found := source(v, producer, resident))
                        and np.array_equal(found[1].reshape(-1), np.arange(found[1].size))}  # the rows as they lie
                layer_sections, constants = compile_residual(layer, allocator, config,
                                                             {v: t for v, (t, _, _) in same.items()})
                through = tuple(o.result for v, (_, _, ops) in same.items() for o in ops
                                if v not in {t.values[0] for t in layer_sections[0].inputs})
                layer_sections = [dataclasses.replace(s, ops=through + s.ops) for s in layer_sections]
            else:
                layer = merge_heads(layer, graph, users, config)
                found = (source(layer.x, producer, resident), source(layer.y, producer, resident) if layer.y else None)
                layer_sections, constants = compile_layer(layer, allocator, config, timing, found,
                                                          rows=layer.out in rows)
        except Unsupported as e:
            allocator.used = start
            why[op.result] = str(e)
            continue
        sections.extend(layer_sections)
        images.extend(constants)
        placed.update(layer_sections[0].ops)  # with the layout ops it reads through
        resident.update((t.values[0], t) for t in layer_sections[0].outputs)
    sections = _host_addressing(graph, sections, placed)
    dram = bytearray(0 if timing else allocator.used * (config.dram_bits // 8))
    for region, data in images:
        dram[region.byte_slice(config)] = data
    moved = _moved(graph, placed)
    converted = _converted(graph, placed | moved, {t.values[0] for s in sections for t in s.outputs})
    host = tuple(HostOp(op.kind, op.result, MOVED if op.result in moved else (
                            CONVERTED if op.kind in CONVERSIONS else EPILOGUE) if op.result in converted
                        else why.get(op.result) or host_reason(op, why),
                        moved=op.result in moved, converted=op.result in converted)
                 for op in graph.ops if op.result not in placed)
    calls, on_chip = _calls(graph, sections, placed)
    if chained:
        calls = chain(list(calls), config, timing)
    return AccelProgram(config, tuple(calls), host, bytes(dram), on_chip)


def _host_addressing(graph: Graph, sections: list[Section], placed: set[str]) -> list[Section]:
    """The sections without the layout ops they read through that the host needs as well (a
    host op or a graph output reads them, or a layout op it then runs): the host runs those
    (from the section output, read back); `placed` loses them."""
    kinds = {op.result: op.kind for op in graph.ops}
    written = {t.values[0] for s in sections for t in s.outputs}  # the host reads these back (merged heads)
    back: set[str] = set()
    while True:
        reads = set(graph.outputs).union(*(op.operands for op in graph.ops if op.result not in placed))
        more = {r for r in placed & reads if kinds.get(r) in ADDRESSING and r not in written}
        if not more:
            break
        placed -= more
        back |= more
    if not back:
        return sections
    return [dataclasses.replace(s, ops=tuple(r for r in s.ops if r not in back)) for s in sections]


def _calls(graph: Graph, sections: list[Section], placed: set[str]) -> tuple[tuple[Section, ...], frozenset[str]]:
    """The sections with their calls (`Section.joins`), and the outputs the host never reads.
    A layer joins the call before it unless the host writes it a value that call computes (a
    round trip), or a host op placed between them in the graph reads one and feeds a layer
    (the call runs where its last layer stands; a host op that feeds none, reading back what
    the call computed, runs after it). Outputs that no host op, graph output or host-written
    input reads stay on chip."""
    index = {op.result: i for i, op in enumerate(graph.ops)}
    host_reads: dict[int, set[str]] = {i: set(op.operands) for i, op in enumerate(graph.ops) if op.result not in placed}
    needed = set(graph.outputs).union(*host_reads.values(), (t.values[0] for s in sections for t in s.inputs))
    feeding = {t.values[0] for s in sections for t in s.inputs}  # what layers read of the host's, and its sources
    for i in reversed(list(host_reads)):
        if graph.ops[i].result in feeding:
            feeding |= host_reads[i]
        else:
            del host_reads[i]  # a host op no layer waits for
    out: list[Section] = []
    computed: set[str] = set()  # the current call's outputs
    first = 0  # the graph index of the current call's first op
    for section in sections:
        positions = [index[r] for r in section.ops]
        joins = bool(out) and (section.ops == out[-1].ops or (
            not any(t.values[0] in computed for t in section.inputs)
            and not any(host_reads[i] & computed for i in range(first, max(positions)) if i in host_reads)))
        if not joins:
            computed, first = set(), min(positions)
        computed.update(t.values[0] for t in section.outputs)
        out.append(dataclasses.replace(section, joins=joins))
    on_chip = frozenset(t.values[0] for s in sections for t in s.outputs) - needed
    return tuple(out), on_chip


MOVED = ("addressing: the host lays the tensor out as it moves it to an accelerator layer "
         "(a strided or indexed copy that is the transfer itself, no op of its own)")


def _gathers(op, graph: Graph) -> bool:
    """An embedding of a constant table: the host copies the table's rows that the indices pick."""
    return op.kind == "embedding" and op.operands[0] in graph.weights


def _moved(graph: Graph, placed: set[str]) -> set[str]:
    """The layout ops of integer (or bool) values that feed only accelerator layers (or such
    ops), not a graph output: the host writes their operand in the layout the layer reads (from
    an earlier layer's output, or from what it computed itself, a padding mask); and the
    gathers of integer embedding rows, which the host copies from its table by index."""
    users, outputs = graph.users(), set(graph.outputs)
    moved: set[str] = set()
    for op in graph.ops:
        if op.result not in placed and (op.kind in LAYOUT_OPS or _gathers(op, graph)) and \
                not op.type.dtype.is_float and op.operands and op.result not in outputs:
            moved.add(op.result)
    for op in reversed(graph.ops):  # users come after: one pass drops those feeding the host
        if op.result in moved and not all(u.result in placed or u.result in moved for u in users[op.result]):
            moved.discard(op.result)
    return moved


CONVERTED = ("a conversion the host applies to the values as it copies them to or from the accelerator "
             "(in the transfer's loop, no op of its own)")
CONVERSIONS = frozenset({"quantize", "dequantize", "cast"})


EPILOGUE = ("the host applies it in a transfer's copy loop: to the values it reads back after their conversion, "
            "or to the model's inputs before they are converted and written (an elementwise op, a per-channel "
            "norm, a pick of rows, a mean over rows; no op of its own)")
_IN_LOOP = LAYOUT_OPS | {"mean", "sum", "batch_norm"}  # with the elementwise ops: what a copy loop applies


def _converted(graph: Graph, on_accelerator: set[str], written: set[str]) -> set[str]:
    """The elementwise conversions of values crossing the link: those reading what a section
    wrote (read back), or whose result only accelerator layers (or the layout ops the transfer
    does) read, not a graph output: the host converts them in the copy loop of the transfer.
    And what those loops apply at the model's edges, ops of one value (the others constants):
    elementwise ops, layout ops, a mean (or sum), an inference batch norm. After a read-back
    conversion, up to graph outputs (the read-back's epilogue: the pooler's [CLS] pick and
    tanh, a classifier's mean over tokens); from graph inputs up to a conversion the
    accelerator reads (the write's prologue: a speech model's feature normalization)."""
    users, outputs, constants = graph.users(), set(graph.outputs), set(graph.constant_names)
    inputs = set(graph.input_names)
    converted: set[str] = set()
    for op in graph.ops:
        if op.result not in on_accelerator and op.kind in CONVERSIONS and (op.operands[0] in written or (
                op.result not in outputs and users[op.result]
                and all(u.result in on_accelerator for u in users[op.result]))):
            converted.add(op.result)
    fusable = [op for op in graph.ops if op.result not in on_accelerator and op.kind not in CONVERSIONS
               and (OPS[op.kind].elementwise or op.kind in _IN_LOOP)
               and len([v for v in op.operands if v not in constants]) == 1]
    value = {op.result: next(v for v in op.operands if v not in constants) for op in fusable}
    read_back = {op.result for op in graph.ops if op.result in converted and op.operands[0] in written}
    epilogue: set[str] = set()
    for op in fusable:  # from a read-back conversion on
        if value[op.result] in read_back or value[op.result] in epilogue:
            epilogue.add(op.result)
    for op in reversed(fusable):  # users come after: one pass drops those another op reads
        if op.result in epilogue and not (all(u.result in epilogue for u in users[op.result])
                                          and (users[op.result] or op.result in outputs)):
            epilogue.discard(op.result)
    prologue: set[str] = set()
    for op in reversed(fusable):  # up to a conversion the accelerator reads
        if op.result not in outputs and users[op.result] and all(
                u.result in prologue or u.result in converted - read_back for u in users[op.result]):
            prologue.add(op.result)
    for op in fusable:  # from the graph's inputs on
        if op.result in prologue and not (value[op.result] in inputs or value[op.result] in prologue):
            prologue.discard(op.result)
    return converted | epilogue | prologue


def host_places(graph: Graph, program: AccelProgram) -> dict[str, str]:
    """Where each host op of `program` stands: "addressing" (a layout op the host's transfer does),
    "between" (it reads what an accelerator call computed and feeds a later call: a round trip
    through the host) or "edge" (before the accelerator's work or after it: the model's inputs
    and outputs, the conversions there)."""
    outputs = {t.values[0] for s in program.sections for t in s.outputs}
    inputs = {t.values[0] for s in program.sections for t in s.inputs}
    host, users = {h.result: h for h in program.host_ops}, graph.users()
    after: set[str] = set()  # host values computed from an accelerator output
    for op in graph.ops:
        if op.result in host and any(v in outputs or v in after for v in op.operands):
            after.add(op.result)
    before: set[str] = set()  # host values an accelerator input is computed from
    for op in reversed(graph.ops):
        if op.result in host and (op.result in inputs or any(u.result in before for u in users[op.result])):
            before.add(op.result)
    return {name: "addressing" if h.moved else "between" if name in after and name in before else "edge"
            for name, h in host.items()}
