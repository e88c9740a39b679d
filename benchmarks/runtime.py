"""Speed of tcc's torch executor against torch eager on the same model, both measured in this
run (median of repeated forward passes, no autograd). Target: at least 0.9x eager's speed.

    .venv/bin/python benchmarks/runtime.py [--model bert-base] [--on cpu|gpu] [--repeats 10]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import median_seconds  # noqa: E402

import tcc  # noqa: E402
from tcc import zoo  # noqa: E402
from tcc.frontend import split_inputs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="bert-base")
    parser.add_argument("--on", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    model, inputs = zoo.build(args.model)
    artifact = tcc.compile(model, inputs, target=args.on)
    device = torch.device("cuda" if args.on == "gpu" else "cpu")
    positional, keywords = split_inputs(inputs)
    model = model.to(device)
    positional = tuple(t.to(device) for t in positional)
    keywords = {k: t.to(device) for k, t in keywords.items()}
    executor = artifact.executor(args.on)
    flat = [t.to(device) for t in artifact.flatten_inputs(inputs)]
    sync = torch.cuda.synchronize if args.on == "gpu" else (lambda: None)

    def eager():
        with torch.inference_mode():
            model(*positional, **keywords)
        sync()

    def compiled():
        executor.run(flat)
        sync()

    # interleave the two so machine noise hits both alike
    eager_s, tcc_s = [], []
    for _ in range(3):
        eager_s.append(median_seconds(eager, args.repeats))
        tcc_s.append(median_seconds(compiled, args.repeats))
    eager_t, tcc_t = sorted(eager_s)[1], sorted(tcc_s)[1]
    speed = eager_t / tcc_t
    print(f"model {args.model} on {args.on}: eager {1e3 * eager_t:.1f} ms, tcc torch executor {1e3 * tcc_t:.1f} ms "
          f"per forward; speed {speed:.2f}x eager (target >= 0.9x): {'PASS' if speed >= 0.9 else 'FAIL'}")


if __name__ == "__main__":
    main()
