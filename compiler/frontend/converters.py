"""The converter table: aten ops (torch.export), torch functions, Tensor methods and
nn modules (torch.fx.symbolic_trace) lowered to IR ops. One converter per operation, with
torch's own parameter names, registered under every key that means that operation."""

from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from tcc.ir.dtypes import DType, promote
from tcc.ir.errors import VerifyError

from .lowering import Lowerer, Value, is_tensor_like, node_location, target_name

aten = torch.ops.aten
Converter = Callable[..., Any]
CONVERTERS: dict[Any, Converter] = {}
MODULE_CONVERTERS: dict[type, Callable[..., Any]] = {}


def converts(*keys: Any):
    """Register a converter under aten packets (`aten.add`), callables, or `'method:name'`."""
    def register(fn: Converter) -> Converter:
        for key in keys:
            CONVERTERS[key] = fn
        return fn
    return register


def convert_node(cx: Lowerer, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    target = node.target
    if node.op == "call_module":
        module = cx.modules[target]
        converter = MODULE_CONVERTERS.get(type(module))
        if converter is None:
            raise cx.unsupported(f"unsupported module {type(module).__name__}", missing=True)
        return converter(cx, module, target, *args, **kwargs)
    if node.op == "call_method":
        key = f"method:{target}"
    elif isinstance(target, torch._ops.OpOverload):
        key = target.overloadpacket
    else:
        key = target
    converter = CONVERTERS.get(key)
    if converter is None:
        raise cx.unsupported(f"unsupported op {target_name(node)}", missing=True)
    try:
        return converter(cx, *args, **kwargs)
    except TypeError as e:
        raise cx.unsupported(f"cannot convert {node.target} with these arguments ({e})") from None
    except VerifyError as e:  # an op the operands do not fit (e.g. an integer input to linear)
        raise VerifyError(f"{e} at {node_location(node)}") from None


# ------------------------------------------------------------------------------------------------
# helpers

def _scalar_dtype(x: Any) -> DType:
    return DType.BOOL if isinstance(x, bool) else DType.I64 if isinstance(x, int) else DType.F32


def _common(cx: Lowerer, *xs: Any) -> DType:
    """torch's type promotion for tensors mixed with Python scalars."""
    tensors = [cx.type(x).dtype for x in xs if isinstance(x, Value)]
    scalars = [_scalar_dtype(x) for x in xs if not isinstance(x, Value)]
    dtype = tensors[0]
    for t in tensors[1:]:
        dtype = promote(dtype, t)
    for s in scalars:
        if (s.is_float and not dtype.is_float) or (s.is_int and dtype is DType.BOOL):
            dtype = s
    return dtype


def _elementwise(kind: str, compute_dtype: str = "result"):
    def convert(cx: Lowerer, a, b, *, alpha=1, **_):
        dtype = cx.out_dtype() if compute_dtype == "result" else _common(cx, a, b)
        if kind == "div" and not dtype.is_float:
            dtype = DType.F32
        if alpha != 1:
            b = cx.op("mul", cx.as_value(b, dtype), cx.scalar(alpha, dtype))
        return cx.op(kind, cx.as_value(a, dtype), cx.as_value(b, dtype))
    return convert


def _identity(cx: Lowerer, x, *args, **kwargs):
    return x


def _ignore(cx: Lowerer, *args, **kwargs):
    return None


def _to_shape(cx: Lowerer, kind: str, x: Value) -> Value:
    shape = cx.out_shape()
    if cx.type(x).shape == shape:
        return x
    return cx.op(kind, x, shape=shape)


def _shape_args(shape) -> tuple:
    return tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else tuple(shape)


# ------------------------------------------------------------------------------------------------
# linear algebra

@converts(aten.linear, F.linear)
def linear(cx: Lowerer, input, weight, bias=None):
    return cx.op("linear", input, weight, *([bias] if bias is not None else []))


def _as_linear_weight(cx: Lowerer, x, rhs) -> Value | None:
    """For `x @ rhs` with `rhs` a learned [in, out] parameter (GPT-2's Conv1D, weights stored
    transposed): the [out, in] weight constant `rhs.t` of the equivalent linear, as canonicalize
    names it; None otherwise."""
    if not (isinstance(rhs, Value) and cx.parameter_constant(rhs) and cx.type(rhs).rank == 2
            and cx.type(x).dtype.is_float and cx.type(x).rank >= 1):
        return None
    return cx.derived(f"{rhs}.t", lambda: cx.known[rhs].t().contiguous())


@converts(aten.addmm)
def addmm(cx: Lowerer, bias, mat1, mat2, *, beta=1, alpha=1):
    if beta != 1 or alpha != 1:
        raise cx.unsupported("addmm with beta/alpha other than 1")
    weight = _as_linear_weight(cx, mat1, mat2)
    if weight is not None and isinstance(bias, Value) and cx.type(bias).shape == (cx.type(weight).shape[0],):
        return cx.op("linear", mat1, weight, bias)
    return cx.op("add", matmul(cx, mat1, mat2), bias)


@converts(aten.mm, aten.bmm, aten.matmul, torch.matmul, torch.bmm, operator.matmul, "method:matmul")
def matmul(cx: Lowerer, a, b):
    weight = _as_linear_weight(cx, a, b)
    return cx.op("matmul", a, b) if weight is None else cx.op("linear", a, weight)


@converts(aten.scaled_dot_product_attention, F.scaled_dot_product_attention)
def sdpa(cx: Lowerer, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
         enable_gqa=False):
    heads = cx.type(query).shape[-3] if cx.type(query).rank >= 3 else 1
    if enable_gqa and cx.type(key).shape[-3] != heads:  # grouped-query attention: each kv head serves a group
        group = heads // cx.type(key).shape[-3]
        key, value = (repeat_interleave(cx, t, group, -3) for t in (key, value))
    mask = [] if attn_mask is None else [attn_mask]
    return cx.op("scaled_dot_product_attention", query, key, value, *mask, is_causal=bool(is_causal), scale=scale)


def _conv_padding(cx: Lowerer, x, weight, padding, dilation, spatial: int):
    """(x, explicit padding per spatial dim): torch's 'valid' and 'same' made explicit; an
    asymmetric 'same' pads `x` first."""
    if not isinstance(padding, str):
        return x, _ints(padding, spatial)
    if padding == "valid":
        return x, (0,) * spatial
    totals = [d * (k - 1) for d, k in zip(dilation, cx.type(weight).shape[2:])]
    if any(t % 2 for t in totals):  # torch puts the odd element after
        pads = [p for t in reversed(totals) for p in (t // 2, t - t // 2)]
        return cx.op("pad", x, pads=tuple(pads), value=0.0), (0,) * spatial
    return x, tuple(t // 2 for t in totals)


def _ints(v, n: int) -> tuple[int, ...]:
    return tuple(v) * (n if len(tuple(v)) == 1 else 1) if isinstance(v, (tuple, list)) else (v,) * n


@converts(aten.convolution, aten.conv1d, aten.conv2d, F.conv1d, F.conv2d)
def convolution(cx: Lowerer, input, weight, bias=None, stride=1, padding=0, dilation=1, transposed=False,
                output_padding=0, groups=1):
    if isinstance(transposed, int) and not isinstance(transposed, bool):  # aten.conv1d / conv2d: groups 4th
        transposed, groups = False, transposed
    spatial = cx.type(input).rank - 2
    if transposed or spatial not in (1, 2):
        raise _conv_unsupported(cx, input, weight, transposed)
    dilation = _ints(dilation, spatial)
    input, padding = _conv_padding(cx, input, weight, padding, dilation, spatial)
    return cx.op(f"conv{spatial}d", input, weight, *([bias] if bias is not None else []),
                 stride=_ints(stride, spatial), padding=padding, dilation=dilation, groups=groups)


def _conv_unsupported(cx: Lowerer, input, weight, transposed: bool):
    return cx.unsupported(f"{'transposed ' if transposed else ''}{cx.type(input).rank - 2}-d convolution is "
                          f"unsupported: got input {list(cx.type(input).shape)}, weight {list(cx.type(weight).shape)}")


@converts(aten.conv_transpose1d, aten.conv_transpose2d, F.conv_transpose1d, F.conv_transpose2d)
def conv_transpose(cx: Lowerer, input, weight, *args, **kwargs):
    raise _conv_unsupported(cx, input, weight, transposed=True)


# ------------------------------------------------------------------------------------------------
# elementwise

for _kind, _keys in {
    "add": (aten.add, torch.add, operator.add, operator.iadd, "method:add"),
    "sub": (aten.sub, torch.sub, operator.sub, "method:sub"),
    "mul": (aten.mul, torch.mul, operator.mul, operator.imul, "method:mul"),
    "div": (aten.div, torch.div, operator.truediv, "method:div"),
    "pow": (aten.pow, torch.pow, operator.pow, "method:pow"),
    "maximum": (aten.maximum, torch.maximum),
    "minimum": (aten.minimum, torch.minimum),
}.items():
    converts(*_keys)(_elementwise(_kind))

for _kind, _keys in {
    "eq": (aten.eq, torch.eq, operator.eq, "method:eq"),
    "ne": (aten.ne, torch.ne, operator.ne, "method:ne"),
    "lt": (aten.lt, torch.lt, operator.lt, "method:lt"),
    "le": (aten.le, torch.le, operator.le, "method:le"),
    "gt": (aten.gt, torch.gt, operator.gt, "method:gt"),
    "ge": (aten.ge, torch.ge, operator.ge, "method:ge"),
}.items():
    converts(*_keys)(_elementwise(_kind, compute_dtype="common"))


@converts(aten.rsub)
def rsub(cx: Lowerer, a, b, alpha=1):
    return _elementwise("sub")(cx, b, a, alpha=alpha)


def _logical(kind: str):
    def convert(cx: Lowerer, a, b):
        if cx.type(a).dtype is not DType.BOOL or (isinstance(b, Value) and cx.type(b).dtype is not DType.BOOL):
            raise cx.unsupported(f"bitwise {kind.split('_')[1]} on integer tensors")
        return cx.op(kind, a, cx.as_value(b, DType.BOOL))
    return convert


converts(aten.bitwise_and, aten.logical_and, aten.__and__, operator.and_, torch.logical_and)(_logical("logical_and"))
converts(aten.bitwise_or, aten.logical_or, aten.__or__, operator.or_, torch.logical_or)(_logical("logical_or"))


@converts(aten.logical_not, aten.bitwise_not, torch.logical_not, operator.invert)
def logical_not(cx: Lowerer, x):
    if cx.type(x).dtype is not DType.BOOL:
        raise cx.unsupported("bitwise not on integer tensors")
    return cx.op("logical_not", x)


def _unary(kind: str):
    def convert(cx: Lowerer, x, *args, **kwargs):
        return cx.op(kind, x)
    return convert


for _kind, _keys in {
    "neg": (aten.neg, torch.neg, operator.neg, "method:neg"),
    "relu": (aten.relu, torch.relu, F.relu, "method:relu"),
    "tanh": (aten.tanh, torch.tanh, F.tanh, "method:tanh"),
    "sigmoid": (aten.sigmoid, torch.sigmoid, F.sigmoid, "method:sigmoid"),
    "exp": (aten.exp, torch.exp, "method:exp"),
    "sqrt": (aten.sqrt, torch.sqrt, "method:sqrt"),
    "rsqrt": (aten.rsqrt, torch.rsqrt, "method:rsqrt"),
    "erf": (aten.erf, torch.erf, "method:erf"),
    "abs": (aten.abs, torch.abs, "method:abs"),
    "sign": (aten.sign, torch.sign, "method:sign"),
    "floor": (aten.floor, torch.floor, "method:floor"),
    "ceil": (aten.ceil, torch.ceil, "method:ceil"),
    "log": (aten.log, torch.log, "method:log"),
    "cos": (aten.cos, torch.cos, "method:cos"),
    "sin": (aten.sin, torch.sin, "method:sin"),
    "silu": (aten.silu, F.silu, "method:silu"),
}.items():
    converts(*_keys)(_unary(_kind))


@converts(aten.clamp, aten.clip, aten.clamp_min, aten.clamp_max, torch.clamp, torch.clip, "method:clamp", "method:clip",
          "method:clamp_min", "method:clamp_max")
def clamp(cx: Lowerer, x, min=None, max=None):
    """`minimum(maximum(x, min), max)`, as torch defines it (min > max gives max)."""
    if cx.node.target in (aten.clamp_max.default, aten.clamp_max.Tensor, "clamp_max"):
        min, max = None, min
    dtype = cx.out_dtype()
    x = cx.cast(x, dtype)
    if min is not None:
        x = cx.op("maximum", x, cx.as_value(min, dtype))
    if max is not None:
        x = cx.op("minimum", x, cx.as_value(max, dtype))
    return x


@converts(aten.glu, F.glu)
def glu(cx: Lowerer, input, dim=-1):
    """The first half times the sigmoid of the second."""
    a, b = chunk(cx, input, 2, dim)
    return cx.op("mul", a, cx.op("sigmoid", b))


@converts(aten.gelu, F.gelu)
def gelu(cx: Lowerer, input, approximate="none"):
    return cx.op("gelu", input, approximate=approximate)


@converts(aten.where, torch.where)
def where(cx: Lowerer, condition, input, other):
    dtype = cx.out_dtype()
    return cx.op("where", cx.as_value(condition, DType.BOOL), cx.as_value(input, dtype), cx.as_value(other, dtype))


@converts(aten.masked_fill, "method:masked_fill")
def masked_fill(cx: Lowerer, input, mask, value):
    dtype = cx.type(input).dtype
    return cx.op("where", mask, cx.as_value(value, dtype), input)


# ------------------------------------------------------------------------------------------------
# normalization, softmax, embedding

@converts(aten._softmax, aten.softmax, torch.softmax, F.softmax, "method:softmax")
def softmax(cx: Lowerer, input, dim=None, half_to_float=False, dtype=None, **_):
    if dim is None:
        raise cx.unsupported("softmax without dim")
    return cx.op("softmax", cx.cast(input, cx.out_dtype()), dim=dim)


@converts(aten.layer_norm, F.layer_norm)
def layer_norm(cx: Lowerer, input, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
    affine = [w for w in (weight, bias) if w is not None]
    if weight is None and bias is not None:
        raise cx.unsupported("layer_norm with a bias but no weight")
    return cx.op("layer_norm", input, *affine, normalized_shape=tuple(normalized_shape), eps=eps)


@converts(aten.native_layer_norm)
def native_layer_norm(cx: Lowerer, input, normalized_shape, weight, bias, eps):
    return (layer_norm(cx, input, normalized_shape, weight, bias, eps), None, None)


@converts(aten.rms_norm, F.rms_norm)
def rms_norm(cx: Lowerer, input, normalized_shape, weight=None, eps=None):
    """`eps=None`: torch's, the epsilon of the type it computes in (f64 for f64, else f32)."""
    eps = torch.finfo(torch.float64 if cx.type(input).dtype is DType.F64 else torch.float32).eps if eps is None else eps
    return cx.op("rms_norm", input, *([weight] if weight is not None else []),
                 normalized_shape=tuple(normalized_shape), eps=eps)


@converts(aten.group_norm, F.group_norm)
def group_norm(cx: Lowerer, input, num_groups, weight=None, bias=None, eps=1e-5, cudnn_enabled=True):
    if weight is None and bias is not None:
        raise cx.unsupported("group_norm with a bias but no weight")
    affine = [w for w in (weight, bias) if w is not None]
    return cx.op("group_norm", input, *affine, num_groups=num_groups, eps=eps)


@converts(aten.native_group_norm)
def native_group_norm(cx: Lowerer, input, weight, bias, n, c, hw, num_groups, eps):
    return (group_norm(cx, input, num_groups, weight, bias, eps), None, None)


@converts(F.batch_norm)
def batch_norm(cx: Lowerer, input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
               eps=1e-5, cudnn_enabled=True):
    if training or running_mean is None:
        raise cx.unsupported("batch_norm in training mode or without running statistics (normalizing by the batch's "
                             "own) is unsupported")
    if weight is None and bias is not None:
        raise cx.unsupported("batch_norm with a bias but no weight")
    affine = [w for w in (weight, bias) if w is not None]
    return cx.op("batch_norm", input, running_mean, running_var, *affine, eps=eps)


@converts(aten.batch_norm)
def aten_batch_norm(cx: Lowerer, input, weight, bias, running_mean, running_var, training, momentum, eps,
                    cudnn_enabled=False):
    return batch_norm(cx, input, running_mean, running_var, weight, bias, training, momentum, eps)


@converts(aten._native_batch_norm_legit, aten._native_batch_norm_legit_functional)
def batch_norm_of_batch_statistics(cx: Lowerer, input, *args, **kwargs):
    """What torch.export decomposes a batch norm on batch statistics to (`training=True`, or no
    running statistics)."""
    return batch_norm(cx, input, None, None, training=True)


@converts(aten._native_batch_norm_legit_no_training)
def native_batch_norm(cx: Lowerer, input, weight, bias, running_mean, running_var, momentum, eps):
    return (batch_norm(cx, input, running_mean, running_var, weight, bias, False, momentum, eps), None, None)


@converts(aten.embedding, F.embedding)
def embedding(cx: Lowerer, weight, indices, padding_idx=None, *rest, **kwargs):
    if isinstance(weight, Value) and cx.type(weight).dtype.is_int:  # F.embedding(input, weight) order
        weight, indices = indices, weight
    return cx.op("embedding", weight, indices)


@converts(aten.index_select, torch.index_select, "method:index_select")
def index_select(cx: Lowerer, input, dim, index):
    """A 0-d `index` selects one element and keeps its dim (of size 1)."""
    dim = cx.dim(dim, cx.type(input).rank)
    if cx.type(index).rank == 0:
        index = cx.op("reshape", index, shape=(1,))
    if dim == 0:
        return cx.op("index", input, index)
    moved = cx.op("transpose", input, dim0=0, dim1=dim)
    return cx.op("transpose", cx.op("index", moved, index), dim0=0, dim1=dim)


@converts(aten.argmax, torch.argmax, "method:argmax")
def argmax(cx: Lowerer, input, dim=None, keepdim=False):
    if dim is None or cx.type(input).rank == 0:  # of the flattened tensor; `keepdim` keeps every dim, of size 1
        rank = cx.type(input).rank
        flat = cx.op("argmax", cx.op("reshape", input, shape=(cx.type(input).numel,)), dim=0, keepdim=False)
        return cx.op("reshape", flat, shape=(1,) * rank) if keepdim and rank else flat
    return cx.op("argmax", input, dim=dim, keepdim=keepdim)


@converts(aten.gather, torch.gather)
def gather(cx: Lowerer, input, dim, index, sparse_grad=False):
    return cx.op("gather", input, index, dim=dim)


@converts(aten.index)
def index(cx: Lowerer, input, indices):
    if any(i is None for i in indices):
        raise cx.unsupported("indexing with None entries")
    return cx.op("index", input, *indices)


@converts(aten.index_copy, torch.index_copy, "method:index_copy")
def index_copy(cx: Lowerer, input, dim, index, source):
    """Functional `index_copy` (a static cache's write: torch.export's functional form of
    `index_copy_`)."""
    dim = cx.dim(dim, cx.type(input).rank)
    return cx.op("index_copy", input, cx.as_value(index, DType.I64), cx.cast(source, cx.type(input).dtype), dim=dim)


@converts(aten.index_put)
def index_put(cx: Lowerer, input, indices, values, accumulate=False):
    """`x[:, :, idx] = values` with one 1-D index on one dim (what decomposing `index_copy`
    gives): an `index_copy` along that dim."""
    placed = [(d, i) for d, i in enumerate(indices) if i is not None]
    if accumulate or len(placed) != 1 or cx.type(placed[0][1]).rank != 1:
        raise cx.unsupported("index_put other than one 1-D index on one dim without accumulation")
    dim, idx = placed[0]
    shape = list(cx.type(input).shape)
    shape[dim] = cx.type(idx).shape[0]
    source = cx.cast(values, cx.type(input).dtype)
    if cx.type(source).shape != tuple(shape):
        source = cx.op("expand", source, shape=tuple(shape))
    return cx.op("index_copy", input, idx, source, dim=dim)


@converts(aten.copy)
def copy(cx: Lowerer, input, src, non_blocking=False):
    """Functional `copy` (of `dst.copy_(src)`): `src` in `input`'s dtype and shape."""
    t = cx.type(input)
    src = cx.cast(cx.as_value(src, t.dtype), t.dtype)
    return src if cx.type(src).shape == t.shape else cx.op("expand", src, shape=t.shape)


# ------------------------------------------------------------------------------------------------
# shapes and layout

@converts(aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unflatten, torch.reshape, torch.flatten,
          "method:view", "method:reshape", "method:flatten", "method:unflatten")
def reshape(cx: Lowerer, x, *shape, **_):
    return _to_shape(cx, "reshape", x)


@converts(aten.expand, "method:expand")
def expand(cx: Lowerer, x, *shape, **_):
    return _to_shape(cx, "expand", x)


@converts(aten.permute, torch.permute, "method:permute")
def permute(cx: Lowerer, x, *dims):
    return cx.op("permute", x, dims=_shape_args(dims))


@converts(aten.transpose, torch.transpose, "method:transpose")
def transpose(cx: Lowerer, x, dim0, dim1):
    return cx.op("transpose", x, dim0=dim0, dim1=dim1)


@converts(aten.t, "method:t")
def t(cx: Lowerer, x):
    return cx.op("transpose", x, dim0=0, dim1=1) if cx.type(x).rank == 2 else x


@converts(aten.slice)
def slice_(cx: Lowerer, x, dim=0, start=None, end=None, step=1):
    size = cx.type(x).shape[cx.dim(dim, cx.type(x).rank)]
    start = 0 if start is None else start
    end = None if end is None or end >= size else end
    if start == 0 and end is None and step == 1:
        return x
    return cx.op("slice", x, dim=dim, start=start, end=end, step=step)


@converts(aten.select)
def select(cx: Lowerer, x, dim, index):
    return cx.op("select", x, dim=dim, index=index)


def _pieces(cx: Lowerer, x, sizes, dim) -> tuple:
    """`x` cut along `dim` into consecutive pieces of `sizes`: slices (a whole `x` stays itself)."""
    out, start = [], 0
    for size in sizes:
        out.append(slice_(cx, x, dim, start, start + size))
        start += size
    return tuple(out)


@converts(aten.split_with_sizes, "method:split_with_sizes")
def split_with_sizes(cx: Lowerer, x, split_sizes, dim=0):
    return _pieces(cx, x, split_sizes, dim)


@converts(aten.split, torch.split, "method:split")
def split(cx: Lowerer, x, split_size_or_sections, dim=0):
    if not isinstance(split_size_or_sections, int):
        return _pieces(cx, x, split_size_or_sections, dim)
    n = cx.type(x).shape[cx.dim(dim, cx.type(x).rank)]
    return _pieces(cx, x, [min(split_size_or_sections, n - i) for i in range(0, n, split_size_or_sections)], dim)


@converts(aten.chunk, torch.chunk, "method:chunk")
def chunk(cx: Lowerer, x, chunks, dim=0):
    n = cx.type(x).shape[cx.dim(dim, cx.type(x).rank)]
    return split(cx, x, -(-n // chunks) if n else 1, dim)  # torch's rule: pieces of ceil(n / chunks)


@converts(aten.unbind, torch.unbind, "method:unbind")
def unbind(cx: Lowerer, x, dim=0):
    return tuple(select(cx, x, dim, i) for i in range(cx.type(x).shape[cx.dim(dim, cx.type(x).rank)]))


@converts(aten.constant_pad_nd)
def constant_pad_nd(cx: Lowerer, x, pad, value=0.0):
    return pad_(cx, x, pad, "constant", value)


@converts(aten.pad, F.pad)
def pad_(cx: Lowerer, x, pad, mode="constant", value=None):
    """Constant padding; a negative width crops (a slice)."""
    if mode != "constant":
        raise cx.unsupported(f"pad mode '{mode}' is unsupported (only 'constant'): got pad {list(pad)}")
    shape = cx.type(x).shape
    for i in range(len(pad) // 2):
        dim, before, after = len(shape) - 1 - i, pad[2 * i], pad[2 * i + 1]
        if before < 0 or after < 0:
            x = slice_(cx, x, dim, max(-before, 0), shape[dim] + min(after, 0))
    pads = tuple(max(p, 0) for p in pad)
    return cx.op("pad", x, pads=pads, value=float(value or 0.0)) if any(pads) else x


@converts(aten.roll, torch.roll, "method:roll")
def roll(cx: Lowerer, x, shifts, dims=()):
    """Two slices joined the other way round, per rolled dim."""
    shifts, dims = _ints(shifts, 1), (() if dims is None or dims in ((), []) else _ints(dims, 1))
    if not dims:  # of the flattened tensor
        shape = cx.type(x).shape
        return cx.op("reshape", roll(cx, cx.op("reshape", x, shape=(cx.type(x).numel,)), shifts, (0,)), shape=shape)
    for shift, dim in zip(shifts, dims):
        size = cx.type(x).shape[cx.dim(dim, cx.type(x).rank)]
        if size and shift % size:
            cut = size - shift % size
            x = cx.op("cat", slice_(cx, x, dim, cut), slice_(cx, x, dim, 0, cut), dim=dim)
    return x


@converts(aten.repeat, "method:repeat")
def repeat(cx: Lowerer, x, *repeats):
    """Tiles: a dim of each count in front of each dim, expanded, then merged."""
    repeats = _shape_args(repeats)
    shape = (1,) * (len(repeats) - cx.type(x).rank) + cx.type(x).shape
    x = cx.op("reshape", x, shape=tuple(d for s in shape for d in (1, s)))
    x = cx.op("expand", x, shape=tuple(d for r, s in zip(repeats, shape) for d in (r, s)))
    return cx.op("reshape", x, shape=tuple(r * s for r, s in zip(repeats, shape)))


@converts(aten.repeat_interleave, torch.repeat_interleave, "method:repeat_interleave")
def repeat_interleave(cx: Lowerer, x, repeats, dim=None, *, output_size=None):
    """Each element repeated in place: a dim of the count after `dim`, expanded, then merged."""
    if not isinstance(repeats, int):
        raise cx.unsupported("repeat_interleave with per-element repeats (a tensor) is unsupported")
    if dim is None:
        x, dim = cx.op("reshape", x, shape=(cx.type(x).numel,)), 0
    shape = cx.type(x).shape
    dim = cx.dim(dim, len(shape))
    x = cx.op("unsqueeze", x, dim=dim + 1)
    x = cx.op("expand", x, shape=shape[:dim + 1] + (repeats,) + shape[dim + 1:])
    return cx.op("reshape", x, shape=shape[:dim] + (shape[dim] * repeats,) + shape[dim + 1:])


@converts(aten.unsqueeze, torch.unsqueeze, "method:unsqueeze")
def unsqueeze(cx: Lowerer, x, dim):
    return cx.op("unsqueeze", x, dim=dim)


@converts(aten.squeeze, torch.squeeze, "method:squeeze")
def squeeze(cx: Lowerer, x, dim=None):
    shape = cx.type(x).shape
    dims = range(len(shape)) if dim is None else ([dim] if isinstance(dim, int) else dim)
    dims = tuple(d % len(shape) for d in dims if shape[d] == 1)
    return cx.op("squeeze", x, dims=dims) if dims else x


@converts(aten.cat, aten.concat, torch.cat, torch.concat)
def cat(cx: Lowerer, tensors, dim=0):
    tensors = [t for t in tensors if cx.type(t).numel or cx.type(t).rank > 1]
    return tensors[0] if len(tensors) == 1 else cx.op("cat", *tensors, dim=dim)


@converts(operator.getitem)
def getitem(cx: Lowerer, container, index):
    if not isinstance(container, Value):
        return container[index]
    return tensor_index(cx, container, index if isinstance(index, tuple) else (index,))


def tensor_index(cx: Lowerer, x: Value, index: tuple) -> Value:
    """Basic indexing x[...] with ints, slices, None and Ellipsis."""
    rank = cx.type(x).rank
    if any(isinstance(i, Value) for i in index):
        raise cx.unsupported("indexing with tensors")
    if Ellipsis in index:
        at = index.index(Ellipsis)
        consumed = len([i for i in index if i is not None and i is not Ellipsis])
        index = index[:at] + (slice(None),) * (rank - consumed) + index[at + 1:]
    dim = 0
    for item in index:
        if item is None:
            x = cx.op("unsqueeze", x, dim=dim)
            dim += 1
        elif isinstance(item, int):
            x = cx.op("select", x, dim=dim, index=item)
        elif isinstance(item, slice):
            x = slice_(cx, x, dim, item.start, item.stop, 1 if item.step is None else item.step)
            dim += 1
        else:
            raise cx.unsupported(f"index {item!r}")
    return x


# ------------------------------------------------------------------------------------------------
# reductions

def _reduction(kind: str):
    def convert(cx: Lowerer, input, dim=None, keepdim=False, *, dtype=None):
        dims = () if dim is None else ((dim,) if isinstance(dim, int) else tuple(dim))
        if kind == "mean" and not cx.type(input).dtype.is_float:
            input = cx.cast(input, cx.out_dtype())
        return cx.op(kind, input, dims=dims, keepdim=keepdim)
    return convert


converts(aten.mean, torch.mean, "method:mean")(_reduction("mean"))
converts(aten.sum, torch.sum, "method:sum")(_reduction("sum"))
converts(aten.any, torch.any, "method:any")(_reduction("any"))


def _adaptive_avg_pool(spatial: int):
    def convert(cx: Lowerer, input, output_size):
        """Mean over equal windows: each output size must divide its input size."""
        shape, sizes = cx.type(input).shape, _ints(output_size, spatial)
        sizes = tuple(shape[-spatial + i] if s is None else s for i, s in enumerate(sizes))
        if any(s < 1 or n % s for n, s in zip(shape[-spatial:], sizes)):
            raise cx.unsupported(f"adaptive_avg_pool{spatial}d to {list(sizes)} is unsupported (the output size "
                                 f"must divide the input's): got input {list(shape)}")
        lead = shape[:-spatial]
        split = tuple(d for n, s in zip(shape[-spatial:], sizes) for d in (s, n // s))
        x = cx.op("reshape", input, shape=lead + split)
        dims = tuple(len(lead) + 2 * i + 1 for i in range(spatial))
        return cx.op("mean", x, dims=dims, keepdim=False)
    return convert


converts(aten.adaptive_avg_pool1d, F.adaptive_avg_pool1d)(_adaptive_avg_pool(1))
converts(aten.adaptive_avg_pool2d, aten._adaptive_avg_pool2d, F.adaptive_avg_pool2d)(_adaptive_avg_pool(2))


@converts(aten.cumsum, torch.cumsum, "method:cumsum")
def cumsum(cx: Lowerer, input, dim, *, dtype=None):
    """In the dtype torch sums in: `dtype`, else i64 for integers and bool, else the input's."""
    return cx.op("cumsum", cx.cast(input, cx.out_dtype()), dim=dim)


# ------------------------------------------------------------------------------------------------
# tensor creation, casts, no-ops

@converts(aten.arange, torch.arange)
def arange(cx: Lowerer, *args, **kwargs):
    bounds = [a for a in args if isinstance(a, (int, float))]
    start, end, step = (0, bounds[0], 1) if len(bounds) == 1 else (bounds + [1])[:3]
    if not all(float(v).is_integer() for v in (start, end, step)):
        raise cx.unsupported("arange with non-integer bounds")
    return cx.op("arange", start=int(start), end=int(end), step=int(step), dtype=cx.out_dtype())


@converts(aten.full, aten.full_like, aten.zeros, aten.ones, aten.zeros_like, aten.ones_like, aten.scalar_tensor,
          aten.new_full, aten.new_zeros, aten.new_ones, torch.full, torch.zeros, torch.ones, torch.zeros_like,
          torch.ones_like, torch.full_like)
def full(cx: Lowerer, *args, **kwargs):
    fill = kwargs.get("fill_value")
    if fill is None:
        fill = next((a for a in args[1:] if isinstance(a, (int, float, bool))), None)
    if fill is None:
        fill = cx.node.target in (aten.ones.default, aten.ones_like.default, aten.new_ones.default, torch.ones,
                                  torch.ones_like)
        fill = 1 if fill else 0
    if cx.node.target is aten.scalar_tensor.default:
        fill = args[0]
    if isinstance(fill, Value):
        raise cx.unsupported("a fill value computed from tensors")
    return cx.op("full", shape=cx.out_shape(), value=float(fill), dtype=cx.out_dtype())


@converts(aten._to_copy, aten.to, aten.type_as, "method:to", "method:float", "method:half", "method:long",
          "method:int", "method:bool", "method:type_as", "method:type")
def to(cx: Lowerer, x, *args, **kwargs):
    return cx.cast(x, cx.out_dtype())


converts(aten.clone, aten.contiguous, aten.alias, aten.detach, aten.lift_fresh_copy, aten.dropout, F.dropout,
         torch.clone, "method:contiguous", "method:clone", "method:detach")(_identity)
converts(aten._assert_tensor_metadata, aten._assert_scalar, aten.sym_constrain_range_for_size,
         torch._assert)(_ignore)


# ------------------------------------------------------------------------------------------------
# nn modules (torch.fx.symbolic_trace keeps built-in modules as leaves)

def module_converter(*classes: type):
    def register(fn):
        for cls in classes:
            MODULE_CONVERTERS[cls] = fn
        return fn
    return register


@module_converter(nn.Linear)
def linear_module(cx: Lowerer, m: nn.Linear, path: str, x):
    return linear(cx, x, cx.parameter(f"{path}.weight"), cx.parameter(f"{path}.bias") if m.bias is not None else None)


@module_converter(nn.LayerNorm)
def layer_norm_module(cx: Lowerer, m: nn.LayerNorm, path: str, x):
    affine = m.weight is not None
    return layer_norm(cx, x, m.normalized_shape, cx.parameter(f"{path}.weight") if affine else None,
                      cx.parameter(f"{path}.bias") if m.bias is not None else None, m.eps)


@module_converter(nn.Embedding)
def embedding_module(cx: Lowerer, m: nn.Embedding, path: str, x):
    return cx.op("embedding", cx.parameter(f"{path}.weight"), x)


@module_converter(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def conv_module(cx: Lowerer, m: nn.Conv1d | nn.Conv2d | nn.Conv3d, path: str, x):
    if m.padding_mode != "zeros":
        raise cx.unsupported(f"{type(m).__name__} padding_mode '{m.padding_mode}' is unsupported (only 'zeros')")
    return convolution(cx, x, cx.parameter(f"{path}.weight"),
                       cx.parameter(f"{path}.bias") if m.bias is not None else None, m.stride, m.padding, m.dilation,
                       False, 0, m.groups)


@module_converter(nn.ConvTranspose1d, nn.ConvTranspose2d)
def conv_transpose_module(cx: Lowerer, m: nn.ConvTranspose1d | nn.ConvTranspose2d, path: str, x, *args):
    raise _conv_unsupported(cx, x, cx.parameter(f"{path}.weight"), transposed=True)


@module_converter(nn.BatchNorm1d, nn.BatchNorm2d)
def batch_norm_module(cx: Lowerer, m: nn.BatchNorm1d, path: str, x):
    if m.training or m.running_mean is None:
        raise cx.unsupported(f"{type(m).__name__} in training mode or without running statistics is unsupported")
    affine = (cx.parameter(f"{path}.weight"), cx.parameter(f"{path}.bias")) if m.affine else (None, None)
    return batch_norm(cx, x, cx.parameter(f"{path}.running_mean"), cx.parameter(f"{path}.running_var"), *affine,
                      False, 0.0, m.eps)


@module_converter(nn.GroupNorm)
def group_norm_module(cx: Lowerer, m: nn.GroupNorm, path: str, x):
    affine = (cx.parameter(f"{path}.weight"), cx.parameter(f"{path}.bias")) if m.affine else (None, None)
    return group_norm(cx, x, m.num_groups, *affine, m.eps)


@module_converter(nn.RMSNorm)
def rms_norm_module(cx: Lowerer, m: nn.RMSNorm, path: str, x):
    return rms_norm(cx, x, m.normalized_shape, cx.parameter(f"{path}.weight") if m.weight is not None else None,
                    m.eps)


@module_converter(nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
def adaptive_avg_pool_module(cx: Lowerer, m: nn.Module, path: str, x):
    return _adaptive_avg_pool(1 if isinstance(m, nn.AdaptiveAvgPool1d) else 2)(cx, x, m.output_size)


@module_converter(nn.GLU)
def glu_module(cx: Lowerer, m: nn.GLU, path: str, x):
    return glu(cx, x, m.dim)


@module_converter(nn.Dropout, nn.Identity)
def identity_module(cx: Lowerer, m: nn.Module, path: str, x):
    return x


@module_converter(nn.GELU)
def gelu_module(cx: Lowerer, m: nn.GELU, path: str, x):
    return cx.op("gelu", x, approximate=m.approximate)


@module_converter(nn.ReLU, nn.Tanh, nn.Sigmoid, nn.SiLU)
def activation_module(cx: Lowerer, m: nn.Module, path: str, x):
    return cx.op({nn.ReLU: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.SiLU: "silu"}[type(m)], x)


@module_converter(nn.Softmax)
def softmax_module(cx: Lowerer, m: nn.Softmax, path: str, x):
    return cx.op("softmax", x, dim=m.dim)


__all__ = ["CONVERTERS", "MODULE_CONVERTERS", "convert_node", "is_tensor_like"]
