"""The verifier: rejects ill-formed or ill-typed graphs with a message naming the op."""

from __future__ import annotations

import numpy as np

from .dtypes import DType
from .encoding import DENSE
from .errors import VerifyError
from .graph import NAME, Graph, Op
from .ops import OPS, OpTypeError
from .types import TensorType

MAX_VALUE_BYTES = 1 << 34  # 16 GiB: a value (or attention's scores) larger than this is an edit or a typo, not a model


def verify(graph: Graph) -> Graph:
    """Check SSA form, every op's operands, attributes and type, the outputs and the weights,
    and that no input or op needs more than `MAX_VALUE_BYTES` at run time. Returns the graph
    so calls chain; raises `VerifyError` on the first problem."""
    defined: dict = {}
    if not NAME.fullmatch(graph.name):
        raise VerifyError(f"graph name '{graph.name}' is not a valid name ([A-Za-z0-9_.]+)")

    def define(name: str, type_, what: str) -> None:
        if not NAME.fullmatch(name):
            raise VerifyError(f"{what} name '{name}' is not a valid name ([A-Za-z0-9_.]+)")
        if name in defined:
            raise VerifyError(f"{what} '{name}' is defined twice")
        defined[name] = type_

    for name, t in graph.inputs:
        define(name, t, "input")
        _check_size(f"input '{name}'", t.dense_bytes)
    for name, t in graph.constants:
        define(name, t, "constant")
        _check_weight(graph, name, t)
    for op in graph.ops:
        where = f"op %{op.result} = {op.kind}"
        opdef = OPS.get(op.kind)
        if opdef is None:
            raise VerifyError(f"{where}: unknown op '{op.kind}'")
        for operand in op.operands:
            if operand not in defined:
                raise VerifyError(f"{where}: operand '{operand}' is not defined before use")
        try:
            normalized = opdef.normalize_attrs(dict(op.attrs))
            if normalized != op.attrs:
                raise ValueError("attributes are not in normalized form")
            inferred = opdef.infer([defined[o] for o in op.operands], dict(op.attrs))
        except (ValueError, OpTypeError) as e:
            raise VerifyError(f"{where}: {e}") from None
        if (inferred.shape, inferred.dtype) != (op.type.shape, op.type.dtype):
            raise VerifyError(f"{where}: result declared {op.type} but operands give "
                              f"{inferred.dtype}[{','.join(map(str, inferred.shape))}]")
        define(op.result, op.type, where + ": result")
        _check_size(where, _run_time_bytes(op, defined))
    if not graph.outputs:
        raise VerifyError("graph has no outputs")
    for name in graph.outputs:
        if name not in defined:
            raise VerifyError(f"output '{name}' is not defined")
    _check_state(graph)
    extra = set(graph.weights) - set(graph.constant_names)
    if extra:
        raise VerifyError(f"weight '{sorted(extra)[0]}' has no constant declaration")
    return graph


def _check_state(graph: Graph) -> None:
    """Each state pairs a distinct input with a distinct output of its type, both after the
    caller's inputs and outputs; a cache's `seq_dim` is within its rank."""
    inputs, seen_inputs, seen_outputs = dict(graph.inputs), set(), set()
    types = graph.types
    first_input, first_output = len(graph.inputs) - len(graph.state), len(graph.outputs) - len(graph.state)
    for s in graph.state:
        where = f"state '{s.input}'"
        if s.input not in inputs:
            raise VerifyError(f"{where} is not a graph input")
        if graph.input_names.index(s.input) < first_input:
            raise VerifyError(f"{where}: state inputs come after the caller's inputs")
        if not first_output <= s.output < len(graph.outputs):
            raise VerifyError(f"{where}: output {s.output} is not among the graph's last {len(graph.state)} "
                              f"of {len(graph.outputs)} outputs (state outputs come after the caller's)")
        if s.input in seen_inputs or s.output in seen_outputs:
            raise VerifyError(f"{where}: its input or output {s.output} is another state's too")
        seen_inputs.add(s.input)
        seen_outputs.add(s.output)
        before, after = inputs[s.input], types[graph.outputs[s.output]]
        if (before.shape, before.dtype) != (after.shape, after.dtype):
            raise VerifyError(f"{where} is {before} before a step and {after} after it (output {s.output})")
        if s.seq_dim is not None and not 0 <= s.seq_dim < before.rank:
            raise VerifyError(f"{where}: seq_dim {s.seq_dim} is outside its rank {before.rank}")
        if s.layer is not None and s.layer < 0:
            raise VerifyError(f"{where}: layer {s.layer} is negative")
    if graph.state and first_output == 0:
        raise VerifyError("every output of the graph is state: a step returns nothing to its caller")


def _run_time_bytes(op: Op, defined: dict[str, TensorType]) -> int:
    """The largest array executing `op` materialises: its result, or attention's scores."""
    t = op.type
    if op.kind == "scaled_dot_product_attention" and t.numel:
        scores = t.numel // t.shape[-1] * defined[op.operands[1]].shape[-2]  # [..., queries, keys]
        return max(t.dense_bytes, (scores * t.dtype.bits + 7) // 8)
    return t.dense_bytes


def _check_size(where: str, size: int) -> None:
    """Executors allocate every value: refuse one beyond the budget before anything runs."""
    if size > MAX_VALUE_BYTES:
        raise VerifyError(f"{where}: needs {size:,} bytes at run time; a value may take at most "
                          f"{MAX_VALUE_BYTES:,} (16 GiB)")


def _check_weight(graph: Graph, name: str, t) -> None:
    array = graph.weights.get(name)
    if array is None:
        raise VerifyError(f"constant '{name}' has no weight")
    if tuple(array.shape) != t.shape:
        raise VerifyError(f"constant '{name}': weight shape {list(array.shape)} differs from declared {t}")
    if array.dtype != t.dtype.numpy:
        raise VerifyError(f"constant '{name}': weight dtype {array.dtype} is not the storage of {t.dtype}")
    if t.dtype is DType.B1 and array.size and not np.all(np.abs(array) == 1):
        raise VerifyError(f"constant '{name}': b1 weight holds values other than +1/-1")
    if t.encoding != DENSE:
        problem = ("it encodes rank-2 tensors" if t.encoding.rank2 and t.rank != 2
                   else t.encoding.violation(array, t.dtype))
        if problem:
            raise VerifyError(f"constant '{name}' cannot be stored as {t.encoding}: {problem}")
    if t.sparsity is not None and (problem := t.sparsity.violation(array)):
        raise VerifyError(f"constant '{name}' breaks its sparsity structure {t.sparsity}: {problem}")
    bounds = t.dtype.value_range
    if t.dtype is DType.I4 and array.size and (array.min() < bounds[0] or array.max() > bounds[1]):
        raise VerifyError(f"constant '{name}': i4 weight holds values outside [{bounds[0]}, {bounds[1]}]")
