"""Train the speech Transformer (`tcc.zoo.SpeechTransformer`: conv subsampling, post-norm encoder
layers, a CTC head over characters) on the corpus espeak-ng speaks on this machine
(`tcc.speech`: spoken commands and digit strings, speakers of dev and test held out of train),
report its greedy-CTC WER and CER on dev and test, and export it with torch.export.

Writes into `--out`: `corpus/` (train.pt, dev.pt, test.pt: CTC data files tcc reads as they
are; kept as a cache), `model.pt2` (a static batch of `--batch`), `vocab.json`, `train.json`
(the settings and figures).

    .venv/bin/python examples/speech/train.py [--out build/speech] [--utterances 3000] [--epochs 40]
    .venv/bin/python examples/speech/train.py --quick     # 600 utterances, 12 epochs: a minute or two

Then, for example:

    tcc compile build/speech/model.pt2 -o build/speech/fp32
    tcc eval build/speech/fp32 --data build/speech/corpus/test.pt           # WER, CER
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from tcc.passes.tasks import CTC
from tcc.speech import VOCAB, CorpusSpec, make_corpus
from tcc.zoo import SpeechTransformer


def load(file: Path) -> tuple[torch.Tensor, list[str]]:
    data = torch.load(file, weights_only=True)
    return data["inputs"], data["labels"]


def greedy_metrics(model: torch.nn.Module, x: torch.Tensor, texts: list[str], task: CTC, batch: int) -> dict:
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])
    return task.metrics(logits.numpy(), texts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="build/speech", help="output directory (default build/speech)")
    parser.add_argument("--utterances", type=int, default=3000, help="corpus size (default 3000)")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch", type=int, default=16, help="training batch, and the exported model's")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="600 utterances, 12 epochs")
    args = parser.parse_args()
    if args.quick:
        args.utterances, args.epochs = 600, 12
    out = Path(args.out)
    start = time.perf_counter()
    files = make_corpus(out / "corpus", CorpusSpec(utterances=args.utterances, seed=args.seed), progress=True)
    print(f"corpus: {args.utterances} utterances in {out / 'corpus'} ({time.perf_counter() - start:.0f} s)")
    (x, texts), (x_dev, dev_texts), (x_test, test_texts) = (load(files[p]) for p in ("train", "dev", "test"))
    spec = CorpusSpec()
    task = CTC(VOCAB)
    torch.manual_seed(args.seed)
    model = SpeechTransformer(mels=x.shape[1], frames=x.shape[2], vocab=len(VOCAB))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    steps = args.epochs * math.ceil(len(x) / args.batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=steps, pct_start=0.15)
    generator = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for i in range(0, len(x), args.batch):
            index = order[i:i + args.batch]
            loss = task.loss(model(x[index]), [texts[j] for j in index])
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            total += loss.item() * len(index)
        if epoch % 5 == 4 or epoch == args.epochs - 1:
            dev = greedy_metrics(model, x_dev, dev_texts, task, args.batch)
            print(f"epoch {epoch + 1}: CTC loss {total / len(x):.3f}, dev WER {dev['wer']:.3f} CER {dev['cer']:.3f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    seconds = time.perf_counter() - start
    figures = {part: greedy_metrics(model, xs, ts, task, args.batch)
               for part, xs, ts in (("dev", x_dev, dev_texts), ("test", x_test, test_texts))}
    model.eval()
    torch.export.save(torch.export.export(model, (x_test[:args.batch],)), out / "model.pt2")
    (out / "vocab.json").write_text(json.dumps(list(VOCAB)))
    (out / "train.json").write_text(json.dumps({"settings": vars(args), "seconds": round(seconds, 1),
                                                "parameters": sum(p.numel() for p in model.parameters()),
                                                "frames": spec.frames, **figures}, indent=1))
    print(f"trained in {seconds:.0f} s; test (speakers held out): WER {figures['test']['wer']:.3f}, "
          f"CER {figures['test']['cer']:.3f}; wrote {out / 'model.pt2'}")


if __name__ == "__main__":
    main()
