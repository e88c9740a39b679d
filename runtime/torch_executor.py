"""The torch executor: the graph as a differentiable `nn.Module` on the CPU or a CUDA device.

Float weights are `nn.Parameter`s (frozen unless `trainable=True`; batch-norm statistics
always), so later passes can fine-tune the IR's own weights through it; other weights are
buffers. A weight stored in a
non-dense encoding and used only as linears' weight computes on its encoding
(`tcc.runtime.encoded_linear`: torch CSR/BSR, XNOR-popcount) unless the executor trains it
or transforms it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import statistics
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tcc.ir.analysis import last_uses
from tcc.ir.dtypes import DType
from tcc.ir.errors import TccError
from tcc.ir.graph import Graph
from tcc.ir.reference import causal_mask

from .encoded_linear import TorchEncodedLinear, accumulator
from .torch_dtypes import TORCH_DTYPES


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


def _exact_float(a: torch.dtype, b: torch.dtype, k: int, device: torch.device) -> torch.dtype:
    """The float type in which a product of integer operands over k terms is exact on CPU and
    CUDA in any summation order: every partial sum is an integer below 2^24 (float32, when
    matmuls run in full float32 precision, no TF32) or 2^53 (float64; i16 x i16 up to k = 2^23)."""
    bound = k * (1 << (torch.iinfo(a).bits - 1)) * (1 << (torch.iinfo(b).bits - 1))
    full_fp32 = torch.get_float32_matmul_precision() == "highest" and not (
        device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32)
    return torch.float32 if bound <= 1 << 24 and full_fp32 else torch.float64


def _linear(x, w, b=None):
    if isinstance(w, TorchEncodedLinear):
        y = w(x)
        if x.is_floating_point():
            return y if b is None else y + b
        acc = TORCH_DTYPES[accumulator(w.x_dtype, w.w_dtype)]
    elif x.is_floating_point():
        return F.linear(x, w, b)
    else:
        acc = torch.int64 if torch.int16 in (x.dtype, w.dtype) else torch.int32
        exact = _exact_float(x.dtype, w.dtype, x.shape[-1], x.device)
        y = F.linear(x.to(exact), w.to(exact)).to(acc if exact is torch.float32 else torch.int64)
    return (y if b is None else y + b).to(acc)


def _quantize(x, dtype: DType, scale, zero_point):
    if dtype is DType.B1:
        return (x >= 0).to(torch.int8) * 2 - 1
    # a divisor tensor on x's device: CUDA turns division by a host scalar into a reciprocal multiply
    q = torch.div(x, torch.tensor(scale, dtype=x.dtype, device=x.device)).round_()
    if zero_point or dtype.bits > 24:  # x's float type holds every integer of the range: exact without float64
        q = q.double().add_(zero_point)
    return q.clamp_(*dtype.value_range).to(TORCH_DTYPES[dtype])


def _dequantize(q, scale, zero_point):
    if zero_point:
        q = q.to(torch.int64) - zero_point
    return q.to(scale.dtype) * scale


def _requantize(acc, multiplier, shift, dtype: DType, scale, zero_point):
    # in place on one int64 buffer: the temporaries of a large batch cost more than the arithmetic
    shift = shift.to(torch.int64)
    p = acc.to(torch.int64, copy=True)  # never acc itself: it may have other users
    p.mul_(multiplier.to(torch.int64)).add_((1 << shift) >> 1).bitwise_right_shift_(shift)
    if zero_point:
        p.add_(zero_point)
    return p.clamp_(*dtype.value_range).to(TORCH_DTYPES[dtype])


def _matmul(a, b):
    if a.is_floating_point() or a.dtype in (torch.int32, torch.int64):
        return torch.matmul(a, b)
    acc = torch.int64 if torch.int16 in (a.dtype, b.dtype) else torch.int32
    exact = _exact_float(a.dtype, b.dtype, a.shape[-1], a.device)
    return torch.matmul(a.to(exact), b.to(exact)).to(acc if exact is torch.float32 else torch.int64).to(acc)


# integer-only nonlinearities: the steps of tcc.ir.reference, in int64, bit for bit

def _round_shift(v, shift: int):
    return (v + ((1 << shift) >> 1)) >> shift


def _int_softmax(x, mask=None, *, multiplier, shift, ln2, b, c, out_bits):
    x = x.to(torch.int64)
    keep = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.expand(x.shape)
    m = torch.where(keep, x, -(1 << 31)).amax(dim=-1, keepdim=True)
    d = torch.where(keep, x - m, 0)
    u = torch.clamp_min(_round_shift(d * multiplier, shift), -31 * ln2)
    z = torch.div(-u, ln2, rounding_mode="floor")
    p = u + z * ln2
    e = torch.where(keep, ((p + b) * (p + b) + c) >> z, 0)
    r = torch.div(torch.full_like(e[..., :1], 1 << 62), e.sum(dim=-1, keepdim=True).clamp_min(1),
                  rounding_mode="floor")
    y = _round_shift(e * r, 62 - out_bits).clamp(0, (1 << out_bits) - 1)
    return y.to(torch.int8 if out_bits <= 7 else torch.int16)


def _int_gelu(x, *, multiplier, shift, clip, one, out_multiplier, out_shift, dtype: DType, scale):
    x = x.to(torch.int64)
    u = _round_shift(x * multiplier, shift)
    t = torch.clamp_max(u.abs(), clip) - clip
    g = x * (torch.sign(u) * (one - t * t) + one)
    return _round_shift(g * out_multiplier, out_shift).clamp(*dtype.value_range).to(TORCH_DTYPES[dtype])


def _isqrt(v):
    # floor(sqrt(v)) for 0 <= v < 2^62: the float64 root is within one of it, then corrected
    root = torch.sqrt(v.double()).to(torch.int64)
    root -= (root * root > v).to(torch.int64)
    root += ((root + 1) * (root + 1) <= v).to(torch.int64)
    return root


def _sdpa(q, k, v, mask=None, *, is_causal, scale, window):
    if window is not None:  # a sliding window: torch's kernel takes it as a mask
        mask = torch.from_numpy(causal_mask(q.shape[-2], k.shape[-2], window)).to(q.device)
        is_causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)


def _int_layer_norm(x, w, b, *, eps, shift, dtype: DType, scale):
    if b.numel() and int(b.to(torch.int64).abs().max()) > 1 << 60:
        raise ValueError("int_layer_norm: |bias| must be at most 2^60")
    x = x.to(torch.int64)
    n = x.shape[-1]
    mean = torch.div(2 * x.sum(dim=-1, keepdim=True) + n, 2 * n, rounding_mode="floor")
    c = x - mean
    r = _isqrt((c * c).sum(dim=-1, keepdim=True) + eps).clamp_min(1)
    f = torch.div(torch.full_like(r, 1 << 31), r, rounding_mode="floor")
    y = _round_shift(c * f * w.to(torch.int64) + b.to(torch.int64), shift)
    return y.clamp(*dtype.value_range).to(TORCH_DTYPES[dtype])


# Kernels keyed by op name. Ops that create tensors take the device as `device=`.
TORCH_KERNELS: dict[str, Callable[..., torch.Tensor]] = {
    "linear": _linear,
    "matmul": _matmul,
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
    "abs": torch.abs,
    "sign": torch.sign,
    "floor": torch.floor,
    "ceil": torch.ceil,
    "log": torch.log,
    "cos": torch.cos,
    "sin": torch.sin,
    "silu": F.silu,
    "sqrt": torch.sqrt,
    "rsqrt": torch.rsqrt,
    "erf": torch.erf,
    "gelu": lambda x, approximate: F.gelu(x, approximate=approximate),
    "softmax": lambda x, dim: torch.softmax(x, dim),
    "layer_norm": lambda x, w=None, b=None, *, normalized_shape, eps: F.layer_norm(x, normalized_shape, w, b, eps),
    "rms_norm": lambda x, w=None, *, normalized_shape, eps: F.rms_norm(x, normalized_shape, w, eps),
    "batch_norm": lambda x, mean, var, w=None, b=None, *, eps: F.batch_norm(x, mean, var, w, b, False, 0.0, eps),
    "group_norm": lambda x, w=None, b=None, *, num_groups, eps: F.group_norm(x, num_groups, w, b, eps),
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
    "cumsum": lambda x, dim: torch.cumsum(x, dim, dtype=x.dtype),
    "sum": lambda x, dims, keepdim: torch.sum(x, dim=dims or tuple(range(x.dim())), keepdim=keepdim, dtype=x.dtype),
    "any": _reduce(torch.any),
    "index": lambda x, *indices: x[indices],
    "index_copy": lambda x, index, source, dim: torch.index_copy(x, dim, index, source),
    "where": torch.where,
    "arange": lambda start, end, step, dtype, device: torch.arange(start, end, step, dtype=TORCH_DTYPES[dtype],
                                                                    device=device),
    "full": lambda shape, value, dtype, device: torch.full(shape, value, dtype=TORCH_DTYPES[dtype], device=device),
    "scaled_dot_product_attention": _sdpa,
    "conv1d": lambda x, w, b=None, *, stride, padding, dilation, groups: F.conv1d(x, w, b, stride, padding,
                                                                                   dilation, groups),
    "pad": lambda x, *, pads, value: F.pad(x, pads, value=value),
    "argmax": lambda x, *, dim, keepdim: torch.argmax(x, dim, keepdim),
    "conv2d": lambda x, w, b=None, *, stride, padding, dilation, groups: F.conv2d(x, w, b, stride, padding,
                                                                                  dilation, groups),
    "cast": _cast,
    "quantize": _quantize,
    "dequantize": _dequantize,
    "requantize": _requantize,
    "int_softmax": _int_softmax,
    "int_gelu": _int_gelu,
    "int_layer_norm": _int_layer_norm,
}
_CREATES_TENSORS = {"arange", "full"}


@functools.cache
def _keep_freed_memory() -> None:
    """Keep freed blocks in the process's heap (glibc): by default glibc maps every block above
    128 KiB afresh and hands it back on free, so each run page-faults its activations in again,
    which makes a large batch's runs several times slower than their arithmetic and erratic
    (what jemalloc or tcmalloc setups of CPU inference avoid). No-op without glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    if not mallopt(m_mmap_threshold, 1 << 30):
        mallopt(m_mmap_threshold, 32 << 20)  # glibc's largest on older releases
    mallopt(m_trim_threshold, 1 << 30)


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
    """`TorchExecutor(graph, device)(*tensors) -> tuple of tensors`; differentiable.

    `weight_transforms` maps constant names to modules applied to the weight on every forward
    (pruning masks, straight-through binarization); `activation_transforms` maps value names
    to modules applied to the value right after it is computed (observers, fake quantization).
    Both are submodules, so their parameters train with the weights."""

    def __init__(self, graph: Graph, device: torch.device | str = "cpu", trainable: bool = False, *,
                 weight_transforms: dict[str, nn.Module] | None = None,
                 activation_transforms: dict[str, nn.Module] | None = None):
        super().__init__()
        self.graph = graph
        self.device_ = torch.device(device)
        if self.device_.type == "cpu":
            _keep_freed_memory()
        types = graph.types
        for what, table in (("constant", weight_transforms), ("value", activation_transforms)):
            for name in table or {}:
                if name not in types:
                    raise TccError(f"transform of unknown {what} '{name}'")
        self.weight_transforms = nn.ModuleDict({f"w{i}": m for i, m in enumerate((weight_transforms or {}).values())})
        self._weight_transform_keys = dict(zip(weight_transforms or {}, self.weight_transforms))
        self.activation_transforms = nn.ModuleDict(
            {f"a{i}": m for i, m in enumerate((activation_transforms or {}).values())})
        activation_keys = dict(zip(activation_transforms or {}, self.activation_transforms))
        self.weights = nn.ParameterDict()
        self._buffer_names: dict[str, str] = {}
        self._param_names: dict[str, str] = {}
        self._encoded: dict[str, TorchEncodedLinear] = {}
        for name, x_dtype in _encoded_linear_weights(graph).items():
            if not trainable and name not in self._weight_transform_keys:
                self._encoded[name] = TorchEncodedLinear(graph.encoded(name), x_dtype, self.device_)
        statistics = {op.operands[i] for op in graph.ops if op.kind == "batch_norm" for i in (1, 2)}  # not learned
        for index, (name, t) in enumerate(graph.constants):
            if name in self._encoded:
                continue
            tensor = torch.from_numpy(np.array(graph.weights[name])).to(TORCH_DTYPES[t.dtype])
            tensor = tensor.to(self.device_)
            key = f"c{index}"
            if t.dtype.is_float:
                self.weights[key] = nn.Parameter(tensor, requires_grad=trainable and name not in statistics)
                self._param_names[name] = key
            else:
                self.register_buffer(key, tensor, persistent=False)
                self._buffer_names[name] = key
        self._activation_keys = activation_keys
        self.weight_transforms.to(self.device_)
        self.activation_transforms.to(self.device_)
        self._program = self._compile()

    def _compile(self) -> list[tuple[Callable, tuple[int, ...], dict[str, Any], int, tuple[int, ...], str | None]]:
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
                            tuple(slots[n] for n in frees.get(index, ()) if n not in constants),
                            self._activation_keys.get(op.result)))
        return program

    def constant(self, name: str) -> torch.Tensor:
        """The tensor holding constant `name` (a Parameter for float weights), untransformed;
        a weight the executor computes on in its encoding is decoded for the caller."""
        if name in self._encoded:
            return torch.from_numpy(np.array(self.graph.weights[name])).to(TORCH_DTYPES[self.graph.types[name].dtype])
        if name in self._param_names:
            return self.weights[self._param_names[name]]
        return getattr(self, self._buffer_names[name])

    def effective_constant(self, name: str) -> torch.Tensor:
        """Constant `name` as the graph computes with it: its weight transform applied."""
        key = self._weight_transform_keys.get(name)
        value = self.constant(name)
        return value if key is None else self.weight_transforms[key](value)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        env: list[Any] = [None] * len(self._slots)
        for i, (name, value) in enumerate(zip(self.graph.input_names, inputs)):
            key = self._activation_keys.get(name)
            env[i] = value if key is None else self.activation_transforms[key](value)
        base = len(inputs)
        for i, name in enumerate(self.graph.constant_names):
            env[base + i] = self._encoded[name] if name in self._encoded else self.effective_constant(name)
        for kernel, operands, kwargs, result, frees, transform in self._program:
            env[result] = kernel(*[env[o] for o in operands], **kwargs)
            if transform is not None:
                env[result] = self.activation_transforms[transform](env[result])
            for slot in frees:
                env[slot] = None
        return tuple(env[self._slots[name]] for name in self.graph.outputs)

    def profile(self, inputs: Sequence[torch.Tensor], repeats: int = 5) -> list[float]:
        """Seconds each op takes (median of `repeats` runs, synchronized on CUDA), in graph order."""
        sync = torch.cuda.synchronize if self.device_.type == "cuda" else (lambda: None)
        runs = []
        with torch.inference_mode():
            for _ in range(repeats + 1):  # the first run warms up
                env: list[Any] = [None] * len(self._slots)
                for i, value in enumerate(inputs):
                    env[i] = value.to(self.device_)
                base = len(inputs)
                for i, name in enumerate(self.graph.constant_names):
                    env[base + i] = self._encoded[name] if name in self._encoded else self.effective_constant(name)
                times = []
                for kernel, operands, kwargs, result, _frees, _transform in self._program:
                    sync()
                    start = time.perf_counter()
                    env[result] = kernel(*[env[o] for o in operands], **kwargs)
                    sync()
                    times.append(time.perf_counter() - start)
                runs.append(times)
        return [statistics.median(column) for column in zip(*runs[1:])]

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


def _encoded_linear_weights(graph: Graph) -> dict[str, DType]:
    """Constants in a non-dense encoding whose every use is as the weight of linears that all
    take inputs of one dtype, with that dtype."""
    types, uses = graph.types, graph.users()
    out = {}
    for name, t in graph.constants:
        users = uses.get(name, [])
        if not t.encoding.rank2 or not users or name in graph.outputs:
            continue
        x_dtypes = {types[op.operands[0]].dtype for op in users}
        if all(op.kind == "linear" and op.operands.index(name) == 1 for op in users) and len(x_dtypes) == 1:
            out[name] = x_dtypes.pop()
    return out
