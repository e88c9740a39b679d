"""Graph analyses shared by passes, backends and executors."""

from __future__ import annotations

import collections
import math
import weakref
from typing import Mapping, Sequence

import numpy as np

from .graph import Graph, Op

_NONZEROS: dict[int, tuple[weakref.ref, int]] = {}  # id of a read-only array -> (the array, its count)


def nonzeros(array: np.ndarray) -> int:
    """`np.count_nonzero(array)`; for a read-only array (a graph's constants are frozen) counted
    once and remembered while the array lives: select-format, the cost model and the report all
    ask of every weight."""
    if array.flags.writeable:
        return int(np.count_nonzero(array))
    key = id(array)
    known = _NONZEROS.get(key)
    if known is not None and known[0]() is array:
        return known[1]
    count = int(np.count_nonzero(array))
    _NONZEROS[key] = (weakref.ref(array, lambda _ref, key=key: _NONZEROS.pop(key, None)), count)
    return count


def last_uses(graph: Graph, at: Mapping[int, int] | None = None) -> dict[int, tuple[str, ...]]:
    """For each op index, the op-result and input values whose last use is that op (so an
    executor may free them right after it). Graph outputs are never freed. `at`: op indices
    whose operands an executor reads at another index (ops it runs later, together)."""
    last: dict[str, int] = {}
    for index, op in enumerate(graph.ops):
        for operand in op.operands:
            last[operand] = max(last.get(operand, -1), at.get(index, index) if at else index)
    keep = set(graph.outputs) | set(graph.constant_names)
    freed: dict[int, list[str]] = {}
    for name, index in last.items():
        if name not in keep:
            freed.setdefault(index, []).append(name)
    return {index: tuple(sorted(names)) for index, names in freed.items()}


def non_finite(array: np.ndarray, *, inf: bool = True) -> str | None:
    """How a float `array` holds NaN (or, with `inf`, +-Inf), e.g. `3 non-finite values of
    1,024 (nan at index [1, 2])`; None when it holds none."""
    array = np.asarray(array)
    with np.errstate(over="ignore", invalid="ignore"):
        if array.dtype.kind != "f" or np.isfinite(array.sum()):  # a finite sum: all finite
            return None
    bad = np.isnan(array) | np.isinf(array) if inf else np.isnan(array)
    count = int(bad.sum())
    if not count:
        return None
    first = np.unravel_index(int(bad.argmax()), array.shape)
    return (f"{count} non-finite value{'s' * (count > 1)} of {array.size:,} "
            f"({float(array[first])} at index {[int(i) for i in first]})")


def live_values(graph: Graph, roots: Sequence[str] | None = None) -> set[str]:
    """Values that contribute to an output (what dead-code elimination keeps), or to `roots`."""
    producer = graph.producer()
    live, stack = set(), list(graph.outputs if roots is None else roots)
    while stack:
        name = stack.pop()
        if name in live:
            continue
        live.add(name)
        if name in producer:
            stack.extend(producer[name].operands)
    return live


def op_flops(op: Op, types: dict) -> int:
    """FLOPs of one op: multiply-accumulates counted as 2 for linear, matmul, attention and
    convolution; one per output element for elementwise ops, 5 per element for norms and
    softmax; 0 for data movement."""
    t = op.type
    if op.kind == "linear":
        return 2 * t.numel * types[op.operands[1]].shape[1]
    if op.kind == "matmul":
        return 2 * t.numel * types[op.operands[0]].shape[-1]
    if op.kind == "scaled_dot_product_attention":
        q, k = types[op.operands[0]], types[op.operands[1]]
        scores = t.numel // t.shape[-1] * k.shape[-2]
        return 2 * scores * q.shape[-1] + 2 * t.numel * k.shape[-2] + 5 * scores
    if op.kind in ("conv1d", "conv2d"):
        return 2 * t.numel * math.prod(types[op.operands[1]].shape[1:])
    if op.kind in ("softmax", "layer_norm", "rms_norm", "batch_norm", "group_norm", "int_softmax", "int_layer_norm"):
        return 5 * t.numel
    if op.kind in ("mean", "sum", "cumsum"):
        return types[op.operands[0]].numel
    if op.kind in ("add", "sub", "mul", "div", "pow", "maximum", "minimum", "relu", "gelu", "int_gelu",
                   "tanh", "sigmoid", "exp", "sqrt", "rsqrt", "erf", "neg", "abs", "sign", "floor", "ceil", "log",
                   "cos", "sin", "silu"):
        return t.numel
    return 0


def flops(graph: Graph) -> int:
    """The graph's FLOPs (`op_flops` summed)."""
    types = graph.types
    return sum(op_flops(op, types) for op in graph.ops)


def describe(graph: Graph) -> dict:
    """A summary for `tcc inspect`: ops by kind, parameters, FLOPs, bytes, and per constant (per
    layer, for weights) its name, shape, dtype, encoding, structure (the pruning guarantee),
    sparsity (fraction of zeros), stored bytes in its encoding, dense bytes and their ratio."""
    constants = []
    for name, t in graph.constants:
        array = graph.weights[name]
        sparsity = float(1.0 - nonzeros(array) / array.size) if array.size else 0.0
        stored = -(-t.encoding.footprint(array, t.dtype)[0] // 8)  # = the encoded size, without encoding
        constants.append({"name": name, "shape": list(t.shape), "dtype": t.dtype.value,
                          "encoding": str(t.encoding).lstrip("#"),
                          "structure": str(t.sparsity).lstrip("~") if t.sparsity else "-", "sparsity": round(sparsity, 6),
                          "bytes": stored, "dense_bytes": t.dense_bytes,
                          "ratio": round(stored / t.dense_bytes, 4) if t.dense_bytes else 1.0})
    float_params = sum(t.numel for _, t in graph.constants if t.dtype.is_float)
    stored, dense = sum(c["bytes"] for c in constants), sum(c["dense_bytes"] for c in constants)
    return {
        "graph": graph.name,
        "inputs": [{"name": n, "type": str(t)} for n, t in graph.inputs],
        "outputs": [{"name": n, "type": str(t)} for n, t in zip(graph.outputs, graph.output_types)],
        "state": [{"input": s.input, "output": graph.outputs[s.output], "role": s.role.value, "layer": s.layer,
                   "seq_dim": s.seq_dim} for s in graph.state],
        "ops": dict(sorted(collections.Counter(op.kind for op in graph.ops).items())),
        "num_ops": len(graph.ops),
        "params": float_params,
        "flops": flops(graph),
        "bytes": stored,
        "dense_bytes": dense,
        "ratio": round(stored / dense, 4) if dense else 1.0,
        "constants": constants,
    }
