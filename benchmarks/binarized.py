"""The binarized Transformer (BMT) on the digits encoder: test accuracy per variant against fp32,
and BiT's published ordering of the fully binary (1-1-1) recipes, on what tcc measures.

    .venv/bin/python benchmarks/binarized.py [--epochs 10] [--seed 0] [--seeds 3] [--speech build/speech]

Each seed trains the fp32 model (`tcc.zoo.train_digits`, 30 epochs; a GELU twin for the GELU
rows), then compiles every row from it with `tcc.compile(model, (x[:64],), pipeline=SPEC,
train_data=...)` (fine-tuning `--epochs` epochs, distilled from the fp32 model) and evaluates
it on the held-out 25% (`tcc.evaluate`). The table shows medians over seeds. Rows:

- W1A8, W1A4, W1A1: binary weights with 8-bit (calibrated), 4-bit (learned step) and binary
  activations (BiT's elastic binarization: learned scale and threshold, ReLU outputs unsigned
  to {0, a}, distilled on logits and hidden states), the attention products in float;
- W1A1 variants: a threshold per channel, ternary weight splitting, binary attention products
  (Q K^T of binary Q and K, P V of 4-bit P and binary V);
- the 1-1-1 ladder (weights, activations and attention maps binary: attn_bits=1), as BiT
  compares recipes: signed binary activations with ternary weight splitting and logit
  distillation (BinaryBERT's 1-1-1), adding hidden-state and attention-map distillation
  (BiBERT's direction, here a relative MSE), adding unsigned elastic binarization (BiT);
- hardware-friendly components (`simplify-nonlinear`, fine-tuned): ReLU attention, RMSNorm,
  and on the GELU twin GELU as ReLU and as a hard (shift-based) GELU; and ReLU attention
  under W1A1.

BiT's published GLUE averages (BERT-base 83.9): BinaryBERT 1-1-1 41.0, BiBERT 63.2, BiT 73.5,
i.e. 49%, 75% and 88% of fp32. The ladder's rows print the same ratio for digits.

With `--speech DIR` (a recognizer trained by examples/speech/train.py: DIR/model.pt2 and its
corpus), a second table: test WER of the binarized variants of the speech model, each
fine-tuned `--epochs` epochs on its training set (one model, one seed).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from compression import BATCH, Row, Setup, tcc_row  # noqa: E402

import tcc  # noqa: E402
from tcc.data import load_dataset  # noqa: E402
from tcc.evaluate import evaluate  # noqa: E402
from tcc.passes import Dataset  # noqa: E402
from tcc.zoo import digits_data, train_digits  # noqa: E402

ONE_ONE_ONE = "mode=w1a1,attention=binary,attn_bits=1"
LADDER = (("BinaryBERT-style 1-1-1", 41.0), ("BiBERT-style 1-1-1", 63.2), ("BiT-style 1-1-1", 73.5))
BERT_BASE = 83.9


def rows(epochs: int) -> list[tuple[str, Row]]:
    """(model, row): "relu" rows run on the digits encoder, "gelu" rows on its GELU twin."""
    def binarize(label: str, options: str) -> tuple[str, Row]:
        return "relu", tcc_row(label, f"binarize{{{options},epochs={epochs}}}")

    def simplify(label: str, options: str, model: str = "relu", then: str = "") -> tuple[str, Row]:
        return model, tcc_row(label, f"simplify-nonlinear{{{options},epochs={epochs}}}{then}")

    return [
        ("relu", tcc_row("fp32", None)), ("relu", tcc_row("int8", "quantize")),
        binarize("W1A8", "mode=w1a8"), binarize("W1A4", "mode=w1a4"), binarize("W1A1", "mode=w1a1"),
        binarize("W1A1, threshold per channel", "mode=w1a1,threshold=channel"),
        binarize("W1A1, ternary weight splitting", "mode=w1a1,tws=true"),
        binarize("W1A1, binary attention products", "mode=w1a1,attention=binary"),
        binarize(LADDER[0][0], f"{ONE_ONE_ONE},unsigned=false,hidden=0,tws=true"),
        binarize(LADDER[1][0], f"{ONE_ONE_ONE},unsigned=false"),
        binarize(LADDER[2][0], ONE_ONE_ONE),
        simplify("ReLU attention (fp32)", "softmax=relu"), simplify("RMSNorm (fp32)", "norm=rms"),
        ("gelu", tcc_row("GELU twin fp32", None)),
        simplify("GELU twin: GELU as ReLU (fp32)", "gelu=relu", "gelu"),
        simplify("GELU twin: hard GELU (fp32)", "gelu=hard", "gelu"),
        simplify("ReLU attention + W1A1", "softmax=relu", then=f",binarize{{mode=w1a1,epochs={epochs}}}"),
    ]


SPEECH_ROWS = (("fp32", None), ("int8", "quantize"), ("W1A8", "binarize{mode=w1a8}"), ("W1A4", "binarize{mode=w1a4}"),
               ("W1A1", "binarize{mode=w1a1}"), ("W1A1, ternary weight splitting", "binarize{mode=w1a1,tws=true}"),
               ("BiT-style 1-1-1", f"binarize{{{ONE_ONE_ONE}}}"))


def speech(directory: Path, epochs: int) -> None:
    """The speech table: WER of each of `SPEECH_ROWS` on the recognizer in `directory`."""
    model = directory / "model.pt2"
    if not model.is_file():
        raise SystemExit(f"--speech: {model} not found (examples/speech/train.py --out {directory} trains it)")
    base = tcc.compile(str(model))
    train = load_dataset(directory / "corpus/train.pt", base.graph, what="training data")
    test = load_dataset(directory / "corpus/test.pt", base.graph)
    print(f"\nspeech: {model}, test WER ({len(test)} utterances), {epochs} fine-tuning epochs on {len(train)}")
    fp32 = None
    for label, spec in SPEECH_ROWS:
        start = time.perf_counter()
        spec = spec and spec.replace("}", f",epochs={epochs}}}") if spec and spec.startswith("binarize") else spec
        metrics = evaluate(tcc.compile(str(model), pipeline=spec, train_data=train), test)
        fp32 = metrics["wer"] if fp32 is None else fp32
        print(f"  {label:<32} WER {100 * metrics['wer']:5.1f}%  ({100 * (metrics['wer'] - fp32):+.1f} points)  "
              f"CER {100 * metrics['cer']:4.1f}%  {time.perf_counter() - start:4.0f} s  {spec or '(fp32)'}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs of every row (>= 1)")
    parser.add_argument("--seed", type=int, default=0, help="first seed (model training, data order)")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds; the table shows medians")
    parser.add_argument("--speech", type=Path, help="also the speech table, on the recognizer in this directory")
    args = parser.parse_args()
    if args.epochs < 1 or args.seeds < 1:
        parser.error("--epochs and --seeds must be >= 1")
    torch.set_num_threads(1)  # the model is tiny: one thread (see compression.py)
    x_train, x_test, y_train, y_test = digits_data()
    table = rows(args.epochs)
    begin = time.perf_counter()
    for seed in range(args.seed, args.seed + args.seeds):
        setups = {}
        for activation in ("relu", "gelu"):
            model = train_digits(x_train, y_train, seed=seed, activation=activation)
            setups[activation] = Setup(seed, args.epochs, model, Dataset((x_train,), y_train, "digits train"),
                                       Dataset((x_test,), y_test, "digits test"), (x_test[:BATCH],))
        for model, row in table:
            start = time.perf_counter()
            row.accuracy.append(row.run(setups[model]).accuracy)
            row.seconds.append(time.perf_counter() - start)
            print(f"  seed {seed} {row.label}: {row.accuracy[-1]:.4f} ({row.seconds[-1]:.1f} s)", flush=True)
    print(f"\ndigits test set ({len(y_test)} images), {args.epochs} fine-tuning epochs, seeds "
          f"{args.seed}..{args.seed + args.seeds - 1}{' (medians)' if args.seeds > 1 else ''}, "
          f"{time.perf_counter() - begin:.0f} s in all")
    acc = {row.label: statistics.median(row.accuracy) for _, row in table}
    base = {"relu": acc["fp32"], "gelu": acc["GELU twin fp32"]}
    header = ("row", "accuracy", "vs fp32", "per seed", "wall s", "pipeline")
    lines = [(r.label, f"{acc[r.label]:.4f}", f"{100 * (acc[r.label] - base[m]):+.1f}",
              " ".join(f"{a:.3f}" for a in r.accuracy), f"{statistics.median(r.seconds):.1f}", r.setup)
             for m, r in table]
    widths = [max(len(line[i]) for line in [header] + lines) for i in range(len(header) - 1)]
    for line in [header] + lines:
        print("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(line, widths)))
              + "  " + line[-1])
    print(f"\nthe 1-1-1 ladder against BiT's published GLUE averages (BERT-base {BERT_BASE}): share of fp32")
    for label, published in LADDER:
        print(f"  {label:<24} published {published:>5.1f} ({published / BERT_BASE:>4.0%})   "
              f"digits {100 * acc[label]:.1f} ({acc[label] / acc['fp32']:.0%})")
    ours = [acc[label] for label, _ in LADDER]
    holds = "holds" if ours == sorted(ours) else "does not hold"
    print(f"  the published ordering (each recipe above the one before) {holds} on digits")
    if args.speech:
        speech(args.speech, args.epochs)


if __name__ == "__main__":
    main()
