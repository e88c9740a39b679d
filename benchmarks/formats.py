"""Storage size of BERT-base-shaped int8 weights under hierarchical pruning (HP), in every
format tcc has for them, against classic CSR with int32 indices and against the
information-theoretic bound of the HP structure. Prints one table and PASS/FAIL per target;
exits 1 when a target or check fails.

    .venv/bin/python benchmarks/formats.py [--seed 0] [--layers 12]

The weights: `--layers` encoder layers (BERT-base: 12), each with the query, key, value and
attention-output matrices (768x768) and the FFN matrices (3072x768, 768x3072), drawn from a
seeded normal distribution and quantized to int8 per row (symmetric: round(w / (max|w| / 127)),
values that round to 0 stored as +-1, so every kept weight is a non-zero and the non-zero
count is exact). Each matrix is pruned at 50/75/90/95% sparsity with hp-prune's default split
(`HPPrune.plan`, 16x16 blocks): every row of a block keeps its `row_nnz = ceil(16 * density)`
largest magnitudes, then the blocks with the lowest L2 norm (of what level 2 kept) are dropped
until the matrix holds the target density (90%: 2 of 16 per row, a fifth of the blocks
dropped; 50% and 75% drop none). The masks rank the float weights; they zero the int8 ones.

Columns (MB = 10^6 bytes, summed over all matrices):
- dense: 8 bits per element;
- CSR(int32): the classic form, (R + 1) * 32 bits of row pointers and 32 + 8 bits per non-zero;
- CSR(tcc), BSR, Bitmap, HP: `Encoding.footprint` of tcc's encodings (indices as narrow as
  the shape allows; BSR and HP over 16x16 blocks, HP with the split's `row_nnz`);
- bound: `HP.lower_bound_bits`, log2 C(blocks, kept) + log2 C(16, row_nnz) per kept block row
  + 8 bits per non-zero: no HP encoding can be smaller on average.
The first matrix is also encoded at every sparsity, checking that the encoded size equals the
footprint and that it decodes to the pruned matrix.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from tcc.ir.dtypes import DType
from tcc.ir.encoding import BSR, CSR, DENSE, HP, Bitmap
from tcc.ir.sparsity import block_view
from tcc.passes import HPPrune
from tcc.passes.masks import block_scores, block_sizes, choose_blocks, expand_blocks, row_mask

BH, BW = 16, 16
DTYPE = DType.I8
SPARSITIES = (0.50, 0.75, 0.90, 0.95)
HIDDEN, FFN = 768, 3072
LAYER_SHAPES = {"query": (HIDDEN, HIDDEN), "key": (HIDDEN, HIDDEN), "value": (HIDDEN, HIDDEN),
                "attention output": (HIDDEN, HIDDEN), "FFN1": (FFN, HIDDEN), "FFN2": (HIDDEN, FFN)}
FORMATS = ("dense", "CSR(int32)", "CSR(tcc)", "BSR", "Bitmap", "HP", "bound")
CSR_CAP, BOUND_CAP = 0.5, 1.25  # targets: HP <= 0.5x CSR(int32) at 90%, HP <= 1.25x the bound


@dataclass
class Totals:
    """Bits per format summed over the matrices pruned at one sparsity."""

    row_nnz: int  # hp-prune's default split at this sparsity: non-zeros per block row
    density: float  # and the overall fraction of non-zeros
    bits: dict[str, float] = field(default_factory=lambda: dict.fromkeys(FORMATS, 0.0))
    blocks: int = 0
    kept_blocks: int = 0
    nnz: int = 0
    numel: int = 0

    def megabytes(self, fmt: str) -> float:
        return self.bits[fmt] / 8e6

    def ratio(self, fmt: str, to: str) -> float:
        """Size in `fmt` over size in `to`."""
        return self.bits[fmt] / self.bits[to]


def quantized_normal(rng: np.random.Generator, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(float weights, their int8 quantization per row) with no quantized value equal to 0."""
    weights = rng.standard_normal(shape, dtype=np.float32)
    scale = np.abs(weights).max(axis=1, keepdims=True) / 127
    quantized = np.clip(np.rint(weights / scale), -127, 127)
    return weights, np.where(quantized == 0, np.where(weights < 0, -1, 1), quantized).astype(np.int8)


def hp_prune(weights: np.ndarray, quantized: np.ndarray, row_nnz: int, density: float) -> np.ndarray:
    """`quantized` pruned to `row_nnz` per block row, then to `density` by dropping blocks, as
    hp-prune's final step ranks `weights` (one matrix at a time, scope=layer)."""
    level2 = row_mask(weights, BH, BW, row_nnz)
    scores = block_scores(np.where(level2, weights, 0), BH, BW)
    kept = choose_blocks([scores], [block_sizes(weights.shape, BH, BW, row_nnz)],
                         target_kept=density * weights.size)[0]
    mask = level2 & expand_blocks(kept, weights.shape, BH, BW)
    return np.where(mask, quantized, 0).astype(np.int8)


