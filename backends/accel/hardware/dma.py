"""The DMA engines between DRAM and the buffers, and the DRAM a program reaches.

DRAM lies outside the design: each cycle the design drives `dram_raddr` (with `dram_re`) and
receives in `dram_rdata` the word at the address it requested in the previous cycle (a
registered read); it writes with `dram_we/dram_waddr/dram_wdata` (applied at the end of the
cycle). A buffer word moves as `AccelConfig.beats` DRAM words, low bits first."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from pyrtl import (Const, Output, Register, WireVector, concat, concat_list, mux, select, shift_left_logical,
                   shift_right_logical)

from ..config import AccelConfig
from ..isa import Buffer, Opcode, Unit
from .circuits import const_mul, fit, nonzero, select_first

if TYPE_CHECKING:
    from .core import Builder

DRAM_ADDR_BITS = 32


def load_engine(builder: Builder):
    """The load engine: requests beat j at k = L-1+j (k: cycles since issue), receives it at
    k = L+j, writes a buffer word when its last beat arrives. A tload requests its tiles'
    source words (`step` apart, tiles `stride` apart) and collects each tile's words as the rows
    of one of two tile registers; once a tile is in, its columns are written, one a cycle,
    while the next tile fills the other register."""
    cfg, mems, f = builder.cfg, builder.mems, builder.f
    D, L, dma_width = cfg.dram_bits, cfg.dram_latency, builder.dma_width
    iss = builder.issue_u[Unit.LOAD]
    tiled = builder.held(Unit.LOAD, "ld_tiled", builder.is_op[Opcode.TLOAD])
    lanes = cfg.rows  # a tload's tile: lanes x lanes (a square array's ABUF and BBUF words)
    occupancy = Const(L, dma_width) + _transfer_beats(builder, Opcode.LOAD) + \
        select(builder.is_op[Opcode.TLOAD], Const(lanes, dma_width), Const(0, dma_width))
    busy, idle = builder.busy(Unit.LOAD, occupancy, dma_width)
    sig = builder.held(Unit.LOAD, "load_sig", builder.sigm)
    o_raddr, o_re = Output(DRAM_ADDR_BITS, "dram_raddr"), Output(1, "dram_re")

    max_beats = max(cfg.beats(b) for b in Buffer)
    bw = max(1, (max_beats - 1).bit_length())
    lw = max(1, (L - 1).bit_length())
    iw = max(1, (lanes - 1).bit_length())
    l_wait, l_left = Register(lw, "ld_wait"), Register(dma_width, "ld_left")
    l_addr = Register(DRAM_ADDR_BITS, "ld_dram")
    eff_wait = select(iss, Const(L - 1, lw), l_wait)
    eff_left = fit(select(iss, _transfer_beats(builder, Opcode.LOAD), l_left), dma_width)
    eff_addr = fit(select(iss, f(Opcode.LOAD, "dram"), l_addr), DRAM_ADDR_BITS)
    request = (eff_wait == 0) & nonzero(eff_left)
    l_wait.next <<= fit(select(eff_wait == 0, Const(0, lw), eff_wait - 1), lw)
    l_left.next <<= fit(select(request, eff_left - 1, eff_left), dma_width)

    # a tload's addresses: the beats of a source word, then the tile's next word (`step` on),
    # then the next tile (`stride` on from the tile's first word)
    step = builder.held(Unit.LOAD, "ld_step", f(Opcode.TLOAD, "step"))
    stride = builder.held(Unit.LOAD, "ld_stride", f(Opcode.TLOAD, "stride"))
    buf = builder.held(Unit.LOAD, "ld_rbuf", f(Opcode.LOAD, "buf"))
    q_beat, q_word = Register(bw, "ld_qbeat"), Register(iw, "ld_qword")
    word_at, tile_at = Register(DRAM_ADDR_BITS, "ld_word_at"), Register(DRAM_ADDR_BITS, "ld_tile_at")
    eff_beat = select(iss, Const(0, bw), q_beat)
    eff_word = select(iss, Const(0, iw), q_word)
    eff_word_at = select(iss, eff_addr, word_at)
    eff_tile_at = select(iss, eff_addr, tile_at)
    word_end = eff_beat == fit(_beats_of(builder, buf, 1), bw)
    tile_end = word_end & (eff_word == lanes - 1)
    next_word_at = fit(select(tile_end, eff_tile_at + stride, eff_word_at + step), DRAM_ADDR_BITS)
    moving = request & tiled & word_end
    q_beat.next <<= fit(select(request, select(word_end, Const(0, bw), eff_beat + 1), eff_beat), bw)
    q_word.next <<= fit(select(request & word_end, select(tile_end, Const(0, iw), eff_word + 1), eff_word), iw)
    word_at.next <<= select(moving, next_word_at, eff_word_at)
    tile_at.next <<= select(moving & tile_end, next_word_at, eff_tile_at)
    l_addr.next <<= fit(select(request, select(moving, next_word_at, eff_addr + 1), eff_addr), DRAM_ADDR_BITS)
    o_raddr <<= eff_addr
    o_re <<= request

    rvalid = Register(1, "ld_rvalid")
    rvalid.next <<= request
    l_buf, l_beat = Register(2, "ld_buf"), Register(bw, "ld_beat")
    l_waddr = Register(16, "ld_waddr")
    last_beat = l_beat == fit(_beats_of(builder, l_buf, 1), bw)
    word_done = rvalid & last_beat
    l_buf.next <<= select(iss, f(Opcode.LOAD, "buf"), l_buf)
    l_beat.next <<= fit(select(iss | word_done, Const(0, bw), select(rvalid, l_beat + 1, l_beat)), bw)
    l_waddr.next <<= fit(select(iss, f(Opcode.LOAD, "addr"), select(word_done, l_waddr + 1, l_waddr)), 16)
    parts = []
    for p in range(max_beats - 1):
        r = Register(D, f"ld_beat{p}")
        r.next <<= select(rvalid & (l_beat == p), builder.dram_rdata, r)
        parts.append(r)
    words = {b: fit(concat_list(parts[:cfg.beats(b) - 1] + [builder.dram_rdata]), cfg.word_bits(b)) for b in Buffer}
    column, shifting, t_waddr = _transposer(builder, words[Buffer.ABUF], word_done & tiled, lanes, iw)
    plain = word_done & ~tiled
    pair = None
    if Opcode.SPLOAD in builder.ops:  # spload's pairs through the same write port, a word into each bank
        packed = builder.held(Unit.LOAD, "ld_packed", builder.is_op[Opcode.SPLOAD])
        plain = plain & ~packed
        pair = _unpacker(builder, words[Buffer.BBUF], word_done & packed)
    for b in Buffer:
        if b in (Buffer.ABUF, Buffer.BBUF):  # a tload's columns through the same write port
            waddr, group = select(shifting, t_waddr, l_waddr), None
            if b is Buffer.BBUF and pair is not None:
                waddr, group = select(pair[0], pair[1], waddr), (pair[0], pair[2])
            mems[b].write("load", waddr, select(shifting, column, words[b]), (plain | shifting) & (l_buf == int(b)),
                          group)
        else:
            mems[b].write("load", l_waddr, words[b], word_done & ~tiled & (l_buf == int(b)))
    return idle, busy == 1, sig


def _transposer(builder: Builder, word: WireVector, arrived: WireVector, lanes: int, iw: int):
    """A tload's tiles: the `lanes` source words of a tile (`arrived` a cycle each, as `word`)
    become the rows of one of two tile registers; from the cycle after a tile's last row its
    columns leave, lane 0 of every row first (then each row shifts down a lane), one a cycle,
    while the next tile fills the other register. Returns (the column word, a column leaves
    this cycle, its buffer address: the tload's `addr` on, a word a column)."""
    lane_bits = builder.cfg.data_bits
    row, bank = Register(iw, "tl_row"), Register(1, "tl_bank")
    out_bank, left = Register(1, "tl_out_bank"), Register(iw + 1, "tl_left")
    waddr = Register(16, "tl_waddr")
    iss = builder.issue_u[Unit.LOAD]
    full = arrived & (row == lanes - 1)
    row.next <<= fit(select(iss, Const(0, iw), select(arrived, select(full, Const(0, iw), row + 1), row)), iw)
    bank.next <<= select(iss, Const(0, 1), select(full, ~bank, bank))
    shifting = nonzero(left)
    left.next <<= fit(select(full, Const(lanes, iw + 1), select(shifting, left - 1, left)), iw + 1)
    out_bank.next <<= select(full, bank, out_bank)
    waddr.next <<= fit(select(iss, builder.f(Opcode.TLOAD, "addr"), select(shifting, waddr + 1, waddr)), 16)
    rows = [[Register(lanes * lane_bits, f"tl_tile{k}_row{i}") for i in range(lanes)] for k in range(2)]
    for k, tile in enumerate(rows):
        for i, reg in enumerate(tile):
            shift = shifting & (out_bank == k)
            down = fit(reg[lane_bits:], lanes * lane_bits) if lanes > 1 else reg  # one lane: nothing to shift
            reg.next <<= select(arrived & (bank == k) & (row == i), word, select(shift, down, reg))
    column = concat_list([select(out_bank, rows[1][i][:lane_bits], rows[0][i][:lane_bits]) for i in range(lanes)])
    return column, shifting, waddr


def _unpacker(builder: Builder, word: WireVector, arrived: WireVector):
    """spload's stream (`isa.sparse_stream`), a stream word `arrived` a cycle: index words join
    a bit buffer (at its fill level); each weight word leaves with its index word, the step's
    `cols` indices of log2(bw) bits from the buffer's bottom (a block's last step: its skip above
    lane 0's index), which then shifts down by the bits the step took. Returns (a weight and
    index word pair is written this cycle, its BBUF address, [the weight word, the index word])."""
    cfg, f = builder.cfg, builder.f
    DB, C = cfg.data_bits, cfg.cols
    W = C * DB  # a stream word's bits
    iss = builder.issue_u[Unit.LOAD]
    nnz = builder.held(Unit.LOAD, "sp_nnz", f(Opcode.SPLOAD, "nnz"))
    bw = builder.held(Unit.LOAD, "sp_bw", f(Opcode.SPLOAD, "bw"))
    ibs = range((min(cfg.abuf_banks, 1 << DB - 1)).bit_length())  # the index widths spload may use
    is_ib = [bw == 1 << i for i in ibs]
    fw = (2 * W).bit_length()
    fill, bits = Register(fw, "sp_fill"), Register(2 * W, "sp_bits")
    step, at = Register(8, "sp_step"), Register(16, "sp_at")
    last = step == fit(nnz - 1, 8)  # the block's last step: its skip follows its indices
    need = select_first([(is_ib[i], select(last, Const(C * i + DB - i, fw), Const(C * i, fw))) for i in ibs],
                        Const(0, fw))
    takes = arrived & (fill < need)  # an index word
    pair = arrived & ~(fill < need)  # a weight word
    joined = bits | shift_left_logical(fit(word, 2 * W), fill)
    bits.next <<= select(iss, Const(0, 2 * W), select(takes, joined, select(pair, shift_right_logical(bits, need),
                                                                                bits)))
    fill.next <<= fit(select(iss, Const(0, fw), select(takes, fill + W, select(pair, fill - need, fill))), fw)
    step.next <<= fit(select(iss | (pair & last), Const(0, 8), select(pair, step + 1, step)), 8)
    at.next <<= fit(select(iss, f(Opcode.SPLOAD, "addr"), select(pair, at + 2, at)), 16)
    indices = []
    for i in ibs:
        lanes = [fit(bits[c * i:(c + 1) * i], DB) if i else Const(0, DB) for c in range(C)]
        skip = bits[C * i:C * i + DB - i]
        lanes[0] = select(last, concat(skip, bits[:i]) if i else skip, lanes[0])
        indices.append((is_ib[i], concat_list(lanes)))
    index = select_first(indices, indices[0][1])
    return pair, at, [fit(word, W), index]


def store_engine(builder: Builder):
    """The store engine: presents buffer word w at k = L-1+w*beats, writes beat j at k = L+j;
    an sstore's words start `step` DRAM words apart."""
    cfg, mems, f = builder.cfg, builder.mems, builder.f
    D, L, dma_width = cfg.dram_bits, cfg.dram_latency, builder.dma_width
    iss = builder.issue_u[Unit.STORE]
    busy, idle = builder.busy(Unit.STORE, Const(L, dma_width) + _transfer_beats(builder, Opcode.STORE), dma_width)
    sig = builder.held(Unit.STORE, "store_sig", builder.sigm)
    o_we, o_waddr = Output(1, "dram_we"), Output(DRAM_ADDR_BITS, "dram_waddr")
    o_wdata = Output(D, "dram_wdata")

    sw = L.bit_length()
    bw = max(1, (max(cfg.beats(b) for b in Buffer) - 1).bit_length())
    s_wait, s_left = Register(sw, "st_wait"), Register(dma_width, "st_left")
    s_beat, s_rptr = Register(bw, "st_beat"), Register(16, "st_rptr")
    s_buf, s_daddr = Register(2, "st_buf"), Register(DRAM_ADDR_BITS, "st_dram")
    eff_wait = select(iss, Const(L, sw), s_wait)
    eff_left = fit(select(iss, _transfer_beats(builder, Opcode.STORE), s_left), dma_width)
    eff_beat = select(iss, Const(0, bw), s_beat)
    eff_rptr = select(iss, f(Opcode.STORE, "addr"), s_rptr)
    eff_buf = select(iss, f(Opcode.STORE, "buf"), s_buf)
    writing = (eff_wait == 0) & nonzero(eff_left)
    last_in_word = eff_beat == fit(_beats_of(builder, eff_buf, 1), bw)
    next_left = fit(select(writing, eff_left - 1, eff_left), dma_width)
    present = (writing & last_in_word & nonzero(next_left)) | (~writing & (eff_wait == 1) & nonzero(eff_left))
    s_wait.next <<= fit(select(eff_wait == 0, Const(0, sw), eff_wait - 1), sw)
    s_left.next <<= next_left
    s_beat.next <<= fit(select(writing, select(last_in_word, Const(0, bw), eff_beat + 1), eff_beat), bw)
    s_rptr.next <<= fit(select(present, eff_rptr + 1, eff_rptr), 16)
    s_buf.next <<= eff_buf
    step = builder.held(Unit.STORE, "st_step", select(builder.is_op[Opcode.SSTORE], f(Opcode.SSTORE, "step"),
                                                      Const(0, 16)))
    word_at = Register(DRAM_ADDR_BITS, "st_word_at")  # the first DRAM word of the word being written
    eff_word_at = select(iss, f(Opcode.STORE, "dram"), word_at)
    jump = writing & last_in_word & nonzero(step)
    next_word = fit(eff_word_at + step, DRAM_ADDR_BITS)
    word_at.next <<= select(jump, next_word, eff_word_at)
    s_daddr.next <<= fit(select(iss, f(Opcode.STORE, "dram"), select(jump, next_word, select(writing, s_daddr + 1,
                                                                                              s_daddr))),
                         DRAM_ADDR_BITS)
    beat_data = []
    for b in Buffer:
        m = mems[b]
        m.read("store", select(present, fit(eff_rptr, m.aw), m.addr["store"]))
        word = fit(m.data["store"], cfg.beats(b) * D)
        slices = [word[j * D:(j + 1) * D] for j in range(cfg.beats(b))]
        beat_data.append(slices[0] if len(slices) == 1 else mux(s_beat, *slices, default=Const(0, D)))
    o_we <<= writing
    o_waddr <<= s_daddr
    o_wdata <<= mux(s_buf, *beat_data)
    return idle, busy == 1, sig


def _beats_of(builder: Builder, buf: WireVector, minus: int = 0) -> WireVector:
    return mux(buf, *[Const(builder.cfg.beats(b) - minus, 16) for b in Buffer])


def _transfer_beats(builder: Builder, o: Opcode) -> WireVector:
    """The DRAM words the DMA instruction in `ir` moves: count * beats(buf), a tload's count
    tiles of lanes words each."""
    count, buf = builder.f(o, "count"), builder.f(o, "buf")
    plain = mux(buf, *[const_mul(count, builder.cfg.beats(b), builder.dma_width) for b in Buffer])
    if o is not Opcode.LOAD:
        return plain
    tiles = mux(buf, *[const_mul(count, builder.cfg.beats(b) * builder.cfg.rows, builder.dma_width) for b in Buffer])
    return select(builder.is_op[Opcode.TLOAD], tiles, plain)


def dram_extent(program, config: AccelConfig) -> int:
    """DRAM words [0, extent) cover every address `program` touches."""
    end = 0
    for instr in program:
        for space, _first, last, _writes in instr.accesses(config):
            if space == "DRAM":
                end = max(end, last)
    return end


def dram_image(program, config: AccelConfig, dram) -> tuple[bytearray, int]:
    """The DRAM as a bytearray of whole words, grown to cover the program; and the byte
    length to hand back."""
    if dram is None:
        dram = b""
    image = np.frombuffer(bytes(dram), np.uint8) if isinstance(dram, (bytes, bytearray)) else \
        np.asarray(dram, dtype=np.uint8).ravel()
    word = config.dram_bits // 8
    size = max(len(image), dram_extent(program, config) * word)
    words = -(-size // word)
    buf = bytearray(words * word)
    buf[:len(image)] = image.tobytes()
    return buf, size
