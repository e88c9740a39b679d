"""Does sparsity pay in time? A BERT-base-shaped model pruned to 90% hierarchical sparsity
(`hp-prune{sparsity=0.9}`, one-shot, 16x16 blocks: 2 of 16 per row, a fifth of the blocks
dropped; embeddings and the pooler stay dense) runs on the torch executor (CPU) with its
weights in the encodings `select-format` chose (HP; torch CSR kernels), against the same
pruned model with every weight forced dense (what a pruning library's masks give you). Both
are measured in this run, interleaved (median of medians); their outputs must agree within
float tolerance. Target: at least 2x the dense model's speed.

    .venv/bin/python benchmarks/sparse_runtime.py [--model bert-base] [--repeats 10] [--sparsity 0.9]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import median_seconds  # noqa: E402

import tcc  # noqa: E402
from tcc import zoo  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="bert-base")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--sparsity", type=float, default=0.9)
    args = parser.parse_args()
    model, inputs = zoo.build(args.model)
    prune = f"fold-constants,canonicalize,dce,hp-prune{{sparsity={args.sparsity}}}"
    start = time.perf_counter()
    sparse = tcc.compile(model, inputs, pipeline=prune)
    compile_s = time.perf_counter() - start
    dense = tcc.compile(model, inputs, pipeline=prune + ",select-format{format=dense}")
    info = tcc.ir.analysis.describe(sparse.graph)
    formats = sorted({c["encoding"] for c in info["constants"] if c["encoding"] != "dense"})
    flat = sparse.flatten_inputs(inputs)
    runs = {"dense": dense.executor("cpu"), "sparse": sparse.executor("cpu")}
    outputs = {name: executor.run(flat) for name, executor in runs.items()}
    error = max(float((s - d).abs().max() / d.abs().max().clamp(min=1e-12))
                for s, d in zip(outputs["sparse"], outputs["dense"]) if d.is_floating_point())
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(3):  # interleaved, so machine noise hits both alike
        for name, executor in runs.items():
            times[name].append(median_seconds(lambda executor=executor: executor.run(flat), args.repeats))
    dense_t, sparse_t = (sorted(times[name])[1] for name in ("dense", "sparse"))
    speed = dense_t / sparse_t
    print(f"model {args.model}, hp-prune to {args.sparsity:.0%} (compiled in {compile_s:.1f} s); weights stored as "
          f"{', '.join(formats)}: {info['bytes'] / 2**20:.1f} MiB vs {info['dense_bytes'] / 2**20:.1f} MiB dense "
          f"({info['ratio']:.3f}); torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"torch executor (CPU) per forward: dense weights {1e3 * dense_t:.1f} ms, encoded weights "
          f"{1e3 * sparse_t:.1f} ms; max relative output difference {error:.1e}")
    ok_speed, ok_error = speed >= 2.0, error <= 1e-4
    print(f"speed {speed:.2f}x the dense model (target >= 2x): {'PASS' if ok_speed else 'FAIL'}")
    print(f"outputs agree within 1e-4 relative: {'PASS' if ok_error else 'FAIL'}")
    return 0 if ok_speed and ok_error else 1


if __name__ == "__main__":
    sys.exit(main())
