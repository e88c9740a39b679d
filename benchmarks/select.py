"""Device selection on the digits Transformer: one exploration (every compression setting x
every device of the catalog, accuracy measured on the 450 held-out images, pruning and
binarization fine-tuned on the training set), then the choice for a range of latency and
accuracy constraints, from the cheapest device to the largest.

    .venv/bin/python benchmarks/select.py [--batch 256] [--no-train] [--executor local|inline|ray]

A run is one batch of `--batch` images. Latencies are the cost model's predictions: the host
CPU's figures measured on this machine, the accelerators' cycles from their timing.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys

if __name__ == "select":
    # `python benchmarks/<script>.py` puts this folder first on the path, so this file answers
    # `import select` (subprocess, selectors): hand the importer the standard library's module
    _here = os.path.dirname(os.path.abspath(__file__))
    _spec = importlib.machinery.PathFinder.find_spec(
        "select", [p for p in sys.path if os.path.abspath(p or ".") != _here])
    _module = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_module)
    sys.modules["select"] = _module

PAIRS = [(100.0, 0.95), (25.0, 0.95), (20.0, 0.95), (10.0, 0.95), (5.0, 0.95), (2.0, 0.95), (1.0, 0.95),
         (0.5, 0.95), (5.0, 0.985), (0.2, 0.95), (1.0, 0.999)]


def main() -> None:
    import argparse
    import time

    import torch

    from tcc.passes import Dataset
    from tcc.select import choose, select
    from tcc.targets import load_catalog
    from tcc.zoo import digits_data, train_digits

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256, help="images per run (default 256)")
    parser.add_argument("--no-train", action="store_true", help="prune one-shot (no fine-tuning)")
    parser.add_argument("--executor", default="local", choices=("local", "inline", "ray"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    x_train, x_test, y_train, y_test = digits_data()
    model = train_digits(x_train, y_train)
    catalog = load_catalog()
    start = time.perf_counter()
    selection = select(model, Dataset((x_test,), y_test, "digits test"), catalog, lc=PAIRS[0][0], ac=PAIRS[0][1],
                       example_inputs=(x_test[:args.batch],), executor=args.executor,
                       train=None if args.no_train else Dataset((x_train,), y_train, "digits train"))
    seconds = time.perf_counter() - start
    settings = len({p.setting for p in selection.points})
    devices = len({p.device for p in selection.points})
    print(f"digits Transformer, {args.batch} images per run: {len(selection.points)} points ({settings} settings x "
          f"{devices} devices) explored in {seconds:.1f} s ({args.executor} executor"
          f"{', fine-tuned' if not args.no_train else ', one-shot'})")
    print(f"{'LC':>8} {'AC':>6}  {'device':<12} {'setting':<18} {'latency ms':>10} {'accuracy':>8} {'price':>8}")
    for lc, ac in PAIRS:
        s = choose(selection.points, lc, ac)
        p = s.chosen or s.closest
        status = "" if s.chosen else "  (none meets both: closest)"
        print(f"{lc:>6g}ms {ac:>6g}  {p.device:<12} {p.setting:<18} {p.latency_ms:>10.3g} {p.accuracy:>8.4f} "
              f"{p.price_usd:>8,.0f}{status}")


if __name__ == "__main__":
    main()
