"""The on-chip buffers as block-RAM banks: one bank per writing unit, a live-value table where
several units write, registered read addresses, and low-order interleaving."""

from __future__ import annotations

from pyrtl import Const, MemBlock, Register, WireVector, concat_list, mux, select

from .circuits import address_bits, fit


class Memory:
    """A buffer: one bank (a MemBlock with one write port) per writing unit, a live-value table
    when several units write it, and one read port per reader with a registered address: the
    data of the address presented in cycle c is there in cycle c + 1 and includes the writes of
    the edge ending c. Yosys maps each bank to block RAM (replicated per read port).

    `interleave` > 1 (a power of two) splits each writer's bank into that many memories, word
    `a` in memory `a % interleave` at index `a // interleave`: a reader's registered address
    picks the index (its high bits) in every memory and the memory (its low bits) whose word
    comes out, so reads and writes behave, cycle for cycle, as with one memory. A buffer with
    one writer also gives each reader `group[reader]`: the words at that index in every memory,
    i.e. the `interleave` consecutive words of the aligned group holding the address, all read
    in the same cycle."""

    def __init__(self, name: str, depth: int, width: int, writers: list[str], readers: list[str],
                 broadcast: dict[str, int] | None = None, interleave: int = 1):
        """`broadcast[w] = bits`: writer `w` only writes words whose lanes all hold one
        `bits`-wide value; its bank stores that value once."""
        assert interleave >= 1 and not interleave & (interleave - 1)
        self.name, self.depth, self.width = name, depth, width
        self.interleave, self.sel_bits = interleave, (interleave - 1).bit_length()
        self.index_bits = address_bits(-(-depth // interleave))
        self.aw = self.sel_bits + self.index_bits  # = address_bits(depth) without interleaving
        self.narrow = broadcast or {}

        def bank(w: str, i: int) -> MemBlock:
            suffix = f"_b{i}" if interleave > 1 else ""
            return MemBlock(self.narrow.get(w, width), self.index_bits, name=f"{name}_{w}{suffix}",
                            max_read_ports=len(readers), max_write_ports=1)

        self.banks = {w: [bank(w, i) for i in range(interleave)] for w in writers}
        self.index = {w: i for i, w in enumerate(writers)}
        self.lvt = None
        if len(writers) > 1:
            self.lvt = MemBlock(address_bits(len(writers)), self.aw, name=f"{name}_lvt", max_read_ports=len(readers),
                                max_write_ports=len(writers))
        self.addr: dict[str, Register] = {}
        self.data: dict[str, WireVector] = {}
        self.group: dict[str, list[WireVector]] = {}
        for r in readers:
            reg = Register(self.aw, name=f"{name}_raddr_{r}")
            groups = {w: [b[reg[self.sel_bits:]] for b in banks] for w, banks in self.banks.items()}
            values = [self._widen(w, g[0] if interleave == 1 else mux(reg[:self.sel_bits], *g))
                      for w, g in groups.items()]
            self.addr[r] = reg
            self.data[r] = values[0] if self.lvt is None else mux(self.lvt[reg], *values, default=values[0])
            if self.lvt is None:
                self.group[r] = groups[writers[0]]

    def _widen(self, writer: str, value: WireVector) -> WireVector:
        if writer not in self.narrow:
            return value
        return fit(concat_list([value] * -(-self.width // len(value))), self.width)

    def read(self, reader: str, addr) -> None:
        """Present `addr` to `reader`'s port: its word is in `data[reader]` next cycle."""
        self.addr[reader].next <<= fit(addr, self.aw)

    def write(self, writer: str, addr, data, enable, group: tuple[WireVector, list[WireVector]] | None = None) -> None:
        """`writer` writes `data` to word `addr` when `enable` is set. With `group` = (its enable,
        a word per memory), the writer instead writes a whole aligned group (`addr` its first
        word) in one cycle, a word into each memory (a buffer with one writer)."""
        addr = fit(addr, self.aw)
        width = self.narrow.get(writer, self.width)
        data = fit(data, width)
        banks = self.banks[writer]
        if self.interleave == 1:
            banks[0][addr] <<= MemBlock.EnabledWrite(data, enable)
        else:
            index, sel = addr[self.sel_bits:], addr[:self.sel_bits]
            for i, b in enumerate(banks):
                word, on = data, enable & (sel == i)
                if group is not None:
                    word, on = select(group[0], fit(group[1][i], width), word), on | group[0]
                b[index] <<= MemBlock.EnabledWrite(word, on)
        if self.lvt is not None:
            self.lvt[addr] <<= MemBlock.EnabledWrite(Const(self.index[writer], self.lvt.bitwidth), enable)

    def memblocks(self) -> list[MemBlock]:
        return [*(b for banks in self.banks.values() for b in banks), *([self.lvt] if self.lvt is not None else [])]
