"""Storage encodings of tensors: typed, frozen values held in `TensorType.encoding`.

Each encoding can `encode` a numpy array into an `EncodedTensor` (named flat buffers, each
with a declared bit width), `decode` it back exactly, and bound its size from below
(`lower_bound_bits`). Index and pointer widths are chosen from the shape (`widths`): a
buffer holding values in `[0, n)` is `index_bits(n) = max(1, ceil(log2 n))` bits wide,
packed exactly. Value buffers are `dtype.bits` wide (b1: 1 bit, +1 -> 1, -1 -> 0; so b1
value buffers cannot hold zeros). All encodings but Dense take rank-2 tensors `[R, C]`;
blocks and groups tile from the top-left, with edge blocks zero-padded (see
`tcc.ir.sparsity`).

Storage form (`EncodedTensor.buffer_bytes`, `Encoding.load`): each buffer on its own, its
elements' low `width` bits packed LSB-first into bytes (so byte-wide buffers are plain
little-endian arrays), padded to a whole byte. `load` checks every length, index and
pointer before anything is decoded, so a corrupted buffer is an error, never a wrong tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import ClassVar

import numpy as np

from .dtypes import DType
from .sparsity import NM as NMStructure
from .sparsity import Blocks, Hierarchical, block_view, block_widths, make_keyword_value


def index_bits(n: int) -> int:
    """Bits of an unsigned field holding any value in `[0, n)`: `ceil(log2 n)`, at least 1."""
    return max(1, (n - 1).bit_length())


def _log2_comb(n: int, k: int) -> float:
    return math.log2(math.comb(n, k))


_CHUNK = 1 << 16  # elements packed per step; a multiple of 8, so each step ends on a byte
_WORD_WIDTHS = (8, 16, 32, 64)  # widths packed as plain little-endian words


def pack_bits(patterns: np.ndarray, width: int) -> bytes:
    """The low `width` bits of each uint64 in `patterns`, LSB-first, padded to a byte."""
    if width in _WORD_WIDTHS:
        return patterns.astype(f"<u{width // 8}").tobytes()
    shifts = np.arange(width, dtype=np.uint64)
    out = bytearray()
    for start in range(0, len(patterns), _CHUNK):
        bits = ((patterns[start:start + _CHUNK, None] >> shifts) & np.uint64(1)).astype(np.uint8)
        out += np.packbits(bits.ravel(), bitorder="little").tobytes()
    return bytes(out)


def unpack_bits(data: bytes, count: int, width: int) -> np.ndarray:
    """Inverse of `pack_bits`: `count` uint64 patterns of `width` bits; ValueError when `data`
    does not hold exactly that many bits (to the byte)."""
    if len(data) != -(-count * width // 8):
        raise ValueError(f"holds {len(data)} bytes, but {count} elements of {width} bits take "
                         f"{-(-count * width // 8)}")
    if width in _WORD_WIDTHS:
        return np.frombuffer(data, f"<u{width // 8}").astype(np.uint64)
    raw = np.frombuffer(data, np.uint8)
    weights = np.uint64(1) << np.arange(width, dtype=np.uint64)
    parts = []
    for start in range(0, count, _CHUNK):
        n = min(_CHUNK, count - start)
        first = start * width // 8  # whole bytes: `start` is a multiple of 8
        bits = np.unpackbits(raw[first:first + -(-n * width // 8)], bitorder="little", count=n * width)
        parts.append(bits.reshape(n, width).astype(np.uint64) @ weights)
    return np.concatenate(parts) if parts else np.zeros(0, np.uint64)


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


def _pattern_values(patterns: np.ndarray, dtype: DType) -> np.ndarray:
    """Inverse of `_value_patterns`: values of `dtype` (in `dtype.numpy`)."""
    if dtype is DType.B1:
        return np.where(patterns > 0, 1, -1).astype(np.int8)
    if dtype is DType.BF16:
        return (patterns.astype(np.uint32) << np.uint32(16)).view(np.float32)
    if dtype.is_float:
        return patterns.astype(f"uint{dtype.bits}").view(dtype.numpy)
    if dtype is DType.BOOL:
        return patterns.astype(bool)
    signed = patterns.astype(np.int64)
    return np.where(signed >= 1 << (dtype.bits - 1), signed - (1 << dtype.bits), signed).astype(dtype.numpy)


def _word_dtype(dtype: DType) -> np.dtype | None:
    """The little-endian numpy dtype whose bytes are the storage form of `dtype` values, when
    there is one (byte-wide ints and IEEE floats): the fast path of packing and unpacking."""
    if dtype.bits in _WORD_WIDTHS and dtype not in (DType.B1, DType.BF16, DType.BOOL):
        return dtype.numpy.newbyteorder("<")
    return None


def _check_b1(values: np.ndarray) -> None:
    if np.any((values != 1) & (values != -1)):
        raise ValueError("b1 values must be +1 or -1 (a b1 value buffer cannot hold zeros)")


def _coerce(encoding: "Encoding", array: np.ndarray, dtype: DType) -> np.ndarray:
    """`array` as `dtype.numpy`; ValueError if it is not rank 2 (when required) or out of range."""
    array = np.asarray(array)
    if encoding.rank2 and array.ndim != 2:
        raise ValueError(f"{encoding} encodes rank-2 tensors, got shape {array.shape}")
    bounds = dtype.value_range
    if bounds is not None and array.size and (array.min() < bounds[0] or array.max() > bounds[1]):
        raise ValueError(f"{encoding}: values outside the range {bounds} of {dtype}")
    return array.astype(dtype.numpy, copy=False)


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

    @property
    def work(self) -> int:
        """Operations the hardware pays to compute with this tensor once: per stored value slot
        (explicit zeros included) one multiply-accumulate plus the bits of the index it must
        resolve to fetch the matching operand (a select of that depth)."""
        slots = len(self.buffers.get("values", next(iter(self.buffers.values()))))
        return slots * (1 + self.encoding.select_bits(self.shape))

    def buffer_arrays(self) -> dict[str, np.ndarray]:
        """Each buffer in storage form as a uint8 array of `ceil(len * width / 8)` bytes (see
        the module doc); a view, not a copy, where the values already are in storage form."""
        out = {}
        for name, buffer in self.buffers.items():
            width = self.widths[name]
            if name == "values" and (word := _word_dtype(self.dtype)) is not None:
                out[name] = np.ascontiguousarray(buffer.astype(word, copy=False)).view(np.uint8).reshape(-1)
                continue
            if name == "values":
                patterns = _value_patterns(buffer, self.dtype)
            else:
                patterns = buffer.astype(np.uint64)
                if patterns.size and int(patterns.max()) >> width:
                    raise ValueError(f"buffer '{name}' holds {int(patterns.max())}, wider than its {width} bits")
            out[name] = np.frombuffer(pack_bits(patterns, width), np.uint8)
        return out

    def buffer_bytes(self) -> dict[str, bytes]:
        """Each buffer in storage form: `ceil(len * width / 8)` bytes (see the module doc)."""
        return {name: array.tobytes() for name, array in self.buffer_arrays().items()}

    def serialize(self) -> bytes:
        """The buffers' storage forms in order: `8 * len(serialize()) - size_bits` is the
        padding, less than 8 bits per buffer."""
        return b"".join(self.buffer_bytes().values())

    def lengths(self) -> dict[str, int]:
        """Elements per buffer: with the encoding, shape and dtype, what `Encoding.load` needs."""
        return {name: len(buffer) for name, buffer in self.buffers.items()}


def _expect_lengths(buffers: dict[str, np.ndarray], expected: dict[str, int]) -> None:
    for name, count in expected.items():
        if name not in buffers:
            raise ValueError(f"buffer '{name}' is missing")
        if len(buffers[name]) != count:
            raise ValueError(f"buffer '{name}' holds {len(buffers[name])} elements, expected {count}")


def _expect_below(buffers: dict[str, np.ndarray], name: str, limit: int) -> None:
    buffer = buffers[name]
    if buffer.size and buffer.max() >= limit:
        raise ValueError(f"buffer '{name}' holds index {int(buffer.max())}, out of range [0, {limit})")


def _expect_pointers(buffers: dict[str, np.ndarray], name: str, count: int) -> int:
    """`count + 1` non-decreasing pointers from 0; returns the last (the entries they cover)."""
    _expect_lengths(buffers, {name: count + 1})
    pointers = buffers[name]
    if pointers[0] != 0 or np.any(np.diff(pointers) < 0):
        raise ValueError(f"buffer '{name}' does not rise from 0")
    return int(pointers[-1])


def _expect_increasing(name: str, keys: np.ndarray) -> None:
    """`keys` (a buffer's entries mapped to positions) strictly increase: no index repeats."""
    if np.any(np.diff(keys) <= 0):
        raise ValueError(f"buffer '{name}' repeats or reorders indices")


def _expect_zero_padding(values: np.ndarray, valid: np.ndarray, where: str) -> None:
    if np.any(values[~valid] != 0):
        raise ValueError(f"buffer 'values' holds a non-zero in the zero padding of {where}")


def _edge_sizes(start: np.ndarray, size: int, extent: int) -> np.ndarray:
    """Real sizes of blocks of `size` starting at block index `start` in a dimension of `extent`."""
    return np.minimum(size, extent - start * size)


@dataclass(frozen=True)
class Encoding:
    """Base of every encoding. `keyword` is the text form's name (`#keyword(params)`);
    the dataclass fields, in order, are its parameters."""

    keyword: ClassVar[str]
    rank2: ClassVar[bool] = True

    def params(self) -> tuple[int, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))

    def __str__(self) -> str:
        params = self.params()
        return f"#{self.keyword}" + (f"({', '.join(map(str, params))})" if params else "")

    def widths(self, shape: tuple[int, ...], dtype: DType) -> dict[str, int]:
        """Bit width of every buffer this encoding may hold for a tensor of `shape`, in storage order."""
        raise NotImplementedError

    def select_bits(self, shape: tuple[int, ...]) -> int:
        """Bits of index the hardware resolves per stored value to find its operand (see `work`)."""
        return 0

    def violation(self, array: np.ndarray, dtype: DType) -> str | None:
        """None if this encoding can store `array` (of `dtype`, rank checked), else why not."""
        return None

    def footprint(self, array: np.ndarray, dtype: DType) -> tuple[int, int]:
        """`(size_bits, work)` that `encode(array, dtype)` would have, counted without building
        the buffers (format selection costs every candidate this way)."""
        array = _coerce(self, array, dtype)
        bits, slots = self._footprint(array, dtype.bits)
        return bits, slots * (1 + self.select_bits(array.shape))

    def _footprint(self, array: np.ndarray, value_bits: int) -> tuple[int, int]:
        """(size_bits, value slots)."""
        raise NotImplementedError

    def min_footprint(self, shape: tuple[int, ...], dtype: DType, nnz: int) -> tuple[int, int]:
        """Lower bounds of `footprint`'s `(size_bits, work)` over every array of `shape` and
        `dtype` with `nnz` non-zeros: format selection skips a candidate that cannot win."""
        bits, slots = self._min_footprint(shape, nnz, dtype.bits)
        return bits, slots * (1 + self.select_bits(shape))

    def _min_footprint(self, shape: tuple[int, ...], nnz: int, value_bits: int) -> tuple[int, int]:
        """(size_bits, value slots) lower bounds; every encoding stores each non-zero value."""
        return nnz * value_bits, nnz

    def encode(self, array: np.ndarray, dtype: DType) -> EncodedTensor:
        """Store `array` (elements of `dtype`); ValueError if it does not fit this encoding."""
        array = _coerce(self, array, dtype)
        problem = self.violation(array, dtype)
        if problem:
            raise ValueError(f"{self} cannot store this tensor: {problem}")
        buffers = self._encode(array, dtype)
        widths = self.widths(array.shape, dtype)
        return EncodedTensor(self, tuple(array.shape), dtype, buffers, {name: widths[name] for name in buffers})

    def decode(self, enc: EncodedTensor) -> np.ndarray:
        """The array `enc` stores, as `enc.dtype.numpy`."""
        if enc.encoding != self:
            raise ValueError(f"cannot decode a {enc.encoding} tensor as {self}")
        return self._decode(enc.buffers, enc.shape, enc.dtype.numpy)

    def entries(self, enc: EncodedTensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows, columns, values) of every stored slot of a rank-2 tensor that lies inside it
        (explicit zeros included, padding left out): what sparse kernels are built from."""
        if enc.encoding != self:
            raise ValueError(f"cannot read a {enc.encoding} tensor as {self}")
        return self._entries(enc.buffers, enc.shape)

    def load(self, shape: tuple[int, ...], dtype: DType, stored: dict[str, tuple[int, bytes]]) -> EncodedTensor:
        """Rebuild an `EncodedTensor` from its buffers' storage forms (`name -> (elements,
        bytes)`), checking lengths, index ranges, pointers and zero padding; ValueError
        naming the buffer otherwise."""
        if self.rank2 and len(shape) != 2:
            raise ValueError(f"{self} encodes rank-2 tensors, got shape {tuple(shape)}")
        widths = self.widths(tuple(shape), dtype)
        unknown = sorted(set(stored) - set(widths))
        if unknown:
            raise ValueError(f"unexpected buffer '{unknown[0]}' for {self}")
        buffers = {}
        for name in widths:
            if name in stored:
                count, data = stored[name]
                word = _word_dtype(dtype) if name == "values" else None
                if word is not None and len(data) == count * word.itemsize:
                    buffers[name] = np.frombuffer(data, word).astype(dtype.numpy)
                    continue
                try:
                    patterns = unpack_bits(data, count, widths[name])
                except ValueError as e:
                    raise ValueError(f"buffer '{name}' {e}") from None
                buffers[name] = _pattern_values(patterns, dtype) if name == "values" else patterns.astype(np.int64)
        self._check(buffers, tuple(shape))
        return EncodedTensor(self, tuple(shape), dtype, buffers, {name: widths[name] for name in buffers})

    def lower_bound_bits(self, array: np.ndarray, dtype: DType) -> float:
        """Information-theoretic size of `array` given this encoding's structure: log2 of the
        number of non-zero patterns the structure allows (given the counts that fix this
        encoding's size), plus `dtype.bits` per stored position that the structure cannot
        exclude."""
        return self._lower_bound(_coerce(self, array, dtype), dtype.bits)

    def _encode(self, array: np.ndarray, dtype: DType) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _decode(self, buffers: dict[str, np.ndarray], shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        rows, cols, values = self._entries(buffers, shape)
        out = np.zeros(shape, dtype)
        out[rows, cols] = values
        return out

    def _entries(self, buffers: dict[str, np.ndarray], shape: tuple[int, ...]):
        raise NotImplementedError

    def _check(self, buffers: dict[str, np.ndarray], shape: tuple[int, ...]) -> None:
        """Raise ValueError naming the buffer unless `buffers` decode to a tensor of `shape`."""
        raise NotImplementedError

    def _lower_bound(self, array: np.ndarray, value_bits: int) -> float:
        raise NotImplementedError


@dataclass(frozen=True)
class Dense(Encoding):
    """Every element stored, row-major: `numel * dtype.bits` bits."""

    keyword: ClassVar[str] = "dense"
    rank2: ClassVar[bool] = False

    def widths(self, shape, dtype):
        return {"values": dtype.bits}

    def _encode(self, array, dtype):
        return {"values": array.ravel()}

    def _footprint(self, array, value_bits):
        return array.size * value_bits, array.size

    def _min_footprint(self, shape, nnz, value_bits):
        return math.prod(shape) * value_bits, math.prod(shape)

    def _decode(self, buffers, shape, dtype):
        return buffers["values"].reshape(shape).astype(dtype)

    def _check(self, buffers, shape):
        _expect_lengths(buffers, {"values": math.prod(shape)})

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

    def widths(self, shape, dtype):
        return {"rows": index_bits(shape[0]), "cols": index_bits(shape[1]), "values": dtype.bits}

    def select_bits(self, shape):
        return index_bits(shape[0]) + index_bits(shape[1])

    def _encode(self, array, dtype):
        rows, cols = np.nonzero(array)
        return {"rows": rows, "cols": cols, "values": array[rows, cols]}

    def _footprint(self, array, value_bits):
        return self._min_footprint(array.shape, int(np.count_nonzero(array)), value_bits)

    def _min_footprint(self, shape, nnz, value_bits):  # exact: the size depends on nnz only
        return nnz * (index_bits(shape[0]) + index_bits(shape[1]) + value_bits), nnz

    def _entries(self, buffers, shape):
        return buffers["rows"], buffers["cols"], buffers["values"]

    def _check(self, buffers, shape):
        nnz = len(buffers.get("values", ()))
        _expect_lengths(buffers, {"rows": nnz, "cols": nnz, "values": nnz})
        _expect_below(buffers, "rows", shape[0])
        _expect_below(buffers, "cols", shape[1])
        _expect_increasing("cols", buffers["rows"] * shape[1] + buffers["cols"])

    def _lower_bound(self, array, value_bits):
        return _unstructured_bound(array, value_bits)


class _CompressedRows(Encoding):
    """CSR over the rows (`transposed = False`) or over the columns (CSC)."""

    transposed: ClassVar[bool]
    pointers: ClassVar[str]
    indices: ClassVar[str]

    def _major_minor(self, shape):
        return shape[::-1] if self.transposed else shape

    def widths(self, shape, dtype):
        major, minor = self._major_minor(shape)
        return {self.pointers: index_bits(major * minor + 1), self.indices: index_bits(minor), "values": dtype.bits}

    def select_bits(self, shape):
        return index_bits(self._major_minor(shape)[1])

    def _encode(self, array, dtype):
        array = array.T if self.transposed else array
        rows, cols = np.nonzero(array)
        pointers = np.concatenate([[0], np.cumsum(np.count_nonzero(array, axis=1))])
        return {self.pointers: pointers, self.indices: cols, "values": array[rows, cols]}

    def _footprint(self, array, value_bits):
        return self._min_footprint(array.shape, int(np.count_nonzero(array)), value_bits)

    def _min_footprint(self, shape, nnz, value_bits):  # exact
        major, minor = self._major_minor(shape)
        return (major + 1) * index_bits(major * minor + 1) + nnz * (index_bits(minor) + value_bits), nnz

    def _entries(self, buffers, shape):
        major = self.major_of(buffers, self._major_minor(shape)[0])
        minor = buffers[self.indices]
        return (minor, major, buffers["values"]) if self.transposed else (major, minor, buffers["values"])

    def major_of(self, buffers: dict[str, np.ndarray], major: int) -> np.ndarray:
        """The row (CSC: column) of every stored entry, from the pointers."""
        return np.repeat(np.arange(major), np.diff(buffers[self.pointers]))

    def _check(self, buffers, shape):
        major, minor = self._major_minor(shape)
        nnz = _expect_pointers(buffers, self.pointers, major)
        _expect_lengths(buffers, {self.indices: nnz, "values": nnz})
        _expect_below(buffers, self.indices, minor)
        _expect_increasing(self.indices, self.major_of(buffers, major) * minor + buffers[self.indices])

    def _lower_bound(self, array, value_bits):
        return _unstructured_bound(array, value_bits)


@dataclass(frozen=True)
class CSR(_CompressedRows):
    """Compressed sparse rows: `(R + 1) * index_bits(R*C + 1)` bits of row pointers, then
    `nnz * (index_bits(C) + dtype.bits)` bits of column indices and values."""

    keyword: ClassVar[str] = "csr"
    transposed: ClassVar[bool] = False
    pointers: ClassVar[str] = "row_ptr"
    indices: ClassVar[str] = "cols"


@dataclass(frozen=True)
class CSC(_CompressedRows):
    """Compressed sparse columns (CSR of the transpose): `(C + 1) * index_bits(R*C + 1)`
    bits of column pointers, then `nnz * (index_bits(R) + dtype.bits)` bits."""

    keyword: ClassVar[str] = "csc"
    transposed: ClassVar[bool] = True
    pointers: ClassVar[str] = "col_ptr"
    indices: ClassVar[str] = "rows"


@dataclass(frozen=True)
class Bitmap(Encoding):
    """One bit per element (row-major, 1 = non-zero), then the non-zero values:
    `R*C + nnz * dtype.bits` bits. The hardware finds an operand by counting set bits of its
    row (a prefix count of `index_bits(C)` depth)."""

    keyword: ClassVar[str] = "bitmap"

    def widths(self, shape, dtype):
        return {"bitmap": 1, "values": dtype.bits}

    def select_bits(self, shape):
        return index_bits(shape[1])

    def _encode(self, array, dtype):
        mask = array != 0
        return {"bitmap": mask.ravel().astype(np.uint8), "values": array[mask]}

    def _footprint(self, array, value_bits):
        return self._min_footprint(array.shape, int(np.count_nonzero(array)), value_bits)

    def _min_footprint(self, shape, nnz, value_bits):  # exact
        return math.prod(shape) + nnz * value_bits, nnz

    def _entries(self, buffers, shape):
        rows, cols = np.nonzero(buffers["bitmap"].reshape(shape))
        return rows, cols, buffers["values"]

    def _check(self, buffers, shape):
        _expect_lengths(buffers, {"bitmap": math.prod(shape)})
        _expect_lengths(buffers, {"values": int(np.count_nonzero(buffers["bitmap"]))})

    def _lower_bound(self, array, value_bits):
        return _unstructured_bound(array, value_bits)


def _grid(shape: tuple[int, int], bh: int, bw: int) -> tuple[int, int]:
    return -(-shape[0] // bh), -(-shape[1] // bw)


def _inside(rows: np.ndarray, cols: np.ndarray, values: np.ndarray, shape: tuple[int, int]):
    """The (rows, cols, values) entries that lie inside `shape` (padding dropped), flattened."""
    keep = (rows < shape[0]) & (cols < shape[1])
    return rows[keep], cols[keep], values[keep]


@dataclass(frozen=True)
class BSR(Encoding):
    """Block sparse rows over `bh x bw` blocks (edge blocks zero-padded); only blocks with a
    non-zero are stored, densely. With a `BR x BC` block grid and `nb` stored blocks:
    `(BR + 1) * index_bits(BR*BC + 1) + nb * (index_bits(BC) + bh*bw*dtype.bits)` bits."""

    keyword: ClassVar[str] = "bsr"
    bh: int
    bw: int

    def __post_init__(self) -> None:
        Blocks(self.bh, self.bw)  # validates the parameters

    def widths(self, shape, dtype):
        nbr, nbc = _grid(shape, self.bh, self.bw)
        return {"block_ptr": index_bits(nbr * nbc + 1), "block_cols": index_bits(nbc), "values": dtype.bits}

    def _encode(self, array, dtype):
        blocks = block_view(array, self.bh, self.bw)
        kept = blocks.any(axis=(2, 3))
        bi, bj = np.nonzero(kept)
        return {"block_ptr": np.concatenate([[0], np.cumsum(kept.sum(axis=1))]), "block_cols": bj,
                "values": blocks[bi, bj].ravel()}

    def _footprint(self, array, value_bits):
        kept = block_view(array, self.bh, self.bw).any(axis=(2, 3))
        nb, slots = int(kept.sum()), int(kept.sum()) * self.bh * self.bw
        return (kept.shape[0] + 1) * index_bits(kept.size + 1) + nb * index_bits(kept.shape[1]) + slots * value_bits, slots

    def _min_footprint(self, shape, nnz, value_bits):
        nbr, nbc = _grid(shape, self.bh, self.bw)
        nb = -(-nnz // (self.bh * self.bw))  # a block holds at most bh*bw non-zeros
        slots = nb * self.bh * self.bw
        return (nbr + 1) * index_bits(nbr * nbc + 1) + nb * index_bits(nbc) + slots * value_bits, slots

    def block_rows(self, buffers: dict[str, np.ndarray], shape: tuple[int, int]) -> np.ndarray:
        """The block row of every stored block, from the pointers."""
        return np.repeat(np.arange(_grid(shape, self.bh, self.bw)[0]), np.diff(buffers["block_ptr"]))

    def _entries(self, buffers, shape):
        bi, bj = self.block_rows(buffers, shape), buffers["block_cols"]
        rows = np.broadcast_to((bi * self.bh)[:, None, None] + np.arange(self.bh)[None, :, None],
                               (len(bi), self.bh, self.bw))
        cols = np.broadcast_to((bj * self.bw)[:, None, None] + np.arange(self.bw)[None, None, :], rows.shape)
        return _inside(rows, cols, buffers["values"].reshape(rows.shape), shape)

    def _check(self, buffers, shape):
        nbr, nbc = _grid(shape, self.bh, self.bw)
        nb = _expect_pointers(buffers, "block_ptr", nbr)
        _expect_lengths(buffers, {"block_cols": nb, "values": nb * self.bh * self.bw})
        _expect_below(buffers, "block_cols", nbc)
        bi, bj = self.block_rows(buffers, shape), buffers["block_cols"]
        _expect_increasing("block_cols", bi * nbc + bj)
        rows = np.arange(self.bh)[None, :, None] < _edge_sizes(bi, self.bh, shape[0])[:, None, None]
        cols = np.arange(self.bw)[None, None, :] < _edge_sizes(bj, self.bw, shape[1])[:, None, None]
        _expect_zero_padding(buffers["values"].reshape(nb, self.bh, self.bw), rows & cols, "an edge block")

    def _lower_bound(self, array, value_bits):
        kept = block_view(array, self.bh, self.bw).any(axis=(2, 3))
        area = np.outer(block_widths(array.shape[0], self.bh), block_widths(array.shape[1], self.bw))
        return _log2_comb(kept.size, int(kept.sum())) + int(area[kept].sum()) * value_bits


def _top_slots(groups: np.ndarray, k: int) -> np.ndarray:
    """Per last-axis group, `k` distinct positions (ascending) covering every non-zero."""
    order = np.argsort(groups == 0, axis=-1, kind="stable")[..., :k]
    return np.sort(order, axis=-1)


def _check_slots(buffers: dict[str, np.ndarray], name: str, slots: tuple[int, ...], limit: int,
                 real_widths: np.ndarray, where: str) -> None:
    """Slot positions `buffers[name]` ([..., k] groups of positions in `[0, limit)`) are
    ascending within each group, and values at padding (position >= the group's real width)
    are zero."""
    _expect_below(buffers, name, limit)
    positions = buffers[name].reshape(slots)
    if np.any(np.diff(positions, axis=-1) <= 0):
        raise ValueError(f"buffer '{name}' repeats or reorders indices")
    valid = positions < real_widths
    _expect_zero_padding(buffers["values"].reshape(slots), valid, where)


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
        return NMStructure(self.n, self.m)

    def widths(self, shape, dtype):
        return {"positions": index_bits(self.m), "values": dtype.bits}

    def select_bits(self, shape):
        return index_bits(self.m)

    def violation(self, array, dtype):
        return self._structure().violation(array)

    def _groups(self, array: np.ndarray) -> np.ndarray:
        return block_view(array, 1, self.m)[:, :, 0, :]  # [R, C/m, m]

    def _encode(self, array, dtype):
        groups = self._groups(array)
        positions = _top_slots(groups, self.n)
        return {"positions": positions.ravel(), "values": np.take_along_axis(groups, positions, axis=2).ravel()}

    def _footprint(self, array, value_bits):
        return self._min_footprint(array.shape, 0, value_bits)

    def _min_footprint(self, shape, nnz, value_bits):  # exact: the size depends on the shape only
        slots = math.prod(self._slots(shape))
        return slots * (index_bits(self.m) + value_bits), slots

    def _slots(self, shape):
        return (shape[0], -(-shape[1] // self.m), self.n)

    def _entries(self, buffers, shape):
        slots = self._slots(shape)
        rows = np.broadcast_to(np.arange(slots[0])[:, None, None], slots)
        cols = np.arange(slots[1])[None, :, None] * self.m + buffers["positions"].reshape(slots)
        return _inside(rows, cols, buffers["values"].reshape(slots), shape)

    def _check(self, buffers, shape):
        slots = self._slots(shape)
        _expect_lengths(buffers, {"positions": math.prod(slots), "values": math.prod(slots)})
        real = _edge_sizes(np.arange(slots[1]), self.m, shape[1])[None, :, None]
        _check_slots(buffers, "positions", slots, self.m, real, "the last group of a row")

    def _lower_bound(self, array, value_bits):
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
    Level 2, in each surviving block, each of its rows stores exactly `row_nnz` (value, local
    column) slots, explicit zeros filling rows with fewer non-zeros: with `S` rows in surviving
    blocks (`bh` per block, fewer in a bottom-edge block: padding rows are not stored),
    `S * row_nnz * (dtype.bits + index_bits(bw))` bits. No row pointers are needed."""

    keyword: ClassVar[str] = "hp"
    bh: int
    bw: int
    row_nnz: int

    def __post_init__(self) -> None:
        self._structure()  # validates the parameters

    def _structure(self):
        return Hierarchical(self.bh, self.bw, self.row_nnz)

    def widths(self, shape, dtype):
        nbc = _grid(shape, self.bh, self.bw)[1]
        return {"block_format": 1, "block_bitmap": 1, "block_counts": index_bits(nbc + 1),
                "block_cols": index_bits(nbc), "columns": index_bits(self.bw), "values": dtype.bits}

    def select_bits(self, shape):
        return index_bits(self.bw)

    def violation(self, array, dtype):
        return self._structure().violation(array)

    def _encode(self, array, dtype):
        blocks = block_view(array, self.bh, self.bw)
        kept = blocks.any(axis=(2, 3))
        bi, bj = np.nonzero(kept)
        if self._block_list_bits(kept) < kept.size:
            buffers = {"block_format": np.array([1]), "block_counts": kept.sum(axis=1), "block_cols": bj}
        else:
            buffers = {"block_format": np.array([0]), "block_bitmap": kept.ravel().astype(np.uint8)}
        real = np.arange(self.bh)[None, :] < _edge_sizes(bi, self.bh, array.shape[0])[:, None]
        rows = blocks[bi, bj][real]  # [S, bw]: the real rows of the surviving blocks
        columns = _top_slots(rows, self.row_nnz)
        buffers.update(columns=columns.ravel(), values=np.take_along_axis(rows, columns, axis=1).ravel())
        return buffers

    @staticmethod
    def _block_list_bits(kept: np.ndarray) -> int:
        """Bits of level 1 as per-block-row counts and surviving block columns."""
        nbr, nbc = kept.shape
        return nbr * index_bits(nbc + 1) + int(kept.sum()) * index_bits(nbc)

    def _footprint(self, array, value_bits):
        kept = block_view(array, self.bh, self.bw).any(axis=(2, 3))
        real_rows = _edge_sizes(np.arange(kept.shape[0]), self.bh, array.shape[0])
        slots = int(kept.sum(axis=1) @ real_rows) * self.row_nnz
        return 1 + min(kept.size, self._block_list_bits(kept)) + slots * (index_bits(self.bw) + value_bits), slots

    def _min_footprint(self, shape, nnz, value_bits):
        nbr, nbc = _grid(shape, self.bh, self.bw)
        slots = -(-nnz // self.row_nnz) * self.row_nnz  # whole rows of row_nnz slots
        nb = -(-nnz // (self.bh * self.bw))  # a block holds at most bh*bw non-zeros
        level1 = min(nbr * nbc, nbr * index_bits(nbc + 1) + nb * index_bits(nbc))
        return 1 + level1 + slots * (index_bits(self.bw) + value_bits), slots

    def surviving_blocks(self, buffers: dict[str, np.ndarray], shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """(block row, block column) of every stored block, in storage order."""
        nbr, nbc = _grid(shape, self.bh, self.bw)
        if buffers["block_format"][0]:
            return np.repeat(np.arange(nbr), buffers["block_counts"]), buffers["block_cols"]
        return np.nonzero(buffers["block_bitmap"].reshape(nbr, nbc))

    def _stored_rows(self, buffers, shape) -> tuple[np.ndarray, np.ndarray]:
        """(matrix row, block column) of every stored row, in storage order."""
        bi, bj = self.surviving_blocks(buffers, shape)
        real = _edge_sizes(bi, self.bh, shape[0])
        block = np.repeat(np.arange(len(bi)), real)
        local = np.arange(len(block)) - np.repeat(np.cumsum(real) - real, real)
        return bi[block] * self.bh + local, bj[block]

    def _entries(self, buffers, shape):
        rows, bj = self._stored_rows(buffers, shape)
        slots = (len(rows), self.row_nnz)
        cols = (bj * self.bw)[:, None] + buffers["columns"].reshape(slots)
        return _inside(np.broadcast_to(rows[:, None], slots), cols, buffers["values"].reshape(slots), shape)

    def _check(self, buffers, shape):
        nbr, nbc = _grid(shape, self.bh, self.bw)
        _expect_lengths(buffers, {"block_format": 1})
        if buffers["block_format"][0]:
            _expect_lengths(buffers, {"block_counts": nbr})
            _expect_below(buffers, "block_counts", nbc + 1)
            _expect_lengths(buffers, {"block_cols": int(buffers["block_counts"].sum())})
            _expect_below(buffers, "block_cols", nbc)
            if "block_bitmap" in buffers:
                raise ValueError("buffer 'block_bitmap' is present beside a block list")
        else:
            _expect_lengths(buffers, {"block_bitmap": nbr * nbc})
            if "block_counts" in buffers or "block_cols" in buffers:
                raise ValueError("a block list is present beside 'block_bitmap'")
        bi, bj = self.surviving_blocks(buffers, shape)
        _expect_increasing("block_cols", bi * nbc + bj)
        rows, row_bj = self._stored_rows(buffers, shape)
        slots = (len(rows), self.row_nnz)
        _expect_lengths(buffers, {"columns": math.prod(slots), "values": math.prod(slots)})
        real_cols = _edge_sizes(row_bj, self.bw, shape[1])[:, None]
        _check_slots(buffers, "columns", slots, self.bw, real_cols, "an edge block")

    def _lower_bound(self, array, value_bits):
        blocks = block_view(array, self.bh, self.bw)
        kept = blocks.any(axis=(2, 3))
        counts = np.count_nonzero(blocks, axis=3)  # [BR, BC, bh]
        widths = np.broadcast_to(block_widths(array.shape[1], self.bw)[None, :, None], counts.shape)
        patterns = sum(_log2_comb(int(w), int(k)) for w, k in zip(widths[kept].ravel(), counts[kept].ravel()))
        return _log2_comb(kept.size, int(kept.sum())) + patterns + int(counts.sum()) * value_bits


@dataclass(frozen=True)
class Packed1b(Encoding):
    """Binarized (b1) values, one bit each, row-major (+1 -> 1, -1 -> 0): `R*C` bits. Every
    element must be +1 or -1; the per-output-channel scales are the type's quantization
    (`!q(axis=0, scales=...)`), stored with the type. The hardware multiplies by XNOR and
    adds by popcount."""

    keyword: ClassVar[str] = "packed1b"

    def widths(self, shape, dtype):
        return {"signs": 1}

    def violation(self, array, dtype):
        if dtype is not DType.B1:
            return f"it stores b1 tensors, got {dtype}"
        return None

    def _encode(self, array, dtype):
        _check_b1(array)
        return {"signs": (array.ravel() > 0).astype(np.uint8)}

    def _footprint(self, array, value_bits):
        return self._min_footprint(array.shape, 0, value_bits)

    def _min_footprint(self, shape, nnz, value_bits):  # exact
        return math.prod(shape), math.prod(shape)

    def _decode(self, buffers, shape, dtype):
        return np.where(buffers["signs"].reshape(shape) > 0, 1, -1).astype(dtype)

    def _check(self, buffers, shape):
        _expect_lengths(buffers, {"signs": math.prod(shape)})

    def _lower_bound(self, array, value_bits):
        return float(array.size)


ENCODINGS: dict[str, type[Encoding]] = {
    cls.keyword: cls for cls in (Dense, COO, CSR, CSC, BSR, Bitmap, NM, HP, Packed1b)
}


def make_encoding(keyword: str, params: tuple[int, ...]) -> Encoding:
    """Build an encoding from its text form's keyword and integer parameters."""
    return make_keyword_value(ENCODINGS, "encoding", "#", keyword, params)
