"""The IR graph: SSA values produced by ops from the op table, graph inputs, and named
constants (weights) held as read-only numpy arrays beside the graph."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import numpy as np

from .dtypes import DType
from .encoding import EncodedTensor
from .errors import VerifyError
from .ops import OPS, OpTypeError
from .printer import print_graph
from .state import State
from .types import TensorType

if TYPE_CHECKING:
    import networkx as nx

NAME = re.compile(r"[A-Za-z0-9_.]+")  # what the text form spells after % and @


@dataclass(frozen=True)
class Op:
    """`result = kind(operands...) {attrs} : type`; attrs are normalized by the op table."""

    kind: str
    result: str
    operands: tuple[str, ...]
    attrs: tuple[tuple[str, Any], ...]
    type: TensorType

    def attr(self, key: str) -> Any:
        for k, v in self.attrs:
            if k == key:
                return v
        raise KeyError(f"{self.kind} has no attribute '{key}'")

    @property
    def attr_dict(self) -> dict[str, Any]:
        return dict(self.attrs)


def _freeze(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if array.flags.writeable:
        array = array.copy()
        array.flags.writeable = False
    return array


@dataclass(frozen=True)
class Graph:
    """An immutable graph. Passes build new graphs with `replace` or a `GraphBuilder`."""

    name: str
    inputs: tuple[tuple[str, TensorType], ...]
    constants: tuple[tuple[str, TensorType], ...]
    ops: tuple[Op, ...]
    outputs: tuple[str, ...]
    weights: Mapping[str, np.ndarray] = field(default_factory=dict, compare=False, repr=False)
    # constants as read from storage in their encodings (artifact load), so executors compute
    # on them without re-encoding; a cache of `encoded`, never a second source of values
    stored: Mapping[str, EncodedTensor] = field(default_factory=dict, compare=False, repr=False)
    # inputs carried to the next run as outputs (a decoder's KV cache); see `tcc.ir.state`
    state: tuple[State, ...] = ()

    def replace(self, **changes) -> "Graph":
        """A copy with `changes`; stored encodings survive only for weights left untouched."""
        if "weights" in changes and self.stored:
            new = changes["weights"]
            changes.setdefault("stored", {k: v for k, v in self.stored.items() if new.get(k) is self.weights.get(k)})
        return dataclasses.replace(self, **changes)

    def encoded(self, name: str) -> EncodedTensor:
        """Constant `name` in the encoding its type names (the stored form when there is one)."""
        type_ = dict(self.constants)[name]
        enc = self.stored.get(name)
        if enc is not None and (enc.encoding, enc.shape, enc.dtype) == (type_.encoding, type_.shape, type_.dtype):
            return enc
        return type_.encoding.encode(self.weights[name], type_.dtype)

    # -- look-ups ---------------------------------------------------------------------------
    @property
    def types(self) -> dict[str, TensorType]:
        """The type of every named value: inputs, constants and op results."""
        table = dict(self.inputs)
        table.update(self.constants)
        table.update((op.result, op.type) for op in self.ops)
        return table

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.inputs)

    @property
    def constant_names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.constants)

    @property
    def user_inputs(self) -> tuple[str, ...]:
        """The inputs that are not state: what the model's caller passes (state comes after them)."""
        return self.input_names[:len(self.inputs) - len(self.state)]

    def initial_state(self) -> dict[str, np.ndarray]:
        """Each state input's value before the first step: zeros (an empty cache)."""
        types = dict(self.inputs)
        return {s.input: np.zeros(types[s.input].shape, types[s.input].dtype.numpy) for s in self.state}

    @property
    def user_outputs(self) -> tuple[str, ...]:
        """The outputs that are not a state's next value: what the model returns to its caller."""
        return self.outputs[:len(self.outputs) - len(self.state)]

    @property
    def output_types(self) -> tuple[TensorType, ...]:
        types = self.types
        return tuple(types[n] for n in self.outputs)

    def producer(self) -> dict[str, Op]:
        return {op.result: op for op in self.ops}

    def users(self) -> dict[str, list[Op]]:
        table: dict[str, list[Op]] = {name: [] for name in self.types}
        for op in self.ops:
            for operand in op.operands:
                table.setdefault(operand, []).append(op)
        return table

    def same_as(self, other: "Graph") -> bool:
        """Structural equality plus equal weights (bit for bit)."""
        return self == other and set(self.weights) == set(other.weights) and all(
            self.weights[k].dtype == other.weights[k].dtype
            and np.array_equal(self.weights[k], other.weights[k], equal_nan=True) for k in self.weights)

    def to_networkx(self) -> nx.DiGraph:
        """Value-level dataflow graph: nodes are value names (attribute `kind`: input, const or
        the op name), edges go from operand to result."""
        import networkx as nx  # on first use: importing it takes longer than all of tcc.ir
        g = nx.DiGraph()
        for name, t in self.inputs:
            g.add_node(name, kind="input", type=t)
        for name, t in self.constants:
            g.add_node(name, kind="const", type=t)
        for op in self.ops:
            g.add_node(op.result, kind=op.kind, type=op.type, op=op)
            for operand in op.operands:
                g.add_edge(operand, op.result)
        return g

    def __str__(self) -> str:
        return print_graph(self)


