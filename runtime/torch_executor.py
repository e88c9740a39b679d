"""The torch executor: the graph as a differentiable `nn.Module` on the CPU or a CUDA device.

Float weights are `nn.Parameter`s (frozen unless `trainable=True`), so later passes can
fine-tune the IR's own weights through it; other weights are buffers.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tcc.ir.analysis import last_uses
from tcc.ir.dtypes import DType
from tcc.ir.errors import TccError
from tcc.ir.graph import Graph
from tcc.ir.ops import OPS

TORCH_DTYPES: dict[DType, torch.dtype] = {
    DType.F64: torch.float64, DType.F32: torch.float32, DType.F16: torch.float16, DType.BF16: torch.bfloat16, DType.I64: torch.int64,
    DType.I32: torch.int32, DType.I16: torch.int16, DType.I8: torch.int8, DType.I4: torch.int8,
    DType.B1: torch.int8, DType.BOOL: torch.bool,
}


def dtype_from_torch(dtype: torch.dtype) -> DType:
    for ir_dtype in (DType.F64, DType.F32, DType.F16, DType.BF16, DType.I64, DType.I32, DType.I16, DType.I8, DType.BOOL):
        if TORCH_DTYPES[ir_dtype] == dtype:
            return ir_dtype
    raise TccError(f"no IR dtype for torch dtype {dtype}")


def _slice(x, dim, start, end, step):
    index = [slice(None)] * x.dim()
    index[dim] = slice(start, end, step)
    return x[tuple(index)]


def _reduce(fn):
    def kernel(x, dims, keepdim):
        return fn(x, dim=dims or tuple(range(x.dim())), keepdim=keepdim)
    return kernel


def _cast(x, dtype: DType):
    if dtype is DType.BOOL:
        return x != 0
    return x.to(TORCH_DTYPES[dtype])


# Kernels keyed by op name. Ops that create tensors take the device as `device=`.
TORCH_KERNELS: dict[str, Callable[..., torch.Tensor]] = {
    "linear": F.linear,
    "matmul": torch.matmul,
    "add": torch.add,
    "sub": torch.sub,
    "mul": torch.mul,
    "div": torch.div,
    "pow": torch.pow,
    "maximum": torch.maximum,
    "minimum": torch.minimum,
    "eq": torch.eq,
    "ne": torch.ne,
    "lt": torch.lt,
    "le": torch.le,
    "gt": torch.gt,
    "ge": torch.ge,
    "logical_and": torch.logical_and,
    "logical_or": torch.logical_or,
    "logical_not": torch.logical_not,
    "neg": torch.neg,
    "relu": torch.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "exp": torch.exp,
    "sqrt": torch.sqrt,
    "rsqrt": torch.rsqrt,
    "erf": torch.erf,
    "gelu": lambda x, approximate: F.gelu(x, approximate=approximate),
    "softmax": lambda x, dim: torch.softmax(x, dim),
    "layer_norm": lambda x, w=None, b=None, *, normalized_shape, eps: F.layer_norm(x, normalized_shape, w, b, eps),
    "embedding": lambda w, idx: F.embedding(idx, w),
    "gather": lambda x, idx, dim: torch.gather(x, dim, idx),
    "reshape": lambda x, shape: x.reshape(shape),
    "permute": lambda x, dims: x.permute(dims),
    "transpose": lambda x, dim0, dim1: x.transpose(dim0, dim1),
    "slice": _slice,
    "select": lambda x, dim, index: x.select(dim, index),
    "unsqueeze": lambda x, dim: x.unsqueeze(dim),
    "squeeze": lambda x, dims: x.squeeze(dims) if dims else x,
    "expand": lambda x, shape: x.expand(shape),
    "cat": lambda *xs, dim: torch.cat(xs, dim),
    "mean": _reduce(torch.mean),
    "sum": lambda x, dims, keepdim: torch.sum(x, dim=dims or tuple(range(x.dim())), keepdim=keepdim, dtype=x.dtype),
    "any": _reduce(torch.any),
    "index": lambda x, *indices: x[indices],
    "where": torch.where,
    "arange": lambda start, end, step, dtype, device: torch.arange(start, end, step, dtype=TORCH_DTYPES[dtype],
                                                                    device=device),
    "full": lambda shape, value, dtype, device: torch.full(shape, value, dtype=TORCH_DTYPES[dtype], device=device),
    "scaled_dot_product_attention": lambda q, k, v, mask=None, *, is_causal, scale: F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale),
    "conv2d": lambda x, w, b=None, *, stride, padding, dilation, groups: F.conv2d(x, w, b, stride, padding,
                                                                                  dilation, groups),
    "cast": _cast,
}
_CREATES_TENSORS = {"arange", "full"}


def resolve_device(on: str) -> torch.device:
    """'cpu' or 'gpu' (the first CUDA device) as a torch device; a clear error when absent."""
    if on == "cpu":
        return torch.device("cpu")
    if on == "gpu":
        if not torch.cuda.is_available():
            raise TccError("--on gpu: no CUDA device is available on this machine")
        return torch.device("cuda")
    raise TccError(f"unknown executor '{on}' (choose cpu, gpu or numpy)")


class TorchExecutor(nn.Module):
    """`TorchExecutor(graph, device)(*tensors) -> tuple of tensors`; differentiable."""

    def __init__(self, graph: Graph, device: torch.device | str = "cpu", trainable: bool = False):
        super().__init__()
        self.graph = graph
        self.device_ = torch.device(device)
        self.weights = nn.ParameterDict()
        self._buffer_names: dict[str, str] = {}
        self._param_names: dict[str, str] = {}
        for index, (name, t) in enumerate(graph.constants):
            tensor = torch.from_numpy(np.array(graph.weights[name])).to(TORCH_DTYPES[t.dtype])
            tensor = tensor.to(self.device_)
            key = f"c{index}"
            if t.dtype.is_float:
                self.weights[key] = nn.Parameter(tensor, requires_grad=trainable)
                self._param_names[name] = key
            else:
                self.register_buffer(key, tensor, persistent=False)
                self._buffer_names[name] = key
        self._program = self._compile()

    def _compile(self) -> list[tuple[Callable, tuple[int, ...], dict[str, Any], int, tuple[int, ...]]]:
        slots = {name: i for i, name in enumerate(list(self.graph.input_names) + list(self.graph.constant_names))}
        for op in self.graph.ops:
            slots[op.result] = len(slots)
        self._slots = slots
        frees = last_uses(self.graph)
        constants = set(self.graph.constant_names)
        program = []
        for index, op in enumerate(self.graph.ops):
            kwargs = op.attr_dict
            if op.kind in _CREATES_TENSORS:
                kwargs["device"] = self.device_
            program.append((TORCH_KERNELS[op.kind], tuple(slots[o] for o in op.operands), kwargs, slots[op.result],
                            tuple(slots[n] for n in frees.get(index, ()) if n not in constants)))
        return program

    def constant(self, name: str) -> torch.Tensor:
        """The tensor holding constant `name` (a Parameter for float weights)."""
        if name in self._param_names:
            return self.weights[self._param_names[name]]
        return getattr(self, self._buffer_names[name])

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        env: list[Any] = [None] * len(self._slots)
        for i, value in enumerate(inputs):
            env[i] = value
        base = len(inputs)
        for i, name in enumerate(self.graph.constant_names):
            env[base + i] = self.constant(name)
        for kernel, operands, kwargs, result, frees in self._program:
            env[result] = kernel(*[env[o] for o in operands], **kwargs)
            for slot in frees:
                env[slot] = None
        return tuple(env[self._slots[name]] for name in self.graph.outputs)

    def weights_to_numpy(self) -> dict[str, np.ndarray]:
        """The current constants (e.g. after fine-tuning) as numpy arrays in IR storage dtypes."""
        out = {}
        for name, t in self.graph.constants:
            tensor = self.constant(name).detach().to("cpu")
            out[name] = (tensor.float() if t.dtype is DType.BF16 else tensor).numpy().astype(t.dtype.numpy)
        return out

    def run(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Inference: inputs moved to the executor's device, no autograd."""
        with torch.inference_mode():
            return self(*(x.to(self.device_) for x in inputs))
