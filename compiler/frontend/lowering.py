"""Lowering of torch.fx graphs (from torch.export or torch.fx.symbolic_trace) to tcc IR.

Every fx node is lowered by a converter from `converters.CONVERTERS`. Tensors become IR
values (`Value`); non-tensor node results (sizes, dtypes, tuples of ints) are carried as
Python values, since shapes are static. Example values per node come from
`node.meta['val']` (torch.export) or from running the graph once (symbolic_trace).

Constant subgraphs are evaluated first (`fold_node`): an op whose tensor operands are all
constants (parameters, buffers, constants, results of such ops) and whose other operands are
static is computed in torch and enters the IR as a named constant, whether or not a converter
exists for it: rotary tables (cos / sin of positions x frequencies), relative-position buckets
(abs, log, clamp of aranges), split sizes, interpolated biases, position ids of a static shape.
Left to the IR: ops that draw random numbers, mutate or allocate uninitialized memory, layout
ops of a learned parameter (the passes find a linear's weight by its parameter's name; their
values are known, so what is computed from them alone still folds), and results much larger
than their operands (an expanded mask stays an `expand`).
"""

from __future__ import annotations

import operator
import os
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
    """What the frontend cannot lower; `missing` when only ops without any converter are to
    blame (a converter that refuses its arguments is not missing: it says what it got)."""

    def __init__(self, message: str, missing: bool = False):
        super().__init__(message)
        self.missing = missing


_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_FAILED = object()  # the value of a node that could not be lowered (and of every node computed from it)


def module_path(node: fx.Node) -> str:
    """The path of the module whose forward made `node` (`''`: the root, or not recorded)."""
    stack = node.meta.get("nn_module_stack")
    return list(stack.values())[-1][0] if stack else ""


def user_call(node: fx.Node) -> str | None:
    """What the model's source called to make `node`, when torch.export recorded it and it is
    not the node's own op: `Tensor.split` for `split_with_sizes`, `F.softplus` for the `log1p`
    of its decomposition."""
    recorded = node.meta.get("torch_fn")
    if not recorded or "." not in recorded[1]:
        return None
    kind, name = recorded[1].rsplit(".", 1)
    own = node.target.overloadpacket.__name__ if isinstance(node.target, torch._ops.OpOverload) else str(node.target)
    if name in (own, own.rstrip("_")) or not name.isidentifier():
        return None
    homes = {"method_descriptor": ("Tensor",), "builtin_function_or_method": ("torch", "F"),
             "function": ("F", "Tensor", "torch")}.get(kind, ())
    objects = {"Tensor": torch.Tensor, "torch": torch, "F": torch.nn.functional}
    return next((f"{home}.{name}" for home in homes if hasattr(objects[home], name)), name)


def node_location(node: fx.Node) -> str:
    """`node 'name' (Tensor.split, module a.b.c, file.py:LINE)` from what fx recorded about the
    node: the user's call where the node's op is another, the module and the model's line."""
    parts = [f"node '{node.name}'"]
    call = user_call(node)
    if call:
        parts.append(call)
    path = module_path(node)
    if path:
        parts.append(f"module {path}")
    trace = node.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+)', trace)
    frames = [f for f in frames if not f[0].startswith(_TORCH_DIR)] or frames  # the model's line, not torch's
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
        self.known: dict[Value, torch.Tensor] = {}  # the tensors of constant values, for folding
        self._learned_values: set[Value] = set()  # constants of learned parameters
        self._learned_layouts: set[Value] = set()  # layout ops of them
        self.layout_values: dict[fx.Node, torch.Tensor] = {}  # a layout op of them, evaluated, not yet lowered

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
        value = Value(self.builder.constant(name, array, dtype))
        self.known[value] = tensor
        if learned:
            self._learned_values.add(value)
        return value

    def learned_value(self, value: Value) -> bool:
        """Whether `value` is the constant of a learned parameter, or a layout op of one."""
        return value in self._learned_values or value in self._learned_layouts

    def parameter_constant(self, value: Value) -> bool:
        """Whether `value` is the constant of a learned parameter itself."""
        return value in self._learned_values

    def learned_layout(self, value: Value) -> None:
        """`value` is a layout op of a learned parameter (a view of it, kept as an op)."""
        self._learned_layouts.add(value)

    def parameter(self, path: str) -> Value:
        """The constant holding parameter or buffer `path` (created on first use)."""
        if path not in self._constants:
            if path not in self.tensors:
                raise self.unsupported(f"no parameter or buffer '{path}'")
            self._constants[path] = self.constant(path, self.tensors[path], path in self.learned)
        return self._constants[path]

    def derived(self, name: str, make: Callable[[], torch.Tensor]) -> Value:
        """The constant `name` of a learned tensor computed from parameters (`make`), made once."""
        if name not in self._constants:
            self._constants[name] = self.constant(name, make(), learned=True)
        return self._constants[name]

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

    def unsupported(self, problem: str, missing: bool = False) -> UnsupportedError:
        return UnsupportedError(f"{problem} at {node_location(self.node)}", missing)

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


# ops that only relabel their operand's elements: on a learned parameter they stay IR ops, so
# that the parameter keeps its name (and a linear its weight) for the compression passes
_LAYOUT = frozenset({"view", "_unsafe_view", "reshape", "permute", "t", "transpose", "expand", "unsqueeze", "squeeze",
                     "contiguous", "clone", "alias", "detach", "slice", "select", "flatten", "unflatten"})
# ops whose result is uninitialized memory (a decomposition fills it later): never values to fold
_UNINITIALIZED = frozenset({"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided",
                            "empty_permuted"})
FOLD_GROWTH = 1 << 20  # a folded result may hold this many elements more than its operands


