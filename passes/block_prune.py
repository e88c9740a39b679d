"""block-prune: systolic-aligned block pruning, or its N:M variant.

Blocks are R x C, by default the target's array tile, so a pruned block is a tile the
hardware skips. Sparsity can differ per layer kind (attention Q/K/V, attention output,
FFN-1, FFN-2; see `passes.layers`), as in systolic co-design work. With `nm=N:M` it keeps
N of every M consecutive weights of a row instead (e.g. 2:4). The type records
`~blocks(R, C)` or `~nm(N, M)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tcc.ir.graph import Graph
from tcc.ir.sparsity import NM, Blocks
from tcc.ir.types import TensorType

from .base import Pass, PassContext, PassResult, option
from .finetune import TrainingOptions, prune, with_weights
from .layers import LAYER_KINDS, LayerOptions
from .masks import BlockScore, block_scores, block_sizes, choose_blocks, expand_blocks, nm_mask, pruning_surprises
from .options import Ratio, Shape2


@dataclass(frozen=True)
class BlockPrune(Pass, LayerOptions, TrainingOptions):
    name = "block-prune"
    summary = "prune whole RxC blocks aligned to the array tile (per layer kind), or N:M within rows"

    sparsity: float = option(0.5, "fraction of zeros, for kinds not set on their own", within="[0, 1)")
    block: Shape2 | None = option(None, "block shape RxC (default: the target's array tile)")
    qkv: float | None = option(None, "sparsity of attention query/key/value projections", within="[0, 1)")
    attn_out: float | None = option(None, "sparsity of the attention output projection", within="[0, 1)")
    ffn1: float | None = option(None, "sparsity of the first FFN layer", within="[0, 1)")
    ffn2: float | None = option(None, "sparsity of the second FFN layer", within="[0, 1)")
    nm: Ratio | None = option(None, "N:M variant: keep N of every M consecutive weights per row (e.g. 2:4)")
    block_score: BlockScore = option("l2", "block importance: l2 or l1 norm")

    def validate(self) -> None:
        if self.nm is not None and self.nm[0] > self.nm[1]:
            raise self.fail("nm", f"{self.nm}: N must not exceed M")

    def kind_sparsity(self, kind: str) -> float:
        value = getattr(self, kind) if kind in LAYER_KINDS[:4] else None
        return self.sparsity if value is None else value

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        bh, bw = self.block or ctx.tile
        structure = NM(*self.nm) if self.nm is not None else Blocks(bh, bw)
        types = graph.types
        choice = self.layers_to_structure(graph, self.name, structure)
        layers = choice.chosen
        if not layers:
            for note in choice.notes("pruned"):
                ctx.note(note)
            return PassResult(graph, False)
        target = {layer.weight: self.kind_sparsity(layer.kind) for layer in layers}

        def rule(weights: dict[str, np.ndarray], progress: float) -> dict[str, np.ndarray]:
            if self.nm is not None:
                n, m = self.nm
                return {name: nm_mask(w, m - round(progress * (m - n)), m) for name, w in weights.items()}
            masks = {}
            for name, w in weights.items():
                kept = choose_blocks([block_scores(w, bh, bw, self.block_score)], [block_sizes(w.shape, bh, bw)],
                                     target_kept=(1 - progress * target[name]) * math.prod(w.shape))[0]
                masks[name] = expand_blocks(kept, w.shape, bh, bw)
            return masks

        names = list(target)
        new = prune(graph, ctx, self, names, rule, desc=self.name)
        total = sum(types[n].numel for n in names)
        zeros = sum(int(np.count_nonzero(new[n] == 0)) for n in names)
        kinds = sorted({layer.kind for layer in layers})
        for note in choice.notes("pruned", to=f"{structure} ({', '.join(kinds)}), sparsity {zeros / total:.3f}"):
            ctx.note(note)
        asked = {n: self.nm[0] < self.nm[1] if self.nm is not None else target[n] > 0 for n in names}
        for note in pruning_surprises({n: np.asarray(graph.weights[n]) for n in names}, {n: new[n] for n in names},
                                      asked, str(structure)):
            ctx.note(note)
        new_types = {n: TensorType(types[n].shape, types[n].dtype, types[n].encoding, types[n].quant, structure)
                     for n in names}
        return PassResult(with_weights(graph, new, new_types), True)
