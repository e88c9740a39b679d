"""Storage encodings: encode -> decode is the identity, sizes match the serialized bytes and
sit above the information-theoretic bound, structure violations are ValueErrors."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcc.ir.dtypes import DType
from tcc.ir.encoding import (BSR, COO, CSC, CSR, DENSE, HP, NM, Bitmap, EncodedTensor, Packed1b, index_bits,
                             make_encoding, pack_bits, unpack_bits)
from tcc.passes.masks import block_scores, block_sizes, choose_blocks, expand_blocks, nm_mask, row_mask

DIMS = st.sampled_from([1, 2, 3, 4, 5, 7, 8, 11, 13, 16])
DTYPES = st.sampled_from([DType.F32, DType.I8, DType.I32])
UNSTRUCTURED = [DENSE, COO(), CSR(), CSC(), Bitmap(), BSR(1, 1), BSR(2, 3), BSR(4, 4)]


def values(rng: np.random.Generator, shape: tuple[int, int], dtype: DType) -> np.ndarray:
    if dtype.is_float:
        return rng.standard_normal(shape).astype(dtype.numpy)
    low, high = dtype.value_range
    return rng.integers(low, high, size=shape, endpoint=True).astype(dtype.numpy)


@st.composite
def sparse_arrays(draw) -> tuple[np.ndarray, DType]:
    """Random matrices with a random density (all-zero and fully dense included) and some
    whole rows emptied."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shape, dtype = (draw(DIMS), draw(DIMS)), draw(DTYPES)
    array = values(rng, shape, dtype)
    array[rng.random(shape) >= draw(st.sampled_from([0.0, 0.2, 0.6, 1.0]))] = 0
    array[rng.random(shape[0]) < 0.2] = 0
    return array, dtype


def check_roundtrip(encoding, array: np.ndarray, dtype: DType) -> EncodedTensor:
    enc = encoding.encode(array, dtype)
    decoded = encoding.decode(enc)
    assert decoded.dtype == dtype.numpy and decoded.shape == array.shape
    np.testing.assert_array_equal(decoded, array)
    serialized = enc.serialize()
    padded = sum(-(-len(buffer) * enc.widths[name] // 8) * 8 for name, buffer in enc.buffers.items())
    assert 8 * len(serialized) == padded
    assert 0 <= padded - enc.size_bits < 8 * len(enc.buffers)
    assert encoding.lower_bound_bits(array, dtype) <= enc.size_bits + 1e-9
    if encoding.rank2 and not isinstance(encoding, Packed1b):
        rows, cols, stored = encoding.entries(enc)
        assert np.all(rows < array.shape[0]) and np.all(cols < array.shape[1])
        assert np.count_nonzero(stored) == np.count_nonzero(array)
    assert encoding.footprint(array, dtype) == (enc.size_bits, enc.work)
    nnz = int(np.count_nonzero(array))
    probes = [encoding] + ([HP(encoding.bh, encoding.bw, 1)] if isinstance(encoding, HP) else [])
    for probe in probes:  # select-format prunes with these bounds (hp row_nnz=1 stands for any row_nnz)
        bits, work = probe.min_footprint(array.shape, dtype, nnz)
        assert bits <= enc.size_bits and work <= enc.work, probe
    loaded = encoding.load(array.shape, dtype, stored_form(enc))
    assert loaded.widths == enc.widths and loaded.size_bits == enc.size_bits
    np.testing.assert_array_equal(encoding.decode(loaded), array)
    return enc


def stored_form(enc: EncodedTensor) -> dict[str, tuple[int, bytes]]:
    return {name: (enc.lengths()[name], data) for name, data in enc.buffer_bytes().items()}


@settings(max_examples=60, deadline=None)
@given(sparse_arrays(), st.sampled_from(UNSTRUCTURED))
def test_unstructured_roundtrip(case, encoding):
    check_roundtrip(encoding, *case)


@settings(max_examples=60, deadline=None)
@given(sparse_arrays(), st.sampled_from([(1, 1), (1, 2), (2, 4), (3, 4), (4, 4), (1, 8)]))
def test_nm_roundtrip(case, nm):
    array, dtype = case
    array = np.where(nm_mask(array, *nm), array, 0).astype(array.dtype)
    check_roundtrip(NM(*nm), array, dtype)


@settings(max_examples=60, deadline=None)
@given(sparse_arrays(), st.sampled_from([(1, 1, 1), (2, 2, 1), (2, 3, 2), (4, 4, 2), (3, 5, 5), (16, 16, 4)]),
       st.sampled_from([0.0, 0.5, 1.0]))
def test_hp_roundtrip(case, hp, keep_fraction):
    array, dtype = case
    bh, bw, row_nnz = hp
    kept = choose_blocks([block_scores(array, bh, bw)], [block_sizes(array.shape, bh, bw, row_nnz)],
                         keep_fraction=keep_fraction)[0]
    mask = expand_blocks(kept, array.shape, bh, bw) & row_mask(array, bh, bw, row_nnz)
    check_roundtrip(HP(*hp), np.where(mask, array, 0).astype(array.dtype), dtype)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1), DIMS, DIMS)
