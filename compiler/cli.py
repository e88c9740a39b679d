"""The `tcc` command line: compile, run, inspect, targets.

User errors print one line `tcc: error: ...` and exit with code 2, never a traceback."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tcc.ir.errors import TccError


def _load_inputs(path: str) -> Any:
    """Inputs from .npy (one array), .npz (by input name, or arr_0.. positionally), or a file
    written by torch.save (tensor, tuple, list or dict; loaded with weights_only)."""
    import torch
    file = Path(path)
    if not file.is_file():
        raise TccError(f"{path}: no such input file")
    try:
        if file.suffix == ".npy":
            return np.load(file, allow_pickle=False)
        if file.suffix == ".npz":
            with np.load(file, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
            positional = [f"arr_{i}" for i in range(len(arrays))]
            return [arrays[k] for k in positional] if sorted(arrays) == sorted(positional) else arrays
        value = torch.load(file, weights_only=True, map_location="cpu")
    except (ValueError, OSError, EOFError, RuntimeError, zipfile.BadZipFile, Exception) as e:
        raise TccError(f"{path}: cannot read inputs ({str(e).splitlines()[0] if str(e) else type(e).__name__})") \
            from None
    if isinstance(value, (torch.Tensor, dict, tuple, list)):
        return value
    raise TccError(f"{path}: holds a {type(value).__name__}; expected a tensor, tuple, list or dict of tensors")


def _format_value(value: Any) -> str:
    import torch
    if isinstance(value, torch.Tensor):
        flat = value.flatten()[:4].tolist()
        return f"{str(value.dtype).replace('torch.', '')}{list(value.shape)} first values {flat}"
    return repr(value)


def _progress(args: argparse.Namespace) -> bool:
    return not args.quiet and sys.stderr.isatty()


def cmd_compile(args: argparse.Namespace) -> int:
    import tcc
    artifact = tcc.compile(args.model, target=args.target, pipeline=args.pipeline, frontend=args.frontend,
                           input_shapes=args.input_shape, arch=args.arch, trust_pickle=args.trust_pickle,
                           train_data=args.train_data, calib_data=args.calib_data, progress=_progress(args),
                           accel=args.accel, synth=args.synth)
    path = artifact.save(args.output)
    summary = f"{len(artifact.graph.ops)} ops, {len(artifact.graph.constants)} constants"
    if not args.quiet:
        for line in artifact.manifest["pass_log"]:
            print(f"  {line}")
    print(f"compiled {artifact.manifest['source']} for {args.target}: {summary} -> {path}")
    if "accel" in artifact.manifest and not args.quiet:
        host = artifact.manifest["accel"]["host_ops"]
        print(f"  accelerator: {artifact.manifest['accel']['sections']} sections; {len(host)} ops on the host"
              + (": " + ", ".join(f"{h['op']} {h['result']}" for h in host[:8]) + (", ..." if len(host) > 8 else "")
                 if host else ""))
        for label, key in (("estimated", "resources_estimate"), ("synthesized (yosys)", "synthesis")):
            if key in artifact.manifest["accel"]:
                r = artifact.manifest["accel"][key]
                label += ", the catalog's record of this config" if r.get("source") == "catalog" else ""
                print(f"  {label}: {r['LUT']:,} LUT, {r['FF']:,} FF, {r['DSP']:,} DSP, {r['BRAM']:,} BRAM36 "
                      f"(part {artifact.manifest['target']['part']['name']})")
    return 0


def cmd_passes(args: argparse.Namespace) -> int:
    from tcc.passes import PASSES
    from tcc.passes.pipeline import describe_passes
    info = describe_passes(PASSES)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for entry in info:
        print(f"{entry['name']}: {entry['summary']}")
        for o in entry["options"]:
            print(f"    {o['name']}={o['type']}  (default {o['default']})  {o['help']}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import tcc
    from tcc.evaluate import evaluate

    from .data import load_dataset
    artifact = tcc.load(args.artifact)
    data = load_dataset(args.data, artifact.graph)
    baseline = tcc.load(args.baseline) if args.baseline else None
    report = evaluate(artifact, data, on=args.on, baseline=baseline)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    line = f"{args.artifact} on {args.data} ({report['examples']} examples, --on {args.on}):"
    if "accuracy" in report:
        line += f" accuracy {report['accuracy']:.4f}"
    if baseline is not None:
        if report["baseline_accuracy"] is not None:
            line += f" (baseline {report['baseline_accuracy']:.4f})"
        line += (f", top-1 agreement {report['agreement']:.4f}, max abs error {report['max_abs_error']:.3g}, "
                 f"relative {report['relative_error']:.3g}")
    print(line)
    return 0


def _write_atomically(path: str, write) -> Path:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it into place."""
    out = Path(path)
    tmp = out.with_name(f".{out.name}.tmp")
    write(tmp)
    os.replace(tmp, out)
    return out


