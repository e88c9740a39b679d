"""The board as a system, per zoo model: what `tcc compile --target T` makes of it (the target's
own pipeline: conv-as-gemm, quantize and, where the accelerator has the nonlinear unit,
int-nonlinear; calibrated on the model's example inputs), priced by the cost model. For each
model: the latency and its split (accelerator / host processor / link), the host's share
against the 10% target, the host's calls into the accelerator a run, the host ops by where
they stand (`codegen.host_places`: at the model's edges, between two calls, or addressing
the transfer does), and the accelerator's cycles against its busiest unit's busy cycles (the
overlap the schedule leaves; target 1.15x) and those of its layers run one after another
(`apart`: each layer's sections a program of their own, as before a call's sections ran as one;
`queues`: the same program timed as if each unit had its own instruction queue, VTA's
decoupled access-execute, `queued_cycles`). Each model dense and hp-pruned (one-shot, the
target's tile as the block) at each of `--sparsities`; `transformer-encoder` is the digits
encoder's architecture. Where the target's pipeline ends in int-nonlinear, `int8 ms` is the
same model without it (softmax, layer norm, GELU in float on the host): the fully integer
model must be the faster. Then where the vector unit's cycles go, per model: by instruction,
and the share that is a row instruction's fixed cost (`isa.passes`: a layer norm's or a
softmax's divisions and square root, per row whatever its length).

    .venv/bin/python benchmarks/host_share.py [--target fpga-medium] [--accel KEY=VALUE,...] [--sparsities 0,0.9]
        [--models speech-transformer,whisper-encoder,conformer,hf-vit,hf-bert,tinybert4,transformer-encoder]
"""

from __future__ import annotations

import argparse
from collections import Counter

from _common import board_devices, zoo_graph
from tcc.backends.accel.codegen import generate, host_places
from tcc.backends.accel.isa import FETCH_CYCLES, Opcode, Token, Unit, passes
from tcc.passes import parse_pipeline, run_pipeline
from tcc.targets import load_catalog

