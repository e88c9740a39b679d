"""The language-modelling task: what each compression setting keeps of a small Llama trained on
tcc's grammar (`tcc.language`), measured through the decoder's own step.

A Llama (default 2 x 64, 4 heads with 2 kv heads, vocabulary 64: the grammar's words) is
trained on 4096 windows of 32 tokens (`zoo.train_lm`, 10 epochs: near its best, so that a
setting's fine-tuning does not merely train it further). Its prefill step (32 tokens a run, batch
8, cache 32: one run a window) is compiled per setting of `tcc.select.default_settings()`,
each fine-tuned on 1024 of the training windows through the step (the LM loss and distillation from
the fp32 step; `--epochs`) and calibrated on them, and measured on 128 held-out windows:
perplexity one-shot (no fine-tuning) and fine-tuned, and the fine-tuned next-token accuracy,
beside fp32's from the same run (the ratio) and the grammar's own floor (the perplexity of the true distribution, which no model beats). Hugging
Face's forward pass over the same windows checks the fp32 step.

    .venv/bin/python benchmarks/language.py [--settings fp32,hp75-8x8,hp90-8x8,int8,w1a8]
        [--epochs 3] [--hidden 64 --layers 2]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

import tcc
from tcc import zoo
from tcc.evaluate import evaluate
from tcc.language import VOCAB, make_corpus
from tcc.passes import Dataset
from tcc.passes.tasks import Tokens
from tcc.select import default_settings

LENGTH, BATCH = 32, 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default="fp32,hp75-8x8,hp90-8x8,int8,hp75-8x8-int8,w1a8")
    parser.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs per setting (0: one-shot)")
    parser.add_argument("--train-epochs", type=int, default=10, help="the fp32 model's training epochs")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    train, test = make_corpus(4096, LENGTH, 0), make_corpus(128, LENGTH, 1)
    start = time.perf_counter()
    model = zoo.train_lm(zoo.causal_lm("llama", vocab_size=len(VOCAB), hidden_size=args.hidden,
                                       intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
                                       num_attention_heads=4, num_key_value_heads=2), train.inputs, train.labels,
                           epochs=args.train_epochs)
    print(f"trained a {args.layers} x {args.hidden} Llama on {len(train.inputs)} windows of {LENGTH} tokens in "
          f"{time.perf_counter() - start:.0f} s")
    with torch.no_grad():
        logits = model(input_ids=test.inputs).logits
    hf = Tokens().metrics(logits.numpy(), test.labels)
    step = zoo.decode_step(model, LENGTH, batch=BATCH, width=LENGTH)
    training = Dataset((train.inputs[:1024],), train.labels[:1024], "grammar train", Tokens())
    held_out = Dataset((test.inputs,), test.labels, "grammar test", Tokens())
    print(f"the grammar's floor: perplexity {test.floor_perplexity:.3f}, {100 * test.determined:.1f}% of next tokens "
          f"determined; Hugging Face's forward pass: perplexity {hf['perplexity']:.3f}, token accuracy "
          f"{hf['token_accuracy']:.4f}")
    by_name = {s.name: s for s in default_settings()}
    print(f"{'setting':<16} {'one-shot ppl':>12} {'tuned ppl':>10} {'/ fp32':>7} {'/ floor':>8} {'token acc':>10} "
          f"{'compile s':>10}")
    fp32 = None
    for name in args.settings.split(","):
        found = {}
        for epochs in dict.fromkeys((0, args.epochs)):  # one-shot, then fine-tuned
            pipeline = by_name[name].pipeline.replace("hp-prune{", f"hp-prune{{epochs={epochs},").replace(
                "binarize", f"binarize{{epochs={epochs}}}")
            start = time.perf_counter()
            artifact = tcc.compile(step, pipeline=pipeline, train_data=training if epochs else None,
                                   calib_data=training)
            found[epochs] = evaluate(artifact, held_out) | {"seconds": time.perf_counter() - start}
        tuned = found[args.epochs]
        fp32 = fp32 or tuned
        print(f"{name:<16} {found[0]['perplexity']:>12.3f} {tuned['perplexity']:>10.3f} "
              f"{tuned['perplexity'] / fp32['perplexity']:>6.3f}x {tuned['perplexity'] / test.floor_perplexity:>7.3f}x "
              f"{tuned['token_accuracy']:>10.4f} {tuned['seconds']:>10.1f}")

if __name__ == "__main__":
    main()
