"""hp-prune: hierarchical pruning of linear weights.

Level 1 removes whole blocks (the block shape defaults to the target's PE tile); level 2
keeps exactly `row_nnz` non-zeros in each row of each surviving block, so every PE row does
equal work. The result's type records `~hp(bh, bw, row_nnz)` for format selection and the
hardware. Give either `sparsity` (overall; split between the levels) or the per-level
`block_sparsity` and/or `row_nnz` (see `HPPrune.plan` for the default split). Matrices whose
sides the block does not divide are treated as zero-padded to whole blocks (edge blocks are
partial), never refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from tcc.ir.graph import Graph
from tcc.ir.sparsity import Hierarchical
from tcc.ir.types import TensorType

from .base import Pass, PassContext, PassResult, option
from .finetune import TrainingOptions, prune, with_weights
from .layers import LayerOptions
from .masks import BlockScore, block_scores, block_sizes, choose_blocks, expand_blocks, pruning_surprises, row_mask
from .options import Shape2


@dataclass(frozen=True)
class HPPrune(Pass, LayerOptions, TrainingOptions):
    name = "hp-prune"
    summary = "hierarchical pruning: drop whole blocks, keep row_nnz per row in the rest (balanced PE rows)"

    sparsity: float | None = option(None, "overall fraction of zeros (default 0.75 when no level is given); "
                                          "split: fewest non-zeros per row that reach it, blocks for the rest",
                                    within="[0, 1)")
    block: Shape2 | None = option(None, "block shape RxC (default: the target's PE tile)")
    block_sparsity: float | None = option(None, "level 1: fraction of blocks removed", within="[0, 1)")
    row_nnz: int | None = option(None, "level 2: non-zeros kept per row of a surviving block", within="[1, inf)")
    scope: Literal["layer", "global"] = option("layer", "same sparsity in every layer, or one global block ranking")
    block_score: BlockScore = option("l2", "block importance: l2 or l1 norm")

    def validate(self) -> None:
        if self.block is not None and self.row_nnz is not None and self.row_nnz > self.block[1]:
            raise self.fail("row_nnz", f"{self.row_nnz} exceeds the block width {self.block[1]}")
        if self.sparsity is not None and self.block_sparsity is not None and self.row_nnz is not None:
            raise self.fail("sparsity", "cannot be given together with both block_sparsity and row_nnz")

    def plan(self, bw: int) -> tuple[int, float | None, float | None]:
        """(row_nnz, overall density or None, block keep fraction or None) at the final step.
        Given only `sparsity`, level 2 keeps the fewest non-zeros per row that still reach the
        target density (ceil(density * bw)) and level 1 removes blocks for the rest: fine-grained
        balanced rows cost less accuracy than whole blocks (benchmarks/compression.py)."""
        if self.block_sparsity is not None:
            row_nnz = self.row_nnz or bw
            if self.sparsity is not None:  # block level given, row level derived from the total
                row_nnz = max(1, min(bw, round(bw * (1 - self.sparsity) / (1 - self.block_sparsity))))
            return row_nnz, None, 1 - self.block_sparsity
        density = 1 - (0.75 if self.sparsity is None else self.sparsity)
        row_nnz = self.row_nnz or max(1, min(bw, math.ceil(density * bw - 1e-9)))
        return row_nnz, density, None

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        bh, bw = self.block or ctx.tile
        if self.row_nnz is not None and self.row_nnz > bw:
            raise self.fail("row_nnz", f"{self.row_nnz} exceeds the block width {bw}")
        row_nnz, density, keep_fraction = self.plan(bw)
        structure = Hierarchical(bh, bw, row_nnz)
        types = graph.types
        choice = self.layers_to_structure(graph, self.name, structure)
        names = choice.names
        if not names:
            for note in choice.notes("pruned"):
                ctx.note(note)
            return PassResult(graph, False)

        def rule(weights: dict[str, np.ndarray], progress: float) -> dict[str, np.ndarray]:
            k = bw - round(progress * (bw - row_nnz))
            level2 = {n: row_mask(w, bh, bw, k) for n, w in weights.items()}
            groups = [names] if self.scope == "global" else [[n] for n in names]
            masks = {}
            for group in groups:
                shapes = [weights[n].shape for n in group]
                scores = [block_scores(np.where(level2[n], weights[n], 0), bh, bw, self.block_score) for n in group]
                sizes = [block_sizes(s, bh, bw, k) for s in shapes]
                if keep_fraction is not None:
                    kept = choose_blocks(scores, sizes, keep_fraction=1 - progress * (1 - keep_fraction))
                else:
                    target = (1 - progress * (1 - density)) * sum(math.prod(s) for s in shapes)
                    kept = choose_blocks(scores, sizes, target_kept=target)
                for n, s, blocks in zip(group, shapes, kept):
                    masks[n] = level2[n] & expand_blocks(blocks, s, bh, bw)
            return masks

        new = prune(graph, ctx, self, names, rule, desc=self.name)
        total = sum(types[n].numel for n in names)
        zeros = sum(int(np.count_nonzero(new[n] == 0)) for n in names)
        for note in choice.notes("pruned", to=f"{structure}, sparsity {zeros / total:.3f}"):
            ctx.note(note)
        asked = density < 1 if density is not None else keep_fraction < 1 or row_nnz < bw
        before = {n: np.asarray(graph.weights[n]) for n in names}
        for note in pruning_surprises(before, {n: new[n] for n in names}, dict.fromkeys(names, asked), str(structure),
                                      ranked_globally=self.scope == "global"):
            ctx.note(note)
        new_types = {n: TensorType(types[n].shape, types[n].dtype, types[n].encoding, types[n].quant, structure)
                     for n in names}
        return PassResult(with_weights(graph, new, new_types), True)
