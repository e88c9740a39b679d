"""The compiler driver: model (or model file) -> IR -> passes -> backend -> Artifact."""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
import torch.fx as fx

from tcc.backends.accel.codegen import generate
from tcc.backends.accel.config import AccelConfig
from tcc.backends.accel.hardware import dram_extent
from tcc.backends.accel.isa import Instruction, Opcode
from tcc.backends.accel.layout import AccelProgram
from tcc.backends.accel.verilog import hardware_files, synthesize
from tcc.backends.reference.plan import build_plan
from tcc.ir.errors import TccError
from tcc.ir.graph import Graph
from tcc.passes import Dataset, Pass, PassContext, format_pipeline, parse_pipeline
from tcc.runtime.accel_executor import AccelExecutor, cycle_bound
from tcc.runtime.artifact import BACKEND_DIR, Artifact
from tcc.runtime.torch_executor import TorchExecutor

from . import __version__
from .data import load_dataset
from .frontend import Signature, from_exported_program, from_module, split_inputs
from .loader import InputShape, load_model_file
from .devices import candidates
from .report import render as render_report
from .targets import Target, get_target, load_catalog

if TYPE_CHECKING:
    from .select import Selection


_log = logging.getLogger("tcc.driver")

def default_pipeline(target: Target) -> list[Pass]:
    """The optimisation passes a target runs when the user names none."""
    return parse_pipeline(target.pipeline)


PipelineSpec = str | Sequence[Pass] | None
DataSpec = str | Path | Dataset | None


def lower(model: Any, example_inputs: Any = None, *, frontend: str = "export", input_shapes: Sequence[str] = (),
          arch: str | None = None, trust_pickle: bool = False) -> tuple[Graph, Signature, Any, str]:
    """Lower a model object or file to IR. Returns (graph, signature, example_inputs, source)."""
    if isinstance(model, (str, Path)):
        loaded = load_model_file(model, input_shapes=[InputShape.parse(s) for s in input_shapes] or None,
                                 arch=arch, trust_pickle=trust_pickle)
        examples = example_inputs if example_inputs is not None else loaded.example_inputs
        source = f"{Path(model).name} ({loaded.kind})"
        if loaded.program is not None:
            graph, signature = from_exported_program(loaded.program)
        else:
            graph, signature = from_module(loaded.module, examples, frontend)
        return graph, signature, examples, source
    if isinstance(model, torch.export.ExportedProgram):
        examples = example_inputs
        if examples is None and model.example_inputs is not None:
            args, kwargs = model.example_inputs
            examples = kwargs if kwargs and not args else args
        graph, signature = from_exported_program(model)
        return graph, signature, examples, "ExportedProgram"
    if isinstance(model, torch.nn.Module):
        if example_inputs is None:
            raise TccError("compiling an nn.Module needs example_inputs")
        graph, signature = from_module(model, example_inputs, frontend)
        kind = "fx.GraphModule" if isinstance(model, fx.GraphModule) else type(model).__name__
        return graph, signature, example_inputs, kind
    raise TccError(f"cannot compile a {type(model).__name__}: pass an nn.Module, an ExportedProgram or a file path")


def _example_arrays(signature: Signature, examples: Any) -> dict[str, np.ndarray]:
    if examples is None:
        return {}
    args, kwargs = split_inputs(examples)
    flat = list(args) + [kwargs[n] for n in signature.input_names if n in kwargs]
    if len(flat) != len(signature.input_names):
        return {}
    return {name: t.detach().cpu().numpy() for name, t in zip(signature.input_names, flat)
            if isinstance(t, torch.Tensor)}


def _dataset(spec: DataSpec, graph: Graph, what: str) -> Dataset | None:
    """`spec` fitted to `graph`; a file's dataset is named by the file's name (its path, which
    is the machine's, goes to the artifact's measured/host.json)."""
    if spec is None:
        return None
    if isinstance(spec, Dataset):
        return spec.fit(graph, what)
    return dataclasses.replace(load_dataset(spec, graph, what=what), source=Path(spec).name)


def _paths(model: Any, data: dict[str, DataSpec]) -> dict[str, str]:
    """The absolute paths of the model and data files compiled from."""
    files = {"model": model, **data}
    return {key: str(Path(f).resolve()) for key, f in files.items() if isinstance(f, (str, Path))}


