"""The `tcc` command line: compile, run, inspect, targets.

User errors print one line `tcc: error: ...` and exit with code 2, never a traceback."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from tcc import __version__
from tcc.ir.errors import TccError, printable  # light: tcc and tcc.ir import numpy only (tests/test_imports.py)


def _load_inputs(path: str) -> Any:
    """Inputs from .npy (one array), .npz (by input name, or arr_0.. positionally), or a file
    written by torch.save (tensor, tuple, list or dict; loaded with weights_only)."""
    import torch

    from .data import read_numpy, read_saved
    file = Path(path)
    if file.suffix == ".npy":
        return read_numpy(file, "input")
    if file.suffix == ".npz":
        arrays = read_numpy(file, "inputs")
        positional = [f"arr_{i}" for i in range(len(arrays))]
        return [arrays[k] for k in positional] if sorted(arrays) == sorted(positional) else arrays
    value = read_saved(file, "input")
    if isinstance(value, (torch.Tensor, dict, tuple, list)):
        return value
    raise TccError(f"{path}: holds a {type(value).__name__}; expected a tensor, tuple, list or dict of tensors")


def _format_value(value: Any) -> str:
    import torch
    if isinstance(value, torch.Tensor):
        flat = value.flatten()[:4].tolist()
        return f"{str(value.dtype).replace('torch.', '')}{list(value.shape)} first values {flat}"
    return repr(value)


def read_vocab(path: str | None) -> list[str] | None:
    """--vocab: a JSON list of the model's output symbols (CTC: the blank first)."""
    if path is None:
        return None
    try:
        vocab = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise TccError(f"--vocab {path}: cannot read it ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TccError(f"--vocab {path}: not JSON ({e})") from None
    if not isinstance(vocab, list) or not all(isinstance(s, str) for s in vocab):
        raise TccError(f"--vocab {path}: must be a JSON list of strings (the model's output symbols in logit order)")
    return vocab


def _data(args: argparse.Namespace, path: str | None, what: str):
    """The data file at `path` as `tcc.compile` takes it: the path itself, or with --task / --vocab
    the dataset they make of it."""
    if path is None or (args.task is None and args.vocab is None):
        return path
    from .data import load_dataset
    dataset = load_dataset(path, what=what, task=args.task, vocab=read_vocab(args.vocab))
    return dataclasses.replace(dataset, source=Path(path).name)


def _exploration_data(args: argparse.Namespace):
    """`tcc select`'s and `tcc explore`'s evaluation and training data (None when not given),
    and their --report directory checked, before the exploration, not after it."""
    from tcc.report import check_report_dir

    from .data import load_dataset
    vocab = read_vocab(args.vocab)
    data = load_dataset(args.data, what="evaluation data", task=args.task, vocab=vocab)
    train = load_dataset(args.train_data, what="training data", task=args.task, vocab=vocab) if args.train_data \
        else None
    if args.report:
        check_report_dir(args.report, "--report: ")
    return data, train


def _progress(args: argparse.Namespace) -> bool:
    return not args.quiet and sys.stderr.isatty()


def cmd_compile(args: argparse.Namespace) -> int:
    import tcc
    from tcc.runtime.artifact import check_destination
    check_destination(args.output)  # before the work, not after it
    artifact = tcc.compile(args.model, target=args.target, pipeline=args.pipeline, frontend=args.frontend,
                           input_shapes=args.input_shape, arch=args.arch, trust_pickle=args.trust_pickle,
                           train_data=_data(args, args.train_data, "training data"), calib_data=args.calib_data,
                           eval_data=_data(args, args.data, "evaluation data"),
                           progress=_progress(args), accel=args.accel, synth=args.synth, targets_file=args.targets_file,
                           lc=args.lc, ac=args.ac, settings=args.settings, study=args.study,
                           weights_from=args.weights_from)
    path = artifact.save(args.output)
    summary = f"{len(artifact.graph.ops)} ops, {len(artifact.graph.constants)} constants"
    if not args.quiet:
        if adopted := artifact.manifest.get("weights_from"):
            line = f"weights from {adopted['source']}: {adopted['weights']} of the {adopted['of']} float weights"
            print(f"  {printable(line)}")
        for line in (*artifact.manifest["pass_log"], *artifact.notes):  # notes: what this machine decided
            print(f"  {printable(line)}")
    print(printable(f"compiled {artifact.manifest['source']} for {artifact.manifest['target']['name']}: {summary} -> "
                    f"{path}"))
    if "accel" in artifact.manifest and not args.quiet:
        accel = artifact.manifest["accel"]
        host = [h for h in accel["host_ops"] if h["where"] != "addressing"]
        between = sum(h["where"] == "between" for h in host)
        print(printable(f"  accelerator: {accel['sections']} sections in {accel['calls']} calls "
                        f"({accel['link_bytes']:,} bytes over the host link a run); {len(host)} ops on the host "
                        f"({len(host) - between} at the model's edges, {between} between calls)"
                        + (": " + ", ".join(f"{h['op']} {h['result']}" for h in host[:8])
                           + (", ..." if len(host) > 8 else "") if host else "")))
        for label, key in (("estimated", "resources_estimate"), ("synthesized (yosys)", "synthesis")):
            if key in artifact.manifest["accel"]:
                r = artifact.manifest["accel"][key]
                label += ", the catalog's record of this config" if r.get("source") == "catalog" else ""
                print(printable(f"  {label}: {r['LUT']:,} LUT, {r['FF']:,} FF, {r['DSP']:,} DSP, {r['BRAM']:,} BRAM36 "
                                f"(part {artifact.manifest['target']['part']['name']})"))
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
            print(f"    {o['name']}={o['type']}{', ' + o['range'] if o['range'] else ''}  (default {o['default']})  "
                  f"{o['help']}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import tcc
    from tcc.evaluate import evaluate
    from tcc.passes.tasks import METRIC_NAMES

    from .data import load_dataset
    artifact = tcc.load(args.artifact)
    data = load_dataset(args.data, artifact.graph, task=args.task, vocab=read_vocab(args.vocab))
    baseline = tcc.load(args.baseline) if args.baseline else None
    report = evaluate(artifact, data, on=args.on, baseline=baseline)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    figures = []
    for key, name in METRIC_NAMES.items():
        if key in report:
            figures.append(f"{name} {report[key]:.4f}" + (f" (baseline {report['baseline_' + key]:.4f})"
                                                          if "baseline_" + key in report else ""))
    if baseline is not None:
        figures.append(f"{'top-1 ' if data.task.name == 'classification' else ''}agreement {report['agreement']:.4f}, "
                       f"max abs error {report['max_abs_error']:.3g}, relative {report['relative_error']:.3g}")
    print(printable(f"{args.artifact} on {args.data} ({report['examples']} examples, --on {args.on}): "
                    + ", ".join(figures)))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import torch

    import tcc
    from tcc.runtime.outputs import check_new_file, write_file
    artifact = tcc.load(args.artifact)
    inputs = _load_inputs(args.input) if args.input else None
    if args.stats and args.on not in ("sim", "rtl"):
        raise TccError("--stats: cycle statistics come from --on sim or --on rtl")
    for out in (args.stats, args.output):
        if out:
            check_new_file(Path(out))
    if args.on in ("sim", "rtl"):
        artifact.executor(args.on).progress = _progress(args)
    outputs = artifact.run(inputs, on=args.on)
    if args.stats:
        executor = artifact.executor(args.on)
        stats = executor.stats.to_json(executor.program.config)
        out = write_file(Path(args.stats), lambda f: f.write((json.dumps(stats, indent=2) + "\n").encode()))
        print(f"{args.on}: {stats['cycles']:,} cycles, {stats['macs']:,} MACs, utilization {stats['utilization']:.3f}"
              f" -> {out}")
    if args.output:
        out = write_file(Path(args.output), lambda f: torch.save(outputs, f))
        print(f"wrote {out}")
    else:
        items = outputs.items() if isinstance(outputs, dict) else enumerate(
            outputs if isinstance(outputs, tuple) else (outputs,))
        for key, value in items:
            print(printable(f"{key}: {_format_value(value)}"))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    import tcc
    from tcc.runtime.generate import generate
    from tcc.runtime.outputs import check_new_file, write_file
    artifact = tcc.load(args.artifact)
    prompt = _load_inputs(args.input)
    if isinstance(prompt, dict):
        prompt = list(prompt.values())
    if isinstance(prompt, (tuple, list)) and len(prompt) == 1 and not isinstance(prompt[0], int):
        prompt = prompt[0]
    if isinstance(prompt, (tuple, list)) and not all(type(t) is int for t in prompt):
        raise TccError(f"{args.input}: holds {len(prompt)} values; the prompt is one tensor of token ids "
                       "[length] or [batch, length]")
    if args.output:
        check_new_file(Path(args.output))
    if args.on in ("sim", "rtl"):
        artifact.executor(args.on).progress = False
    prefill = tcc.load(args.prefill) if args.prefill else None
    result = generate(artifact, prompt, args.max_new_tokens, on=args.on, temperature=args.temperature,
                      top_k=args.top_k, seed=args.seed, eos_token_id=args.eos, prefill=prefill)
    if args.output:
        write_file(Path(args.output), lambda f: torch.save(result.tokens, f))
    rate = f"{result.decode_tokens_per_s:,.1f} tokens/s" if result.decode_tokens_per_s else "one token"
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        for row in result.new_tokens.tolist():
            print(" ".join(map(str, row)))
        print(f"{args.on}: {result.new_tokens.shape[1]} new tokens after {result.prompt_length}; time to first token "
              f"{result.time_to_first_token_s * 1e3:.1f} ms, then {rate}"
              + (f" -> {args.output}" if args.output else ""), file=sys.stderr if args.quiet else sys.stdout)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    import tcc
    from tcc.ir.analysis import describe
    artifact = tcc.load(args.artifact)
    info = describe(artifact.graph)
    info["target"] = artifact.manifest["target"]["name"]
    info["pipeline"] = artifact.manifest["passes"]
    wire = {w["name"]: w for w in artifact.manifest.get("accel", {}).get("weights", [])}
    for c in info["constants"]:  # an FPGA artifact: what the accelerator reads of each weight
        if c["name"] in wire:
            c["accel"] = {k: v for k, v in wire[c["name"]].items() if k != "name"}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(printable(f"artifact {args.artifact}: target {info['target']}, "
                    f"passes {', '.join(info['pipeline']) or 'none'}"))
    for label in ("inputs", "outputs"):
        print(f"{label + ':':<9}" + ", ".join(f"{v['name']} {v['type']}" for v in info[label]))
    if info["state"]:  # a decode step's KV cache: carried from one run to the next
        print("state:   " + ", ".join(f"{s['input']} -> {s['output']} ({s['role']}"
                                      + (f", layer {s['layer']}" if s["layer"] is not None else "")
                                      + (f", seq dim {s['seq_dim']}" if s["seq_dim"] is not None else "") + ")"
                                      for s in info["state"]))
    print(f"{info['num_ops']} ops, {info['params']:,} parameters, {info['flops']:,} FLOPs, "
          f"{info['bytes']:,} bytes of constants ({info['ratio']:.3f} of {info['dense_bytes']:,} dense)")
    print("ops: " + ", ".join(f"{k} {v}" for k, v in info["ops"].items()))
    rows = [(c["name"], "x".join(map(str, c["shape"])) or "scalar", c["dtype"], c["encoding"], c["structure"],
             f"{100 * c['sparsity']:.1f}%", f"{c['bytes']:,}", f"{c['dense_bytes']:,}", f"{c['ratio']:.3f}")
            + ((f"{c['accel']['dram_bytes']:,}" if "accel" in c else "-",) if wire else ())
            for c in info["constants"]]
    header = ("constant", "shape", "dtype", "encoding", "structure", "sparsity", "bytes", "dense", "ratio") \
        + (("accel DRAM",) if wire else ())
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for row in [header] + rows:
        print("  " + "  ".join(str(v).ljust(w) if i < 5 else str(v).rjust(w) for i, (v, w) in
                               enumerate(zip(row, widths))))
    return 0


def cmd_targets(args: argparse.Namespace) -> int:
    from tcc.targets import load_catalog
    catalog = load_catalog(args.targets_file)
    if args.json:
        print(json.dumps([t.to_json() for t in catalog.values()], indent=2))
        return 0

    def number(value: float) -> str:
        return f"{value:,.0f}" if value >= 100 else f"{value:.3g}" if value else "-"

    header = ("target", "kind", "price", "power", "fp32 GFLOP/s", "int8 GOP/s", "DRAM GB/s", "on-chip MB", "part",
              "array", "synthesis", "description")
    rows = []
    for t in catalog.values():
        d = t.device
        mark = "*" if t.measured else ""
        fits = t.synthesis_fits()
        rows.append(tuple(map(printable, (t.name, t.kind, f"${d.price_usd:,.0f}{mark}", f"{d.power_w:g} W{mark}",
                     number(d.fp32_gflops) + mark, number(d.int8_gops) + mark, number(d.dram_gbps) + mark,
                     f"{d.onchip_mb:.3g}{mark}", t.part.name if t.part else "-",
                     f"{t.accel.rows}x{t.accel.cols}" if t.accel else "-",
                     "-" if t.part is None else "no record" if fits is None else "fits" if fits else "DOES NOT FIT",
                     t.description))))
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    numeric = range(2, 8)
    for row in [header] + rows:
        print("  ".join(v if i == len(row) - 1 else v.rjust(w) if i in numeric else v.ljust(w)
                        for i, (v, w) in enumerate(zip(row, widths))).rstrip())
    if any(t.measured for t in catalog.values()):
        print("* placeholder figures: the cost model measures these devices")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    import time

    from tcc.targets import load_catalog
    from tcc.targets.calibration import cache_file, cost_devices
    catalog = load_catalog(args.targets_file)
    start = time.perf_counter()
    announced = []

    def announce(what: str) -> None:
        announced.append(what)
        if not args.quiet and not args.json:
            print(f"{what} ...", file=sys.stderr, flush=True)

    devices = cost_devices(catalog, again=args.again, on_measure=announce)
    measured = {name: devices[name] for name, t in catalog.items() if t.measured and name in devices}
    if args.json:
        print(json.dumps({name: d.to_json() for name, d in measured.items()}, indent=2))
        return 0
    for name, d in measured.items():
        print(f"{name}: fp32 {d.fp32_gflops:g} GFLOP/s, int8 {d.int8_gops:g} GOP/s, DRAM {d.dram_gbps:g} GB/s, "
              f"cache {d.cache_gbps:g} GB/s, {d.op_overhead_us:g} us per op ({len(d.op_costs)} op kinds measured)")
    how = f"measured in {time.perf_counter() - start:.0f} s" if announced else "already measured"
    print(printable(f"{how}; cached in {cache_file()}"))
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    from tcc.driver import settings_named
    from tcc.report import write_selection_report
    from tcc.select import TokenRate, parse_accuracy, parse_latency, select
    from tcc.targets import load_catalog

    lc, ac = parse_latency(args.lc), parse_accuracy(args.ac)
    ttft = parse_latency(args.ttft) if args.ttft else None
    if isinstance(ttft, TokenRate):
        raise TccError(f"--ttft is '{args.ttft}' but expects a latency (e.g. 20ms), not a token rate")
    catalog = load_catalog(args.targets_file)
    data, train = _exploration_data(args)
    settings = settings_named(args.settings)
    selection = select(args.model, data, catalog, lc=lc, ac=ac, train=train, settings=settings,
                       prefill=args.prefill, ttft_ms=ttft,
                       executor=args.executor, progress=_progress(args), input_shapes=args.input_shape,
                       arch=args.arch, trust_pickle=args.trust_pickle)
    if args.report:
        write_selection_report(selection, args.report, model=args.model, data=args.data)
    if args.json:
        print(json.dumps(selection.to_json(), indent=2))
    else:
        if not args.quiet:
            score, tokens, first = data.task.score_name, selection.tokens_per_run, args.prefill is not None
            if tokens:
                print(f"--lc {lc}: a run of the step makes {tokens} token(s): at most {selection.lc_ms:.4g} ms a run")
            print(f"{'device':<12} {'setting':<18} {score:>{max(8, len(score))}} {'latency ms':>11} "
                  + (f"{'tokens/s':>9} " if tokens else "") + (f"{'TTFT ms':>9} " if first else "")
                  + f"{'energy mJ':>10} {'GOP/s/W':>9} {'price $':>9}")
            for p in sorted(selection.points, key=lambda p: (p.price_usd, p.device, p.latency_ms)):
                mark = " <- chosen" if p is selection.chosen else (" meets" if selection.meets(p) else "")
                print(f"{printable(p.device):<12} {printable(p.setting):<18} {p.accuracy:>{max(8, len(score))}.4f} "
                      f"{p.latency_ms:>11.4g} " + (f"{tokens / p.latency_ms * 1e3:>9.4g} " if tokens else "")
                      + (f"{p.ttft_ms:>9.4g} " if first else "")
                      + f"{p.energy_mj:>10.4g} {p.gops_per_w:>9.4g} {p.price_usd:>9,.0f}{mark}")
        print(printable(f"{len(selection.points)} points in {selection.seconds:.1f} s: {selection.reason}"
                        + (f"; report: {args.report}/report.html" if args.report else "")))
    if selection.chosen is None:
        print(f"tcc: error: {printable(selection.reason)}", file=sys.stderr)
        return 2
    return 0


def cmd_explore(args: argparse.Namespace) -> int:
    from tcc.explore import describe, explore_model, load_space
    from tcc.report import write_explore_report
    from tcc.select import parse_accuracy, parse_latency
    from tcc.targets import load_catalog

    lc = parse_latency(args.lc) if args.lc else None
    ac = parse_accuracy(args.ac) if args.ac else None
    catalog = load_catalog(args.targets_file)
    space = load_space(args.space, catalog)
    data, train = _exploration_data(args)
    study = args.study or f"{Path(args.model).stem}.study"
    result = explore_model(args.model, data, catalog, space, budget=args.budget, store=study, train=train,
                           executor=args.executor, workers=args.workers, grid=args.sampler == "grid", lc=lc,
                           ac=ac, seed=args.seed, progress=_progress(args), synth=args.synth,
                           input_shapes=args.input_shape, arch=args.arch, trust_pickle=args.trust_pickle)
    if args.report:
        write_explore_report(result, args.report, model=args.model, data=args.data)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        if not args.quiet:
            score = result.score
            print(f"the Pareto set ({', '.join(space.objectives)}):")
            for p in sorted(result.front, key=lambda p: p.latency_ms):
                mark = " <- chosen" if p is result.chosen else ""
                yosys = f" (yosys {max(p.synthesized.values()):.3f})" if p.synthesized else ""
                print(printable(f"  {p.values['metric']:.4f} {score}, {p.values['robustness']:.4f} under faults, "
                                f"{p.latency_ms:.4g} ms, {p.values.get('throughput', math.nan):.4g}/s, "
                                f"{p.energy_mj:.4g} mJ, area {p.values['area']:.3f}{yosys}: "
                                f"{describe(p).split(': ')[0]}{mark}"))
        print(printable(f"{result.evaluated} of {space.grid_size()} points in the study {study} "
                        f"({result.seconds:.1f} s): {result.reason}"
                        + (f"; report: {args.report}/report.html" if args.report else "")))
    if (lc is not None or ac is not None) and result.chosen is None:
        print(f"tcc: error: {printable(result.reason)}", file=sys.stderr)
        return 2
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage errors as every other user error: one line, exit code 2."""

    def error(self, message: str):
        self.exit(2, f"tcc: error: {printable(message)} (see `{self.prog} --help`)\n")


def _model_arguments(p: argparse.ArgumentParser, shape: str) -> None:
    """--input-shape, --arch and --trust-pickle: how a model file is read (`shape`: the example)."""
    p.add_argument("--input-shape", action="append", default=[], metavar="[NAME=]DIMS[:DTYPE]",
                   help=f"example input shape, e.g. {shape} (repeat per input)")
    p.add_argument("--arch", help="module:Class giving the architecture of a state_dict")
    p.add_argument("--trust-pickle", action="store_true", help="allow full pickles (runs code from the file)")


def _task_arguments(p: argparse.ArgumentParser) -> None:
    """--task and --vocab: what the data files' labels are, over the files' own "task" and "vocab"."""
    p.add_argument("--task", metavar="TASK", help="the data's task (default: the file's 'task', else "
                                                  "classification: top-1 accuracy); ctc: WER and CER; tokens: token "
                                                  "accuracy, perplexity")
    p.add_argument("--vocab", metavar="VOCAB.json", help="ctc: the model's output symbols in logit order, a JSON "
                                                         "list (the blank first, ' ' the word separator)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tcc", description="tcc: a Transformer co-design compiler", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  tcc compile model.pt2 --target fpga-small -o out/   # then open out/report.html\n"
               "  tcc run out/ --on sim\n  tcc select model.pt2 --lc 10ms --ac 0.95 --data test.pt\n\n"
               "`tcc COMMAND --help` for each command. Exit codes: 0 ok, 2 bad input or constraints no device "
               "meets, 1 an internal error (a bug in tcc: please report it), 130 interrupted (143: by SIGTERM).")
    parser.add_argument("--version", action="version", version=f"tcc {__version__}")
    parser.add_argument("-q", "--quiet", dest="quiet_before", action="store_true", help="as the commands' -q")
    parser.add_argument("-v", "--verbose", dest="verbose_before", action="count", default=0,
                        help="as the commands' -v")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    common = argparse.ArgumentParser(add_help=False)
    talk = common.add_mutually_exclusive_group()
    talk.add_argument("-q", "--quiet", action="store_true", help="no progress bars, pass log or tables: results only")
    talk.add_argument("-v", "--verbose", action="count", default=0,
                      help="log what tcc does to stderr, with timings (-vv: debug detail)")

    def command(name: str, help: str, examples: str, **kw) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, parents=[common],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=examples, **kw)

    p = command("compile", "compile a model file into an artifact directory",
                "example:\n  tcc compile model.pt2 --target fpga-small -o out/\n"
                "  tcc compile model.pt2 --target my-fpga --targets-file my_targets.json -o out/\n"
                "  tcc compile model.pt2 --target auto --lc 10ms --ac 0.95 --data test.pt -o out/\n"
                "  tcc compile model.pt2 --target auto --study model.study --lc 1ms -o out/   # from `tcc explore`\n"
                "  tcc compile model.pt2 --target auto --data test.pt -o out/ \\\n"
                "      --pipeline 'hp-prune{sparsity=0.5},quantize,select-device{lc=10ms,ac=0.95}'")
    p.add_argument("model", help="model file: torch.export (.pt2), TorchScript, state_dict or torch.save")
    p.add_argument("--target", default="cpu", help="target name (see `tcc targets`), or auto: the cheapest device "
                                                   "and setting meeting --lc and --ac on --data (or the device "
                                                   "select-device in --pipeline chooses); default cpu")
    p.add_argument("--targets-file", metavar="FILE.json",
                   help="user targets to add to the catalog (a JSON object of targets by name, the shipped "
                        "catalog's schema; see `tcc targets --help`); --target may name one")
    p.add_argument("--lc", metavar="LATENCY", help="--target auto: latency constraint per run (10ms, 2s, 800us), or "
                                                   "a decoder step's token rate (20tok/s)")
    p.add_argument("--ac", metavar="ACCURACY", help="--target auto: accuracy constraint on --data (0.95 or 95%%)")
    p.add_argument("--data", metavar="D.pt", help="labelled evaluation data: the accuracy in the report, and what "
                                                  "--target auto and select-device measure accuracy on")
    p.add_argument("--settings", metavar="NAME,...", help="--target auto: the compression settings to explore "
                                                           "(default: all; see `tcc select --help`)")
    p.add_argument("--study", metavar="DIR|URL", help="--target auto: choose under --lc and/or --ac among the points "
                                                      "of this `tcc explore` study (its device, accelerator and "
                                                      "compression) instead of exploring")
    p.add_argument("-o", "--output", required=True, help="artifact directory to write")
    _model_arguments(p, "1x128:i64")
    p.add_argument("--frontend", choices=("export", "fx"), default="export",
                   help="capture with torch.export (default) or torch.fx.symbolic_trace")
    p.add_argument("--pipeline", metavar="SPEC",
                   help="passes replacing the target's default optimisation, e.g. "
                        "'fold-constants,dce,hp-prune{block=16x16,sparsity=0.75},quantize{bits=8}' (see `tcc passes`)")
    p.add_argument("--train-data", metavar="D.pt", help="training data for fine-tuning: torch.save({'inputs': X, "
                                                         "'labels': Y})")
    p.add_argument("--calib-data", metavar="D.pt", help="calibration data for quantization (same format)")
    _task_arguments(p)
    p.add_argument("--weights-from", metavar="ARTIFACT", help="start from the float weights another compile of this "
                                                              "model left (e.g. pruned and fine-tuned through its "
                                                              "prefill step, for its decode step)")
    p.add_argument("--accel", metavar="KEY=VALUE,...",
                   help="override fields of an fpga target's accelerator config, e.g. rows=16,cols=16")
    p.add_argument("--synth", action="store_true",
                   help="fpga targets: synthesize the accelerator with yosys (minutes), record LUT/FF/DSP/BRAM, "
                        "fail if it does not fit the part")
    p.set_defaults(func=cmd_compile)

    p = command("passes", "list every pass with its options",
                "examples:\n  tcc passes\n  tcc passes --json\n\n"
                "A pipeline is NAME{KEY=VALUE,...} joined by commas, e.g.\n"
                "  tcc compile model.pt2 --pipeline 'hp-prune{block=16x16,sparsity=0.75},quantize' -o out/")
    p.add_argument("--json", action="store_true", help="print the passes and their options as JSON")
    p.set_defaults(func=cmd_passes)

    p = command("eval", "an artifact's metrics on labelled data (accuracy; WER and CER; token accuracy and "
                "perplexity), and error against a baseline",
                "examples:\n  tcc eval out/ --data test.pt\n  tcc eval pruned/ --data test.pt --baseline dense/ --json\n"
                "  tcc eval asr/ --data test.pt --task ctc --vocab vocab.json")
    p.add_argument("artifact", help="artifact directory (from tcc compile)")
    p.add_argument("--data", required=True, metavar="D.pt", help="torch.save({'inputs': X, 'labels': Y}) (and "
                                                                  "'task', 'vocab')")
    _task_arguments(p)
    p.add_argument("--baseline", metavar="ARTIFACT", help="the uncompressed model's artifact to compare outputs with")
    p.add_argument("--on", choices=("cpu", "gpu", "numpy", "sim", "rtl"), default="cpu",
                   help="executor (default cpu; sim: the ISA simulator, rtl: Verilator, for fpga targets)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.set_defaults(func=cmd_eval)

    p = command("run", "run an artifact on inputs",
                "examples:\n  tcc run out/                          # on its example inputs, torch executor\n"
                "  tcc run out/ --input x.npy -o y.pt\n"
                "  tcc run out/ --on sim --stats stats.json   # fpga targets: the ISA simulator\n"
                "  tcc run out/ --on rtl                  # fpga targets: Verilator on the Verilog")
    p.add_argument("artifact", help="artifact directory (from tcc compile)")
    p.add_argument("--input", help="inputs: .npy, .npz, or a torch.save file (tensor, tuple or dict); "
                                   "default: the artifact's example inputs")
    p.add_argument("--on", choices=("cpu", "gpu", "numpy", "sim", "rtl"), default="cpu",
                   help="executor (default cpu); sim: ISA simulator, rtl: Verilator on the Verilog (fpga targets)")
    p.add_argument("--stats", metavar="FILE.json", help="with --on sim|rtl: write cycles, MACs, utilization, "
                                                         "instruction counts")
    p.add_argument("-o", "--output", help="save outputs with torch.save to this file")
    p.set_defaults(func=cmd_run)

    p = command("generate", "generate tokens with a decoder's decode-step artifact (its KV cache carried from "
                "step to step)",
                "examples:\n  tcc generate out/ --input prompt_ids.pt --max-new-tokens 20\n"
                "  tcc generate out/ --input prompt_ids.npy --max-new-tokens 20 --temperature 0.8 --top-k 40 "
                "--seed 1 -o tokens.pt\n\n"
                "The artifact is a decode step with a static cache, e.g. transformers'\n"
                "TorchExportableModuleForDecoderOnlyLM(model, max_cache_len=...).export(...) saved with\n"
                "torch.export.save and compiled with `tcc compile`. The prompt goes through it a token at a\n"
                "time, or through --prefill (the same decoder exported with several tokens a run) a chunk at a time.")
    p.add_argument("artifact", help="artifact directory of a decode step (from tcc compile)")
    p.add_argument("--input", required=True, metavar="PROMPT", help="prompt token ids [length] or [batch, length]: "
                                                                    ".npy, .npz or a torch.save file")
    p.add_argument("--max-new-tokens", required=True, type=int, metavar="N", help="tokens to generate")
    p.add_argument("--on", choices=("cpu", "gpu", "numpy", "sim", "rtl"), default="cpu",
                   help="executor (default cpu; sim: the ISA simulator, rtl: Verilator, for fpga targets)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; above: seeded sampling")
    p.add_argument("--top-k", type=int, metavar="K", help="sampling: only the K likeliest tokens")
    p.add_argument("--seed", type=int, default=0, help="sampling: the generator's seed (default 0)")
    p.add_argument("--prefill", metavar="ARTIFACT", help="a prefill step (the same decoder exported with several "
                                                         "tokens a run, sharing the cache): the prompt goes through "
                                                         "it a chunk at a time")
    p.add_argument("--eos", type=int, metavar="ID", help="stop when every sequence has produced this token id")
    p.add_argument("-o", "--output", metavar="TOKENS.pt", help="save prompt and new tokens [batch, length] with "
                                                                "torch.save")
    p.add_argument("--json", action="store_true", help="print tokens and timings as JSON")
    p.set_defaults(func=cmd_generate)

    p = command("inspect", "summarize an artifact's graph and constants",
                "examples:\n  tcc inspect out/\n  tcc inspect out/ --json")
    p.add_argument("artifact", help="artifact directory (from tcc compile)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_inspect)

    p = command("calibrate", "measure this machine's figures for the cost model (once per machine, cached)",
                "examples:\n  tcc calibrate\n  tcc calibrate --again --json\n\n"
                "The host CPU (and the local CUDA device) are timed on the torch executor; `tcc compile`\n"
                "prices them with these figures, or with the catalog's placeholders until they exist.\n"
                "`tcc select`, --target auto and select-device calibrate first when they must.")
    p.add_argument("--again", action="store_true", help="measure again even when figures are cached")
    p.add_argument("--json", action="store_true", help="print the measured figures as JSON")
    p.add_argument("--targets-file", metavar="FILE.json", help="more targets (same schema as `tcc targets --json`)")
    p.set_defaults(func=cmd_calibrate)

    p = command("targets", "list targets: kind, price, power, throughput, memory, FPGA part and array",
                "examples:\n  tcc targets\n  tcc targets --json\n"
                "  tcc targets --targets-file my_targets.json   # add (or replace) targets from a file\n\n"
                "A targets file is a JSON object of targets by name with the shipped catalog's fields:\n"
                "  kind, backend, executor, description, tile, pipeline, lowering [formats, work_cost, measured]\n"
                "  cpu/gpu: device {price_usd, power_w, dram_gbps, onchip_mb, fp32_gflops, int8_gops, "
                "op_overhead_us, clock_mhz}\n"
                "  fpga: part {name, family, lut, ff, dsp, bram36, uram, dram_gbps, price_usd, power_w, static_w, "
                "process_nm, link_gbps, link_latency_us, host}, accel {rows, cols, ...} [synthesis]")
    p.add_argument("--json", action="store_true", help="print every target as JSON, with its device figures")
    p.add_argument("--targets-file", metavar="FILE.json",
                   help="user targets to add to the catalog (a JSON object of targets by name, the shipped "
                        "catalog's schema); a user target replaces a shipped one of the same name")
    p.set_defaults(func=cmd_targets)
    p = command("select", "choose the cheapest device and compression setting meeting a latency and an accuracy "
                "constraint",
                "example:\n  tcc select model.pt2 --lc 10ms --ac 0.95 --data test.pt --train-data train.pt "
                "--report sel/\n\nexit code 0 when a device meets both constraints, 2 when none does "
                "(the closest point is printed)")
    p.add_argument("model", help="model file (as for compile)")
    p.add_argument("--lc", required=True, metavar="LATENCY", help="latency constraint per run, with a unit: 10ms, 2s, "
                                                                  "800us; or a decoder step's token rate: 20tok/s")
    p.add_argument("--ac", required=True, metavar="ACCURACY", help="constraint on the task's score on --data "
                                                                   "(accuracy, 1 - WER, token accuracy): 0.95 or 95%%")
    p.add_argument("--data", required=True, metavar="D.pt", help="labelled evaluation data: torch.save({'inputs': X, "
                                                                  "'labels': Y})")
    p.add_argument("--train-data", metavar="T.pt", help="training data: pruning and binarization fine-tune on it")
    _task_arguments(p)
    p.add_argument("--targets-file", metavar="FILE.json", help="more targets (same schema as `tcc targets --json`)")
    p.add_argument("--executor", choices=("local", "inline", "ray"), default="local",
                   help="where settings are explored: local processes (default), this process, or a Ray cluster "
                        "(RAY_ADDRESS, else a local instance)")
    p.add_argument("--settings", metavar="NAME,...", help="explore only these compression settings (default: all; "
                                                           "e.g. fp32,int8,hp75-16x16-int8,w1a8-int8)")
    p.add_argument("--prefill", metavar="MODEL", help="a decode step's prefill step (the same decoder exported with "
                                                      "several tokens a run): each point's time to first token")
    p.add_argument("--ttft", metavar="LATENCY", help="with --prefill: constraint on the time to first token (one run "
                                                     "of the prefill step: a prompt as wide as it)")
    p.add_argument("--report", metavar="DIR", help="write report.html, pareto.png and selection.json into DIR")
    _model_arguments(p, "1x8x8")
    p.add_argument("--json", action="store_true", help="print {device, setting, latency_ms, accuracy, points, ...}")
    p.set_defaults(func=cmd_select)
    p = command("explore", "search the accelerator's configuration and the model's compression together "
                "(multi-objective: the task's metric, latency, throughput, energy, area, robustness)",
                "example:\n  tcc explore model.pt2 --data test.pt --space space.json --budget 40 --report ex/\n\n"
                "The study persists (SQLite in --study DIR, or a database URL): run again to resume it, or to "
                "raise its budget.\nexit code 2 when --lc/--ac are given and no point meets them")
    p.add_argument("model", help="model file (as for compile)")
    p.add_argument("--data", required=True, metavar="D.pt", help="labelled evaluation data")
    p.add_argument("--train-data", metavar="T.pt", help="training data: pruning and binarization fine-tune on it")
    p.add_argument("--space", required=True, metavar="SPACE.json",
                   help="what to search: {base, hardware, compression, devices, objectives, robustness}")
    p.add_argument("--budget", required=True, type=int, metavar="N", help="distinct points to evaluate in the study")
    p.add_argument("--study", metavar="DIR|URL", help="where the study lives (default: MODEL.study/, SQLite)")
    p.add_argument("--executor", choices=("inline", "local", "ray"), default="inline",
                   help="this process (default), local processes or Ray workers (RAY_ADDRESS), sharing the study")
    p.add_argument("--workers", type=int, default=2, metavar="K", help="workers for local and ray (default 2)")
    p.add_argument("--sampler", choices=("nsga2", "grid"), default="nsga2",
                   help="optuna's NSGA-II (default), or the grid in order")
    p.add_argument("--lc", metavar="LATENCY", help="latency constraint per run (10ms), or a decoder step's token "
                                                   "rate (20tok/s): choose a point")
    p.add_argument("--ac", metavar="ACCURACY", help="constraint on the task's score (0.95 or 95%%)")
    p.add_argument("--seed", type=int, default=0, help="the search's, fine-tuning's and the faults' seed")
    _task_arguments(p)
    p.add_argument("--targets-file", metavar="FILE.json", help="more targets (same schema as `tcc targets --json`)")
    p.add_argument("--synth", action="store_true",
                   help="synthesize the Pareto set's accelerators with yosys (minutes each; kept in the study): "
                        "their LUT/FF/DSP/BRAM, and a point whose accelerator does not fit its part dropped")
    p.add_argument("--report", metavar="DIR", help="write report.html, pareto.png and explore.json into DIR")
    _model_arguments(p, "1x8x8")
    p.add_argument("--json", action="store_true", help="print the Pareto set, the choice and every point as JSON")
    p.set_defaults(func=cmd_explore)
    return parser


class _Printable(logging.Formatter):
    """Log lines with names from files made safe for the terminal."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return printable(super().formatMessage(record))


def _configure_logging(verbosity: int) -> None:
    """-v: what tcc does, with timings (INFO); -vv: debug detail; one `tcc: ` line each on stderr."""
    logger = logging.getLogger("tcc")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    if verbosity:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_Printable("tcc: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbosity > 1 else logging.INFO if verbosity else logging.WARNING)
    logger.propagate = False


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that it cleans up as for Ctrl-C."""


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises `_Terminated` while the context lasts (in the main thread: only there
    can a handler be set)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: Any) -> None:
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.quiet, args.verbose = args.quiet or args.quiet_before, args.verbose + args.verbose_before  # tcc -v CMD
    _configure_logging(0 if args.quiet else args.verbose)
    debug = bool(os.environ.get("TCC_DEBUG"))
    if not debug:  # library deprecation chatter is not the user's business
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
    try:
        with _sigterm_interrupts():
            return args.func(args)
    except TccError as e:
        print(f"tcc: error: {printable(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print("tcc: interrupted", file=sys.stderr)
        return 143 if isinstance(e, _Terminated) else 130
    except Exception as e:
        if debug:
            raise
        print(f"tcc: internal error: {type(e).__name__}: {printable(str(e).splitlines()[0]) if str(e) else ''} "
              "(a bug in tcc: please report it, with the traceback TCC_DEBUG=1 prints)", file=sys.stderr)
        return 1
