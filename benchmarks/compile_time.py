"""Compile time of `tcc compile --target cpu` on a BERT-base-shaped model (12 x 768, seq 128)
against `torch.export` alone, both measured in this run. Target: ratio at most 2x, the report
included. Also the split: compile alone, and save (writing 440 MB of weights: the disk's speed).

    .venv/bin/python benchmarks/compile_time.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import median_seconds  # noqa: E402

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
        export_s = median_seconds(lambda: torch.export.export(model, positional, keywords), args.repeats)
        load_s = median_seconds(lambda: torch.export.load(str(program_path)), args.repeats)
        # the whole compile: capture (torch.export), lower, passes, prices, report, write the artifact
        compile_s = median_seconds(lambda: tcc.compile(model, inputs, target="cpu").save(Path(tmp) / "a"),
                                   args.repeats)
        only_s = median_seconds(lambda: tcc.compile(model, inputs, target="cpu"), args.repeats)
        # what `tcc compile model.pt2 --target cpu -o OUT` does: load the archive, then the same
        file_s = median_seconds(lambda: tcc.compile(str(program_path), target="cpu").save(Path(tmp) / "b"),
                                args.repeats)
    ratio = compile_s / export_s
    print(f"model {args.model} (median of {args.repeats}): torch.export {export_s:.2f} s; "
          f"tcc.compile(model) + save {compile_s:.2f} s; ratio {ratio:.2f}x (target <= 2x): "
          f"{'PASS' if ratio <= 2 else 'FAIL'}; tcc.compile alone {only_s:.2f} s ({only_s / export_s:.2f}x)")
    print(f"from a .pt2 file: torch.export.load {load_s:.2f} s; tcc compile model.pt2 {file_s:.2f} s "
          f"(ratio to load + export {file_s / (load_s + export_s):.2f}x)")


if __name__ == "__main__":
    main()
