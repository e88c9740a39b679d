"""The accelerator codegen: `generate(graph, config) -> AccelProgram` compiles every chain of
`graph` the array runs exactly to accelerator sections, and leaves every other op to the host
with its reason; `timing(graph, config)` gives the cycles of what `generate` would build without
building it (the cost model's fast path).

The stages, a module each: `match` (the chains the accelerator runs: layers), `weights` (the
weight plan: the unit, and what the array runs per column tile), `tiling` (output tiles, buffer
slots and the tile order), `emit` (a section's four instruction streams, tile by tile),
`schedule` (the streams interleaved into one program under the ISA's timing, with its tokens and
cycles), `layer` (one layer's sections and DRAM contents), `chain` (a call's sections run as one
program) and `program` (the graph's)."""

from ..layout import AccelProgram
from .program import EPILOGUE, generate, host_places, timing

__all__ = ["generate", "host_places", "timing", "AccelProgram", "EPILOGUE"]
