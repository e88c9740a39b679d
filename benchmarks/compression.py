"""Accuracy of tcc's compression passes on the digits Transformer (scikit-learn's 8x8 digits,
test accuracy on the held-out 25%) against fp32, and of hp-prune against a peer: torch.ao's
`WeightNormSparsifier` on the same trained model and weights, at the same overall sparsity
and 16x16 block shape, fine-tuned with the same budget. Prints one table and PASS/FAIL per
target.

    .venv/bin/python benchmarks/compression.py [--epochs 10] [--seed 0] [--seeds 3] [--quick]

Each seed (SEED..SEED+SEEDS-1) trains the model once (`tcc.zoo.train_digits`, 30 epochs),
then compiles every row from it with `tcc.compile(model, (x[:64],), pipeline=SPEC,
train_data=...)` and evaluates it with `tcc.evaluate`; the table shows medians over seeds
(accuracy is deterministic per seed) and judges the targets on them. Everything runs on one
CPU thread. `--quick` runs only fp32, int8, HP 75%, its block peer and W1A8 (a smoke run).

The peer: both prune the 8 encoder linear weights (`layers=encoder`; the input embedding and
the head stay dense; the script checks that the sets match) and fine-tune with tcc's recipe
(passes/finetune.py), replicated here: AdamW (lr 2e-3, no weight decay), cosine learning
rate, batches of 64 in the same seeded order, cross-entropy plus KL distillation from the
fp32 model (temperature 2; the "distill off" rows drop it on both sides), `--epochs` epochs.
Both prune gradually on the same cubic schedule (torch.ao's `CubicSL`), masks updated every
tenth of the first two thirds of the steps. `WeightNormSparsifier` makes a fraction
`sparsity_level` of the blocks sparse, each with its `zeros_per_block` smallest weights
zeroed: it cannot both drop whole blocks and thin the rest, as hp-prune does, so it runs in
two forms at overall sparsity s: "blocks" (sparsity_level=s, all 256 weights of a block
zeroed) and "in-block" (sparsity_level=1, round(256 s) zeros in every block, unstructured
inside). hp-prune's default split keeps the fewest non-zeros per row that reach the target
(75%: 4 of 16 per row, every block kept; 90%: 2 of 16, a fifth of the blocks dropped); the
"even split" row drops half the blocks and keeps 8 of 16 per row.
"""

from __future__ import annotations

import argparse
import copy
import math
import re
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.ao.pruning import WeightNormSparsifier
from torch.ao.pruning.scheduler.cubic_scheduler import CubicSL

import tcc
from tcc.evaluate import evaluate
from tcc.passes import Dataset
from tcc.zoo import digits_data, train_digits

BATCH = 64
BLOCK = (16, 16)
LAYERS = "encoder"  # regex on weight names: the encoder's linear weights
LR, TEMPERATURE = 2e-3, 2.0  # tcc's fine-tuning defaults (passes/finetune.py)


@dataclass
class Setup:
    """One seed's trained fp32 model and data."""

    seed: int
    epochs: int
    model: torch.nn.Module
    train: Dataset
    test: Dataset
    example: tuple[torch.Tensor]


@dataclass
class Outcome:
    accuracy: float
    sparsity: float | None  # fraction of zeros over the pruned weights
    pruned: frozenset[str]  # names of the pruned weights


@dataclass
class Row:
    label: str
    setup: str
    run: Callable[[Setup], Outcome]
    accuracy: list[float] = field(default_factory=list)
    sparsity: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    pruned: set[frozenset[str]] = field(default_factory=set)


def tcc_row(label: str, spec: str | None) -> Row:
    """A row compiled by tcc with pipeline `spec` (None: the target's default, fp32)."""

    def run(s: Setup) -> Outcome:
        artifact = tcc.compile(s.model, s.example, pipeline=spec, train_data=s.train, seed=s.seed)
        types, weights = artifact.graph.types, artifact.graph.weights
        pruned = frozenset(n for n, t in artifact.graph.constants if t.sparsity is not None)
        zeros = sum(int(np.count_nonzero(weights[n] == 0)) for n in pruned)
        sparsity = zeros / sum(types[n].numel for n in pruned) if pruned else None
        return Outcome(evaluate(artifact, s.test)["accuracy"], sparsity, pruned)

    return Row(label, spec or "(default: fold-constants,canonicalize,dce)", run)