def cmd_run(args: argparse.Namespace) -> int:
    import torch

    import tcc
    artifact = tcc.load(args.artifact)
    inputs = _load_inputs(args.input) if args.input else None
    if args.stats and args.on not in ("sim", "rtl"):
        raise TccError("--stats: cycle statistics come from --on sim or --on rtl")
    outputs = artifact.run(inputs, on=args.on)
    if args.stats:
        executor = artifact.executor(args.on)
        stats = executor.stats.to_json(executor.program.config)
        out = _write_atomically(args.stats, lambda tmp: tmp.write_text(json.dumps(stats, indent=2) + "\n"))
        print(f"{args.on}: {stats['cycles']:,} cycles, {stats['macs']:,} MACs, utilization {stats['utilization']:.3f}"
              f" -> {out}")
    if args.output:
        out = _write_atomically(args.output, lambda tmp: torch.save(outputs, tmp))
        print(f"wrote {out}")
    else:
        items = outputs.items() if isinstance(outputs, dict) else enumerate(
            outputs if isinstance(outputs, tuple) else (outputs,))
        for key, value in items:
            print(f"{key}: {_format_value(value)}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    import tcc
    from tcc.ir.analysis import describe
    artifact = tcc.load(args.artifact)
    info = describe(artifact.graph)
    info["target"] = artifact.manifest["target"]["name"]
    info["pipeline"] = artifact.manifest["passes"]
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"artifact {args.artifact}: target {info['target']}, passes {', '.join(info['pipeline']) or 'none'}")
    for label in ("inputs", "outputs"):
        print(f"{label + ':':<9}" + ", ".join(f"{v['name']} {v['type']}" for v in info[label]))
    print(f"{info['num_ops']} ops, {info['params']:,} parameters, {info['flops']:,} FLOPs, "
          f"{info['bytes']:,} bytes of constants ({info['ratio']:.3f} of {info['dense_bytes']:,} dense)")
    print("ops: " + ", ".join(f"{k} {v}" for k, v in info["ops"].items()))
    rows = [(c["name"], "x".join(map(str, c["shape"])) or "scalar", c["dtype"], c["encoding"], c["structure"],
             f"{100 * c['sparsity']:.1f}%", f"{c['bytes']:,}", f"{c['dense_bytes']:,}", f"{c['ratio']:.3f}")
            for c in info["constants"]]
    header = ("constant", "shape", "dtype", "encoding", "structure", "sparsity", "bytes", "dense", "ratio")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for row in [header] + rows:
        print("  " + "  ".join(str(v).ljust(w) if i < 5 else str(v).rjust(w) for i, (v, w) in
                               enumerate(zip(row, widths))))
    return 0


def cmd_targets(args: argparse.Namespace) -> int:
    from tcc.targets import load_catalog
    catalog = load_catalog()
    if args.json:
        print(json.dumps([t.to_json() for t in catalog.values()], indent=2))
        return 0
    for target in catalog.values():
        print(f"{target.name:<12} {target.kind:<5} backend {target.backend:<10} {target.description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tcc", description="tcc: a Transformer co-design compiler")
    parser.add_argument("--version", action="version", version=f"tcc {__import__('tcc').__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compile", help="compile a model file into an artifact directory")
    p.add_argument("model", help="model file: torch.export (.pt2), TorchScript, state_dict or torch.save")
    p.add_argument("--target", default="cpu", help="target name (see `tcc targets`); default cpu")
    p.add_argument("-o", "--output", required=True, help="artifact directory to write")
    p.add_argument("--input-shape", action="append", default=[], metavar="[NAME=]DIMS[:DTYPE]",
                   help="example input shape, e.g. 1x128:i64 (repeat per input)")
    p.add_argument("--arch", help="module:Class giving the architecture of a state_dict")
    p.add_argument("--trust-pickle", action="store_true", help="allow full pickles (runs code from the file)")
    p.add_argument("--frontend", choices=("export", "fx"), default="export",
                   help="capture with torch.export (default) or torch.fx.symbolic_trace")
    p.add_argument("--pipeline", metavar="SPEC",
                   help="passes replacing the target's default optimisation, e.g. "
                        "'fold-constants,dce,hp-prune{block=16x16,sparsity=0.75},quantize{bits=8}' (see `tcc passes`)")
    p.add_argument("--train-data", metavar="D.pt", help="training data for fine-tuning: torch.save({'inputs': X, "
                                                         "'labels': Y})")
    p.add_argument("--calib-data", metavar="D.pt", help="calibration data for quantization (same format)")
    p.add_argument("--accel", metavar="KEY=VALUE,...",
                   help="override fields of an fpga target's accelerator config, e.g. rows=16,cols=16")
    p.add_argument("--synth", action="store_true",
                   help="fpga targets: synthesize the accelerator with yosys (minutes), record LUT/FF/DSP/BRAM, "
                        "fail if it does not fit the part")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or pass log")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("passes", help="list every pass with its options")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_passes)

    p = sub.add_parser("eval", help="accuracy of an artifact on labelled data, and error against a baseline")
    p.add_argument("artifact")
    p.add_argument("--data", required=True, metavar="D.pt", help="torch.save({'inputs': X, 'labels': Y})")
    p.add_argument("--baseline", metavar="ARTIFACT", help="the uncompressed model's artifact to compare outputs with")
    p.add_argument("--on", choices=("cpu", "gpu", "numpy"), default="cpu", help="executor (default cpu)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("run", help="run an artifact on inputs")
    p.add_argument("artifact")
    p.add_argument("--input", help="inputs: .npy, .npz, or a torch.save file (tensor, tuple or dict); "
                                   "default: the artifact's example inputs")
    p.add_argument("--on", choices=("cpu", "gpu", "numpy", "sim", "rtl"), default="cpu",
                   help="executor (default cpu); sim: ISA simulator, rtl: Verilator on the Verilog (fpga targets)")
    p.add_argument("--stats", metavar="FILE.json", help="with --on sim|rtl: write cycles, MACs, utilization, "
                                                         "instruction counts")
    p.add_argument("-o", "--output", help="save outputs with torch.save to this file")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("inspect", help="summarize an artifact's graph and constants")
    p.add_argument("artifact")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("targets", help="list targets")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_targets)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = bool(os.environ.get("TCC_DEBUG"))
    if not debug:  # library deprecation chatter is not the user's business
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
    try:
        return args.func(args)
    except TccError as e:
        print(f"tcc: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tcc: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        print(f"tcc: internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
              "(a bug in tcc; set TCC_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
