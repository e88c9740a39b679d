"""Loading a torch.export archive: tcc's reader (no unpickling, no imports, bounded reads)
against `torch.export.load`, both measured in this run on each zoo model (and BERT-base with
--bert). Target: ratio at most 1.2x (safety should cost nothing noticeable).

    .venv/bin/python benchmarks/export_reader.py [--repeats 5] [--bert]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import median_seconds  # noqa: E402

from tcc import zoo  # noqa: E402
from tcc.export_archive import read_export_archive  # noqa: E402
from tcc.frontend import split_inputs  # noqa: E402
from tcc.loader import MAX_INPUT_ELEMENTS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bert", action="store_true", help="also BERT-base (12 x 768, 440 MB of weights)")
    args = parser.parse_args()
    names = [*zoo.ZOO, *(["bert-base"] if args.bert else [])]
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            model, inputs = zoo.build(name)
            positional, keywords = split_inputs(inputs)
            path = Path(folder) / f"{name}.pt2"
            torch.export.save(torch.export.export(model, positional, keywords), path)
            ours = median_seconds(lambda: read_export_archive(path, MAX_INPUT_ELEMENTS), args.repeats)
            theirs = median_seconds(lambda: torch.export.load(path), args.repeats)
            print(f"{name:20s} tcc reader {ours:.3f} s, torch.export.load {theirs:.3f} s: ratio {ours / theirs:.2f}"
                  f" ({'meets' if ours <= 1.2 * theirs else 'MISSES'} <= 1.2x)")


if __name__ == "__main__":
    main()
