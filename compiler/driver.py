"""The compiler driver: model (or model file) -> IR -> passes -> backend -> Artifact."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.fx as fx

from tcc.backends.reference.plan import build_plan
from tcc.ir.errors import TccError
from tcc.ir.graph import Graph
from tcc.passes import DeadCodeElimination, FoldConstants, Pass, PassContext
from tcc.runtime.artifact import Artifact

from . import __version__
from .frontend import Signature, from_exported_program, from_module, split_inputs
from .loader import InputShape, load_model_file
from .targets import Target, get_target


def default_pipeline(target: Target) -> list[Pass]:
    """The passes a target runs when the user names none."""
    return [FoldConstants(), DeadCodeElimination()]


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


def compile(model: Any, example_inputs: Any = None, *, target: str = "cpu", pipeline: Sequence[Pass] | None = None,
            frontend: str = "export", input_shapes: Sequence[str] = (), arch: str | None = None,
            trust_pickle: bool = False) -> Artifact:
    """Compile `model` (an nn.Module, fx.GraphModule, ExportedProgram, or a model file path)
    for `target`; returns an in-memory `Artifact` (`.save(path)`, `.run(inputs, on=...)`)."""
    target_info = get_target(target)
    graph, signature, examples, source = lower(model, example_inputs, frontend=frontend,
                                               input_shapes=input_shapes, arch=arch, trust_pickle=trust_pickle)
    ctx = PassContext()
    passes = list(pipeline) if pipeline is not None else default_pipeline(target_info)
    for p in passes:
        graph = p(graph, ctx)
    plan = build_plan(graph, target_info.executor)
    manifest = {
        "tcc_version": __version__, "torch_version": torch.__version__, "python": platform.python_version(),
        "source": source, "frontend": frontend, "target": target_info.to_json(),
        "pipeline": [p.name for p in passes], "pass_log": ctx.log,
    }
    return Artifact(graph, signature.to_json(), plan, manifest, _example_arrays(signature, examples))