def format_bits(array: np.ndarray, row_nnz: int) -> dict[str, float]:
    """Storage bits of the pruned int8 `array` in every format of the table."""
    rows, nnz = array.shape[0], int(np.count_nonzero(array))
    hp = HP(BH, BW, row_nnz)
    return {"dense": DENSE.footprint(array, DTYPE)[0], "CSR(int32)": (rows + 1) * 32 + nnz * (32 + DTYPE.bits),
            "CSR(tcc)": CSR().footprint(array, DTYPE)[0], "BSR": BSR(BH, BW).footprint(array, DTYPE)[0],
            "Bitmap": Bitmap().footprint(array, DTYPE)[0], "HP": hp.footprint(array, DTYPE)[0],
            "bound": hp.lower_bound_bits(array, DTYPE)}


def hp_encoding_agrees(array: np.ndarray, row_nnz: int) -> bool:
    """`HP.encode` of `array` is as large as its footprint and decodes back to `array`."""
    hp = HP(BH, BW, row_nnz)
    encoded = hp.encode(array, DTYPE)
    return encoded.size_bits == hp.footprint(array, DTYPE)[0] and np.array_equal(hp.decode(encoded), array)


def add(totals: Totals, array: np.ndarray) -> None:
    """Count the pruned `array` into `totals`."""
    for fmt, bits in format_bits(array, totals.row_nnz).items():
        totals.bits[fmt] += bits
    grid = block_view(array, BH, BW).any(axis=(2, 3))
    totals.blocks += grid.size
    totals.kept_blocks += int(grid.sum())
    totals.nnz += int(np.count_nonzero(array))
    totals.numel += array.size


def measure(layers: int, seed: int) -> tuple[dict[float, Totals], list[tuple[str, bool]]]:
    """Totals per sparsity over `layers` BERT-base layers, and the encode checks."""
    rng = np.random.default_rng(seed)
    totals = {s: Totals(*HPPrune(sparsity=s).plan(BW)[:2]) for s in SPARSITIES}
    checks = []
    for layer in range(layers):
        for name, shape in LAYER_SHAPES.items():
            weights, quantized = quantized_normal(rng, shape)
            for sparsity, total in totals.items():
                array = hp_prune(weights, quantized, total.row_nnz, total.density)
                add(total, array)
                if layer == 0 and name == "query":
                    checks.append((f"HP encode of layer 0 {name} {shape[0]}x{shape[1]} at {sparsity:.0%}: "
                                   f"size_bits == footprint, decodes exactly", hp_encoding_agrees(array, total.row_nnz)))
    return totals, checks


def targets(totals: dict[float, Totals]) -> list[tuple[str, bool]]:
    """(description, met) of every size target."""
    ratio = totals[0.90].ratio("HP", "CSR(int32)")
    out = [(f"HP <= {CSR_CAP}x CSR(int32) at 90%: {ratio:.3f}x", ratio <= CSR_CAP)]
    for sparsity, total in totals.items():
        ratio = total.ratio("HP", "bound")
        out.append((f"HP within {BOUND_CAP}x of the lower bound at {sparsity:.0%}: {ratio:.3f}x", ratio <= BOUND_CAP))
    return out


def print_table(totals: dict[float, Totals]) -> None:
    """One row per sparsity (the achieved one), sizes in MB and HP's ratios."""
    header = ("sparsity", "HP split", *(f"{fmt} MB" for fmt in FORMATS), "HP/CSR32", "HP/bound")
    lines = [(f"{1 - total.nnz / total.numel:.1%}",
              f"{total.row_nnz}/{BW} x {total.kept_blocks / total.blocks:.2f}",
              *(f"{total.megabytes(fmt):.2f}" for fmt in FORMATS),
              f"{total.ratio('HP', 'CSR(int32)'):.3f}", f"{total.ratio('HP', 'bound'):.3f}")
             for total in totals.values()]
    widths = [max(len(line[i]) for line in [header] + lines) for i in range(len(header))]
    for line in [header] + lines:
        print("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(line, widths))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--layers", type=int, default=12, help="encoder layers (BERT-base: 12), >= 1")
    args = parser.parse_args()
    if args.layers < 1:
        parser.error("--layers must be >= 1")
    start = time.perf_counter()
    totals, checks = measure(args.layers, args.seed)
    matrices = args.layers * len(LAYER_SHAPES)
    print(f"{matrices} int8 matrices of {args.layers} BERT-base layer(s), seed {args.seed}, "
          f"{next(iter(totals.values())).numel:,} weights; {time.perf_counter() - start:.1f} s. "
          f"HP split: non-zeros per block row / fraction of 16x16 blocks kept.")
    print_table(totals)
    results = targets(totals) + checks
    print("\ntargets and checks:")
    for text, met in results:
        print(f"  {'PASS' if met else 'FAIL'}  {text}")
    if not all(met for _, met in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