def compile(model: Any, example_inputs: Any = None, *, target: str = "cpu", pipeline: PipelineSpec = None,
            frontend: str = "export", input_shapes: Sequence[str] = (), arch: str | None = None,
            trust_pickle: bool = False, train_data: DataSpec = None, calib_data: DataSpec = None,
            eval_data: DataSpec = None, progress: bool = False, seed: int = 0, accel: str | None = None,
            synth: bool = False, targets_file: str | Path | None = None,
            selection: Selection | None = None) -> Artifact:
    """Compile `model` (an nn.Module, fx.GraphModule, ExportedProgram, or a model file path)
    for `target`; returns an in-memory `Artifact` (`.save(path)`, `.run(inputs, on=...)`).

    `pipeline` (a text spec such as `"hp-prune{sparsity=0.75},quantize"` or a list of passes)
    replaces the target's default optimisation passes; the target's lowering passes still run
    after it, except those the pipeline already names (so `select-format{format=csr}` in a
    pipeline is not re-chosen by the target's own `select-format`). `train_data` / `calib_data` (data files or `Dataset`s) feed fine-tuning and
    calibration; without them, passes prune one-shot and calibrate on the example inputs.
    `target="auto"` takes the device a `select-device{lc=...,ac=...}` in `pipeline` chooses
    among the catalog's (accuracy on the labelled `eval_data`); named targets are its only
    candidate, so there it checks the constraints. `accel` (`KEY=VALUE,...`) overrides fields of an FPGA target's accelerator config; `synth`
    synthesizes its accelerator with yosys (minutes), records LUT/FF/DSP/BRAM in the manifest
    and fails if the design does not fit the part. `targets_file` adds (or replaces) targets
    from a JSON file of the catalog's schema. `selection`, the device selection that chose
    `target` (`tcc compile --target auto`), goes into the report.

    The artifact's report (`report.html`: the model, its weights and their sparsity patterns,
    the accelerator's cycles, the predicted latency and energy on every device, the accuracy on
    `eval_data`, the selection) is rendered when the artifact is first saved. What depends on
    this machine (the cost model's measured figures and predictions, a selection's points,
    select-device's latencies, file paths) goes to the artifact's unhashed `measured/`, so the
    hashed files follow from the model, the options and the software alone."""
    catalog = load_catalog(targets_file)
    passes = parse_pipeline(pipeline) if isinstance(pipeline, str) else list(pipeline or [])
    if target == "auto":
        offered, config = catalog, None
    else:
        target_info = get_target(target, targets_file)
        config = _accel_config(target_info, accel)
        if synth and config is None:
            raise TccError(f"--synth: target '{target_info.name}' has no accelerator to synthesize")
        offered = {target_info.name: target_info}
        if pipeline is None:
            passes = default_pipeline(target_info)
    choosing = any(p.name == "select-device" for p in passes)
    if target == "auto" and not choosing:
        raise TccError("target 'auto' needs select-device{lc=...,ac=...} in the pipeline (or `tcc select`)")
    from tqdm.auto import tqdm
    steps = tqdm(total=len(passes) + 3, desc=f"compile: {frontend}", unit="step", leave=False, disable=not progress,
                 dynamic_ncols=True)  # the frontend, each pass, the target's lowering, the backend
    start = time.perf_counter()
    graph, signature, examples, source = lower(model, example_inputs, frontend=frontend,
                                               input_shapes=input_shapes, arch=arch, trust_pickle=trust_pickle)
    _log.info("lowered %s with %s in %.2f s: %d ops, %d constants", source, frontend, time.perf_counter() - start,
              len(graph.ops), len(graph.constants))
    steps.update()
    data: dict[str, Dataset] = {}
    example_arrays = _example_arrays(signature, examples)
    if len(example_arrays) == len(graph.inputs):
        data["example"] = Dataset(tuple(torch.from_numpy(example_arrays[n]) for n in graph.input_names),
                                  source="the example inputs")
    for key, spec, what in (("train", train_data, "training data"), ("calib", calib_data, "calibration data"),
                            ("eval", eval_data, "evaluation data")):
        dataset = _dataset(spec, graph, what)
        if dataset is not None:
            data[key] = dataset
    ctx = PassContext(data=data, torch_module=TorchExecutor, progress=progress, seed=seed,
                      devices=candidates(offered, catalog) if choosing else ())
    if target != "auto":
        ctx.tile, ctx.formats, ctx.work_cost = target_info.tile, target_info.formats, target_info.work_cost
    for p in passes:
        steps.set_description_str(f"compile: {p.name}")
        graph = p(graph, ctx)
        steps.update()
    if target == "auto":
        target_info = catalog[ctx.chosen_device]
        config = _accel_config(target_info, accel)
        if synth and config is None:
            raise TccError(f"--synth: the chosen target '{target_info.name}' has no accelerator to synthesize")
        ctx.tile, ctx.formats, ctx.work_cost = target_info.tile, target_info.formats, target_info.work_cost
    lowering = [p for p in parse_pipeline(target_info.lowering) if p.name not in {q.name for q in passes}]
    steps.set_description_str(f"compile: lowering for {target_info.name}")
    for p in lowering:
        graph = p(graph, ctx)
    steps.update()
    steps.set_description_str("compile: backend")
    plan = build_plan(graph, target_info.executor)
    manifest = {
        "tcc_version": __version__, "torch_version": torch.__version__,
        "source": source, "frontend": frontend, "target": target_info.to_json(),
        "pipeline": format_pipeline(passes + lowering), "passes": [p.name for p in passes + lowering],
        "pass_log": ctx.log, "data": {k: {"source": d.source, "examples": len(d)} for k, d in data.items()},
    }
    backend_files: dict[str, bytes] = {}
    program: AccelProgram | None = None
    if config is not None:
        manifest["target"]["accel"] = config.to_json()
        program = generate(graph, config)
        backend_files = {f"{BACKEND_DIR}/{name}": data for name, data in program.to_files().items()}
        backend_files.update({f"{BACKEND_DIR}/rtl/{name}": data for name, data in
                              _hardware_files(graph, program, example_arrays, target_info).items()})
        manifest["accel"] = {"sections": len(program.sections),
                             "host_ops": [{"op": h.kind, "result": h.result, "why": h.reason} for h in program.host_ops],
                             "resources_estimate": config.estimate_resources()}
        if synth:
            manifest["accel"]["synthesis"] = _synthesize(config, target_info)
        elif config == target_info.accel and target_info.synthesis:  # the shipped config: measured in the catalog
            manifest["accel"]["synthesis"] = dict(target_info.synthesis, source="catalog")
    # the report prices the target with the accelerator config built (--accel may override the catalog's)
    compiled_for = dataclasses.replace(target_info, accel=config) if config is not None else target_info
    paths = _paths(model, {"train": train_data, "calib": calib_data, "eval": eval_data})
    report = functools.partial(render_report, target=compiled_for, catalog={**catalog, target_info.name: compiled_for},
                               program=program, eval_data=data.get("eval"), selection=selection, seed=seed,
                               measured={"pass_log": ctx.measured, "paths": paths})
    steps.update()
    steps.close()
    _log.info("compiled for %s in %.2f s", target_info.name, time.perf_counter() - start)
    return Artifact(graph, signature.to_json(), plan, manifest, _example_arrays(signature, examples), backend_files,
                    render_report=report)


