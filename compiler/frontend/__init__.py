"""The frontend: PyTorch models to tcc IR, through torch.export or torch.fx.symbolic_trace."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from tcc.ir.errors import TccError
from tcc.ir.graph import Graph
from tcc.ir.types import TensorType
from tcc.ir.verifier import verify
from tcc.passes import DeadCodeElimination, FoldConstants, PassContext
from tcc.runtime.torch_dtypes import dtype_from_torch

from .converters import convert_node
from .lowering import Lowerer, UnsupportedError, Value, is_tensor_like, lower_nodes
from .state import with_state

# Ops kept whole instead of decomposed to core ATen.
KEPT_WHOLE = ("linear", "scaled_dot_product_attention", "layer_norm", "gelu", "silu", "group_norm", "rms_norm")


@dataclass(frozen=True)
class Signature:
    """How the model's Python inputs and outputs map to the graph's flat inputs and outputs:
    outputs come back as one tensor, a tuple, or a dict with `output_keys`. A graph with state
    takes its state after these inputs and returns it after these outputs."""

    input_names: tuple[str, ...]
    output_form: str = "tuple"  # "tensor" | "tuple" | "dict"
    output_keys: tuple[str, ...] = field(default=())

    def to_json(self) -> dict:
        return {"input_names": list(self.input_names), "output_form": self.output_form,
                "output_keys": list(self.output_keys)}

    @classmethod
    def from_json(cls, data: dict) -> "Signature":
        return cls(tuple(data["input_names"]), data["output_form"], tuple(data["output_keys"]))


def split_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    return tuple(example_inputs), {}


def export(model: torch.nn.Module, example_inputs: Any) -> torch.export.ExportedProgram:
    """torch.export the model; failures become one-line `TccError`s."""
    args, kwargs = split_inputs(example_inputs)
    try:
        return torch.export.export(model, args, kwargs)
    except Exception as e:  # torch.export raises many types; report its first line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TccError(f"torch.export failed on {type(model).__name__}: {first}") from None


def _output_signature(spec, input_names) -> Signature:
    if spec is None or spec.type is None:
        return Signature(input_names, "tensor")
    if spec.type is dict or (isinstance(spec.type, type) and issubclass(spec.type, dict)):
        return Signature(input_names, "dict", tuple(spec.context))
    if spec.num_children == 0:
        return Signature(input_names, "tensor")
    return Signature(input_names, "tuple")


def _finish(lowerer: Lowerer, outputs: list[Value]) -> Graph:
    graph = lowerer.builder.finish(outputs)
    ctx = PassContext()
    for p in (FoldConstants(), DeadCodeElimination()):
        graph = p(graph, ctx)
    return verify(graph)


def from_exported_program(ep: torch.export.ExportedProgram, name: str = "main") -> tuple[Graph, Signature]:
    """Lower an ExportedProgram. The graph is lowered as exported when every op has a converter;
    otherwise it is decomposed to core ATen (keeping the ops of `KEPT_WHOLE` whole)
    and lowered again. When that fails too, the error is the first attempt's where a converter
    refused its arguments (`pad mode 'reflect' is unsupported`), else the decomposition's."""
    try:
        return _lower_program(ep, name)
    except UnsupportedError as as_exported:
        table = torch.export.default_decompositions()
        for op in KEPT_WHOLE:
            table.pop(getattr(torch.ops.aten, op).default, None)
        try:
            decomposed_ep = ep.run_decompositions(table)
        except Exception as e:  # torch cannot trace it again (e.g. in-place writes to aliased buffers)
            reason = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
            raise UnsupportedError(f"{as_exported}; torch cannot decompose the program either ({type(e).__name__}: "
                                   f"{reason[:300]})", as_exported.missing) from None
        try:
            return _lower_program(decomposed_ep, name)
        except UnsupportedError as decomposed:  # a converter's own refusal says more than its decomposition's
            raise (decomposed if as_exported.missing else as_exported) from None