def _evaluate(lowerer: Lowerer, node: fx.Node, args: tuple, kwargs: dict) -> tuple[str, Any] | None:
    """(op name, torch result) of `node` evaluated ahead when its tensor operands are all
    constants (`Lowerer.known`) and it is safe to: None otherwise."""
    target = node.target
    if node.op not in ("call_function", "call_method") or target is operator.getitem:
        return None
    leaves = torch.utils._pytree.tree_leaves((args, kwargs))
    values = [leaf for leaf in leaves if isinstance(leaf, Value)]
    if any(v not in lowerer.known for v in values) or any(isinstance(leaf, fx.Node) for leaf in leaves):
        return None
    if isinstance(target, torch._ops.OpOverload):  # torch.export
        if torch.Tag.nondeterministic_seeded in target.tags or target._schema.is_mutable:
            return None
        name = target.overloadpacket.__name__
        if name in _UNINITIALIZED:
            return None
    else:  # symbolic_trace: torch functions and tensor methods
        name = target if node.op == "call_method" else getattr(target, "__name__", "")
        module = "torch" if node.op == "call_method" else getattr(target, "__module__", "") or ""
        if not module.startswith(("torch", "math", "_operator")) or name.endswith("_") or name in _UNINITIALIZED or \
                name.startswith(("rand", "normal", "bernoulli", "dropout", "manual_seed", "uniform", "exponential")):
            return None
    tensors = {v: lowerer.known[v] for v in values}
    real_args, real_kwargs = torch.utils._pytree.tree_map(lambda x: tensors[x] if isinstance(x, Value) else x,
                                                          (args, kwargs))
    function = (lambda this, *rest, **kw: getattr(this, target)(*rest, **kw)) if node.op == "call_method" else target
    try:
        with torch.no_grad():
            result = function(*real_args, **real_kwargs)
    except Exception:  # noqa: BLE001 - not evaluable ahead: the converter decides
        return None
    results = result if isinstance(result, (tuple, list)) else (result,)
    if not results or not all(isinstance(r, torch.Tensor) for r in results):
        return None
    if sum(r.numel() for r in results) > FOLD_GROWTH + sum(t.numel() for t in tensors.values()):
        return None
    return name, result


def _layout_of_learned(lowerer: Lowerer, name: str, args: tuple, kwargs: dict) -> bool:
    leaves = torch.utils._pytree.tree_leaves((args, kwargs))
    return name in _LAYOUT and any(isinstance(v, Value) and lowerer.learned_value(v) for v in leaves)


def fold_node(lowerer: Lowerer, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    """`node` evaluated in torch when its tensor operands are all constants (`Lowerer.known`):
    its result as named constants (a tuple of them for several results); None when it is not
    constant, not safe to evaluate ahead, would grow much larger than its operands, or is a
    layout op of a learned parameter (see `know_layout`)."""
    evaluated = _evaluate(lowerer, node, args, kwargs)
    if evaluated is None:
        return None
    if _layout_of_learned(lowerer, evaluated[0], args, kwargs):
        if isinstance(evaluated[1], torch.Tensor):
            lowerer.layout_values[node] = evaluated[1]  # for `know_layout`, once the converter lowered it
        return None
    result, path = evaluated[1], module_path(node)
    name = f"{path}.{node.name}" if path else node.name  # `encoder.pos_conv.conv._weight_norm`
    folded = tuple(lowerer.constant(name, r) for r in (result if isinstance(result, (tuple, list)) else (result,)))
    return folded if isinstance(result, (tuple, list)) else folded[0]


def know_layout(lowerer: Lowerer, node: fx.Node, lowered: Any) -> None:
    """A layout op of a learned parameter stays an op (the parameter keeps its name, a linear
    its weight), but its value, computed by `fold_node`, is known, so that what is computed from
    it alone still folds (an interpolated position-bias table)."""
    value = lowerer.layout_values.pop(node, None)
    if value is not None and isinstance(lowered, Value) and lowered not in lowerer.known:
        lowerer.known[lowered] = value
        lowerer.learned_layout(lowered)


def _problems(problems: dict[str, list[UnsupportedError]]) -> str:
    """One line naming every unsupported op: its first node (with module and line) and how many
    more nodes have the same problem."""
    pieces = [str(found[0]) + (f" (and {len(found) - 1} more like it)" if len(found) > 1 else "")
              for found in problems.values()]
    if len(pieces) == 1:
        return pieces[0]
    return f"{len(pieces)} unsupported ops: " + "; ".join(p.removeprefix("unsupported op ") for p in pieces)


def lower_nodes(lowerer: Lowerer, graph: fx.Graph, env: dict[fx.Node, Any],
                convert: Callable[[Lowerer, fx.Node, tuple, dict], Any]) -> list[Any]:
    """Lower every call node of `graph` (placeholders and get_attrs already in `env`);
    return the flat list of output values."""
    outputs: list[Any] = []
    problems: dict[str, list[UnsupportedError]] = {}  # by what is unsupported: every op is reported at once
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
        if any(leaf is _FAILED for leaf in torch.utils._pytree.tree_leaves((args, kwargs))):
            env[node] = _FAILED  # downstream of an unsupported op: not a problem of its own
            continue
        try:
            folded = fold_node(lowerer, node, args, kwargs)
            if folded is None:
                folded = convert(lowerer, node, args, kwargs)
                know_layout(lowerer, node, folded)
            env[node] = folded
        except UnsupportedError as e:
            problems.setdefault(str(e).split(" at node ")[0], []).append(e)
            env[node] = _FAILED
    if problems:
        raise UnsupportedError(_problems(problems), all(e.missing for found in problems.values() for e in found))
    for value in outputs:
        if not isinstance(value, Value):
            raise TccError(f"graph output {value!r} is not a tensor computed by the model")
    return outputs