HOST_TARGET = 0.10  # the host's share of end-to-end latency
OVERLAP_TARGET = 1.15  # end-to-end cycles over the busiest unit's


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="fpga-medium")
    parser.add_argument("--models", default="speech-transformer,whisper-encoder,conformer,hf-vit,hf-bert,tinybert4,"
                                            "transformer-encoder")
    parser.add_argument("--sparsities", default="0,0.9", help="hp-prune sparsities, 0: dense")
    parser.add_argument("--accel", help="accelerator config overrides, as tcc compile's (e.g. divider_steps=8)")
    args = parser.parse_args()
    catalog = load_catalog()
    target = catalog[args.target].with_accel(args.accel)
    devices = board_devices(target, catalog)
    print(f"{target.name}{f' ({args.accel})' if args.accel else ''}: {target.pipeline}; host {target.device.host}; "
          f"targets: host <= {HOST_TARGET:.0%}, "
          f"cycles <= {OVERLAP_TARGET}x the busiest unit's")
    print(f"{'model':<26}{'ms':>8}{'accel':>8}{'host':>8}{'link':>8}{'host %':>8}{'calls':>7}"
          f"{'edge/between/addr':>19}{'vs busiest':>12}{'apart':>8}{'queues':>8}{'int8 ms':>9}")
    vector_rows = []
    for name, sparsity in ((n, float(s)) for n in args.models.split(",") for s in args.sparsities.split(",")):
        graph, ctx = zoo_graph(name)
        pipeline = target.pipeline.replace("dce,", f"dce,hp-prune{{sparsity={sparsity}}},", 1) if sparsity \
            else target.pipeline
        passes = parse_pipeline(pipeline)
        lowered = target.lower(run_pipeline(graph, passes, ctx), after=passes)
        cost = target.cost(lowered, devices)
        int8 = ""
        if pipeline.endswith(",int-nonlinear"):
            floats = parse_pipeline(pipeline.removesuffix(",int-nonlinear"))
            int8 = f"{target.cost(target.lower(run_pipeline(graph, floats, ctx), after=floats), devices).latency_s * 1e3:.3f}"
        program = generate(lowered, target.accel)
        places = Counter(host_places(lowered, program).values())
        busy = Counter()
        for section in program.sections:
            busy.update(section.busy(target.accel))
        cycles = sum(s.cycles for s in program.sections)
        queued = sum(queued_cycles(s.program, target.accel) for s in program.sections)
        apart = sum(s.cycles for s in generate(lowered, target.accel, chained=False).sections)
        if not sparsity:
            vector_rows.append((name, vector_cycles(program, target.accel)))
        ms = {k: v * 1e3 for k, v in cost.parts.items()}
        label = f"{name} hp{round(100 * sparsity)}" if sparsity else name
        print(f"{label:<26}{cost.latency_s * 1e3:>8.3f}{ms['accelerator']:>8.3f}{ms['host']:>8.3f}{ms['link']:>8.3f}"
              f"{ms['host'] / (cost.latency_s * 1e3):>8.0%}{len(program.calls()):>7}"
              f"{places['edge']:>9}/{places['between']}/{places['addressing']:<6}"
              f"{cycles / max(busy.values()):>11.2f}x{apart / cycles:>7.2f}x{queued / max(busy.values()):>7.2f}x"
              f"{int8:>9}")
    print("\nthe vector unit's busy cycles, dense: by instruction (% of its busy cycles); fixed: row "
          "instructions' fixed cycles")
    for name, (by_op, fixed) in vector_rows:
        total = sum(by_op.values())
        shares = ", ".join(f"{op} {n / total:.0%}" for op, n in by_op.most_common() if n / total >= 0.01)
        print(f"{name:<26}{total:>9,} cycles: {shares}; fixed {fixed / total:.0%}")


def queued_cycles(program, config) -> int:
    """`program`'s cycles if each unit had its own instruction queue: a unit's next instruction
    issues once the unit is free and the tokens it waits for have come, whatever the other
    units' queues hold (the k-th wait on a token takes its k-th signal: each token has one
    producer unit and one consumer unit, whose instructions end in order)."""
    queues = {u: [ins for ins in program if ins.unit is u and ins.op is not Opcode.HALT] for u in Unit}
    signals, taken = {t: [] for t in Token}, Counter()
    at, free, last_end = {u: 0 for u in Unit}, {u: FETCH_CYCLES for u in Unit}, 0
    while any(at[u] < len(queues[u]) for u in Unit):
        moved = False
        for u in Unit:
            while at[u] < len(queues[u]):
                ins = queues[u][at[u]]
                waits = [t for t in Token if ins.wait >> t & 1]
                if any(len(signals[t]) <= taken[t] for t in waits):
                    break
                issue = max([free[u]] + [signals[t][taken[t]] for t in waits])
                taken.update(waits)
                end = issue + ins.duration(config)
                for t in Token:
                    if ins.signal >> t & 1:
                        signals[t].append(end)
                free[u], last_end, at[u], moved = issue + ins.occupancy(config), max(last_end, end), at[u] + 1, True
        if not moved:
            raise RuntimeError("the program's tokens deadlock")
    return last_end + 1


def vector_cycles(program, config) -> tuple[Counter, int]:
    """The vector unit's busy cycles by mnemonic, and how many are row instructions' fixed cost."""
    by_op, fixed, budget = Counter(), 0, passes(config)
    for section in program.sections:
        for ins in section.program:
            if ins.unit is Unit.VECTOR and ins.op is not Opcode.HALT:
                by_op[ins.mnemonic] += ins.occupancy(config)
                fixed += budget.get(ins.op, (0, 0))[1]
    return by_op, fixed


if __name__ == "__main__":
    main()
