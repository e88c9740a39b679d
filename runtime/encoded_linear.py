"""Linear kernels that compute on a weight in its storage encoding.

Each kernel is built once from an `EncodedTensor` `W [out, in]` (never a dense copy per
call) and maps `x [..., in]` to `x @ W.T` (bias left to the caller):

- sparse encodings (CSR, CSC, COO, bitmap, N:M, HP) become one compressed-row matrix of their
  stored entries (`Encoding.entries`; HP's balanced rows need no pointers of their own, so its
  row pointers are counted from the surviving blocks). numpy: a scipy CSR matrix, in the
  op's accumulator (int32, int64 for i16) for integers; torch: a sparse CSR tensor, float64
  for integers (exact: products and partial sums are integers below 2^53). BSR with square
  blocks on torch is a sparse BSR tensor over the zero-padded block grid (MKL takes square
  blocks only; other block shapes go through CSR).
- Packed1b: the signs as 64-bit words per output row, and XNOR-popcount. With b1 inputs
  `x . w = K - 2 popcount(x ^ w)`; with B-bit integer inputs, bit-serially over the input's
  two's complement bit planes: `x . w = 2 sum_b c_b popcount(plane_b & w) - sum(x)`, with
  `c_b = 2^b` and `-2^(B-1)` for the sign plane. numpy counts with `bitwise_count`; torch,
  which has no popcount, with the SWAR bit trick on int64 words.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse
import torch
import torch.nn.functional as F

from tcc.ir.dtypes import DType
from tcc.ir.encoding import BSR, EncodedTensor, Packed1b

from .torch_dtypes import TORCH_DTYPES

_POPCOUNT_CHUNK = 1 << 22  # words per popcount step: bounds the [rows, out, words] temporary


def accumulator(x_dtype: DType, w_dtype: DType) -> DType:
    """The integer linear's accumulator (as the op table types it)."""
    return DType.I64 if DType.I16 in (x_dtype, w_dtype) else DType.I32


def plane_coefficients(dtype: DType) -> list[tuple[int, int]]:
    """(bit, weight) of each two's complement bit plane of a `dtype` integer."""
    bits = dtype.bits
    return [(b, 1 << b) for b in range(bits - 1)] + [(bits - 1, -(1 << (bits - 1)))]


def pack_rows(bits: np.ndarray) -> np.ndarray:
    """Boolean rows `[n, k]` as little-endian 64-bit words `[n, ceil(k/64)]` (element j of a row
    is bit j % 64 of word j // 64; padding bits are 0)."""
    words = -(-bits.shape[1] // 64)
    packed = np.packbits(bits, axis=1, bitorder="little")
    padded = np.zeros((bits.shape[0], words * 8), np.uint8)
    padded[:, :packed.shape[1]] = packed
    return padded.view("<u8")


def _signs(enc: EncodedTensor) -> np.ndarray:
    return enc.buffers["signs"].reshape(enc.shape) > 0


def _csr_parts(enc: EncodedTensor):
    """Row pointers, column indices and values of the stored entries, rows in order."""
    rows, cols, values = enc.encoding.entries(enc)
    order = np.lexsort((cols, rows))
    pointers = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=enc.shape[0]))])
    return pointers, cols[order], values[order]