def _lower_program(ep: torch.export.ExportedProgram, name: str) -> tuple[Graph, Signature]:
    """Lower the program; buffers it writes (a static KV cache, in torch.export's functional
    form: BUFFER_MUTATION outputs) become the graph's state (`tcc.ir.state`)."""
    graph = ep.graph_module.graph
    lowerer = Lowerer(name, {n: n.meta.get("val") for n in graph.nodes})
    env: dict[fx.Node, Any] = {}
    specs = {s.arg.name: s for s in ep.graph_signature.input_specs}
    output_kinds = [s.kind.name for s in ep.graph_signature.output_specs]
    mutated = [s.target for s in ep.graph_signature.output_specs if s.kind.name == "BUFFER_MUTATION"]
    unsupported = sorted(set(output_kinds) - {"USER_OUTPUT", "BUFFER_MUTATION"})
    if unsupported:
        raise UnsupportedError(f"the program returns an output of kind {unsupported[0]} (e.g. an input written in "
                               "place); tcc carries only written buffers from one run to the next (a static cache)")
    input_names, state_inputs = [], {}
    for node in graph.nodes:
        if node.op != "placeholder":
            continue
        spec = specs[node.name]
        kind = spec.kind.name
        if kind == "USER_INPUT" or (kind == "BUFFER" and spec.target in mutated):
            val = node.meta.get("val")
            if not isinstance(val, torch.Tensor):
                env[node] = val
                continue
            type_ = TensorType(tuple(int(d) for d in val.shape), dtype_from_torch(val.dtype))
            env[node] = Value(lowerer.builder.input(node.name if kind == "USER_INPUT" else spec.target, type_))
            if kind == "BUFFER":
                state_inputs[spec.target] = env[node]
            else:
                input_names.append(env[node])
        elif kind in ("PARAMETER", "BUFFER"):
            tensor = ep.state_dict[spec.target] if spec.target in ep.state_dict else ep.constants[spec.target]
            env[node] = lowerer.constant(spec.target, tensor, learned=kind == "PARAMETER")
        elif kind == "CONSTANT_TENSOR":
            env[node] = lowerer.constant(spec.target, ep.constants[spec.target])
        else:
            raise TccError(f"unsupported exported input kind {kind} at placeholder '{node.name}'")
    outputs = lower_nodes(lowerer, graph, env, convert_node)
    user = [v for v, kind in zip(outputs, output_kinds) if kind == "USER_OUTPUT"]
    nexts = dict(zip(mutated, (v for v, kind in zip(outputs, output_kinds) if kind == "BUFFER_MUTATION")))
    signature = _output_signature(ep.call_spec.out_spec, tuple(input_names))
    if not state_inputs:
        return _finish(lowerer, user), signature
    return with_state(_finish(lowerer, user + [nexts[b] for b in state_inputs]),
                      [(state_inputs[b], len(user) + i) for i, b in enumerate(state_inputs)]), signature


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.values: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        self.values[n] = result = super().run_node(n)
        return result


def from_graph_module(gm: fx.GraphModule, example_inputs: Any, name: str = "main") -> tuple[Graph, Signature]:
    """Lower a GraphModule from `torch.fx.symbolic_trace`; the example inputs give each node
    its shape (the graph is run once)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    args, kwargs = split_inputs(example_inputs)
    positional = list(args) + [kwargs[n.target] for n in placeholders[len(args):] if n.target in kwargs]
    recorder = _Recorder(gm)
    try:
        with torch.no_grad():
            result = recorder.run(*positional)
    except Exception as e:
        raise TccError(f"running the traced graph on the example inputs failed: {str(e).splitlines()[0]}") from None
    lowerer = Lowerer(name, recorder.values)
    lowerer.modules = dict(gm.named_modules())
    lowerer.tensors = {**dict(gm.named_parameters()), **dict(gm.named_buffers())}
    lowerer.learned = {name for name, _ in gm.named_parameters()}
    env: dict[fx.Node, Any] = {}
    input_names = []
    for node in gm.graph.nodes:
        lowerer.node = node
        if node.op == "placeholder":
            val = recorder.values[node]
            if isinstance(val, torch.Tensor):
                type_ = TensorType(tuple(val.shape), dtype_from_torch(val.dtype))
                env[node] = Value(lowerer.builder.input(node.target, type_))
                input_names.append(env[node])
            else:
                env[node] = val
        elif node.op == "get_attr":
            value = recorder.values[node]
            if isinstance(value, torch.Tensor):
                lowerer.tensors.setdefault(node.target, value)
                env[node] = lowerer.parameter(node.target)
            else:
                env[node] = value
    outputs = lower_nodes(lowerer, gm.graph, env, convert_node)
    if isinstance(result, torch.Tensor):
        signature = Signature(tuple(input_names), "tensor")
    elif isinstance(result, dict):
        signature = Signature(tuple(input_names), "dict", tuple(result))
    else:
        signature = Signature(tuple(input_names), "tuple")
    return _finish(lowerer, outputs), signature


def from_module(model: torch.nn.Module, example_inputs: Any, frontend: str = "export",
                name: str = "main") -> tuple[Graph, Signature]:
    """Lower an nn.Module through torch.export (default) or torch.fx.symbolic_trace (`frontend='fx'`).
    A GraphModule is lowered as it is."""
    model = model.eval()
    if isinstance(model, fx.GraphModule):
        return from_graph_module(model, example_inputs, name)
    if frontend == "fx":
        try:
            gm = fx.symbolic_trace(model)
        except Exception as e:
            raise TccError(f"torch.fx.symbolic_trace failed on {type(model).__name__}: "
                           f"{str(e).strip().splitlines()[0]}") from None
        return from_graph_module(gm, example_inputs, name)
    if frontend != "export":
        raise TccError(f"unknown frontend '{frontend}' (choose export or fx)")
    return from_exported_program(export(model, example_inputs), name)


__all__ = ["Signature", "from_exported_program", "from_graph_module", "from_module", "export", "split_inputs",
           "is_tensor_like"]
