"""Lowering of torch.fx graphs (from torch.export or torch.fx.symbolic_trace) to tcc IR.

Every fx node is lowered by a converter from `converters.CONVERTERS`. Tensors become IR
values (`Value`); non-tensor node results (sizes, dtypes, tuples of ints) are carried as
Python values, since shapes are static. Example values per node come from
`node.meta['val']` (torch.export) or from running the graph once (symbolic_trace).
"""

from __future__ import annotations

import re
from typing import Any, Callable

import torch
import torch.fx as fx

from tcc.ir.analysis import non_finite
from tcc.ir.dtypes import DType
from tcc.ir.errors import TccError
from tcc.ir.graph import GraphBuilder
from tcc.ir.types import TensorType
from tcc.runtime.torch_dtypes import dtype_from_torch


class Value(str):
    """The name of an IR value, as distinct from Python strings among converter arguments."""


class UnsupportedError(TccError):
    pass


def node_location(node: fx.Node) -> str:
    """`node 'name' (module a.b.c, file.py:LINE)` from what fx recorded about the node."""
    parts = [f"node '{node.name}'"]
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        if path:
            parts.append(f"module {path}")
    trace = node.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+)', trace)
    if frames:
        file, line = frames[-1]
        parts.append(f"{file}:{line}")
    return parts[0] + (f" ({', '.join(parts[1:])})" if len(parts) > 1 else "")


def target_name(node: fx.Node) -> str:
    target = node.target
    if node.op == "call_method":
        return f"Tensor.{target}"
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    if node.op == "call_module":
        return target
    return getattr(target, "__qualname__", None) or getattr(target, "__name__", str(target))


class Lowerer:
    """Converter context: builds IR through `op`, knows each node's example value."""

    def __init__(self, graph_name: str, examples: dict[fx.Node, Any]):
        self.builder = GraphBuilder(graph_name)
        self.examples = examples
        self.node: fx.Node | None = None
        self._scalar_cache: dict[tuple, Value] = {}
        self.modules: dict[str, torch.nn.Module] = {}  # symbolic_trace: leaf modules by path
        self.tensors: dict[str, torch.Tensor] = {}  # parameters and buffers by path
        self.learned: set[str] = set()  # which of them are parameters
        self._constants: dict[str, Value] = {}

    # -- helpers for converters -------------------------------------------------------------
    def type(self, value: Value) -> TensorType:
        return self.builder.type_of(value)

    def example(self) -> Any:
        """The example value of the node being lowered (a tensor or FakeTensor, or Python value)."""
        return self.examples[self.node]

    def out_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.example().shape)

    def out_dtype(self) -> DType:
        return dtype_from_torch(self.example().dtype)

    def op(self, kind: str, *operands: Value, **attrs: Any) -> Value:
        hint = self.node.name if self.node is not None else kind
        return Value(self.builder.op(kind, *operands, name=hint, **attrs))

    def constant(self, name: str, tensor: torch.Tensor, learned: bool = False) -> Value:
        """The IR constant `name` holding `tensor`: a TccError naming it if it holds NaN, or
        (a `learned` parameter) +-Inf, which no pass or executor computes anything useful from."""
        tensor = tensor.detach().cpu()
        check_finite(name, tensor, learned)
        if tensor.dtype == torch.bfloat16:
            array, dtype = tensor.float().numpy(), DType.BF16
        else:
            array, dtype = tensor.numpy(), dtype_from_torch(tensor.dtype)
        return Value(self.builder.constant(name, array, dtype))

    def parameter(self, path: str) -> Value:
        """The constant holding parameter or buffer `path` (created on first use)."""
        if path not in self._constants:
            if path not in self.tensors:
                raise self.unsupported(f"no parameter or buffer '{path}'")
            self._constants[path] = self.constant(path, self.tensors[path], path in self.learned)
        return self._constants[path]

    def scalar(self, value: float | int | bool, dtype: DType) -> Value:
        key = (float(value), dtype)
        if key not in self._scalar_cache:
            self._scalar_cache[key] = Value(self.builder.op("full", name="scalar", shape=(), value=float(value),
                                                            dtype=dtype))
        return self._scalar_cache[key]

    def cast(self, value: Value, dtype: DType) -> Value:
        return value if self.type(value).dtype is dtype else self.op("cast", value, dtype=dtype)

    def as_value(self, x: Any, dtype: DType) -> Value:
        """A tensor operand of `dtype`: casts IR values, materializes Python scalars."""
        if isinstance(x, Value):
            return self.cast(x, dtype)
        if isinstance(x, (bool, int, float)):
            return self.scalar(x, dtype)
        raise self.unsupported(f"operand {x!r} is neither a tensor nor a scalar")

    def unsupported(self, problem: str) -> UnsupportedError:
        return UnsupportedError(f"{problem} at {node_location(self.node)}")

    def dim(self, dim: int, rank: int) -> int:
        return dim % rank if rank else 0


def check_finite(name: str, tensor: torch.Tensor, learned: bool) -> None:
    """A TccError naming constant `name` if it holds NaN, or +-Inf when it is a `learned`
    parameter (buffers may hold -Inf: additive attention masks)."""
    if not tensor.is_floating_point():
        return
    problem = non_finite((tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy(), inf=learned)
    if problem:
        raise TccError(f"{'parameter' if learned else 'constant'} '{name}' holds {problem}; tcc compiles finite "
                       "weights only")


def is_tensor_like(x: Any) -> bool:
    if isinstance(x, torch.Tensor):
        return True
    if isinstance(x, (tuple, list)):
        return any(is_tensor_like(v) for v in x)
    if isinstance(x, dict):
        return any(is_tensor_like(v) for v in x.values())
    return hasattr(x, "to_tuple")  # Hugging Face ModelOutput


def _map_args(args: Any, env: dict[fx.Node, Any]) -> Any:
    return fx.node.map_arg(args, lambda n: env[n])


def lower_nodes(lowerer: Lowerer, graph: fx.Graph, env: dict[fx.Node, Any],
                convert: Callable[[Lowerer, fx.Node, tuple, dict], Any]) -> list[Any]:
    """Lower every call node of `graph` (placeholders and get_attrs already in `env`);
    return the flat list of output values."""
    outputs: list[Any] = []
    for node in graph.nodes:
        if node in env:
            continue
        lowerer.node = node
        if node.op == "output":
            outputs = list(torch.utils._pytree.tree_leaves(_map_args(node.args[0], env)))
            continue
        example = lowerer.examples.get(node)
        if node.op in ("call_function", "call_method") and example is not None and not is_tensor_like(example):
            env[node] = example  # a static Python value (a size, a dtype, ...)
            continue
        args, kwargs = _map_args(node.args, env), _map_args(node.kwargs, env)
        env[node] = convert(lowerer, node, args, kwargs)
    for value in outputs:
        if not isinstance(value, Value):
            raise TccError(f"graph output {value!r} is not a tensor computed by the model")
    return outputs