def test_packed1b_and_b1_roundtrip(seed, rows, cols):
    signs = np.where(np.random.default_rng(seed).random((rows, cols)) < 0.5, -1, 1).astype(np.int8)
    enc = check_roundtrip(Packed1b(), signs, DType.B1)
    assert enc.size_bits == rows * cols
    assert check_roundtrip(DENSE, signs, DType.B1).size_bits == rows * cols
    sparse = np.where(np.arange(cols) % 2 == 0, signs, 0).astype(np.int8)
    check_roundtrip(CSR(), sparse, DType.B1)  # non-zeros of b1 are +-1, 1 bit each


def test_csr_golden_size():
    array = np.array([[1, 0, 2], [0, 0, 0]], np.float32)
    enc = check_roundtrip(CSR(), array, DType.F32)
    # 3 row pointers of index_bits(7) = 3 bits, 2 columns of 2 bits, 2 values of 32 bits
    assert enc.widths == {"row_ptr": 3, "cols": 2, "values": 32}
    assert enc.size_bits == 3 * 3 + 2 * 2 + 2 * 32 == 77
    assert len(enc.serialize()) == 2 + 1 + 8


def test_hp_golden_size():
    array = np.array([[1, 0, 0, 0], [0, 2, 0, 0], [0, 0, 0, 0], [0, 0, 3, 0]], np.int8)
    enc = check_roundtrip(HP(2, 2, 1), array, DType.I8)
    # 1 format bit + 4-bit block bitmap (the list would take 2*2 + 2*1 = 6 bits), then
    # 2 blocks * 2 rows * 1 slot * (8 value bits + 1 column bit); row 2 stores an explicit zero
    assert enc.buffers["block_format"].tolist() == [0]
    assert enc.buffers["values"].tolist() == [1, 2, 0, 3]
    assert enc.size_bits == 1 + 4 + 2 * 2 * 1 * (8 + 1) == 41


def test_hp_picks_the_block_list_when_smaller():
    array = np.zeros((4, 64), np.int8)
    array[0, 5] = 7
    enc = check_roundtrip(HP(4, 4, 1), array, DType.I8)
    assert enc.buffers["block_format"].tolist() == [1]
    assert enc.size_bits == 1 + index_bits(17) + index_bits(16) + 4 * (8 + 2)


def test_index_widths_follow_the_shape():
    assert [index_bits(n) for n in (1, 2, 3, 4, 5, 256, 257)] == [1, 1, 2, 2, 3, 8, 9]
    enc = COO().encode(np.eye(300, 5, dtype=np.float32), DType.F32)
    assert enc.widths == {"rows": 9, "cols": 3, "values": 32}