class GraphBuilder:
    """Builds a graph op by op, inferring each result type from the op table.

    >>> b = GraphBuilder("g"); x = b.input("x", tensor((2, 3)))
    >>> y = b.op("relu", x); g = b.finish([y])
    """

    def __init__(self, name: str = "main"):
        self.name = name
        self._inputs: list[tuple[str, TensorType]] = []
        self._constants: dict[str, TensorType] = {}
        self._weights: dict[str, np.ndarray] = {}
        self._ops: list[Op] = []
        self._types: dict[str, TensorType] = {}
        self._counter = 0

    def fresh(self, hint: str = "v") -> str:
        """A value name not yet used, derived from `hint`."""
        hint = re.sub(r"[^A-Za-z0-9_.]", "_", hint) or "v"
        if not re.match(r"[A-Za-z_]", hint):
            hint = "v" + hint
        name = hint
        while name in self._types:
            self._counter += 1
            name = f"{hint}_{self._counter}"
        return name

    def type_of(self, name: str) -> TensorType:
        return self._types[name]

    def input(self, name: str, type_: TensorType) -> str:
        name = self.fresh(name)
        self._inputs.append((name, type_))
        self._types[name] = type_
        return name

    def constant(self, name: str, array: np.ndarray, dtype: DType | None = None) -> str:
        array = np.asarray(array)
        dtype = dtype or DType.from_numpy(array.dtype)
        name = self.fresh(name)
        type_ = TensorType(tuple(int(d) for d in array.shape), dtype)
        self._constants[name] = type_
        self._weights[name] = _freeze(array.astype(dtype.numpy, copy=False))
        self._types[name] = type_
        return name

    def op(self, kind: str, *operands: str, name: str | None = None, **attrs: Any) -> str:
        if kind not in OPS:
            raise VerifyError(f"unknown op '{kind}'")
        opdef = OPS[kind]
        try:
            normalized = opdef.normalize_attrs(attrs)
            result_type = opdef.infer([self._types[o] for o in operands], dict(normalized))
        except (ValueError, OpTypeError) as e:
            raise VerifyError(f"{kind}: {e}") from None
        result = self.fresh(name or kind)
        self._ops.append(Op(kind, result, tuple(operands), normalized, result_type))
        self._types[result] = result_type
        return result

    def finish(self, outputs: Iterable[str]) -> Graph:
        return Graph(self.name, tuple(self._inputs), tuple(self._constants.items()), tuple(self._ops),
                     tuple(outputs), dict(self._weights))


def freeze_weights(weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Read-only copies of `weights`, as graphs hold them."""
    return {k: _freeze(v) for k, v in weights.items()}
