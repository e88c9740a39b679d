"""Compressing a trained Transformer with the `tcc` CLI: train a small Transformer on
scikit-learn's 8x8 digits, save it as a torch.export archive (batch 64) and the data as
`train.pt` / `test.pt` (`torch.save({"inputs": X, "labels": Y})`), compile it with several
`--pipeline` specs (int8, pruning fine-tuned on `--train-data`, binary weights, a chain),
inspect one artifact, evaluate every artifact on the held-out images against the fp32 one
and print the accuracies. Exits with an error if a compressed artifact loses more than
10 points of accuracy to fp32.

    .venv/bin/python examples/compress_digits.py [--out build/compress] [--epochs 30] [--finetune-epochs 10]
    .venv/bin/python examples/compress_digits.py --quick    # fp32, int8 and hp-prune only, 2 fine-tuning epochs
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch

from tcc.zoo import digits_data, train_digits

FLOOR_POINTS = 10.0  # a compressed artifact may lose at most this much accuracy to fp32


class Build(NamedTuple):
    name: str
    directory: str  # the artifact's directory under --out
    pipeline: str | None  # --pipeline SPEC; None: the target's default passes (fp32)
    data_option: str = "--train-data"  # how the pipeline gets train.pt


def tcc_cli(*args: str) -> str:
    """Run `python -m tcc ARGS`, echoing the command; returns its stdout (stderr passes through)."""
    print("$ tcc " + shlex.join(args), flush=True)
    return subprocess.run([sys.executable, "-m", "tcc", *args], check=True, stdout=subprocess.PIPE, text=True).stdout


def builds(finetune_epochs: int, quick: bool) -> list[Build]:
    # pruning keeps the 8-wide input embedding dense (layers=encoder): cut into 16x16 blocks it
    # would lose whole groups of input features
    e = finetune_epochs
    out = [Build("fp32", "fp32.tcc", None), Build("int8", "int8.tcc", "quantize", "--calib-data"),
           Build("hp-prune 75%", "hp75.tcc", f"hp-prune{{sparsity=0.75,layers=encoder,epochs={e}}}")]
    if not quick:
        out += [Build("N:M 2:4", "nm24.tcc", f"block-prune{{nm=2:4,layers=encoder,epochs={e}}}"),
                Build("W1A8", "w1a8.tcc", f"binarize{{mode=w1a8,epochs={e}}}"),
                Build("hp-prune 50% + int8", "hp50-int8.tcc",
                      f"hp-prune{{sparsity=0.5,layers=encoder,epochs={e}}},quantize")]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("build/compress"))
    parser.add_argument("--epochs", type=int, default=30, help="epochs training the fp32 model")
    parser.add_argument("--finetune-epochs", type=int, help="epochs the compression passes fine-tune "
                                                            "(default 10, 2 with --quick)")
    parser.add_argument("--quick", action="store_true", help="fewer artifacts and fine-tuning epochs (smoke test)")
    args = parser.parse_args()
    finetune_epochs = args.finetune_epochs if args.finetune_epochs is not None else 2 if args.quick else 10
    args.out.mkdir(parents=True, exist_ok=True)

    x_train, x_test, y_train, y_test = digits_data()
    start = time.perf_counter()
    model = train_digits(x_train, y_train, args.epochs)
    print(f"trained DigitsTransformer on {len(x_train)} digits in {time.perf_counter() - start:.1f} s")
    model_file, train_file, test_file = args.out / "digits.pt2", args.out / "train.pt", args.out / "test.pt"
    # the graph's batch size is the example's: 64, the batch size fine-tuning and evaluation use
    torch.export.save(torch.export.export(model, (x_test[:64],)), model_file)
    torch.save({"inputs": x_train, "labels": y_train}, train_file)
    torch.save({"inputs": x_test, "labels": y_test}, test_file)

    table = builds(finetune_epochs, args.quick)
    for b in table:
        options = ["--pipeline", b.pipeline, b.data_option, str(train_file)] if b.pipeline else []
        print(tcc_cli("compile", str(model_file), "-o", str(args.out / b.directory), *options), end="")
    print(tcc_cli("inspect", str(args.out / "hp75.tcc")), end="")

    reports = {b.name: json.loads(tcc_cli("eval", str(args.out / b.directory), "--data", str(test_file),
                                          "--baseline", str(args.out / "fp32.tcc"), "--json")) for b in table}
    fp32 = reports["fp32"]["accuracy"]
    print(f"\naccuracy on {reports['fp32']['examples']} held-out digits (floor: fp32 - {FLOOR_POINTS:g} points)")
    print(f"{'artifact':<20} {'accuracy':>8} {'vs fp32':>8} {'agreement':>9}  pipeline")
    failed = []
    for b in table:
        report = reports[b.name]
        points = 100 * (report["accuracy"] - fp32)
        if points < -FLOOR_POINTS:
            failed.append(b.name)
        print(f"{b.name:<20} {report['accuracy']:>8.4f} {points:>+8.1f} {report['agreement']:>9.4f}  "
              f"{b.pipeline or '(the target default)'}")
    if failed:
        raise SystemExit(f"compress_digits FAILED: below the floor: {', '.join(failed)}")
    print("compress_digits OK")


if __name__ == "__main__":
    main()
