"""End-to-end demo: train a small Transformer on real data (scikit-learn's 8x8 digits), save it
as a torch.export archive, compile it with the `tcc` CLI, run the artifact on the held-out
images and compare accuracy and outputs with PyTorch eager; then compile it for fpga-small,
int8 and HP-pruned (75%, fine-tuned), and run both on the accelerator's ISA simulator; last,
let `tcc select` pick the cheapest device and setting under two latency constraints. Then speech:
a CTC recognizer trained (briefly) on the corpus espeak-ng speaks on this machine, compiled for
fpga-medium, its word error rate measured on the accelerator's ISA simulator.

    .venv/bin/python examples/demo.py [--out build/demo] [--epochs 30]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from tcc.select import Point, choose
from tcc.zoo import digits_data, train_digits


def tcc_cli(*args: str) -> None:
    print("$ tcc " + " ".join(args))
    subprocess.run([sys.executable, "-m", "tcc", *args], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("build/demo"))
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    x_train, x_test, y_train, y_test = digits_data()
    start = time.perf_counter()
    model = train_digits(x_train, y_train, args.epochs)
    with torch.no_grad():
        eager = model(x_test)
    eager_accuracy = float((eager.argmax(-1) == y_test).float().mean())
    print(f"trained DigitsTransformer on {len(x_train)} digits in {time.perf_counter() - start:.1f} s: "
          f"eager test accuracy {eager_accuracy:.3f}")

    model_file, artifact, inputs, outputs = (args.out / n for n in ("digits.pt2", "digits.tcc", "test_images.pt",
                                                                   "logits.pt"))
    torch.export.save(torch.export.export(model, (x_test,)), model_file)
    torch.save(x_test, inputs)
    tcc_cli("compile", str(model_file), "--target", "cpu", "-o", str(artifact))
    tcc_cli("inspect", str(artifact))
    tcc_cli("run", str(artifact), "--input", str(inputs), "-o", str(outputs))

    logits = torch.load(outputs, weights_only=True)
    accuracy = float((logits.argmax(-1) == y_test).float().mean())
    error = float((logits - eager).abs().max() / eager.abs().max())
    print(f"tcc artifact on cpu: test accuracy {accuracy:.3f} (eager {eager_accuracy:.3f}), "
          f"max relative difference to eager {error:.1e}")
    # floats agree within 1e-5 of the largest logit, not bit for bit (BLAS sums in its own order):
    # every prediction must match eager's except a near tie, whose top two logits are closer
    # than that tolerance allows on each side
    top2 = eager.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2e-5 * eager.abs().max()
    if error > 1e-5 or not torch.equal(logits.argmax(-1)[clear], eager.argmax(-1)[clear]):
        raise SystemExit("demo FAILED: the artifact does not reproduce the eager model")

    # the same model for an FPGA: int8-quantized, its linears on the accelerator (ISA simulator,
    # cycle-exact with the RTL), the rest on the host
    fpga, fpga_outputs, stats = args.out / "digits-fpga.tcc", args.out / "logits-fpga.pt", args.out / "stats.json"
    tcc_cli("compile", str(model_file), "--target", "fpga-small", "-q", "-o", str(fpga))
    tcc_cli("run", str(fpga), "--input", str(inputs), "--on", "sim", "--stats", str(stats), "-o", str(fpga_outputs))
    fpga_accuracy = float((torch.load(fpga_outputs, weights_only=True).argmax(-1) == y_test).float().mean())
    print(f"tcc artifact on fpga-small (int8, ISA simulator): test accuracy {fpga_accuracy:.3f}")
    if fpga_accuracy < eager_accuracy - 0.02:
        raise SystemExit("demo FAILED: the quantized accelerator model lost more than 2 points")

    # co-design: 75% HP pruning (fine-tuned on the training digits) runs on the HP sparse unit
    train, hp, hp_outputs, hp_stats = (args.out / n for n in ("train.pt", "digits-hp75.tcc", "logits-hp75.pt",
                                                              "stats-hp75.json"))
    torch.save({"inputs": x_train, "labels": y_train}, train)
    tcc_cli("compile", str(model_file), "--target", "fpga-small", "-q", "-o", str(hp), "--train-data", str(train),
            "--pipeline", "fold-constants,canonicalize,dce,hp-prune{sparsity=0.75},quantize")
    tcc_cli("run", str(hp), "--input", str(inputs), "--on", "sim", "--stats", str(hp_stats), "-o", str(hp_outputs))
    hp_accuracy = float((torch.load(hp_outputs, weights_only=True).argmax(-1) == y_test).float().mean())
    dense_cycles, hp_cycles = (json.loads(f.read_text())["cycles"] for f in (stats, hp_stats))
    print(f"HP 75% on fpga-small: test accuracy {hp_accuracy:.3f}, {hp_cycles:,} accelerator cycles against "
          f"{dense_cycles:,} dense int8 ({dense_cycles / hp_cycles:.2f}x)")
    if hp_accuracy < eager_accuracy - 0.03 or hp_cycles >= dense_cycles:
        raise SystemExit("demo FAILED: the pruned model lost more than 3 points or ran no faster")

    # the closed loop: the cheapest device (and setting) meeting a latency and an accuracy
    # constraint, for two latency constraints (a run: the 450 test images)
    test = args.out / "test.pt"
    torch.save({"inputs": x_test, "labels": y_test}, test)
    ac = f"{eager_accuracy - 0.02:.3f}"  # within 2 points of the eager model
    report = args.out / "select"
    shutil.rmtree(report, ignore_errors=True)
    tcc_cli("select", str(model_file), "--lc", "200ms", "--ac", ac, "--data", str(test), "--train-data", str(train),
            "--settings", "fp32,int8,hp75-8x8,hp75-8x8-int8", "--report", str(report), "-q")
    selection = json.loads((report / "selection.json").read_text())
    points = [Point(**p) for p in selection["points"]]  # the same exploration, a tighter constraint
    tight = choose(points, 5.0, float(ac))
    if tight.chosen is None or tight.chosen.device == selection["device"]:
        raise SystemExit("demo FAILED: a tighter latency constraint did not choose another device")
    print(f"selection at accuracy >= {ac}: {selection['device']} ({selection['setting']}) under 200 ms, "
          f"{tight.chosen.device} ({tight.chosen.setting}) under 5 ms; report: {report}/report.html")

    # speech: examples/speech/train.py in its short form, the recognizer compiled for fpga-medium
    # (int8, integer softmax / layer norm / GELU on the vector unit), its WER and CER on 32 test
    # utterances (speakers held out of training) from the ISA simulator
    speech = args.out / "speech"
    subprocess.run([sys.executable, str(Path(__file__).parent / "speech" / "train.py"), "--quick", "--out",
                    str(speech)], check=True)
    test = torch.load(speech / "corpus" / "test.pt", weights_only=True)
    sample = speech / "test-32.pt"
    torch.save({"inputs": test["inputs"][:32], "labels": test["labels"][:32], "task": "ctc", "vocab": test["vocab"]},
               sample)
    tcc_cli("compile", str(speech / "model.pt2"), "--target", "fpga-medium", "-q", "-o", str(speech / "fpga.tcc"))
    found = subprocess.run([sys.executable, "-m", "tcc", "eval", str(speech / "fpga.tcc"), "--data", str(sample),
                            "--on", "sim", "--json"], check=True, capture_output=True, text=True)
    wer = json.loads(found.stdout)
    print(f"speech on fpga-medium (ISA simulator), 32 test utterances: WER {wer['wer']:.3f}, CER {wer['cer']:.3f}")
    if wer["cer"] > 0.5:
        raise SystemExit("demo FAILED: the speech recognizer on the accelerator gets most characters wrong")
    print("demo OK")


if __name__ == "__main__":
    main()
