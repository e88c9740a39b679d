"""Train the speech Transformer (`tcc.zoo.SpeechTransformer`: conv subsampling, post-norm encoder
layers, a CTC head over characters) on the corpus espeak-ng speaks on this machine
(`tcc.speech`: spoken commands and digit strings, speakers of dev and test held out of train),
report its greedy-CTC WER and CER on dev and test, and export it with torch.export.

Writes into `--out`: `corpus/` (train.pt, dev.pt, test.pt: CTC data files tcc reads as they
are; kept as a cache), `model.pt2` (a static batch of `--batch`), `vocab.json`, `train.json`
(the settings and figures).

    .venv/bin/python examples/speech/train.py [--out build/speech] [--utterances 3000] [--epochs 40] [--width 64]
    .venv/bin/python examples/speech/train.py --quick     # 1500 utterances, 25 epochs: about 2 minutes

Then, for example:

    tcc compile build/speech/model.pt2 -o build/speech/fp32
    tcc eval build/speech/fp32 --data build/speech/corpus/test.pt           # WER, CER
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from tcc.passes.tasks import CTC
from tcc.speech import VOCAB, CorpusSpec, make_corpus
from tcc.zoo import train_speech


def load(file: Path) -> tuple[torch.Tensor, list[str]]:
    data = torch.load(file, weights_only=True)
    return data["inputs"], data["labels"]


def metrics(model: torch.nn.Module, x: torch.Tensor, texts: list[str], batch: int) -> dict:
    """Greedy-CTC WER and CER of `model` on (x, texts)."""
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])
    return CTC(VOCAB).metrics(logits.numpy(), texts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="build/speech", help="output directory (default build/speech)")
    parser.add_argument("--utterances", type=int, default=3000, help="corpus size (default 3000)")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch", type=int, default=16, help="training batch, and the exported model's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=int, default=64, help="the model's width (heads of 16, FFN twice as wide)")
    parser.add_argument("--quick", action="store_true", help="1500 utterances, 25 epochs")
    args = parser.parse_args()
    if args.width < 16 or args.width % 16:
        parser.error(f"--width {args.width}: a positive multiple of 16 (heads of 16 channels)")
    if args.quick:
        args.utterances, args.epochs = 1500, 25
    out = Path(args.out)
    start = time.perf_counter()
    spec = CorpusSpec(utterances=args.utterances, seed=args.seed)
    files = make_corpus(out / "corpus", spec, progress=True)
    print(f"corpus: {args.utterances} utterances in {out / 'corpus'} ({time.perf_counter() - start:.0f} s)")
    (x, texts), dev, test = (load(files[p]) for p in ("train", "dev", "test"))
    start = time.perf_counter()

    def report(epoch: int, loss: float, model: torch.nn.Module) -> None:
        if epoch % 5 == 4 or epoch == args.epochs - 1:
            found = metrics(model, *dev, args.batch)
            print(f"epoch {epoch + 1}: CTC loss {loss:.3f}, dev WER {found['wer']:.3f} CER {found['cer']:.3f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)

    model = train_speech(x, texts, VOCAB, epochs=args.epochs, batch=args.batch, seed=args.seed, width=args.width,
                         on_epoch=report)
    seconds = time.perf_counter() - start
    figures = {"dev": metrics(model, *dev, args.batch), "test": metrics(model, *test, args.batch)}
    torch.export.save(torch.export.export(model, (test[0][:args.batch],)), out / "model.pt2")
    (out / "vocab.json").write_text(json.dumps(list(VOCAB)))
    (out / "train.json").write_text(json.dumps({"settings": vars(args), "seconds": round(seconds, 1),
                                                "parameters": sum(p.numel() for p in model.parameters()),
                                                "corpus": spec.to_json(), **figures}, indent=1))
    print(f"trained in {seconds:.0f} s; test (speakers held out): WER {figures['test']['wer']:.3f}, "
          f"CER {figures['test']['cer']:.3f}; wrote {out / 'model.pt2'}")


if __name__ == "__main__":
    main()
