"""Compile time of `tcc compile --target cpu` on a BERT-base-shaped model (12 x 768, seq 128)
against `torch.export` alone, both measured in this run, taking turns in every round; the ratio
is the median of the rounds' ratios. Target: ratio at most 2x, the report included. Also the split: compile alone, and save (writing 440 MB of weights: the disk's speed).

    .venv/bin/python benchmarks/compile_time.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import interleaved_seconds  # noqa: E402

import tcc  # noqa: E402
from tcc import zoo  # noqa: E402
from tcc.frontend import split_inputs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="bert-base")
    args = parser.parse_args()
    model, inputs = zoo.build(args.model)
    positional, keywords = split_inputs(inputs)
    with tempfile.TemporaryDirectory() as tmp:
        program_path = Path(tmp) / "model.pt2"
        torch.export.save(torch.export.export(model, positional, keywords), program_path)
        # taking turns in every round: the ratios are of one round's times, the machine's load alike
        times = interleaved_seconds({
            "export": lambda: torch.export.export(model, positional, keywords),
            # the whole compile: capture (torch.export), lower, passes, prices, report, write the artifact
            "compile+save": lambda: tcc.compile(model, inputs, target="cpu").save(Path(tmp) / "a"),
            "compile": lambda: tcc.compile(model, inputs, target="cpu"),
            "load": lambda: torch.export.load(str(program_path)),
            # what `tcc compile model.pt2 --target cpu -o OUT` does: load the archive, then the same
            "file": lambda: tcc.compile(str(program_path), target="cpu").save(Path(tmp) / "b"),
        }, args.repeats)
    median = {name: statistics.median(t) for name, t in times.items()}

    def ratio(name: str, *baseline: str) -> float:
        return statistics.median(t / sum(times[b][i] for b in baseline) for i, t in enumerate(times[name]))

    saved = ratio("compile+save", "export")
    print(f"model {args.model} (medians of {args.repeats} rounds): torch.export {median['export']:.2f} s; "
          f"tcc.compile(model) + save {median['compile+save']:.2f} s; ratio {saved:.2f}x (target <= 2x): "
          f"{'PASS' if saved <= 2 else 'FAIL'}; tcc.compile alone {median['compile']:.2f} s "
          f"({ratio('compile', 'export'):.2f}x)")
    print(f"from a .pt2 file: torch.export.load {median['load']:.2f} s; tcc compile model.pt2 {median['file']:.2f} s "
          f"(ratio to load + export {ratio('file', 'load', 'export'):.2f}x)")

if __name__ == "__main__":
    main()
