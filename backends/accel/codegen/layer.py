"""One layer's sections: its DRAM tensors, the spans of output tiles whose program fits the
program memory (a section each; a layer alike one built before takes its sections, `BUILT`),
and its constants' DRAM contents; the residual add and layer norm on the vector unit."""

from __future__ import annotations

import bisect
import dataclasses
import functools
import math
from dataclasses import dataclass
from itertools import chain
from typing import Mapping

import numpy as np

from .. import energy
from ..config import AccelConfig
from ..energy import Activity
from ..isa import FORMATS, Buffer, Instruction, Opcode, Unit
from ..layout import Deferred, DramAllocator, DramTensor, Layout, Region, Section, dram_words, encode, inner
from .addressing import TILED, Found, InPlace, Reads, activations, channel_blocks, row_order
from .emit import PARAM_RUN, Builder
from .match import Layer, Residual, Unsupported
from .schedule import Node, schedule
from .tiling import Tiling, choose_tiling, tile_order
from .weights import MAX_COUNT, Plan, weight_plan

CHUNKS = 8  # a residual add and norm section's row chunks, at least


def _tensors(layer: Layer, plan: Plan, config: AccelConfig, rows: bool) -> dict[str, DramTensor]:
    """The layer's DRAM tensors by role (x, w, params, constants, out: in the rows layout for
    a softmax or with `rows`, else outputs; the merged heads' one 2-D tensor), regions unset."""
    lead = (layer.batch,) if layer.kind != "linear" else ()
    x = Layout.BINARY_ACTIVATIONS if plan.kind == "binary" else Layout.ACTIVATIONS
    tensors = {"x": DramTensor((layer.x,), x, lead + (layer.m, layer.k), Region(0, 0))}
    if layer.y:
        tensors["w"] = DramTensor((layer.y,), Layout.WEIGHTS_T, lead + (layer.k, layer.n), Region(0, 0))
    elif plan.kind == "dense":
        tensors["w"] = DramTensor((layer.ops[0].operands[1],), Layout.WEIGHTS, (layer.n, layer.k), Region(0, 0))
    else:
        tensors["w"] = DramTensor((layer.ops[0].operands[1],), Layout.WEIGHT_STREAM, plan.stream.shape, Region(0, 0))
    if not layer.softmax:
        tensors["params"] = DramTensor(layer.param_values, Layout.PARAMS, (3, layer.n), Region(0, 0))
    if layer.mask:  # its rows, one per query row (or one for all) of each leading index it has
        shape = (math.prod(layer.mask_shape[:-1]), layer.n)
        tensors["mask"] = DramTensor((layer.mask,), Layout.PBUF_ROWS, shape, Region(0, 0))
    constants = layer.gelu or layer.softmax
    if constants:
        fused = layer.ops[-1].result
        tensors["constants"] = DramTensor((fused,), Layout.PARAM_WORDS, (len(constants), config.cols), Region(0, 0))
    if layer.addend is not None:  # the constants vadd adds, laid out as the outputs' tiles
        tensors["addend"] = DramTensor((layer.ops[-2].result,), Layout.OUTPUTS, (layer.m, layer.n), Region(0, 0))
    out = Layout.ROWS if layer.softmax or rows else Layout.OUTPUTS
    shape = (layer.batch // layer.heads * layer.m, layer.heads * layer.n) if layer.heads else lead + (layer.m, layer.n)
    tensors["out"] = DramTensor((layer.out,), out, shape, Region(0, 0))
    return tensors


def _reads(layer: Layer, plan: Plan, config: AccelConfig, x: Found | None, y: Found | None) -> Reads:
    """What the layer reads in place: its activations (not packed binary ones); a dense
    matmul's right operand by plain loads where its column tiles are whole channel blocks of
    the source (V's heads), else by tloads where one chunk holds each column tile's (K^T: its
    output channels are the source's rows, so transposed it is laid out as activations)."""
    place_x = activations(x, layer.batch, layer.m, layer.k, plan.a_align, config) \
        if x is not None and plan.kind != "binary" else None
    place_y = None
    if y is not None and layer.y and plan.kind == "dense":
        t, index, ops = y
        transposed = (t, np.swapaxes(index, -1, -2), ops)  # K^T's columns are K's rows
        place_y = channel_blocks(y, layer.batch, layer.k, layer.n, config) or (
            activations(transposed, layer.batch, layer.n, layer.k, 1, config) if plan.chunks == 1 else None)
    return Reads(place_x, place_y)


def _allocate(allocator: DramAllocator, t: DramTensor, what: str, config: AccelConfig) -> DramTensor:
    """`t` with a region of its own; an output's is followed by slack, so that a tload of its
    last row block (whole tiles of `rows` rows) reads no other tensor."""
    region = allocator.allocate(dram_words(t.layout, t.shape, config), what)
    if t.layout in TILED:
        rows = config.rows - 1
        allocator.allocate(rows * (inner(t.layout, t.shape, config) if t.layout is Layout.ROWS else 1)
                           * config.beats(t.layout.buffer), f"{what}'s slack")
    return dataclasses.replace(t, region=region)


@dataclass(frozen=True)
class _Built:
    """A section as built for one layer signature: its program, where each DRAM address in it
    points (`dram`: instruction, the layer tensor's role, the word within it), its cycles and
    activity, and its output tiles (`tile_order`'s, `first` to `end`)."""

    program: tuple[Instruction, ...]
    dram: tuple[tuple[int, str, int], ...]
    cycles: int
    activity: Activity
    first: int
    end: int


BUILT: dict[tuple, tuple[_Built, ...]] = {}  # layer signature -> its sections as built


@dataclass(frozen=True)
class _Timed:
    """A section's timing without its program (`_span_timings`): cycles, activity, its
    instructions (halt included) and its output tiles."""

    cycles: int
    activity: Activity
    length: int
    first: int
    end: int


TIMINGS: dict[tuple, tuple[_Timed, ...]] = {}  # layer signature -> its sections' timings


def compile_layer(layer: Layer, allocator: DramAllocator, config: AccelConfig, timing: bool = False,
                  found: tuple[Found | None, Found | None] = (None, None), rows: bool = False) \
        -> tuple[list[Section], list[tuple[Region, bytes]]]:
    """The layer's sections, and its constants' DRAM contents (`timing`: no contents, no
    weight encoded). `found`: the earlier section outputs its activations and a matmul's right
    operand come from (`addressing.source`), read in place where tloads can (`_reads`: the
    layout ops between become addressing, which the sections implement); `rows`: its output in
    the rows layout (what a residual add reads; sstores a row's words apart), where the
    sstore's step fits. A layer of a signature built before (`BUILT`: shapes, plan, tiling,
    reads, tensor layouts alike) takes those sections, their DRAM addresses moved to its own
    tensors."""
    plan = weight_plan(layer, config)
    out_rows = layer.out_rows
    if layer.kind == "linear" and found[0] is not None and (reordered := row_order(found[0], layer.m, layer.k)):
        found, out_rows = (reordered[0], found[1]), reordered[1]  # its rows in its source's order
    reads = _reads(layer, plan, config, *found)
    tiled_w = reads.y.words if isinstance(reads.y, InPlace) else 0
    tiling = choose_tiling(layer, plan, config, reads.x.words if reads.x else 0, tiled_w)
    if reads.x is not None and not tiling.resident:  # streamed chunks of a row: from the activations layout
        reads = Reads(None, reads.y)
        tiling = choose_tiling(layer, plan, config, 0, tiled_w)
    if reads.x is None and layer.kind == "linear":
        out_rows = ()  # the host writes its input in order
    tensors = {}
    try:
        rows = rows and math.ceil(layer.n / config.cols) * config.beats(Buffer.OBUF) <= MAX_COUNT
        for role, t in _tensors(layer, plan, config, rows).items():
            place = reads.x if role == "x" else reads.y if role == "w" and layer.y else None
            tensors[role] = place.source if place else _allocate(allocator, t, f"{layer.out}'s {t.layout.value}",
                                                                 config)
    except ValueError as e:
        raise Unsupported(f"the DRAM is full: {e}") from None
    tensors["out"] = dataclasses.replace(tensors["out"], rows=out_rows)
    if "addend" in tensors:
        tensors["addend"] = dataclasses.replace(tensors["addend"], rows=out_rows)
    signature = (config, layer.kind, layer.m, layer.k, layer.n, layer.batch, layer.relu, layer.gelu, layer.softmax,
                 layer.addend is not None, layer.mask_shape, layer.heads, plan.kind, plan.a_words, plan.a_align,
                 plan.tiles, tiling, tuple((role, t.layout, t.shape) for role, t in tensors.items()),
                 reads.x and (reads.x.pieces, reads.x.shifts),
                 reads.y and ((reads.y.pieces, reads.y.shifts) if isinstance(reads.y, InPlace) else reads.y.firsts))
    ops = tuple(o.result for o in reads.ops + layer.ops)
    inputs = tuple(tensors[r] for r in ("x", "w", "mask") if r in tensors and (r != "w" or layer.y)
                   and not (r == "x" and reads.x) and not (r == "w" and reads.y))
    constants = tuple(tensors[r] for r in ("w", "params", "constants", "addend")
                      if r in tensors and not (r == "w" and layer.y))
    tiles = tile_order(layer, plan, tiling, config)
    if timing and signature not in BUILT:  # timed, the programs deferred to where a chain needs them
        if signature not in TIMINGS:
            if len(TIMINGS) > 4096:
                TIMINGS.clear()
            TIMINGS[signature] = _span_timings(layer, plan, tiling, tensors, config, tiles, reads)
        return [Section(ops, inputs, constants, (tensors["out"],), (), _macs(layer, plan, config, tiles[t.first:t.end]),
                        t.cycles, _note(layer, plan, tiling, reads, t.first, t.end, len(tiles)), reads.sources,
                        activity=t.activity, deferred=Deferred(t.length, functools.partial(
                            _program, signature, layer, plan, tiling, tensors, config, reads, tiles, t.first, t.end)))
                for t in TIMINGS[signature]], []
    if signature not in BUILT:
        if len(BUILT) > 4096:
            BUILT.clear()
        BUILT[signature] = _build(layer, plan, tiling, tensors, config, reads)
    sections = [Section(ops, inputs, constants, (tensors["out"],), _relocated(built, tensors),
                        _macs(layer, plan, config, tiles[built.first:built.end]), built.cycles,
                        _note(layer, plan, tiling, reads, built.first, built.end, len(tiles)), reads.sources,
                        activity=built.activity)
                for built in BUILT[signature]]
    if timing:
        return sections, []
    images = []
    if not layer.y:
        stream = encode(Layout.WEIGHTS, layer.weight, config) if plan.kind == "dense" else \
            encode(Layout.WEIGHT_STREAM, plan.stream, config)
        images.append((tensors["w"].region, stream))
    if "params" in tensors:
        params = layer.params.copy()
        if plan.kind == "binary":  # the padding bits of the last packed word add +1 each
            params[0] -= plan.a_words * config.data_bits - layer.k
        images.append((tensors["params"].region, encode(Layout.PARAMS, params, config)))
    if "constants" in tensors:
        words = np.repeat(np.asarray(layer.gelu or layer.softmax, np.int64)[:, None], config.cols, axis=1)
        images.append((tensors["constants"].region, encode(Layout.PARAM_WORDS, words, config)))
    if "addend" in tensors:
        images.append((tensors["addend"].region, encode(Layout.OUTPUTS, tensors["addend"].stored(layer.addend),
                                                        config)))
    return sections, images


def _build(layer: Layer, plan: Plan, tiling: Tiling, tensors: dict[str, DramTensor], config: AccelConfig,
           reads: Reads) -> tuple[_Built, ...]:
    """The layer's sections: spans of output tiles whose programs fit the program memory."""
    tiles = tile_order(layer, plan, tiling, config)
    spans = []  # (first tile, end tile, the builder of exactly those tiles)
    while not spans or spans[-1][1] < len(tiles):
        start = spans[-1][1] if spans else 0
        spans.append((start, *_span(layer, plan, tiling, tensors, config, tiles, start, reads)))
    out = []
    for first, end, builder in spans:
        program, cycles, work = builder.finish()
        out.append(_Built(program, _dram_roles(program, tensors), cycles, work, first, end))
    return tuple(out)


def _dram_roles(program: tuple[Instruction, ...], tensors: dict[str, DramTensor]) -> tuple[tuple[int, str, int], ...]:
    """Where each DRAM address of `program` points: (instruction, the tensor's role, the word in it)."""
    starts = sorted((t.region.start, role) for role, t in tensors.items())
    dram = []
    for i, instruction in enumerate(program):
        if "dram" in (f.name for f in FORMATS[instruction.op]):
            at = instruction["dram"]
            _, role = starts[bisect.bisect_right(starts, (at, "~")) - 1]  # the tensor it lies in (or its slack)
            dram.append((i, role, at - tensors[role].region.start))
    return tuple(dram)


def _macs(layer: Layer, plan: Plan, config: AccelConfig, tiles: list[tuple[int, int, int]]) -> int:
    """The useful multiply-accumulates of output `tiles` (no padding; of a sparse weight, its
    non-zeros)."""
    macs = 0
    for _b, m, n in tiles:
        rows = min(layer.m, (m + 1) * config.rows) - m * config.rows
        cols = min(layer.n, (n + 1) * config.cols) - n * config.cols
        macs += rows * (cols * layer.k if plan.kind in ("dense", "binary", "w1a8") else
                        int(np.count_nonzero(layer.weight[n * config.cols:(n + 1) * config.cols])))
    return macs


DEFERRED: dict[tuple, _Built] = {}  # (layer signature, first tile, end tile) -> that section as built


def _program(signature: tuple, layer: Layer, plan: Plan, tiling: Tiling, tensors: dict[str, DramTensor],
             config: AccelConfig, reads: Reads, tiles: list[tuple[int, int, int]], first: int, end: int) \
        -> tuple[Instruction, ...]:
    """The program of the section of `tiles[first:end]` (a span `_span` cut), built once per layer
    signature and span, its DRAM addresses moved to `tensors`."""
    key = (signature, first, end)
    if key not in DEFERRED:
        if len(DEFERRED) > 4096:
            DEFERRED.clear()
        builder = Builder(layer, plan, tiling, tensors, config, reads)
        for tile in tiles[first:end]:
            builder.tile(*tile)
        program, cycles, work = builder.finish()
        DEFERRED[key] = _Built(program, _dram_roles(program, tensors), cycles, work, first, end)
    return _relocated(DEFERRED[key], tensors)


def _span_key(layer: Layer, plan: Plan, config: AccelConfig, tiles: list[tuple[int, int, int]],
              classes: list[int], reads: Reads) -> tuple:
    """What the instructions of a section of `tiles` and their timing depend on, addresses
    aside, tile by tile: its product, row block and column tile numbered by first appearance
    (the keys of the rings and batches), the step from the previous row block, the row
    block's parity and rows, the column tile's chunk structure (`classes`), how many column
    tiles from it on one load of params brings (`PARAM_RUN` at most: 1 for the last), and the
    tiles of its product's tloads. A prefix of the tiles has a prefix of the
    key."""
    names: dict[tuple, int] = {}
    last_n = math.ceil(layer.n / config.cols) - 1
    key, previous = [], None
    for b, m, n in tiles:
        ids = tuple(names.setdefault(k, len(names)) for k in (("b", b), ("m", b, m), ("n", b, n), ("p", n)))
        rows = min(layer.m, (m + 1) * config.rows) - m * config.rows
        key.append((ids, None if previous is None else m - previous, m % 2, rows, classes[n],
                    min(PARAM_RUN, last_n + 1 - n), reads.tiles(b, m, n)))
        previous = m
    return tuple(key)


def _span_timings(layer: Layer, plan: Plan, tiling: Tiling, tensors: dict[str, DramTensor], config: AccelConfig,
                  tiles: list[tuple[int, int, int]], reads: Reads) -> tuple[_Timed, ...]:
    """The timings of the sections `_build` cuts the layer into, scheduling only sections unlike
    those before: one whose tiles have the `_span_key` of a section already scheduled, and whose
    next tile has it too (so it ends where that one did), takes its cycles, activity and length."""
    structures: dict[tuple, int] = {}
    classes = [structures.setdefault(tuple((c.words, c.k, c.steps) for c in chunks), len(structures))
               for chunks in plan.tiles]
    seen: dict[tuple, tuple[tuple | None, tuple[int, Activity, int]]] = {}  # key -> (with its next tile, timing)
    timings: list[_Timed] = []
    start = length = 0
    while start < len(tiles):
        if length:
            end = min(start + length, len(tiles))
            key = _span_key(layer, plan, config, tiles[start:end + 1], classes, reads)
            hit = seen.get(key[:end - start])
            if hit is not None and (end == len(tiles) or hit[0] == key):
                timings.append(_Timed(*hit[1], start, end))
                start = end
                continue
        end, builder = _span(layer, plan, tiling, tensors, config, tiles, start, reads)
        program, cycles, work = builder.finish()
        key = _span_key(layer, plan, config, tiles[start:end + 1], classes, reads)
        seen[key[:end - start]] = (key if end < len(tiles) else None, (cycles, work, len(program)))
        timings.append(_Timed(cycles, work, len(program), start, end))
        start, length = end, end - start
    return tuple(timings)


def _relocated(built: _Built, tensors: dict[str, DramTensor]) -> tuple[Instruction, ...]:
    """`built`'s program with its DRAM addresses in `tensors`."""
    program = list(built.program)
    for i, role, offset in built.dram:
        program[i] = program[i].with_field("dram", tensors[role].region.start + offset)
    return tuple(program)


def _note(layer: Layer, plan: Plan, tiling: Tiling, reads: Reads, first: int, end: int, tiles: int) -> str:
    batch = f"{layer.batch} x " if layer.kind != "linear" else ""
    return (f"{' -> '.join(o.result for o in layer.ops)}: {batch}M={layer.m} K={layer.k} N={layer.n}, "
            f"{plan.kind}, output tiles {first}..{end - 1} of {tiles} (by groups of {tiling.group} row "
            f"blocks, groups of columns, row, column), K in {plan.chunks} chunk(s)"
            + "".join(f", {what} by tload from {p.source.values[0]}'s {p.source.layout.value}"
                      + (f" through {', '.join(o.kind for o in p.ops)}" if p.ops else "")
                      for what, p in (("activations", reads.x), ("right operand", reads.y)) if p))


def _span(layer: Layer, plan: Plan, tiling: Tiling, tensors: dict[str, DramTensor], config: AccelConfig,
          tiles: list[tuple[int, int, int]], start: int, reads: Reads) -> tuple[int, "Builder"]:
    """The section from tile `start`: as many tiles as its program memory holds, a softmax's
    row blocks whole (its rows' scores from all column tiles in one program). Returns the end
    tile and the builder of exactly tiles[start:end]."""
    builder = Builder(layer, plan, tiling, tensors, config, reads)
    last_n = math.ceil(layer.n / config.cols) - 1
    cut = (start, builder.mark())  # the last place the section may end
    for end in range(start, len(tiles)):
        mark = builder.mark()
        if end > start and (not layer.softmax or tiles[end - 1][2] == last_n):
            cut = (end, mark)
        builder.tile(*tiles[end])
        if builder.size() > config.imem_depth:
            if cut[0] == start:
                what = "a softmax's row block" if layer.softmax else "one output tile"
                raise Unsupported(f"{what} takes {builder.size()} instructions, the program memory holds "
                                  f"{config.imem_depth}")
            builder.rewind(cut[1])
            return cut[0], builder
    return len(tiles), builder


def compile_residual(layer: Residual, allocator: DramAllocator, config: AccelConfig,
                     resident: Mapping[str, DramTensor] | None = None) \
        -> tuple[list[Section], list[tuple[Region, bytes]]]:
    """The residual add and layer norm, row by row on the vector unit: chunks of rows of both
    operands load into OBUF (a wide `b`, a pre-norm stream, into PBUF), per row vresadd into
    PBUF and vlayernorm back into OBUF, a store per chunk (and of the sums from PBUF, where
    `layer.stream` keeps them); two slots of everything, so the next chunk loads while this one
    runs (`CHUNKS` chunks at least, so load and store overlap the rows). A norm alone (`layer.b` empty) loads its rows straight into PBUF, and vlayernorm reads
    them there. An operand an earlier section left in the layout it reads (`resident`) is read
    where it lies; a constant `b` (position embeddings) lies in the DRAM image."""
    words = math.ceil(layer.n / config.cols)
    count = len(layer.constants)
    add, keep = bool(layer.b), bool(layer.stream)
    free = config.pbuf_depth - count  # below the constants
    # per chunk row: OBUF words (both operands and the result, two slots; a wide b is PBUF's),
    # PBUF words (a norm's rows, a wide b, kept sums: two slots each; else two rows of sums)
    obuf_rows = 2 * (3 - layer.wide) if add else 2
    pbuf_rows = 2 * (layer.wide + keep) if add else 2
    sums = 0 if keep or not add else 2 * words
    # at least CHUNKS chunks where there are rows enough: the first chunk's load is all the
    # vector unit waits for, the store of the last all that follows it
    chunk = min(math.ceil(layer.m / CHUNKS), config.obuf_depth // (obuf_rows * words), MAX_COUNT // words,
                *((free - sums) // (pbuf_rows * words),) if pbuf_rows else ())
    if chunk < 1 or free < sums:
        raise Unsupported(f"rows of {layer.n} values do not fit OBUF ({obuf_rows} x {words} words) or PBUF "
                          f"({count} words of constants, {sums} and {pbuf_rows} x {words})")
    shape = (layer.m, layer.n)
    inputs = (("a", layer.a, Layout.ROWS if add else Layout.PBUF_ROWS, shape),) + \
        ((("b", layer.b, Layout.PBUF_ROWS if layer.wide else Layout.ROWS, shape),) if add else ())
    kept = {role: resident[value] for role, value, lay, shp in inputs
            if resident and value in resident and (resident[value].layout, resident[value].shape) == (lay, shp)}
    fixed = {"b": layer.b_values} if layer.b_values is not None else {}  # a constant b: in the DRAM image
    outputs = (("out", layer.out, Layout.ROWS, shape),) + ((("stream", layer.stream, Layout.PBUF_ROWS, shape),)
                                                            if keep else ())
    try:
        tensors = {role: kept.get(role) or _allocate(allocator, DramTensor((value,), lay, shp, Region(0, 0)),
                                                     f"{layer.out}'s {role}", config)
                   for role, value, lay, shp in inputs + (("constants", layer.ops[-1].result, Layout.PARAM_WORDS,
                                                           layer.constants.shape),) + outputs}
    except ValueError as e:
        raise Unsupported(f"the DRAM is full: {e}") from None
    beats = {Buffer.OBUF: config.beats(Buffer.OBUF), Buffer.PBUF: config.beats(Buffer.PBUF)}
    per_row = (2 if add else 1) * chunk + 4 + keep  # instructions per chunk
    per_section = max(1, (config.imem_depth - 8) // per_row) * chunk  # rows whose program fits
    base = config.pbuf_depth - count
    norm_constants = base + (7 if add else 0)
    slot_words = chunk * words
    sections = []
    for first in range(0, layer.m, per_section):
        streams: dict[Unit, list[Node]] = {u: [] for u in Unit}

        def node(n: Node) -> Node:
            streams[n.unit].append(n)
            return n

        def load(role: str, buf: Buffer, at: int, low: int, rows: int, deps) -> Node:
            return node(Node(Opcode.LOAD, deps, config, buf=buf, addr=at, count=rows * words,
                             dram=tensors[role].region.start + low * words * beats[buf]))

        def store(role: str, buf: Buffer, at: int, low: int, rows: int, deps) -> Node:
            return node(Node(Opcode.STORE, deps, config, buf=buf, addr=at, count=rows * words,
                             dram=tensors[role].region.start + low * words * beats[buf]))

        const = node(Node(Opcode.LOAD, [], config, buf=Buffer.PBUF, addr=base, count=count,
                          dram=tensors["constants"].region.start))
        readers: list[Node | None] = [None, None]  # the last instruction reading each input slot
        stores: list[Node | None] = [None, None]  # the last store of each output slot
        for i, low in enumerate(range(first, min(layer.m, first + per_section), chunk)):
            rows, slot = min(chunk, layer.m - low), i % 2
            if add:  # a (and a narrow b) into OBUF, a wide b into PBUF after the sums; sums into PBUF
                a_at, b_at, out_at = ((2 * k + slot) * slot_words for k in range(3))
                if layer.wide:
                    out_at, b_at = b_at, (2 * keep + slot) * slot_words + sums
                sums_at = slot * slot_words if keep else 0
                loads = [load("a", Buffer.OBUF, a_at, low, rows, [readers[slot]]),
                         load("b", Buffer.PBUF if layer.wide else Buffer.OBUF, b_at, low, rows, [readers[slot]])]
            else:  # the rows into PBUF
                row_at, out_at = slot * slot_words, slot * slot_words
                loads = [load("a", Buffer.PBUF, row_at, low, rows, [readers[slot]])]
            norm = total = None
            for r in range(rows):
                deps = loads + [const] if r == 0 else []
                if add:
                    source = sums_at + r * words if keep else (r % 2) * words
                    total = node(Node(Opcode.VRESADD, deps + ([stores[slot]] if r == 0 and keep else []), config,
                                      dst=source, a=a_at + r * words, b=b_at + r * words, n=words, param=base,
                                      wide=int(layer.wide)))
                    readers[slot], deps = total, []
                else:
                    source = row_at + r * words
                norm = node(Node(Opcode.VLAYERNORM, deps + ([stores[slot]] if r == 0 else []), config,
                                 dst=out_at + r * words, a=source, n=words, len=layer.n, param=norm_constants))
                if not add:
                    readers[slot] = norm
            stores[slot] = store("out", Buffer.OBUF, out_at, low, rows, [norm])
            if keep:
                stores[slot] = store("stream", Buffer.PBUF, sums_at, low, rows, [norm])
        program, cycles = schedule(streams)
        work = energy.total(chain(*streams.values()), config)
        end = min(layer.m, first + per_section)
        what = "residual add and layer norm" if add else "layer norm"
        note = (f"{' -> '.join(o.result for o in layer.ops)}: rows {first}..{end - 1} of {layer.m}, N={layer.n}, "
                f"{what} on the vector unit, {chunk} rows per chunk")
        sections.append(Section(tuple(o.result for o in layer.ops),
                                tuple(tensors[r] for r in ("a", "b") if r in tensors and r not in kept
                                      and r not in fixed),
                                (tensors["constants"],) + tuple(tensors[r] for r in fixed),
                                tuple(tensors[r] for r, *_ in outputs), program, 0, cycles, note, tuple(kept.values()),
                                activity=work))
    return sections, [(tensors["constants"].region, encode(Layout.PARAM_WORDS, layer.constants, config))] + \
        [(tensors[r].region, encode(tensors[r].layout, values, config)) for r, values in fixed.items()]