@pytest.mark.parametrize("encoding, array, message", [
    (NM(2, 4), np.array([[1, 1, 1, 0]], np.float32), "nm(2, 4) cannot store this tensor: row 0, columns 0..3 hold 3"),
    (HP(2, 2, 1), np.array([[1, 1], [0, 0]], np.float32), "hp(2, 2, 1) cannot store this tensor: row 0 of block (0, 0)"),
    (CSR(), np.zeros((2, 2, 2), np.float32), "#csr encodes rank-2 tensors, got shape (2, 2, 2)"),
    (HP(2, 2, 1), np.zeros(4, np.float32), "#hp(2, 2, 1) encodes rank-2 tensors"),
])
def test_non_conforming_arrays_are_rejected(encoding, array, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        encoding.encode(array, DType.F32)


def test_b1_and_range_errors():
    with pytest.raises(ValueError, match="b1 values must be"):
        Packed1b().encode(np.array([[1, 0]], np.int8), DType.B1)
    with pytest.raises(ValueError, match="stores b1 tensors"):
        Packed1b().encode(np.array([[1, -1]], np.int8), DType.I8)
    with pytest.raises(ValueError, match="outside the range"):
        CSR().encode(np.array([[300]]), DType.I8)
    with pytest.raises(ValueError, match="cannot decode"):
        CSC().decode(CSR().encode(np.eye(2, dtype=np.float32), DType.F32))


@pytest.mark.parametrize("text, params, expected", [
    ("csr", (), CSR()), ("csc", (), CSC()), ("coo", (), COO()), ("bitmap", (), Bitmap()),
    ("packed1b", (), Packed1b()), ("bsr", (16, 16), BSR(16, 16)), ("nm", (2, 4), NM(2, 4)),
    ("hp", (16, 16, 4), HP(16, 16, 4)),
])
def test_text_form(text, params, expected):
    encoding = make_encoding(text, params)
    assert encoding == expected
    assert str(encoding) == f"#{text}" + (f"({', '.join(map(str, params))})" if params else "")


@pytest.mark.parametrize("text, params, message", [
    ("hp", (4, 4, 5), "row_nnz 5 exceeds the block width 4"), ("nm", (4, 2), "n 4 exceeds m 2"),
    ("bsr", (0, 4), "bh must be a positive integer"), ("csr", (1,), "does not take parameters"),
])
def test_bad_parameters(text, params, message):
    with pytest.raises(ValueError, match=message):
        make_encoding(text, params)


def test_encodings_parse_and_print_in_graphs():
    from tcc.ir import parse_graph, print_graph
    text = ("graph @main(%x: f32[2,3] #hp(16, 16, 4), %w: f32[4,3] #nm(2, 4)) {\n"
            "  %y = linear(%x, %w) : f32[2,4]\n  return %y\n}\n")
    assert print_graph(parse_graph(text)).strip() == text.strip()


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(0, 300), st.integers(1, 64))
def test_bit_packing_roundtrip(seed, count, width):
    rng = np.random.default_rng(seed)
    patterns = rng.integers(0, 2**63, size=count, dtype=np.uint64) & np.uint64((1 << width) - 1)
    data = pack_bits(patterns, width)
    assert len(data) == -(-count * width // 8)
    np.testing.assert_array_equal(unpack_bits(data, count, width), patterns)


def test_storage_is_lsb_first_and_byte_wide_buffers_are_little_endian():
    assert pack_bits(np.array([1, 2, 3], np.uint64), 2) == bytes([0b111001])
    values = np.array([[1.5, 0, -2]], np.float32)
    assert DENSE.encode(values, DType.F32).buffer_bytes()["values"] == values.astype("<f4").tobytes()


def hp_example() -> tuple[np.ndarray, EncodedTensor]:
    array = np.zeros((5, 6), np.int8)
    array[0, 1], array[1, 3], array[4, 5] = 3, -4, 7
    return array, HP(2, 4, 1).encode(array, DType.I8)


def corrupt(enc: EncodedTensor, name: str, change) -> dict[str, tuple[int, bytes]]:
    """The stored form of `enc` with buffer `name` replaced by `change(buffer)`."""
    buffers = dict(enc.buffers)
    buffers[name] = change(buffers[name].copy())
    bad = EncodedTensor(enc.encoding, enc.shape, enc.dtype, buffers, enc.widths)
    return stored_form(bad)


def set_at(index, value):
    def change(buffer):
        buffer[index] = value
        return buffer
    return change


@pytest.mark.parametrize("encoding, name, change, message", [
    (CSR(), "cols", set_at(0, 3), "buffer 'cols' holds index 3, out of range [0, 3)"),
    (CSR(), "cols", set_at(1, 0), "buffer 'cols' repeats or reorders indices"),
    (CSR(), "row_ptr", set_at(1, 5), "buffer 'row_ptr' does not rise from 0"),
    (CSR(), "values", lambda b: b[:-1], "buffer 'values' holds 2 elements, expected 3"),
    (CSC(), "col_ptr", set_at(-1, 2), "buffer 'rows' holds 3 elements, expected 2"),
    (COO(), "rows", set_at(0, 1), "buffer 'cols' repeats or reorders indices"),
    (Bitmap(), "bitmap", set_at(1, 1), "buffer 'values' holds 3 elements, expected 4"),
    (BSR(2, 2), "block_cols", set_at(0, 1), "buffer 'block_cols' repeats or reorders indices"),
    (BSR(2, 2), "values", set_at(-1, 9), "non-zero in the zero padding of an edge block"),
    (NM(1, 2), "positions", set_at(1, 1), "non-zero in the zero padding of the last group"),
    (DENSE, "values", lambda b: b[1:], "buffer 'values' holds 5 elements, expected 6"),
])
def test_corrupted_buffers_are_named(encoding, name, change, message):
    array = np.array([[1, 0, 2], [0, 3, 0]], np.float32)
    enc = encoding.encode(array, DType.F32)
    with pytest.raises(ValueError, match=re.escape(message)):
        encoding.load(array.shape, DType.F32, corrupt(enc, name, change))


@pytest.mark.parametrize("name, change, message", [
    ("columns", set_at(2, 3), "non-zero in the zero padding of an edge block"),  # block (2, 1) is 2 wide
    ("block_bitmap", set_at(1, 1), "buffer 'columns' holds 3 elements, expected 5"),
    ("block_format", set_at(0, 1), "buffer 'block_counts' is missing"),
    ("values", lambda b: b[:-1], "buffer 'values' holds 2 elements, expected 3"),  # row 5 is not stored
])
def test_corrupted_hp_buffers_are_named(name, change, message):
    array, enc = hp_example()
    assert enc.buffers["block_format"][0] == 0
    with pytest.raises(ValueError, match=re.escape(message)):
        HP(2, 4, 1).load(array.shape, DType.I8, corrupt(enc, name, change))


def test_wrong_byte_counts_and_unknown_buffers():
    array, enc = hp_example()
    stored = stored_form(enc)
    count, data = stored["columns"]
    with pytest.raises(ValueError, match="buffer 'columns' holds 2 bytes, but 3 elements of 2 bits take 1"):
        HP(2, 4, 1).load(array.shape, DType.I8, {**stored, "columns": (count, data + b"\0")})
    with pytest.raises(ValueError, match="unexpected buffer 'extra'"):
        HP(2, 4, 1).load(array.shape, DType.I8, {**stored, "extra": (0, b"")})


@settings(max_examples=80, deadline=None)
@given(sparse_arrays(), st.sampled_from(UNSTRUCTURED + [NM(1, 1), HP(2, 3, 3)]), st.data())
def test_bit_flips_give_a_clear_error_or_a_well_formed_tensor(case, encoding, data):
    """A flipped bit in any buffer either fails `load` with a ValueError or loads a tensor
    that decodes to the right shape (which the artifact's hash then catches): never a crash."""
    array, dtype = case
    enc = encoding.encode(array, dtype)
    stored = stored_form(enc)
    name = data.draw(st.sampled_from(sorted(stored)))
    count, raw = stored[name]
    if not raw:
        return
    bit = data.draw(st.integers(0, 8 * len(raw) - 1))
    flipped = bytearray(raw)
    flipped[bit // 8] ^= 1 << (bit % 8)
    try:
        loaded = encoding.load(array.shape, dtype, {**stored, name: (count, bytes(flipped))})
    except ValueError:
        return
    assert encoding.decode(loaded).shape == array.shape


def test_nonzeros_remembers_frozen_arrays_only():
    """`nonzeros` counts once per read-only array (a graph's constants), never a writable one:
    a write after a count is seen."""
    from tcc.ir.analysis import nonzeros
    array = np.array([[0.0, 1.0], [2.0, 0.0]], np.float32)
    assert nonzeros(array) == 2
    array[0, 0] = 5.0
    assert nonzeros(array) == 3
    frozen = array.copy()
    frozen.flags.writeable = False
    assert nonzeros(frozen) == nonzeros(frozen) == 3 and nonzeros(np.zeros(4)) == 0