class NumpyEncodedLinear:
    """`x -> x @ W.T` in numpy/scipy on `W` in its encoding; `x_dtype` is the input's IR dtype."""

    def __init__(self, enc: EncodedTensor, x_dtype: DType):
        self.out_features, self.in_features = enc.shape
        self.x_dtype = x_dtype
        if isinstance(enc.encoding, Packed1b):
            self.words = pack_rows(_signs(enc))
            self.compute = np.int64
            return
        self.compute = accumulator(x_dtype, enc.dtype).numpy if x_dtype.is_int else enc.dtype.numpy
        pointers, cols, values = _csr_parts(enc)
        self.matrix = scipy.sparse.csr_array((values.astype(self.compute), cols, pointers), shape=enc.shape)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x2 = x.reshape(-1, self.in_features)
        y = self._popcount(x2) if hasattr(self, "words") else (self.matrix @ x2.astype(self.compute).T).T
        # C order, as the dense reference's matmul (and the accelerator's read-back) gives: on the
        # transposed view, a later reduction (mean, softmax) would sum in another order
        return np.ascontiguousarray(y).reshape(x.shape[:-1] + (self.out_features,))

    def _popcount(self, x2: np.ndarray) -> np.ndarray:
        if self.x_dtype is DType.B1:
            return self.in_features - 2 * self._count(pack_rows(x2 > 0), np.bitwise_xor)
        total = sum(weight * self._count(pack_rows((x2 >> bit) & 1 > 0), np.bitwise_and)
                    for bit, weight in plane_coefficients(self.x_dtype))
        return 2 * total - x2.sum(axis=1, dtype=np.int64)[:, None]

    def _count(self, xw: np.ndarray, combine) -> np.ndarray:
        """`[n, out]` popcounts of `combine(x row words, weight row words)`."""
        step = max(1, _POPCOUNT_CHUNK // max(1, self.words.size))
        return np.concatenate([
            np.bitwise_count(combine(xw[i:i + step, None, :], self.words[None])).sum(axis=2, dtype=np.int64)
            for i in range(0, len(xw), step)]) if len(xw) else np.zeros((0, self.out_features), np.int64)


_M1, _M2, _M4, _H01 = 0x5555555555555555, 0x3333333333333333, 0x0F0F0F0F0F0F0F0F, 0x0101010101010101


def _torch_popcount(v: torch.Tensor) -> torch.Tensor:
    """Set bits of each int64 (SWAR). Arithmetic shifts are safe: every mask clears the bits a
    sign extension could fill, and the final byte sum is at most 64."""
    v = v - ((v >> 1) & _M1)
    v = (v & _M2) + ((v >> 2) & _M2)
    v = (v + (v >> 4)) & _M4
    return (v * _H01) >> 56


def _torch_pack_rows(bits: torch.Tensor, words: int) -> torch.Tensor:
    """`pack_rows` in torch: boolean `[n, k]` -> int64 words `[n, words]`, same bit layout."""
    padded = F.pad(bits.to(torch.int64), (0, words * 64 - bits.shape[1])).reshape(bits.shape[0], words, 64)
    return (padded << torch.arange(64, device=bits.device)).sum(dim=2)


class TorchEncodedLinear:
    """`x -> x @ W.T` in torch on `W` in its encoding, on `device` (floats in the weight's
    dtype; integers exact, returned as int64)."""

    def __init__(self, enc: EncodedTensor, x_dtype: DType, device: torch.device):
        self.out_features, self.in_features = enc.shape
        self.x_dtype, self.w_dtype = x_dtype, enc.dtype
        if isinstance(enc.encoding, Packed1b):
            self.words = torch.from_numpy(pack_rows(_signs(enc)).view(np.int64)).to(device)
            return
        self.compute = TORCH_DTYPES[enc.dtype] if enc.dtype.is_float else torch.float64
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Sparse (CSR|BSR) tensor support is in beta", UserWarning)
            self.matrix = self._matrix(enc).to(device)

    def _matrix(self, enc: EncodedTensor) -> torch.Tensor:
        if isinstance(enc.encoding, BSR) and enc.encoding.bh == enc.encoding.bw:
            bh, bw = enc.encoding.bh, enc.encoding.bw
            grid = (-(-enc.shape[0] // bh), -(-enc.shape[1] // bw))
            values = torch.from_numpy(enc.buffers["values"].reshape(-1, bh, bw)).to(self.compute)
            return torch.sparse_bsr_tensor(torch.from_numpy(enc.buffers["block_ptr"]),
                                           torch.from_numpy(enc.buffers["block_cols"]), values,
                                           size=(grid[0] * bh, grid[1] * bw), check_invariants=False)
        pointers, cols, values = _csr_parts(enc)
        return torch.sparse_csr_tensor(torch.from_numpy(pointers), torch.from_numpy(cols),
                                       torch.from_numpy(values).to(self.compute), size=enc.shape,
                                       check_invariants=False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if hasattr(self, "words"):
            y = self._popcount(x2)
        else:
            xt = x2.to(self.compute).t()
            if self.matrix.shape[1] != self.in_features:  # BSR over a padded block grid
                xt = F.pad(xt, (0, 0, 0, self.matrix.shape[1] - self.in_features))
            y = (self.matrix @ xt)[:self.out_features].t().contiguous()  # row-major, as the numpy kernel's
            if not x.is_floating_point():
                y = y.to(torch.int64)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _popcount(self, x2: torch.Tensor) -> torch.Tensor:
        words = self.words.shape[1]
        if self.x_dtype is DType.B1:
            return self.in_features - 2 * self._count(_torch_pack_rows(x2 > 0, words), torch.bitwise_xor)
        x64 = x2.to(torch.int64)
        total = sum(weight * self._count(_torch_pack_rows((x64 >> bit) & 1 > 0, words), torch.bitwise_and)
                    for bit, weight in plane_coefficients(self.x_dtype))
        return 2 * total - x64.sum(dim=1, keepdim=True)

    def _count(self, xw: torch.Tensor, combine) -> torch.Tensor:
        step = max(1, _POPCOUNT_CHUNK // max(1, self.words.numel()))
        parts = [_torch_popcount(combine(xw[i:i + step, None, :], self.words[None])).sum(dim=2)
                 for i in range(0, len(xw), step)]
        return torch.cat(parts) if parts else xw.new_zeros((0, self.out_features))
