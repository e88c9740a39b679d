"""Generation with a small Llama-shaped decoder: tokens/s and time to first token, measured on
tcc's torch executor beside Hugging Face eager on the same machine in the same run, and
predicted by the cost model on every catalog device it can price here.

The model is `zoo.causal_lm("llama")` widened (default 4 x 256, 8 heads with 2 kv heads, FFN
688, vocabulary 2048: random weights), its decode step exported with a static cache
(`zoo.decode_step`) and compiled per setting (`tcc.select.default_settings()` names: fp32,
hp75/hp90 one-shot in 16x16 blocks, int8, W1A8). Prompt 16 tokens, 32 new, greedy.

1. Measured (cpu, this machine, `--threads` torch threads, medians of `--repeats`): time to
   first token (tcc runs the prompt through a prefill step exported `--prompt` tokens wide, as
   Hugging Face runs it as one forward; "stepwise": through the decode step a token at a time)
   and decode tokens/s after it; the setting's agreement with
   fp32's greedy tokens (the share of equal new tokens: one-shot compression and calibration
   on an empty cache change them); for fp32, whether its tokens equal Hugging Face's.
2. Predicted per catalog device: one decode step's latency (the cost model, as `tcc select`
   prices a run) as tokens/s, and the time to first token as the prefill step's run (its last
   logits give the first token).
3. On each FPGA target, the integer settings' decode step (`--accel-settings`) as the codegen
   schedules it: DRAM bytes a token (every section moves each operand once: the weights stream
   once per token, in their encoding) and the weights' share of them, the accelerator's time
   against the DRAM floor (those bytes at the config's DRAM width x clock: decode is
   bandwidth-bound when the two meet), and the board's predicted tokens/s. Binarized settings
   also on the board with the W1A8 unit (`binary_weight_group`), whose weights stream 1-bit.

    .venv/bin/python benchmarks/generation.py [--settings fp32,int8] [--repeats 3] [--threads 2]
        [--hidden 256 --layers 4 --vocab 2048 --max-cache 64]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

import tcc
from tcc import zoo
from tcc.runtime.generate import generate
from tcc.select import default_settings
from tcc.targets import load_catalog, price_all
from tcc.targets.calibration import cost_devices


def hf_timings(model, prompt: torch.Tensor, new: int, repeats: int) -> tuple[float, float, list[int]]:
    """Hugging Face eager greedy: (time to first token s, decode tokens/s, the new tokens)."""
    def run(n: int) -> tuple[float, torch.Tensor]:
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(prompt))
        return time.perf_counter() - start, out

    run(new)  # warm-up
    first = statistics.median(run(1)[0] for _ in range(repeats))
    whole = [run(new) for _ in range(repeats)]
    total = statistics.median(t for t, _ in whole)
    return first, (new - 1) / max(total - first, 1e-9), whole[0][1][0, prompt.shape[1]:].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default="fp32,hp75-16x16,hp90-16x16,int8,w1a8-int8")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--max-cache", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--accel-settings", default="int8,hp75-16x16-int8,hp90-16x16-int8,w1a8-int8")
    parser.add_argument("--w1a8-group", type=int, default=8, help="binarized settings also on the W1A8 unit, its "
                                                                   "weight group (binary_weight_group)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    offered = {s.name: s for s in default_settings()}
    settings = [offered[name] for name in args.settings.split(",")]
    model = zoo.causal_lm("llama", hidden_size=args.hidden, intermediate_size=round(args.hidden * 2.6875),
                          num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=2,
                          vocab_size=args.vocab, max_position_embeddings=2 * args.max_cache)
    prompt = torch.randint(0, args.vocab, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    params = sum(p.numel() for p in model.parameters())
    print(f"Llama-shaped decoder: {args.layers} x {args.hidden}, 8 heads (2 kv), vocabulary {args.vocab}, "
          f"{params / 1e6:.2f} M parameters; cache {args.max_cache}; prompt {args.prompt}, {args.new} new tokens; "
          f"{args.threads} threads\n")
    hf_first, hf_rate, hf_tokens = hf_timings(model, prompt, args.new, args.repeats)
    program = zoo.decode_step(model, args.max_cache)
    prefill_program = zoo.decode_step(model, args.max_cache, width=args.prompt)
    catalog = load_catalog()
    devices = cost_devices(catalog, calibrate=False)
    measured, predicted, reference = [], {}, None
    for setting in settings:
        artifact = tcc.compile(program, target="cpu", pipeline=setting.passes)
        prefill = tcc.compile(prefill_program, target="cpu", pipeline=setting.passes)
        generate(artifact, prompt, 2, prefill=prefill)  # warm-up
        runs = [generate(artifact, prompt, args.new, prefill=prefill) for _ in range(args.repeats)]
        stepwise = statistics.median(generate(artifact, prompt, 1).time_to_first_token_s for _ in range(args.repeats))
        tokens = runs[0].new_tokens[0].tolist()
        reference = reference or tokens
        agree = sum(a == b for a, b in zip(tokens, reference)) / len(tokens)
        measured.append((setting.name, statistics.median(r.time_to_first_token_s for r in runs), stepwise,
                         statistics.median(r.decode_tokens_per_s for r in runs), agree, tokens == hf_tokens))
        predicted[setting.name] = (price_all(artifact.graph, catalog, devices), price_all(prefill.graph, catalog, devices))
    print(f"{'':<16}{'TTFT ms':>9}{'(stepwise)':>11}{'tokens/s':>10}{'vs HF':>8}   same tokens as fp32 | as HF")
    print(f"{'HF eager':<16}{hf_first * 1e3:>9.1f}{'':>11}{hf_rate:>10.1f}{'1.00x':>8}")
    for name, first, stepwise, rate, agree, same_as_hf in measured:
        print(f"{'tcc ' + name:<16}{first * 1e3:>9.1f}{stepwise * 1e3:>11.1f}{rate:>10.1f}{rate / hf_rate:>7.2f}x   "
              f"{agree:>6.0%}{'' if name != 'fp32' else ' | ' + ('yes' if same_as_hf else 'NO')}")
    print("\npredicted decode tokens/s (time to first token, ms: the prefill step's run) per device:")
    names = [s.name for s in settings]
    print(f"{'device':<13}" + "".join(f"{n:>22}" for n in names))
    for device in next(iter(predicted.values()))[0]:
        cells = []
        for name in names:
            decode, prefill = predicted[name]
            cells.append(f"{1 / decode[device].latency_s:>12,.0f} ({prefill[device].latency_s * 1e3:>6.2f})")
        print(f"{device:<13}" + "".join(f"{c:>22}" for c in cells))
    print("\nthe decode step on each FPGA's accelerator (a token): DRAM traffic, the weights' share, the accelerator's "
          "time against the DRAM floor")
    print(f"{'target':<12} {'setting':<24} {'DRAM KB':>8} {'weights':>8} {'/ encoded':>9} {'accel ms':>9} "
          f"{'floor ms':>9} {'ratio':>6} {'tokens/s':>9}")
    rows = [(name, None) for name in args.accel_settings.split(",")]
    rows += [(name, f"binary_weight_group={args.w1a8_group}") for name, _ in rows if name.startswith("w1a")]
    for target in ("fpga-small", "fpga-medium", "fpga-large"):
        for name, accel in rows:
            artifact = tcc.compile(program, target=target, pipeline=offered[name].passes, accel=accel)
            program_, weights = artifact.accel_program(), artifact.manifest["accel"]["weights"]
            moved = sum(s.activity.dram_bits for s in program_.sections) / 8
            streamed = sum(w["dram_bytes"] for w in weights)
            config = program_.config
            accel_s = sum(s.cycles for s in program_.sections) / (config.clock_mhz * 1e6)
            floor_s = moved / (config.dram_bits / 8 * config.clock_mhz * 1e6)
            rate = 1 / price_all(artifact.graph, {target: catalog[target].with_accel(accel)}, devices)[target].latency_s
            print(f"{target:<12} {name + (' (W1A8 unit)' if accel else ''):<24} {moved / 1e3:>8.0f} {streamed / moved:>7.0%} "
                  f"{streamed / sum(w['encoded_bytes'] for w in weights):>8.3f}x {accel_s * 1e3:>9.3f} "
                  f"{floor_s * 1e3:>9.3f} {accel_s / floor_s:>5.2f}x {rate:>9.0f}")


if __name__ == "__main__":
    main()
