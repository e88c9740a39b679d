"""Sparsity structures: typed guarantees about where a rank-2 weight `[out, in]` may hold
non-zeros, held in `TensorType.sparsity` and written `~keyword(params)` in the text form.

A structure says what pruning guaranteed; the storage encoding (`TensorType.encoding`) says
how the tensor is stored. Format selection reads the first to choose the second. Blocks
tile the matrix from the top-left corner; edge blocks are partial (the matrix is treated
as zero-padded to whole blocks, and padding never counts as a non-zero).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np


@dataclass(frozen=True)
class Sparsity:
    keyword: ClassVar[str]

    def params(self) -> tuple[int, ...]:
        raise NotImplementedError

    def violation(self, array: np.ndarray) -> str | None:
        """None if `array` has this structure, else what breaks it (with the block or row)."""
        raise NotImplementedError

    def __str__(self) -> str:
        return f"~{self.keyword}({', '.join(map(str, self.params()))})"


def _positive(owner: str, **values: int) -> None:
    for key, value in values.items():
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{owner}: {key} must be a positive integer, got {value!r}")


def block_view(array: np.ndarray, bh: int, bw: int) -> np.ndarray:
    """`array` [R, C] zero-padded to whole blocks, as [R/bh, C/bw, bh, bw]."""
    rows, cols = array.shape
    padded = np.zeros((-(-rows // bh) * bh, -(-cols // bw) * bw), dtype=array.dtype)
    padded[:rows, :cols] = array
    return padded.reshape(padded.shape[0] // bh, bh, padded.shape[1] // bw, bw).swapaxes(1, 2)


def block_widths(cols: int, bw: int) -> np.ndarray:
    """The real (unpadded) width of each block column."""
    starts = np.arange(0, cols, bw)
    return np.minimum(bw, cols - starts)


@dataclass(frozen=True)
class Blocks(Sparsity):
    """Block sparsity: every `bh x bw` block is either all zero or kept whole."""

    keyword: ClassVar[str] = "blocks"
    bh: int
    bw: int

    def __post_init__(self) -> None:
        _positive("blocks", bh=self.bh, bw=self.bw)

    def params(self) -> tuple[int, ...]:
        return (self.bh, self.bw)

    def violation(self, array: np.ndarray) -> str | None:
        return None  # any matrix is a union of kept and zero blocks; the structure names the grain


@dataclass(frozen=True)
class Hierarchical(Sparsity):
    """Hierarchical (HP) sparsity: every `bh x bw` block is all zero, or each of its rows
    holds at most `row_nnz` non-zeros (at most the block's width in a narrow edge block).
    Pruning keeps exactly that many, so every PE row does equal work."""

    keyword: ClassVar[str] = "hp"
    bh: int
    bw: int
    row_nnz: int

    def __post_init__(self) -> None:
        _positive("hp", bh=self.bh, bw=self.bw, row_nnz=self.row_nnz)
        if self.row_nnz > self.bw:
            raise ValueError(f"hp: row_nnz {self.row_nnz} exceeds the block width {self.bw}")

    def params(self) -> tuple[int, ...]:
        return (self.bh, self.bw, self.row_nnz)

    def violation(self, array: np.ndarray) -> str | None:
        counts = np.count_nonzero(block_view(array, self.bh, self.bw), axis=3)  # [R/bh, C/bw, bh]
        limit = np.minimum(self.row_nnz, block_widths(array.shape[1], self.bw))[None, :, None]
        bad = np.argwhere(counts > limit)
        if bad.size:
            i, j, r = bad[0]
            return (f"row {i * self.bh + r} of block ({i}, {j}) holds {counts[i, j, r]} non-zeros, "
                    f"more than row_nnz {self.row_nnz}")
        return None


@dataclass(frozen=True)
class NM(Sparsity):
    """N:M sparsity: each group of `m` consecutive elements of a row holds at most `n` non-zeros."""

    keyword: ClassVar[str] = "nm"
    n: int
    m: int

    def __post_init__(self) -> None:
        _positive("nm", n=self.n, m=self.m)
        if self.n > self.m:
            raise ValueError(f"nm: n {self.n} exceeds m {self.m}")

    def params(self) -> tuple[int, ...]:
        return (self.n, self.m)

    def violation(self, array: np.ndarray) -> str | None:
        groups = block_view(array, 1, self.m)[:, :, 0, :]  # [R, C/m, m]
        counts = np.count_nonzero(groups, axis=2)
        bad = np.argwhere(counts > self.n)
        if bad.size:
            row, group = bad[0]
            return f"row {row}, columns {group * self.m}..{group * self.m + self.m - 1} hold {counts[row, group]} " \
                   f"non-zeros, more than {self.n} of {self.m}"
        return None


def make_keyword_value(registry: dict[str, type], what: str, sigil: str, keyword: str, params: tuple[int, ...]):
    """Build `registry[keyword](*params)` for the text form `<sigil>keyword(params)`;
    ValueError naming the problem otherwise. (Shared with `tcc.ir.encoding`, which builds on
    this module: storage encodings are checked against these structures.)"""
    if keyword not in registry:
        raise ValueError(f"unknown {what} '{sigil}{keyword}' (known: {', '.join(sorted(registry))})")
    try:
        return registry[keyword](*params)
    except TypeError:
        raise ValueError(f"{what} '{sigil}{keyword}' does not take parameters {params}") from None


SPARSITIES: dict[str, type[Sparsity]] = {cls.keyword: cls for cls in (Blocks, Hierarchical, NM)}


def make_sparsity(keyword: str, params: tuple[int, ...]) -> Sparsity:
    """Build a sparsity structure from its text form's keyword and integer parameters."""
    return make_keyword_value(SPARSITIES, "sparsity structure", "~", keyword, params)
