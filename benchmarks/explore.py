"""The co-design explorer on the digits Transformer (and with `--models digits,speech` on the
speech recognizer, metric 1 - WER): the two seed explorations as shipped space files, each
searched twice in fresh studies, the whole grid (the reference) and NSGA-II within a budget. Prints each Pareto set, and the search's efficiency: the share of
the grid's Pareto set the budgeted search found, and its wall time against the grid's.

- `examples/spaces/systolic.json`: the third seed paper's sweep, systolic array sizes
  (4x4 to 32x32 on fpga-medium's part) against block-pruning ratios with the block the array's
  tile: accuracy, latency, area.
- `examples/spaces/binarized.json`: the second seed paper's trade-off, binarized variants
  (W1A8, W1A4, W1A1, with and without ternary weight splitting, and int8) on accelerators of
  two sizes with and without the W1A8 unit, and two catalog devices: accuracy, latency,
  energy and robustness (weight bit flips and input noise).

    .venv/bin/python benchmarks/explore.py [--models digits,speech] [--spaces systolic,binarized]
        [--budget-share 0.4] [--batch 64] [--no-train] [--speech-dir build/speech]

Accuracy is on the 450 held-out images; pruning and binarization fine-tune on the training
set (a few epochs) unless `--no-train`. The speech recognizer is `examples/speech/train.py
--quick`'s (trained into `--speech-dir` when it is not there: about 2 minutes), its metric
1 - WER on 64 test utterances (speakers held out of training), fine-tuned on 512 training
utterances. Latency and energy are the cost model's.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spaces", default="systolic,binarized")
    parser.add_argument("--budget-share", type=float, default=0.4, help="NSGA-II's budget, a share of the grid")
    parser.add_argument("--batch", type=int, default=64, help="images per run (the model's exported batch)")
    parser.add_argument("--no-train", action="store_true", help="compress one-shot (no fine-tuning)")
    parser.add_argument("--models", default="digits", help="digits, speech")
    parser.add_argument("--speech-dir", type=Path, default=ROOT / "build" / "speech-bench",
                        help="the speech recognizer and its corpus (trained there when missing)")
    args = parser.parse_args()
    for model in args.models.split(","):
        prepared = speech(args) if model == "speech" else digits(args)
        for name in args.spaces.split(","):
            if prepared[-1] is None and name == "binarized":
                print(f"== {model}, {name}: skipped (ternary weight splitting trains: --no-train)")
                continue
            run_space(name, *prepared, args)


def digits(args) -> tuple:
    """(label, lowered model, its example data, test data, training data or None): the digits
    Transformer trained here, exported at `--batch` images."""
    import torch

    from tcc.model import example_arrays, example_dataset, lower
    from tcc.passes import Dataset
    from tcc.select import canonical
    from tcc.zoo import digits_data, train_digits

    torch.set_num_threads(1)
    x_train, x_test, y_train, y_test = digits_data()
    model = train_digits(x_train, y_train).eval()
    graph, signature, examples, _ = lower(model, (x_test[:args.batch],))
    example = example_dataset(graph, example_arrays(signature, examples))
    base = canonical(graph)
    test = Dataset((x_test,), y_test, "digits test").fit(base)
    train = None if args.no_train else Dataset((x_train,), y_train, "digits train").fit(base)
    return "digits", base, example, test, train


def speech(args) -> tuple:
    """The same for the speech recognizer of `examples/speech/train.py --quick`, on 64 test
    utterances, fine-tuned on 512 training utterances (none with `--no-train`)."""
    import dataclasses
    import subprocess
    import sys

    import torch

    from tcc.data import load_dataset
    from tcc.model import example_arrays, example_dataset, lower
    from tcc.select import canonical

    torch.set_num_threads(1)
    if not (args.speech_dir / "model.pt2").is_file():
        subprocess.run([sys.executable, str(ROOT / "examples" / "speech" / "train.py"), "--quick", "--out",
                        str(args.speech_dir)], check=True)
    graph, signature, examples, _ = lower(str(args.speech_dir / "model.pt2"))
    example = example_dataset(graph, example_arrays(signature, examples))
    base = canonical(graph)
    test = load_dataset(args.speech_dir / "corpus" / "test.pt", base, what="speech test")
    test = dataclasses.replace(test, inputs=tuple(x[:64] for x in test.inputs), labels=test.labels[:64])
    train = None if args.no_train else load_dataset(args.speech_dir / "corpus" / "train.pt", base,
                                                    what="speech train")
    if train is not None:
        train = dataclasses.replace(train, inputs=tuple(x[:512] for x in train.inputs), labels=train.labels[:512])
    return "speech", base, example, test, train


def run_space(name: str, model: str, base, example, test, train, args) -> None:
    """Explore shipped space `name` for the model twice (the grid, NSGA-II) and print both."""
    from tcc.explore import describe, explore, load_space
    from tcc.targets import load_catalog

    catalog = load_catalog()
    space = load_space(ROOT / "examples" / "spaces" / f"{name}.json", catalog)
    grid_size = space.grid_size()
    budget = max(1, math.ceil(args.budget_share * grid_size))
    runs = {}
    with tempfile.TemporaryDirectory() as d:
        for label, size, grid in (("grid", grid_size, True), ("nsga2", budget, False)):
            start = time.perf_counter()
            runs[label] = explore(base, test, catalog, space, examples=example, budget=size,
                                  store=str(Path(d) / label), train=train, grid=grid, seed=0)
            runs[label] = (runs[label], time.perf_counter() - start)
    (grid_run, grid_s), (search, search_s) = runs["grid"], runs["nsga2"]
    reference = {str(sorted(p.params.items())) for p in grid_run.front}
    found = {str(sorted(p.params.items())) for p in search.front} & reference
    print(f"== {model}, {name}: {grid_size} points ({', '.join(space.objectives)}); the grid's Pareto set "
          f"{len(reference)} points in {grid_s:.0f} s")
    for p in sorted(grid_run.front, key=lambda p: p.latency_ms):
        mark = " *" if str(sorted(p.params.items())) in found else ""
        print(f"   {p.values['metric']:.3f} {grid_run.score}, {p.values['robustness']:.3f} under faults, "
              f"{p.latency_ms:8.3f} ms, {p.energy_mj:8.3f} mJ, area {p.values['area']:.2f}: "
              f"{describe(p).split(': ')[0]}{mark}")
    print(f"   NSGA-II, budget {budget} ({args.budget_share:.0%} of the grid): found {len(found)} of the "
          f"{len(reference)} (* above, {len(found) / len(reference):.0%}) in {search_s:.0f} s "
          f"({search_s / grid_s:.2f}x the grid's time)")


if __name__ == "__main__":
    main()