def peer_row(label: str, sparsity: float, in_block: bool, distill: bool = True) -> Row:
    """torch.ao's WeightNormSparsifier at overall `sparsity` (see the module docstring)."""
    size = math.prod(BLOCK)
    level, zeros = (1.0, round(size * sparsity)) if in_block else (sparsity, size)
    setup = (f"WeightNormSparsifier(sparsity_level={level}, sparse_block_shape={BLOCK}, zeros_per_block={zeros}), "
             f"gradual (CubicSL){'' if distill else ', distill off'}")

    def run(s: Setup) -> Outcome:
        student = torch_ao_prune(s, level, zeros, distill)
        names, params = peer_weights(student), dict(student.named_parameters())
        achieved = sum(int((params[n] == 0).sum()) for n in names) / sum(params[n].numel() for n in names)
        artifact = tcc.compile(student, s.example)
        return Outcome(evaluate(artifact, s.test)["accuracy"], achieved, frozenset(names))

    return Row(label, setup, run)


def peer_weights(model: torch.nn.Module) -> list[str]:
    """The weights the peer prunes: the matrices whose names match LAYERS, as hp-prune's `layers`."""
    return [n for n, p in model.named_parameters() if re.search(LAYERS, n) and p.dim() == 2]


def torch_ao_prune(s: Setup, sparsity_level: float, zeros_per_block: int, distill: bool) -> torch.nn.Module:
    """A copy of the fp32 model pruned by WeightNormSparsifier while fine-tuning with tcc's
    recipe (passes/finetune.py `train` and `prune`), masks squashed into the weights."""
    teacher, student = s.model, copy.deepcopy(s.model).train()
    names = peer_weights(student)
    sparsifier = WeightNormSparsifier(sparsity_level, BLOCK, zeros_per_block)
    sparsifier.prepare(student, [{"tensor_fqn": n} for n in names])
    total = s.epochs * s.train.num_batches(BATCH)
    horizon = max(1, 2 * total // 3)
    every = max(1, horizon // 10)
    # level at step t: sparsity_level * (1 - (1 - (t + every) / horizon)^3), as tcc's cubic_progress
    schedule = CubicSL(sparsifier, init_t=-every, delta_t=1, total_t=horizon)
    optimizer = torch.optim.AdamW(student.parameters(), lr=LR, weight_decay=0.0)
    cosine = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 0.5 * (1 + math.cos(math.pi * t / total)))
    generator = torch.Generator().manual_seed(s.seed)
    step = 0
    for _ in range(s.epochs):
        for b in s.train.batches(BATCH, shuffle=True, generator=generator):
            if step % every == 0 and step <= horizon:
                sparsifier.step()
            logits = student(*b.inputs)[:b.valid]
            loss = F.cross_entropy(logits, b.labels[:b.valid])
            if distill:
                with torch.no_grad():
                    target = teacher(*b.inputs)[:b.valid]
                loss = loss + TEMPERATURE ** 2 * F.kl_div(F.log_softmax(logits / TEMPERATURE, -1),
                                                          F.log_softmax(target / TEMPERATURE, -1),
                                                          log_target=True, reduction="batchmean")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            cosine.step()
            schedule.step()
            step += 1
    sparsifier.squash_mask()
    return student.eval()


def rows(epochs: int, quick: bool) -> list[Row]:
    def hp(sparsity: float, tuned: bool = True, distill: bool = True) -> Row:
        label = f"HP {sparsity:.0%} {'fine-tuned' if tuned else 'one-shot'}{'' if distill else ', distill off'}"
        options = f"sparsity={sparsity},block=16x16,layers={LAYERS},epochs={epochs if tuned else 0}"
        return tcc_row(label, f"hp-prune{{{options}{'' if distill else ',distill=false'}}}")

    def peer(sparsity: float, in_block: bool = False, distill: bool = True) -> Row:
        label = f"torch.ao {sparsity:.0%} {'in-block' if in_block else 'blocks'}{'' if distill else ', distill off'}"
        return peer_row(label, sparsity, in_block, distill)

    fp32, int8 = tcc_row("fp32", None), tcc_row("int8", "quantize")
    w1a8 = tcc_row("W1A8 fine-tuned", f"binarize{{mode=w1a8,epochs={epochs}}}")
    if quick:
        return [fp32, int8, hp(0.75, tuned=False), hp(0.75), peer(0.75), w1a8]
    return [
        fp32, int8, tcc_row("int4 weights", "quantize{bits=4}"),
        *[hp(s, tuned) for s in (0.5, 0.75, 0.9) for tuned in (False, True)],
        *[peer(s, in_block) for s in (0.5, 0.75, 0.9) for in_block in (False, True)],
        tcc_row("HP 75% fine-tuned, even split",
                f"hp-prune{{block_sparsity=0.5,row_nnz=8,block=16x16,layers={LAYERS},epochs={epochs}}}"),
        hp(0.75, distill=False), peer(0.75, distill=False),
        tcc_row("block-prune 50% fine-tuned",
                f"block-prune{{sparsity=0.5,block=16x16,layers={LAYERS},epochs={epochs}}}"),
        tcc_row("N:M 2:4 fine-tuned", f"block-prune{{nm=2:4,layers={LAYERS},epochs={epochs}}}"),
        w1a8, tcc_row("W1A1 fine-tuned", f"binarize{{mode=w1a1,epochs={epochs}}}"),
    ]


def targets(results: dict[str, Row]) -> list[tuple[str, bool]]:
    """(description, met) for every target whose rows ran, judged on median accuracies."""
    acc = {label: 100 * statistics.median(r.accuracy) for label, r in results.items()}
    fp32, out = acc["fp32"], []
    for label, points in (("int8", 0.5), ("HP 75% fine-tuned", 1.0), ("W1A8 fine-tuned", 2.0),
                          ("W1A1 fine-tuned", 6.0)):
        if label in acc:
            out.append((f"{label} within {points} points of fp32: {acc[label] - fp32:+.1f}",
                        acc[label] >= fp32 - points))
    for peer in ("torch.ao 75% blocks", "torch.ao 75% in-block"):
        if peer in acc:
            out.append((f"HP 75% fine-tuned no worse than {peer}: {acc['HP 75% fine-tuned']:.1f} vs {acc[peer]:.1f}",
                        acc["HP 75% fine-tuned"] >= acc[peer]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs of every fine-tuned row (>= 1)")
    parser.add_argument("--seed", type=int, default=0, help="first seed (model training, data order)")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds; the table shows medians")
    parser.add_argument("--quick", action="store_true", help="only fp32, int8, HP 75%%, its peer and W1A8")
    args = parser.parse_args()
    if args.epochs < 1 or args.seeds < 1:
        parser.error("--epochs and --seeds must be >= 1")
    # one intra-op thread: the model is tiny, and on a shared 2-core machine two threads make its
    # training 10-100x slower (threads spin waiting for each other), wrecking the wall times
    torch.set_num_threads(1)
    x_train, x_test, y_train, y_test = digits_data()
    table = rows(args.epochs, args.quick)
    begin = time.perf_counter()
    for seed in range(args.seed, args.seed + args.seeds):
        start = time.perf_counter()
        model = train_digits(x_train, y_train, seed=seed)
        print(f"seed {seed}: trained the fp32 model in {time.perf_counter() - start:.1f} s", flush=True)
        setup = Setup(seed, args.epochs, model, Dataset((x_train,), y_train, "digits train"),
                      Dataset((x_test,), y_test, "digits test"), (x_test[:BATCH],))
        for row in table:
            start = time.perf_counter()
            outcome = row.run(setup)
            row.seconds.append(time.perf_counter() - start)
            row.accuracy.append(outcome.accuracy)
            if outcome.sparsity is not None:
                row.sparsity.append(outcome.sparsity)
                row.pruned.add(outcome.pruned)
            print(f"  {row.label}: accuracy {outcome.accuracy:.4f} ({row.seconds[-1]:.1f} s)", flush=True)

    weight_sets = set().union(*(r.pruned for r in table))
    if len(weight_sets) != 1:
        raise SystemExit(f"the rows pruned different weight sets: {sorted(map(sorted, weight_sets))}")
    (pruned,) = weight_sets
    print(f"\ndigits test set ({len(y_test)} images), {args.epochs} fine-tuning epochs, seeds "
          f"{args.seed}..{args.seed + args.seeds - 1}{' (medians)' if args.seeds > 1 else ''}, "
          f"{time.perf_counter() - begin:.0f} s in all; pruning rows (tcc and torch.ao) prune the same "
          f"{len(pruned)} weights: {', '.join(sorted(pruned))}")
    fp32 = statistics.median(table[0].accuracy)
    header = ("row", "accuracy", "vs fp32", "per seed", "sparsity", "wall s", "setup")
    lines = [(r.label, f"{statistics.median(r.accuracy):.4f}", f"{100 * (statistics.median(r.accuracy) - fp32):+.1f}",
              " ".join(f"{a:.3f}" for a in r.accuracy),
              f"{statistics.median(r.sparsity):.3f}" if r.sparsity else "-", f"{statistics.median(r.seconds):.1f}",
              r.setup) for r in table]
    widths = [max(len(line[i]) for line in [header] + lines) for i in range(len(header) - 1)]
    for line in [header] + lines:
        print("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(line, widths)))
              + "  " + line[-1])
    print("\ntargets:")
    for text, met in targets({r.label: r for r in table}):
        print(f"  {'PASS' if met else 'FAIL'}  {text}")


if __name__ == "__main__":
    main()
