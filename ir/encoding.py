"""Storage encodings of tensors: typed, frozen values held in `TensorType.encoding`.

Each encoding can `encode` a numpy array into an `EncodedTensor` (named flat buffers, each
with a declared bit width), `decode` it back exactly, and bound its size from below
(`lower_bound_bits`). Index and pointer widths are chosen from the shape: a buffer holding
values in `[0, n)` is `index_bits(n) = max(1, ceil(log2 n))` bits wide, packed exactly.
Value buffers are `dtype.bits` wide (b1: 1 bit, +1 -> 1, -1 -> 0; so b1 value buffers
cannot hold zeros). All encodings but Dense take rank-2 tensors `[R, C]`; blocks and
groups tile from the top-left, with edge blocks zero-padded (see `tcc.ir.sparsity`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import ClassVar

import numpy as np

from .dtypes import DType


def index_bits(n: int) -> int:
    """Bits of an unsigned field holding any value in `[0, n)`: `ceil(log2 n)`, at least 1."""
    return max(1, (n - 1).bit_length())


def _log2_comb(n: int, k: int) -> float:
    return math.log2(math.comb(n, k))


@dataclass(frozen=True, eq=False)
class EncodedTensor:
    """A tensor in storage form: flat named `buffers`, each `widths[name]` bits per element.

    The buffer named `values` holds elements of `dtype`; every other buffer holds unsigned
    integers (indices, pointers, bitmaps, flags)."""

    encoding: "Encoding"
    shape: tuple[int, ...]
    dtype: DType
    buffers: dict[str, np.ndarray]
    widths: dict[str, int]

    @property
    def size_bits(self) -> int:
        """Exact storage size: the sum over buffers of length times declared width."""
        return sum(len(buffer) * self.widths[name] for name, buffer in self.buffers.items())

    def serialize(self) -> bytes:
        """The buffers in order, each element's `widths[name]` low bits MSB-first, each buffer
        padded to a whole byte: `len(serialize()) == sum(ceil(len(b) * width / 8))`, so
        `0 <= 8 * len(serialize()) - size_bits < 8 * len(buffers)`."""
        out = bytearray()
        for name, buffer in self.buffers.items():
            width = self.widths[name]
            patterns = _value_patterns(buffer, self.dtype) if name == "values" else _index_patterns(buffer, width, name)
            shifts = np.arange(width - 1, -1, -1, dtype=np.uint64)
            bits = ((patterns[:, None] >> shifts) & np.uint64(1)).astype(np.uint8)
            out += np.packbits(bits.ravel()).tobytes()
        return bytes(out)


def _index_patterns(buffer: np.ndarray, width: int, name: str) -> np.ndarray:
    patterns = buffer.astype(np.uint64)
    if patterns.size and int(patterns.max()) >> width:
        raise ValueError(f"buffer '{name}' holds {int(patterns.max())}, wider than its {width} bits")
    return patterns


def _value_patterns(values: np.ndarray, dtype: DType) -> np.ndarray:
    """Bit patterns (low `dtype.bits` bits of a uint64) of values of `dtype`."""
    if dtype is DType.B1:
        _check_b1(values)
        return (values > 0).astype(np.uint64)
    if dtype is DType.BF16:
        return (values.astype(np.float32).view(np.uint32) >> np.uint32(16)).astype(np.uint64)
    if dtype.is_float:
        return values.view(f"uint{dtype.bits}").astype(np.uint64)
    if dtype is DType.BOOL:
        return values.astype(np.uint64)
    return values.astype(np.int64).view(np.uint64) & np.uint64((1 << dtype.bits) - 1)


def _check_b1(values: np.ndarray) -> None:
    if np.any((values != 1) & (values != -1)):
        raise ValueError("b1 values must be +1 or -1 (a b1 value buffer cannot hold zeros)")


def _coerce(encoding: "Encoding", array: np.ndarray, dtype: DType, rank2: bool = True) -> np.ndarray:
    """`array` as `dtype.numpy`; ValueError if it is not rank 2 (when required) or out of range."""
    array = np.asarray(array)
    if rank2 and array.ndim != 2:
        raise ValueError(f"{encoding} encodes rank-2 tensors, got shape {array.shape}")
    bounds = dtype.value_range
    if bounds is not None and array.size and (array.min() < bounds[0] or array.max() > bounds[1]):
        raise ValueError(f"{encoding}: values outside the range {bounds} of {dtype}")
    return array.astype(dtype.numpy)


@dataclass(frozen=True)
class Encoding:
    """Base of every encoding. `keyword` is the text form's name (`#keyword(params)`);
    the dataclass fields, in order, are its parameters."""

    keyword: ClassVar[str]

    def params(self) -> tuple[int, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))

    def __str__(self) -> str:
        params = self.params()
        return f"#{self.keyword}" + (f"({', '.join(map(str, params))})" if params else "")

    def encode(self, array: np.ndarray, dtype: DType) -> EncodedTensor:
        """Store `array` (elements of `dtype`); ValueError if it does not fit this encoding."""
        array = _coerce(self, array, dtype, rank2=not isinstance(self, Dense))
        buffers, widths = self._encode(array, dtype)
        return EncodedTensor(self, tuple(array.shape), dtype, buffers, widths)

    def decode(self, enc: EncodedTensor) -> np.ndarray:
        """The array `enc` stores, as `enc.dtype.numpy`."""
        if enc.encoding != self:
            raise ValueError(f"cannot decode a {enc.encoding} tensor as {self}")
        return self._decode(enc.buffers, enc.shape, enc.dtype.numpy)

    def lower_bound_bits(self, array: np.ndarray, dtype: DType) -> float:
        """Information-theoretic size of `array` given this encoding's structure: log2 of the
        number of non-zero patterns the structure allows (given the counts that fix this
        encoding's size), plus `dtype.bits` per stored position that the structure cannot
        exclude."""
        array = _coerce(self, array, dtype, rank2=not isinstance(self, Dense))
        return self._lower_bound(array, dtype.bits)

    def _encode(self, array: np.ndarray, dtype: DType) -> tuple[dict[str, np.ndarray], dict[str, int]]:
        raise NotImplementedError

    def _decode(self, buffers: dict[str, np.ndarray], shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        raise NotImplementedError

    def _lower_bound(self, array: np.ndarray, value_bits: int) -> float:
        raise NotImplementedError


@dataclass(frozen=True)
class Dense(Encoding):
    """Every element stored, row-major: `numel * dtype.bits` bits."""

    keyword: ClassVar[str] = "dense"

    def _encode(self, array, dtype):
        return {"values": array.ravel()}, {"values": dtype.bits}

    def _decode(self, buffers, shape, dtype):
        return buffers["values"].reshape(shape).astype(dtype)

    def _lower_bound(self, array, value_bits):
        return float(array.size * value_bits)


DENSE = Dense()


def _unstructured_bound(array: np.ndarray, value_bits: int) -> float:
    nnz = int(np.count_nonzero(array))
    return _log2_comb(array.size, nnz) + nnz * value_bits


@dataclass(frozen=True)
class COO(Encoding):
    """Non-zeros in row-major order as (row, column, value) triples:
    `nnz * (index_bits(R) + index_bits(C) + dtype.bits)` bits."""

    keyword: ClassVar[str] = "coo"

    def _encode(self, array, dtype):
        rows, cols = np.nonzero(array)
        buffers = {"rows": rows, "cols": cols, "values": array[rows, cols]}
        return buffers, {"rows": index_bits(array.shape[0]), "cols": index_bits(array.shape[1]), "values": dtype.bits}

    def _decode(self, buffers, shape, dtype):
        out = np.zeros(shape, dtype)
        out[buffers["rows"], buffers["cols"]] = buffers["values"]
        return out

    def _lower_bound(self, array, value_bits):
        return _unstructured_bound(array, value_bits)


def _compress_rows(array: np.ndarray, dtype: DType, ptr: str, idx: str):
    """CSR buffers of `array`: R+1 pointers into the nnz (column index, value) pairs."""
    rows, cols = np.nonzero(array)
    pointers = np.concatenate([[0], np.cumsum(np.count_nonzero(array, axis=1))])
    buffers = {ptr: pointers, idx: cols, "values": array[rows, cols]}
    return buffers, {ptr: index_bits(array.size + 1), idx: index_bits(array.shape[1]), "values": dtype.bits}


def _expand_rows(buffers: dict[str, np.ndarray], shape: tuple[int, int], dtype: np.dtype, ptr: str, idx: str):
    out = np.zeros(shape, dtype)
    rows = np.repeat(np.arange(shape[0]), np.diff(buffers[ptr]))
    out[rows, buffers[idx]] = buffers["values"]
    return out


@dataclass(frozen=True)
class CSR(Encoding):
    """Compressed sparse rows: `(R + 1) * index_bits(R*C + 1)` bits of row pointers, then
    `nnz * (index_bits(C) + dtype.bits)` bits of column indices and values."""

    keyword: ClassVar[str] = "csr"

    def _encode(self, array, dtype):
        return _compress_rows(array, dtype, "row_ptr", "cols")

    def _decode(self, buffers, shape, dtype):
        return _expand_rows(buffers, shape, dtype, "row_ptr", "cols")

    def _lower_bound(self, array, value_bits):
        return _unstructured_bound(array, value_bits)


@dataclass(frozen=True)
class CSC(Encoding):
    """Compressed sparse columns (CSR of the transpose): `(C + 1) * index_bits(R*C + 1)`
    bits of column pointers, then `nnz * (index_bits(R) + dtype.bits)` bits."""

    keyword: ClassVar[str] = "csc"

    def _encode(self, array, dtype):
        return _compress_rows(array.T, dtype, "col_ptr", "rows")

    def _decode(self, buffers, shape, dtype):
        return _expand_rows(buffers, shape[::-1], dtype, "col_ptr", "rows").T.copy()

    def _lower_bound(self, array, value_bits):
        return _unstructured_bound(array, value_bits)


@dataclass(frozen=True)
class Bitmap(Encoding):
    """One bit per element (row-major, 1 = non-zero), then the non-zero values:
    `R*C + nnz * dtype.bits` bits."""

    keyword: ClassVar[str] = "bitmap"

    def _encode(self, array, dtype):
        mask = array != 0
        return {"bitmap": mask.ravel().astype(np.uint8), "values": array[mask]}, {"bitmap": 1, "values": dtype.bits}

    def _decode(self, buffers, shape, dtype):
        out = np.zeros(shape, dtype)
        out[buffers["bitmap"].reshape(shape).astype(bool)] = buffers["values"]
        return out

    def _lower_bound(self, array, value_bits):
        return _unstructured_bound(array, value_bits)


def _padded_blocks(blocks: np.ndarray) -> np.ndarray:
    """Inverse of `block_view`: [BR, BC, bh, bw] -> the padded [BR*bh, BC*bw] matrix."""
    nbr, nbc, bh, bw = blocks.shape
    return blocks.swapaxes(1, 2).reshape(nbr * bh, nbc * bw)


@dataclass(frozen=True)
class BSR(Encoding):
    """Block sparse rows over `bh x bw` blocks (edge blocks zero-padded); only blocks with a
    non-zero are stored, densely. With a `BR x BC` block grid and `nb` stored blocks:
    `(BR + 1) * index_bits(BR*BC + 1) + nb * (index_bits(BC) + bh*bw*dtype.bits)` bits."""

    keyword: ClassVar[str] = "bsr"
    bh: int
    bw: int

    def __post_init__(self) -> None:
        from .sparsity import Blocks
        Blocks(self.bh, self.bw)  # validates the parameters

    def _encode(self, array, dtype):
        from .sparsity import block_view
        blocks = block_view(array, self.bh, self.bw)
        kept = blocks.any(axis=(2, 3))
        bi, bj = np.nonzero(kept)
        buffers = {"block_ptr": np.concatenate([[0], np.cumsum(kept.sum(axis=1))]), "block_cols": bj,
                   "values": blocks[bi, bj].ravel()}
        return buffers, {"block_ptr": index_bits(kept.size + 1), "block_cols": index_bits(kept.shape[1]),
                         "values": dtype.bits}

    def _decode(self, buffers, shape, dtype):
        nbr, nbc = -(-shape[0] // self.bh), -(-shape[1] // self.bw)
        blocks = np.zeros((nbr, nbc, self.bh, self.bw), dtype)
        bi = np.repeat(np.arange(nbr), np.diff(buffers["block_ptr"]))
        blocks[bi, buffers["block_cols"]] = buffers["values"].reshape(-1, self.bh, self.bw)
        return _padded_blocks(blocks)[:shape[0], :shape[1]].copy()

    def _lower_bound(self, array, value_bits):
        from .sparsity import block_view, block_widths
        kept = block_view(array, self.bh, self.bw).any(axis=(2, 3))
        area = np.outer(block_widths(array.shape[0], self.bh), block_widths(array.shape[1], self.bw))
        return _log2_comb(kept.size, int(kept.sum())) + int(area[kept].sum()) * value_bits


def _top_slots(groups: np.ndarray, k: int) -> np.ndarray:
    """Per last-axis group, `k` distinct positions (ascending) covering every non-zero."""
    order = np.argsort(groups == 0, axis=-1, kind="stable")[..., :k]
    return np.sort(order, axis=-1)


@dataclass(frozen=True)
class NM(Encoding):
    """N:M: each row is cut into groups of `m` (the last zero-padded) and every group stores
    exactly `n` (value, position) slots, explicit zeros filling groups with fewer non-zeros:
    `R * ceil(C/m) * n * (dtype.bits + index_bits(m))` bits."""

    keyword: ClassVar[str] = "nm"
    n: int
    m: int

    def __post_init__(self) -> None:
        self._structure()  # validates the parameters

    def _structure(self):
        from .sparsity import NM as NMSparsity
        return NMSparsity(self.n, self.m)

    def _groups(self, array: np.ndarray) -> np.ndarray:
        from .sparsity import block_view
        return block_view(array, 1, self.m)[:, :, 0, :]  # [R, C/m, m]

    def _encode(self, array, dtype):
        problem = self._structure().violation(array)
        if problem:
            raise ValueError(f"{self} cannot store this tensor: {problem}")
        groups = self._groups(array)
        positions = _top_slots(groups, self.n)
        values = np.take_along_axis(groups, positions, axis=2)
        return ({"positions": positions.ravel(), "values": values.ravel()},
                {"positions": index_bits(self.m), "values": dtype.bits})

    def _decode(self, buffers, shape, dtype):
        groups = np.zeros((shape[0], -(-shape[1] // self.m), self.m), dtype)
        slots = groups.shape[:2] + (self.n,)
        np.put_along_axis(groups, buffers["positions"].reshape(slots), buffers["values"].reshape(slots), axis=2)
        return groups.reshape(shape[0], -1)[:, :shape[1]].copy()

    def _lower_bound(self, array, value_bits):
        from .sparsity import block_widths
        counts = np.count_nonzero(self._groups(array), axis=2)
        widths = np.broadcast_to(block_widths(array.shape[1], self.m), counts.shape)
        patterns = sum(_log2_comb(int(w), int(k)) for w, k in zip(widths.ravel(), counts.ravel()))
        return patterns + int(counts.sum()) * value_bits


@dataclass(frozen=True)
class HP(Encoding):
    """Hierarchical sparsity over `bh x bw` blocks (edge blocks zero-padded).

    Level 1, which blocks survive (those with a non-zero), as whichever is smaller for the
    whole tensor, recorded in a 1-bit `block_format` flag: a bitmap of the `BR x BC` grid
    (`BR*BC` bits, flag 0), or per block row a count and the surviving block columns
    (`BR * index_bits(BC + 1) + nb * index_bits(BC)` bits, flag 1; ties pick the bitmap).
    Level 2, in each of the `nb` surviving blocks, each of its `bh` rows stores exactly
    `row_nnz` (value, local column) slots, explicit zeros filling rows with fewer non-zeros:
    `nb * bh * row_nnz * (dtype.bits + index_bits(bw))` bits. No row pointers are needed."""

    keyword: ClassVar[str] = "hp"
    bh: int
    bw: int
    row_nnz: int

    def __post_init__(self) -> None:
        self._structure()  # validates the parameters

    def _structure(self):
        from .sparsity import Hierarchical
        return Hierarchical(self.bh, self.bw, self.row_nnz)

    def _encode(self, array, dtype):
        from .sparsity import block_view
        problem = self._structure().violation(array)
        if problem:
            raise ValueError(f"{self} cannot store this tensor: {problem}")
        blocks = block_view(array, self.bh, self.bw)
        kept = blocks.any(axis=(2, 3))
        nbr, nbc = kept.shape
        bi, bj = np.nonzero(kept)
        list_bits = nbr * index_bits(nbc + 1) + len(bj) * index_bits(nbc)
        if list_bits < kept.size:
            buffers = {"block_format": np.array([1]), "block_counts": kept.sum(axis=1), "block_cols": bj}
            widths = {"block_format": 1, "block_counts": index_bits(nbc + 1), "block_cols": index_bits(nbc)}
        else:
            buffers = {"block_format": np.array([0]), "block_bitmap": kept.ravel().astype(np.uint8)}
            widths = {"block_format": 1, "block_bitmap": 1}
        rows = blocks[bi, bj]  # [nb, bh, bw]
        columns = _top_slots(rows, self.row_nnz)
        buffers.update(columns=columns.ravel(), values=np.take_along_axis(rows, columns, axis=2).ravel())
        widths.update(columns=index_bits(self.bw), values=dtype.bits)
        return buffers, widths

    def _decode(self, buffers, shape, dtype):
        nbr, nbc = -(-shape[0] // self.bh), -(-shape[1] // self.bw)
        if buffers["block_format"][0]:
            bi, bj = np.repeat(np.arange(nbr), buffers["block_counts"]), buffers["block_cols"]
        else:
            bi, bj = np.nonzero(buffers["block_bitmap"].reshape(nbr, nbc))
        slots = (len(bi), self.bh, self.row_nnz)
        rows = np.zeros((len(bi), self.bh, self.bw), dtype)
        np.put_along_axis(rows, buffers["columns"].reshape(slots), buffers["values"].reshape(slots), axis=2)
        blocks = np.zeros((nbr, nbc, self.bh, self.bw), dtype)
        blocks[bi, bj] = rows
        return _padded_blocks(blocks)[:shape[0], :shape[1]].copy()

    def _lower_bound(self, array, value_bits):
        from .sparsity import block_view, block_widths
        blocks = block_view(array, self.bh, self.bw)
        kept = blocks.any(axis=(2, 3))
        counts = np.count_nonzero(blocks, axis=3)  # [BR, BC, bh]
        widths = np.broadcast_to(block_widths(array.shape[1], self.bw)[None, :, None], counts.shape)
        patterns = sum(_log2_comb(int(w), int(k)) for w, k in zip(widths[kept].ravel(), counts[kept].ravel()))
        return _log2_comb(kept.size, int(kept.sum())) + patterns + int(counts.sum()) * value_bits


@dataclass(frozen=True)
class Packed1b(Encoding):
    """Binarized (b1) values, one bit each, row-major (+1 -> 1, -1 -> 0): `R*C` bits.
    Every element must be +1 or -1."""

    keyword: ClassVar[str] = "packed1b"

    def _encode(self, array, dtype):
        if dtype is not DType.B1:
            raise ValueError(f"{self} stores b1 tensors, got {dtype}")
        _check_b1(array)
        return {"signs": (array.ravel() > 0).astype(np.uint8)}, {"signs": 1}

    def _decode(self, buffers, shape, dtype):
        return np.where(buffers["signs"].reshape(shape) > 0, 1, -1).astype(dtype)

    def _lower_bound(self, array, value_bits):
        return float(array.size)


ENCODINGS: dict[str, type[Encoding]] = {
    cls.keyword: cls for cls in (Dense, COO, CSR, CSC, BSR, Bitmap, NM, HP, Packed1b)
}


def make_keyword_value(registry: dict[str, type], what: str, sigil: str, keyword: str, params: tuple[int, ...]):
    """Build `registry[keyword](*params)` for the text form `<sigil>keyword(params)`;
    ValueError naming the problem otherwise."""
    if keyword not in registry:
        raise ValueError(f"unknown {what} '{sigil}{keyword}' (known: {', '.join(sorted(registry))})")
    try:
        return registry[keyword](*params)
    except TypeError:
        raise ValueError(f"{what} '{sigil}{keyword}' does not take parameters {params}") from None


def make_encoding(keyword: str, params: tuple[int, ...]) -> Encoding:
    """Build an encoding from its text form's keyword and integer parameters."""
    return make_keyword_value(ENCODINGS, "encoding", "#", keyword, params)