def _hardware_files(graph: Graph, program: AccelProgram, examples: dict[str, np.ndarray],
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


def _synthesize(config: AccelConfig, target: Target) -> dict:
    """Yosys resource counts of the accelerator; an error if they exceed the part."""
    try:
        used = synthesize(config, part_family=target.part.family)
    except (RuntimeError, FileNotFoundError) as e:
        raise TccError(f"--synth: {e}") from None
    used.pop("cells")
    for resource, have in _part_resources(target).items():
        if used[resource] > have:
            raise TccError(f"--synth: the {config.rows}x{config.cols} accelerator does not fit {target.part.name}: "
                           f"yosys maps it to {used[resource]:,} {resource}, the part has {have:,}")
    return used


def _part_resources(target: Target) -> dict[str, int]:
    return {"LUT": target.part.lut, "FF": target.part.ff, "DSP": target.part.dsp, "BRAM": target.part.bram36}


def _accel_config(target: Target, overrides: str | None) -> AccelConfig | None:
    """The target's accelerator config with `overrides`; a config whose estimated resources
    exceed the part is an error naming the resource."""
    if target.accel is None:
        if overrides:
            raise TccError(f"--accel: target '{target.name}' has no accelerator (use an fpga-* target)")
        return None
    try:
        config = target.accel.with_overrides(overrides) if overrides else target.accel
    except ValueError as e:
        raise TccError(str(e)) from None
    have = _part_resources(target)
    for resource, need in config.estimate_resources().items():
        if need > have[resource]:
            raise TccError(f"the {config.rows}x{config.cols} accelerator does not fit {target.part.name}: it needs about "
                           f"{need:,} {resource} (estimate), the part has {have[resource]:,}")
    return config
