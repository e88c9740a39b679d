"""Structured pruning masks on rank-2 weights `[out, in]` (numpy), shared by the pruning
passes. Blocks tile from the top-left; edge blocks are partial (see `tcc.ir.sparsity`).
Ties in magnitude are broken by position (lower index kept), so masks are deterministic
and recomputing a mask on already-pruned weights gives the same mask (idempotence).
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np

from tcc.ir.sparsity import block_view, block_widths

BlockScore = Literal["l2", "l1"]


def _unblock(blocks: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    nbr, nbc, bh, bw = blocks.shape
    return blocks.swapaxes(1, 2).reshape(nbr * bh, nbc * bw)[:shape[0], :shape[1]]


def _top_k_last_axis(values: np.ndarray, k: np.ndarray | int) -> np.ndarray:
    """Boolean mask of the k largest entries along the last axis (ties: lower index first)."""
    order = np.argsort(-values, axis=-1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(values.shape[-1]), axis=-1)
    return ranks < k


def row_mask(weight: np.ndarray, bh: int, bw: int, row_nnz: int) -> np.ndarray:
    """Level 2 of hierarchical pruning: in every block, each row keeps its `row_nnz` largest
    magnitudes (all of a narrow edge block's row when it is narrower)."""
    magnitudes = block_view(np.abs(weight).astype(np.float64), bh, bw)
    keep = np.minimum(row_nnz, block_widths(weight.shape[1], bw))[None, :, None, None]
    return _unblock(_top_k_last_axis(magnitudes, keep), weight.shape)


def block_scores(weight: np.ndarray, bh: int, bw: int, score: BlockScore = "l2") -> np.ndarray:
    """Importance of each block [R/bh, C/bw]: its L2 (or L1) norm."""
    blocks = block_view(weight.astype(np.float64), bh, bw)
    return np.sqrt((blocks ** 2).sum(axis=(2, 3))) if score == "l2" else np.abs(blocks).sum(axis=(2, 3))


def block_sizes(shape: tuple[int, int], bh: int, bw: int, row_nnz: int | None = None) -> np.ndarray:
    """Elements each block keeps if it survives [R/bh, C/bw]: its real rows times its real
    width (or times `row_nnz`, capped by the width, for hierarchical pruning)."""
    heights = block_widths(shape[0], bh)
    widths = block_widths(shape[1], bw)
    if row_nnz is not None:
        widths = np.minimum(widths, row_nnz)
    return np.outer(heights, widths)


def choose_blocks(scores: Sequence[np.ndarray], sizes: Sequence[np.ndarray], *, target_kept: float | None = None,
                  keep_fraction: float | None = None) -> list[np.ndarray]:
    """Which blocks survive, ranking all blocks of all given weights together by score.

    With `target_kept` (elements), the survivors are the best-scored prefix whose element
    count is closest to it, so the result is within half a block of the target. With
    `keep_fraction`, the best `round(fraction * count)` blocks survive. At least one block
    always survives: a weight of one block is never pruned away whole."""
    flat_scores = np.concatenate([s.ravel() for s in scores])
    flat_sizes = np.concatenate([s.ravel() for s in sizes])
    order = np.argsort(-flat_scores, kind="stable")
    if keep_fraction is not None:
        count = int(round(keep_fraction * len(order)))
    else:
        totals = np.concatenate([[0], np.cumsum(flat_sizes[order])])
        count = int(np.argmin(np.abs(totals - target_kept)))
    count = max(count, 1)
    kept = np.zeros(len(order), dtype=bool)
    kept[order[:count]] = True
    out, start = [], 0
    for s in scores:
        out.append(kept[start:start + s.size].reshape(s.shape))
        start += s.size
    return out


def expand_blocks(kept: np.ndarray, shape: tuple[int, int], bh: int, bw: int) -> np.ndarray:
    """Element mask [R, C] of the kept blocks."""
    return np.kron(kept, np.ones((bh, bw), dtype=bool)).astype(bool)[:shape[0], :shape[1]]


def nm_mask(weight: np.ndarray, n: int, m: int) -> np.ndarray:
    """N:M pruning: each group of `m` consecutive elements of a row keeps its `n` largest."""
    groups = block_view(np.abs(weight).astype(np.float64), 1, m)
    return _unblock(_top_k_last_axis(groups, n), weight.shape)


def pruning_surprises(before: dict[str, np.ndarray], after: dict[str, np.ndarray], asked: dict[str, bool],
                      grain: str, ranked_globally: bool = False) -> list[str]:
    """Pass-log notes naming the weights a pruning pass left without a new zero although it was
    asked to prune them (`asked`), or zeroed completely: weights too small for the pruning grain
    (`grain`, e.g. `~hp(16, 16, 4)`) at the asked sparsity, or (`ranked_globally`) whose blocks
    one ranking over all weights kept or removed."""
    from .layers import name_list
    untouched, emptied = [], []
    for name, new in after.items():
        if name not in before:
            continue
        old_zeros, new_zeros = np.count_nonzero(before[name] == 0), np.count_nonzero(new == 0)
        if asked.get(name) and new_zeros == old_zeros and new.size > old_zeros:
            untouched.append(name)
        elif new_zeros == new.size > old_zeros and new.size > 0:
            emptied.append(name)
    notes = []
    if untouched:
        why = "the global ranking kept all its blocks" if ranked_globally else f"too small for {grain} at this sparsity"
        notes.append(f"nothing pruned in {name_list(untouched)} ({why})")
    if emptied:
        why = "the global ranking removed all its blocks" if ranked_globally else \
            f"too small for {grain} at this sparsity"
        notes.append(f"every element pruned in {name_list(emptied)} ({why})")
    return notes
