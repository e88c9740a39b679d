"""The accelerator's RTL, generated with PyRTL from one `AccelConfig`.

`build(config)` returns a `Design`: a PyRTL block with
- instruction fetch from a program memory (`imem_depth` x 128 bits, written through the
  `imem_we/imem_waddr/imem_wdata` port while the machine is held in reset) and decode: field
  positions come from `isa.FORMATS` and `isa.HEADER`, opcodes from `isa.Opcode`;
- an in-order dispatcher with the nine token counters (`isa.Token`, `TOKEN_BITS` each);
- the four units of `isa.UNITS`: the DMA load engine (DRAM -> buffer; tload's transposer and,
  with the sparse unit, spload's unpacker: a bit buffer of index words, writing a weight word
  and its index word into BBUF's two memories in one cycle); the array, an
  output-stationary `rows x cols` systolic array of `data_bits` multipliers with two banks of
  `acc_bits` accumulators per PE (gemm, and where the config has them spgemm's gather and
  bgemm's XNOR-popcount mode); the `cols`-lane vector unit (requant, and where the config has
  it the vector ALU for vadd/vmul/vrelu/vmax/vsum, vacc and the nonlinearities vresadd, vgelu,
  vsoftmax and vlayernorm); the DMA store engine;
- the buffers ABUF/BBUF/OBUF/PBUF (lane layout as `isa.pack_words`); ABUF as `abuf_banks`
  memories, low-order interleaved (word a in bank a % banks); with the sparse unit, BBUF as two
  (even and odd words).

`vector_unit=False` leaves out the vector ALU and the nonlinearities, the two OBUF read ports,
slots b and d and PBUF's vector bank; `nonlinear_unit=False` the nonlinearities and vacc (the
sequencer, the divider and square root, slots b and d), and PBUF's vector bank then keeps one
lane (vsum writes its value to every lane); `sparse_unit=False` the gather, its delay lines,
spload's unpacker and BBUF's split; `binary_unit=False` the PEs' XNOR-popcount: the opcodes of a missing unit never
issue (`isa.check_program` refuses programs that use them); requant, the array's output path,
stays.

DRAM lies outside (`dma`). `done` rises in the cycle after `halt` issues: the run's cycle count
(`isa_sim.Stats.cycles`) is the number of clock steps after reset until `done` is seen.

Timing is the ISA's contract (`isa.Instruction.occupancy` and `duration`): an instruction
issues in cycle t when its unit is free and its tokens are there, keeps the unit from issuing
until t + occupancy and signals at the edge ending t + duration - 1; `halt` waits until every
instruction has ended (the units idle, the array's delay line empty). To meet it with block-RAM
buffers (synchronous reads), every buffer read port has a registered address (a transparent
synchronous read: it sees the writes of the previous edge) and each unit presents the first
addresses of the next instruction one cycle ahead (the fetch stage holds the instruction after
the current one). Buffers written by two units (OBUF, PBUF) keep one bank per writer and a
live-value table saying which bank holds the newest word.

The modules: `core` (the top level: fetch, dispatcher, tokens), `dma` (load and store engines,
the DRAM port), `array` (the systolic array), `vector` (the vector unit), `nonlinear` (its
nonlinearities), `slots` (its lanes' shared multipliers), `sequential` (its divider and square
root), `memory` (the buffers), `decode` (instruction fields as wires), `circuits` (small
circuit helpers). The PyRTL, Icarus and Verilator runners are `tcc.runtime.rtl`'s; the Verilog
export, testbench and synthesis `tcc.backends.accel.verilog`'s."""

from .array import build_array
from .circuits import DELAY_LINE
from .core import Design, build, design
from .dma import DRAM_ADDR_BITS, dram_extent, dram_image

__all__ = ["DELAY_LINE", "DRAM_ADDR_BITS", "Design", "build", "build_array", "design", "dram_extent", "dram_image"]
