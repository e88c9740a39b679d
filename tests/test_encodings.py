"""Storage encodings: encode -> decode is the identity, sizes match the serialized bytes and
sit above the information-theoretic bound, structure violations are ValueErrors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcc.ir.dtypes import DType
from tcc.ir.encoding import (BSR, COO, CSC, CSR, DENSE, HP, NM, Bitmap, EncodedTensor, Packed1b, index_bits,
                             make_encoding)
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
    return enc


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
