"""Reference semantics: one numpy implementation per op. This is the spec every executor
and every hardware tier is tested against. Each kernel takes the operand arrays and the op's
attributes and returns an array; the executor casts it to the op's declared dtype.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .dtypes import DType


def _erf(x):
    """The error function: `scipy.special.erf`."""
    from scipy import special  # on first use: importing it takes longer than all of tcc.ir
    return special.erf(x)


def _linear(x, w, b=None):
    if x.dtype.kind == "i":  # integer linear: exact in int64 (the executor casts to i32 or i64)
        x, w = x.astype(np.int64), w.astype(np.int64)
    y = np.matmul(x, w.T)
    return y if b is None else y + b


def _quantize(x, dtype: DType, scale, zero_point):
    if dtype is DType.B1:
        return np.where(x >= 0, 1, -1).astype(np.int8)
    q = np.rint(x / np.asarray(scale, dtype=x.dtype))  # divide and round in x's float type
    return np.clip(q.astype(np.float64) + zero_point, *dtype.value_range).astype(dtype.numpy)  # then exact


def _dequantize(q, scale, zero_point):
    return (q.astype(np.int64) - zero_point).astype(scale.dtype) * scale


def _requantize(acc, multiplier, shift, dtype: DType, scale, zero_point):
    """Fixed point in (wrapping) int64: round-half-up of acc * multiplier / 2^shift. Exact,
    nothing wraps, while |acc * multiplier| <= 2^62 (always so for an i32 acc)."""
    shift = shift.astype(np.int64)
    if shift.size and (shift.min() < 0 or shift.max() > 62):
        raise ValueError(f"requantize: shift must lie in [0, 62], got [{shift.min()}, {shift.max()}]")
    p = acc.astype(np.int64) * multiplier.astype(np.int64)
    r = (p + ((np.int64(1) << shift) >> 1)) >> shift
    return np.clip(r + zero_point, *dtype.value_range).astype(dtype.numpy)


def _matmul(a, b):
    if a.dtype.kind == "i":  # exact in int64 (the executor casts to the i32 or i64 accumulator)
        a, b = a.astype(np.int64), b.astype(np.int64)
    return np.matmul(a, b)


# ---------------------------------------------------------------------------------------------
# integer-only nonlinearities (I-BERT, Kim et al. 2021), in int64 lanes: every scale-derived
# constant is an integer attribute; only +, -, *, shifts, compares, clips, floor division by
# an integer and per-row max / sum. `>>` is arithmetic (floor); "round(v >> s)" below means
# (v + 2^(s-1)) >> s (round half up, nothing added when s = 0), as in `requantize`.

def _round_shift(v, shift: int):
    return (v + ((1 << shift) >> 1)) >> shift


def _int_softmax(x, mask=None, *, multiplier, shift, ln2, b, c, out_bits):
    """Softmax over the last dim of integers x (real value x * S), per row of N lanes:

    1. m = max of x over the kept lanes (mask True; all lanes without a mask)   row max
    2. d = x - m on kept lanes, 0 on masked ones: d <= 0, |d| < 2^32
    3. u = round(d * multiplier >> shift): d * S in fixed point with F fraction bits
       (multiplier * 2^-shift = S * 2^F; the product < 2^63)
    4. u = max(u, -31 * ln2), where ln2 = round(ln 2 * 2^F): below 2^-31 the result is 0 anyway
    5. z = (-u) // ln2 (0..31), p = u + z * ln2 in (-ln2, 0]: d * S = p * 2^-F - z ln 2
    6. e = ((p + b)^2 + c) >> z on kept lanes, 0 on masked ones: exp(p) ~ a (p + b)^2 + c
       (a = 0.3585, b = 1.353, c = 0.344 on (-ln 2, 0]) as b = round(1.353 * 2^F) and
       c = round(0.344 / a * 2^2F); (p + b)^2 + c < 2^31 (checked on the attributes)
    7. s = sum of e over the row (< N * 2^31)                                      row sum
    8. r = 2^62 // max(s, 1)                                    one division per row
    9. y = clip(round(e * r >> (62 - out_bits)), 0, 2^out_bits - 1); e * r <= 2^62

    y is the probability in steps of 2^-out_bits; a fully masked row gives zeros."""
    x = x.astype(np.int64)
    keep = np.ones(x.shape, bool) if mask is None else np.broadcast_to(mask, x.shape)
    m = np.where(keep, x, np.int64(-(1 << 31))).max(axis=-1, keepdims=True)
    d = np.where(keep, x - m, 0)
    u = np.maximum(_round_shift(d * multiplier, shift), -31 * ln2)
    z = (-u) // ln2
    p = u + z * ln2
    e = np.where(keep, ((p + b) * (p + b) + c) >> z, 0)
    r = (1 << 62) // np.maximum(e.sum(axis=-1, keepdims=True), 1)
    return np.clip(_round_shift(e * r, 62 - out_bits), 0, (1 << out_bits) - 1)


def _int_gelu(x, *, multiplier, shift, clip, one, out_multiplier, out_shift, dtype: DType, scale):
    """GELU of integers x (real value x * S), lane by lane:

    1. u = round(x * multiplier >> shift): x * S / sqrt(2) with F fraction bits
    2. t = min(|u|, clip) - clip, clip = round(1.769 * 2^F): t in [-clip, 0]
    3. erf = sign(u) * (one - t^2), one = round(2^2F / 0.2888): erf(x S / sqrt 2) in steps of
       0.2888 * 2^-2F (I-BERT's erf(v) ~ sign(v) (1 - 0.2888 (min(|v|, 1.769) - 1.769)^2))
    4. g = x * (erf + one): 2 GELU(x S) / (S * 0.2888 * 2^-2F)
    5. y = clip(round(g * out_multiplier >> out_shift), dtype), out_multiplier * 2^-out_shift =
       S * 0.2888 * 2^-(2F+1) / scale (|g * out_multiplier| <= 2^62, checked on the attributes)"""
    x = x.astype(np.int64)
    u = _round_shift(x * multiplier, shift)
    t = np.minimum(np.abs(u), clip) - clip
    g = x * (np.sign(u) * (one - t * t) + one)
    return np.clip(_round_shift(g * out_multiplier, out_shift), *dtype.value_range)


def _isqrt(v):
    """floor(sqrt(v)) of int64 0 <= v < 2^62, bit by bit: 31 fixed steps of compare, subtract, shift."""
    root, rest = np.zeros_like(v), v
    for k in range(30, -1, -1):
        trial = root + (1 << 2 * k)
        fits = rest >= trial
        rest = np.where(fits, rest - trial, rest)
        root = np.where(fits, (root >> 1) + (1 << 2 * k), root >> 1)
    return root


_LN_BIAS_LIMIT = 1 << 60


def _int_layer_norm(x, w, b, *, eps, shift, dtype: DType, scale):
    """Layer norm over the last dim (N lanes) of integers x (real value x * S):

    1. s = sum of x over the row                                                  row sum
    2. mean = (2 s + N) // (2 N): round half up of s / N          one division per row
    3. c = x - mean (|c| < 2^bits of x)
    4. v = sum of c^2 over the row + eps, eps = round(eps_real * N / S^2); v < 2^62   row sum
    5. r = max(isqrt(v), 1): floor square root, 31 bit-by-bit steps             per row
    6. f = 2^31 // r                                                   one division per row
    7. n = c * f: (x - mean) / std * 2^31 / sqrt(N); |n| <= 2^31 since |c| <= r
    8. y = clip(round((n * weight[j] + bias[j]) >> shift), dtype) per channel j, with
       weight[j] = round(gamma[j] sqrt(N) 2^(shift-31) / scale) (i32) and
       bias[j] = round(beta[j] 2^shift / scale) (i64, |bias| <= 2^60, so nothing wraps)"""
    if b.size and np.abs(b.astype(np.int64)).max() > _LN_BIAS_LIMIT:
        raise ValueError("int_layer_norm: |bias| must be at most 2^60")
    x = x.astype(np.int64)
    n = x.shape[-1]
    mean = (2 * x.sum(axis=-1, keepdims=True) + n) // (2 * n)
    c = x - mean
    r = np.maximum(_isqrt((c * c).sum(axis=-1, keepdims=True) + eps), 1)
    y = _round_shift(c * ((1 << 31) // r) * w.astype(np.int64) + b.astype(np.int64), shift)
    return np.clip(y, *dtype.value_range)


def _softmax(x, dim):
    shifted = x - np.max(x, axis=dim, keepdims=True)
    e = np.exp(shifted)
    return e / np.sum(e, axis=dim, keepdims=True)


def _safe_softmax(x, dim):
    """Softmax whose fully masked (all -inf) rows give zeros, as torch's attention does."""
    finite_max = np.max(x, axis=dim, keepdims=True)
    dead = ~np.isfinite(finite_max)
    e = np.exp(x - np.where(dead, 0, finite_max))
    total = np.sum(e, axis=dim, keepdims=True)
    return np.where(dead, 0, e / np.where(dead, 1, total))


def _layer_norm(x, w=None, b=None, *, normalized_shape, eps):
    axes = tuple(range(x.ndim - len(normalized_shape), x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    y = (x - mean) / np.sqrt(var + np.asarray(eps, dtype=x.dtype))
    if w is not None:
        y = y * w
    if b is not None:
        y = y + b
    return y


def _gelu(x, approximate):
    if approximate == "tanh":
        c = np.asarray(np.sqrt(2.0 / np.pi), dtype=x.dtype)
        return 0.5 * x * (1 + np.tanh(c * (x + np.asarray(0.044715, dtype=x.dtype) * x ** 3)))
    return 0.5 * x * (1 + _erf(x / np.asarray(np.sqrt(2.0), dtype=x.dtype)))


def causal_mask(queries: int, keys: int, window: int | None = None) -> np.ndarray:
    """Bool `[queries, keys]`: query i sees key j when j <= i, and i - j < window if given."""
    i, j = np.arange(queries)[:, None], np.arange(keys)[None, :]
    return (j <= i) & (True if window is None else i - j < window)


def _sdpa(q, k, v, mask=None, *, is_causal, scale, window):
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    scores = np.matmul(q, np.swapaxes(k, -1, -2)) * np.asarray(scale, dtype=q.dtype)
    if is_causal:
        scores = np.where(causal_mask(*scores.shape[-2:], window), scores, -np.inf)
    if mask is not None:
        scores = np.where(mask, scores, -np.inf) if mask.dtype == bool else scores + mask
    return np.matmul(_safe_softmax(scores, -1).astype(q.dtype), v)


def _conv2d(x, w, b=None, *, stride, padding, dilation, groups):
    x = np.pad(x, ((0, 0), (0, 0), (padding[0],) * 2, (padding[1],) * 2))
    kh, kw = w.shape[2:]
    span = (dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1)
    windows = np.lib.stride_tricks.sliding_window_view(x, span, axis=(2, 3))
    windows = windows[:, :, ::stride[0], ::stride[1], ::dilation[0], ::dilation[1]]
    cin, cout = w.shape[1], w.shape[0] // groups
    outs = [np.einsum("nchwij,ocij->nohw", windows[:, g * cin:(g + 1) * cin], w[g * cout:(g + 1) * cout])
            for g in range(groups)]
    y = np.concatenate(outs, axis=1)
    return y if b is None else y + b[None, :, None, None]


def _conv1d(x, w, b=None, *, stride, padding, dilation, groups):
    """`_conv2d` over a height of one."""
    return _conv2d(x[:, :, None], w[:, :, None], b, stride=(1, *stride), padding=(0, *padding),
                   dilation=(1, *dilation), groups=groups)[:, :, 0]


def _per_channel(v, x):
    """A per-channel vector `[C]` shaped to broadcast along dim 1 of `x`."""
    return v.reshape((1, -1) + (1,) * (x.ndim - 2))


def _batch_norm(x, mean, var, w=None, b=None, *, eps):
    y = (x - _per_channel(mean, x)) / np.sqrt(_per_channel(var, x) + np.asarray(eps, dtype=x.dtype))
    if w is not None:
        y = y * _per_channel(w, x)
    return y if b is None else y + _per_channel(b, x)


def _group_norm(x, w=None, b=None, *, num_groups, eps):
    grouped = x.reshape(x.shape[0], num_groups, -1)
    y = _layer_norm(grouped, normalized_shape=grouped.shape[-1:], eps=eps).reshape(x.shape)
    if w is not None:
        y = y * _per_channel(w, x)
    return y if b is None else y + _per_channel(b, x)


def _rms_norm(x, w=None, *, normalized_shape, eps):
    axes = tuple(range(x.ndim - len(normalized_shape), x.ndim))
    y = x / np.sqrt((x * x).mean(axis=axes, keepdims=True) + np.asarray(eps, dtype=x.dtype))
    return y if w is None else y * w


def _pad(x, pads, value):
    widths = [(0, 0)] * x.ndim
    for i in range(len(pads) // 2):
        widths[x.ndim - 1 - i] = (pads[2 * i], pads[2 * i + 1])
    return np.pad(x, widths, constant_values=np.asarray(value, dtype=x.dtype))


def _argmax(x, dim, keepdim):
    return np.argmax(x, axis=dim, keepdims=keepdim)


def _squeeze(x, dims):
    return np.squeeze(x, axis=tuple(d for d in dims if x.shape[d] == 1))


def _reduce(fn):
    def kernel(x, dims, keepdim):
        return fn(x, axis=tuple(dims) if dims else None, keepdims=keepdim)
    return kernel


def _slice(x, dim, start, end, step):
    index = [slice(None)] * x.ndim
    index[dim] = slice(start, end, step)
    return x[tuple(index)]


def _index_copy(x, index, source, dim):
    dim %= x.ndim
    if index.size and (index.min() < 0 or index.max() >= x.shape[dim]):
        raise IndexError(f"index_copy: position {int(index.max() if index.max() >= x.shape[dim] else index.min())} "
                         f"outside [0, {x.shape[dim]}) along dim {dim}")
    out = x.copy()
    np.moveaxis(out, dim, 0)[index] = np.moveaxis(source, dim, 0)
    return out


def _full(shape, value, dtype: DType):
    return np.full(shape, value, dtype=dtype.numpy)


def _cast(x, dtype: DType):
    if dtype is DType.BOOL:
        return x != 0
    if dtype.is_int and np.issubdtype(x.dtype, np.floating):
        x = np.trunc(x)
    return x.astype(dtype.numpy)


REFERENCE: dict[str, Callable[..., np.ndarray]] = {
    "linear": _linear,
    "matmul": _matmul,
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "div": np.true_divide,
    "pow": np.power,
    "maximum": np.maximum,
    "minimum": np.minimum,
    "eq": np.equal,
    "ne": np.not_equal,
    "lt": np.less,
    "le": np.less_equal,
    "gt": np.greater,
    "ge": np.greater_equal,
    "logical_and": np.logical_and,
    "logical_or": np.logical_or,
    "logical_not": np.logical_not,
    "neg": np.negative,
    "relu": lambda x: np.maximum(x, np.zeros((), dtype=x.dtype)),
    "tanh": np.tanh,
    "sigmoid": lambda x: 1 / (1 + np.exp(-x)),
    "exp": np.exp,
    "abs": np.abs,
    "sign": np.sign,
    "floor": np.floor,
    "ceil": np.ceil,
    "log": np.log,
    "cos": np.cos,
    "sin": np.sin,
    "silu": lambda x: x / (1 + np.exp(-x)),
    "sqrt": np.sqrt,
    "rsqrt": lambda x: 1 / np.sqrt(x),
    "erf": _erf,
    "gelu": _gelu,
    "softmax": _softmax,
    "layer_norm": _layer_norm,
    "rms_norm": _rms_norm,
    "batch_norm": _batch_norm,
    "group_norm": _group_norm,
    "embedding": lambda w, idx: w[idx],
    "gather": lambda x, idx, dim: np.take_along_axis(x, idx, axis=dim),
    "reshape": lambda x, shape: np.reshape(x, shape),
    "permute": lambda x, dims: np.transpose(x, dims),
    "transpose": lambda x, dim0, dim1: np.swapaxes(x, dim0, dim1),
    "slice": _slice,
    "select": lambda x, dim, index: np.take(x, index, axis=dim),
    "unsqueeze": lambda x, dim: np.expand_dims(x, dim if dim >= 0 else x.ndim + 1 + dim),
    "squeeze": _squeeze,
    "expand": lambda x, shape: np.broadcast_to(x, shape),
    "cat": lambda *xs, dim: np.concatenate(xs, axis=dim),
    "mean": _reduce(np.mean),
    "sum": _reduce(np.sum),
    "cumsum": lambda x, dim: np.cumsum(x, axis=dim, dtype=x.dtype),
    "any": _reduce(np.any),
    "index": lambda x, *indices: x[tuple(indices)],
    "index_copy": _index_copy,
    "where": np.where,
    "arange": lambda start, end, step, dtype: np.arange(start, end, step, dtype=dtype.numpy),
    "full": _full,
    "scaled_dot_product_attention": _sdpa,
    "conv1d": _conv1d,
    "conv2d": _conv2d,
    "pad": _pad,
    "argmax": _argmax,
    "cast": _cast,
    "quantize": _quantize,
    "dequantize": _dequantize,
    "requantize": _requantize,
    "int_softmax": _int_softmax,
    "int_gelu": _int_gelu,
    "int_layer_norm": _int_layer_norm,
}
