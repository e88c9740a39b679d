"""A model as the user hands it over (an nn.Module, an fx.GraphModule, an ExportedProgram or a
model file), lowered to IR with its signature and example inputs; and data files fitted to it."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.fx as fx

from tcc.ir.errors import TccError
from tcc.ir.graph import Graph, freeze_weights
from tcc.passes import Dataset
from tcc.passes.data import data_inputs

from .data import load_dataset
from .frontend import Signature, from_exported_program, from_module, split_inputs
from .loader import InputShape, load_model_file

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


def example_arrays(signature: Signature, examples: Any) -> dict[str, np.ndarray]:
    """The example inputs by input name, as numpy arrays ({} when they do not match the
    signature)."""
    if examples is None:
        return {}
    args, kwargs = split_inputs(examples)
    flat = list(args) + [kwargs[n] for n in signature.input_names if n in kwargs]
    if len(flat) != len(signature.input_names):
        return {}
    return {name: t.detach().cpu().numpy() for name, t in zip(signature.input_names, flat)
            if isinstance(t, torch.Tensor)}


def example_dataset(graph: Graph, arrays: dict[str, np.ndarray]) -> Dataset | None:
    """The example inputs as a dataset of the graph's inputs (None unless there is one per input;
    a decoder's step: its token ids, a sequence from position 0)."""
    if len(arrays) != len(graph.user_inputs):
        return None
    return Dataset(tuple(torch.from_numpy(arrays[n]) for n in data_inputs(graph)), source="the example inputs")


def fitted_dataset(spec: DataSpec, graph: Graph | None, what: str) -> Dataset | None:
    """`spec` (a data file or a Dataset) fitted to `graph` (as loaded when None); a file's dataset
    is named by the file's name (its path, which is the machine's, goes to the artifact's
    measured/host.json)."""
    if spec is None:
        return None
    if isinstance(spec, Dataset):
        return spec.fit(graph, what) if graph is not None else spec
    return dataclasses.replace(load_dataset(spec, graph, what=what), source=Path(spec).name)


def source_paths(model: Any, data: dict[str, DataSpec]) -> dict[str, str]:
    """The absolute paths of the model and data files compiled from."""
    files = {"model": model, **data}
    return {key: str(Path(f).resolve()) for key, f in files.items() if isinstance(f, (str, Path))}


def adopt_weights(graph: Graph, source: Any) -> tuple[Graph, dict[str, Any]]:
    """`graph` whose float constants take the values of those of `source` (an `Artifact`, or its
    directory) of the same name, shape and float dtype: a model's weights as another compile of
    it left them (pruned and fine-tuned through its prefill step, say, for its decode step);
    and what was taken, for the manifest. A TccError when nothing matches."""
    from tcc.runtime.artifact import Artifact, load
    artifact = source if isinstance(source, Artifact) else load(source)
    where = str(artifact.path or "the --weights-from artifact")
    theirs, ours = dict(artifact.graph.constants), dict(graph.constants)
    floats = [name for name, t in ours.items() if t.dtype.is_float]
    taken = {name: np.asarray(artifact.graph.weights[name], dtype=ours[name].dtype.numpy) for name in floats
             if name in theirs and theirs[name].dtype.is_float and theirs[name].shape == ours[name].shape}
    if not taken:
        raise TccError(f"{where}: none of its float weights is one of this model's by name and shape (another model, "
                       "or compiled to integers: take the weights from a float compile)")
    merged = dict(graph.weights)
    merged.update(freeze_weights(taken))
    return graph.replace(weights=merged), {"source": where, "weights": len(taken), "of": len(floats)}
