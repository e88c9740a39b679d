"""The backends by `Target.backend`: each builds an artifact's backend files from the graph
lowered for the target (`BACKENDS[target.backend](graph, target, examples=..., synth=...)`).

- `reference`: the CPU / GPU runtime executes the IR itself: no files beyond the graph.
- `accel`: the accelerator program (sections, instruction stream, DRAM image), the Verilog of
  the accelerator with a testbench and a synthesis script, and optionally yosys' resource
  counts (`synth`, failing when the design does not fit the part).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

from tcc.backends.accel.codegen import generate, host_places
from tcc.backends.accel.hardware import dram_extent
from tcc.backends.accel.isa import Buffer, Instruction, Opcode
from tcc.backends.accel.layout import AccelProgram
from tcc.backends.accel.verilog import hardware_files, synthesize
from tcc.ir.encoding import make_encoding
from tcc.ir.errors import TccError
from tcc.ir.graph import Graph
from tcc.ir.sparsity import Hierarchical
from tcc.runtime.accel_executor import AccelExecutor, cycle_bound
from tcc.runtime.artifact import BACKEND_DIR

from .target import Target


@dataclass(frozen=True)
class Built:
    """What a backend built: files by their path in the artifact, what the manifest says of
    them, and the accelerator program (for the report) where there is one."""

    files: dict[str, bytes] = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)
    program: AccelProgram | None = None


def build_reference(graph: Graph, target: Target, *, examples: Mapping[str, np.ndarray], synth: bool = False) -> Built:
    """The reference runtime runs the artifact's graph as it is."""
    return Built()


def build_accel(graph: Graph, target: Target, *, examples: Mapping[str, np.ndarray], synth: bool = False) -> Built:
    """The accelerator program of `graph` for `target.accel`, the hardware files and the resources
    (the estimate; yosys' counts with `synth`, else the catalog's record of an unchanged config).
    The manifest lists each host op with where it stands (`codegen.host_places`: at the model's
    edges, between two accelerator calls, or addressing) and why the accelerator does not run it."""
    program = generate(graph, target.accel)
    places = host_places(graph, program)
    files = {f"{BACKEND_DIR}/{name}": data for name, data in program.to_files().items()}
    files |= {f"{BACKEND_DIR}/rtl/{name}": data for name, data in _hardware_files(graph, program, examples,
                                                                                   target).items()}
    manifest = {"sections": len(program.sections), "calls": len(program.calls()), "link_bytes": program.link_bytes(),
                "host_ops": [{"op": h.kind, "result": h.result, "where": places[h.result], "why": h.reason}
                             for h in program.host_ops],
                "weights": weights_on_the_wire(graph, program),
                "resources_estimate": target.accel.estimate_resources()}
    if synth:
        manifest["synthesis"] = _synthesize(target)
    elif target.synthesis:
        manifest["synthesis"] = dict(target.synthesis, source="catalog")
    return Built(files, manifest, program)


def weights_on_the_wire(graph: Graph, program: AccelProgram) -> list[dict]:
    """Per weight the accelerator reads, in graph order: its bytes in the DRAM image
    (`dram_bytes`), its bytes in the IR's compact encoding of its structure (`encoded_bytes`:
    `#hp` for an HP weight, else its own encoding) and their ratio, and whether it fits BBUF
    whole (`on_chip`: "fits BBUF") or streams through it in chunks every run ("streamed"); the
    accelerator's cycles count its loads either way."""
    config = program.config
    words, beats = program.weight_words(), config.beats(Buffer.BBUF)
    out = []
    for name, t in graph.constants:
        if name not in words:
            continue
        dram = words[name] * config.dram_bits // 8
        encoding = make_encoding(t.sparsity.keyword, t.sparsity.params()) if isinstance(t.sparsity, Hierarchical) \
            else t.encoding
        encoded = -(-encoding.footprint(graph.weights[name], t.dtype)[0] // 8)
        out.append({"name": name, "dram_bytes": dram, "encoded": str(encoding).lstrip("#"), "encoded_bytes": encoded,
                    "ratio": round(dram / encoded, 4) if encoded else 1.0,
                    "on_chip": "fits BBUF" if words[name] // beats <= config.bbuf_depth else "streamed"})
    return out


Backend = Callable[..., Built]
BACKENDS: dict[str, Backend] = {"reference": build_reference, "accel": build_accel}


def _hardware_files(graph: Graph, program: AccelProgram, examples: Mapping[str, np.ndarray],
                    target: Target) -> dict[str, bytes]:
    """accel.v, synth.ys and a testbench running the first section on the DRAM it starts from
    with the example inputs (its image without them; just `halt` without a section)."""
    config = program.config
    if not program.sections:
        return hardware_files((Instruction.make(Opcode.HALT),), config, b"", 16, target.part.family)
    section, dram = program.sections[0].program, program.dram
    if len(examples) == len(graph.inputs):
        section, dram = AccelExecutor(graph, program).section_runs(
            *(examples[n] for n in graph.input_names), first=1)[0]
    extent = dram_extent(section, config) * (config.dram_bits // 8)
    return hardware_files(section, config, dram[:extent], cycle_bound(section, config), target.part.family)


def synthesize_target(target: Target) -> dict:
    """Yosys' resource counts (LUT, FF, DSP, BRAM, URAM; `seconds`) of the target's
    accelerator; a TccError when yosys fails."""
    try:
        used = synthesize(target.accel, part_family=target.part.family)
    except (RuntimeError, FileNotFoundError) as e:
        raise TccError(f"--synth: {e}") from None
    used.pop("cells")
    return used


def _synthesize(target: Target) -> dict:
    """Yosys resource counts of the target's accelerator; an error if they exceed the part."""
    used = synthesize_target(target)
    try:
        target.part.check_fits(used, f"the {target.accel.rows}x{target.accel.cols} accelerator", "yosys")
    except TccError as e:
        raise TccError(f"--synth: {e}") from None
    return used
