"""A language tcc makes on the machine, for the language-modelling task: text from a small
probabilistic grammar, with each token's true probability known.

Why a grammar rather than a shipped text: it needs no download and no licence, any amount of
it is made in milliseconds from a seed, and because the generator knows the distribution
every token was drawn from, the corpus comes with its own floor: the perplexity of the true
model (`Corpus.floor_perplexity`), which no language model can beat on average. A model's
perplexity reads against that floor, and its next-token accuracy against the share of tokens
the grammar fixes (`Corpus.determined`). Three kinds of sentence exercise what a decoder does:

- agreement: ``the old cat sees the dogs .``: the verb's number follows the subject's;
- counting: ``three four five six .``: each word fixed by the one before (where to stop is not);
- recall: ``bob has a red box and the box is red .``: the second object and colour copy the
  first ones, across the sentence: attention over the KV cache.

A data file for `tcc compile --train-data`, `tcc evaluate --data` and `tcc select --data`
(the `tokens` task: the label at each position is the next token)::

    python -m tcc.language -o lm.pt --examples 512 --length 32 --seed 0
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

ADJECTIVES = ("big", "small", "old", "young")
NOUNS = (("cat", "cats"), ("dog", "dogs"), ("bird", "birds"), ("fox", "foxes"), ("horse", "horses"),
         ("mouse", "mice"), ("child", "children"), ("wolf", "wolves"))
VERBS = (("sees", "see"), ("likes", "like"), ("chases", "chase"), ("finds", "find"))
NUMBERS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve")
NAMES = ("alice", "bob", "carol", "dave", "eve", "frank")
COLOURS = ("red", "blue", "green", "yellow", "black", "white")
OBJECTS = ("ball", "box", "cup", "hat", "book", "kite")
KINDS = (("agreement", 0.4), ("counting", 0.3), ("recall", 0.3))  # a sentence's kind and its probability
COUNT_STARTS, COUNT_LENGTHS = 8, (3, 4, 5)  # counting starts at one of the first 8 numbers, runs 3 to 5 words

VOCAB: tuple[str, ...] = tuple(dict.fromkeys(
    (".", "the", "has", "a", "and", "is") + ADJECTIVES + tuple(w for pair in NOUNS for w in pair)
    + tuple(w for pair in VERBS for w in pair) + NUMBERS + NAMES + COLOURS + OBJECTS))
INDEX = {word: i for i, word in enumerate(VOCAB)}


def _sentence(rng: np.random.Generator) -> Iterator[tuple[str, float]]:
    """One sentence drawn from the grammar: each word with the probability it had given every
    word before it (the sentence's kind is fixed by its first word)."""
    kind = rng.choice(len(KINDS), p=[p for _, p in KINDS])
    share = KINDS[kind][1]
    if KINDS[kind][0] == "agreement":
        yield "the", share
        for role in ("subject", "object"):
            if role == "object":
                yield "the", 1.0
            if rng.random() < 0.5:
                yield ADJECTIVES[rng.integers(len(ADJECTIVES))], 0.5 / len(ADJECTIVES)
                noun_p = 1.0 / (2 * len(NOUNS))
            else:
                noun_p = 0.5 / (2 * len(NOUNS))
            plural = int(rng.integers(2))
            yield NOUNS[rng.integers(len(NOUNS))][plural], noun_p
            if role == "subject":
                yield VERBS[rng.integers(len(VERBS))][plural], 1.0 / len(VERBS)
        yield ".", 1.0
    elif KINDS[kind][0] == "counting":
        start, length = int(rng.integers(COUNT_STARTS)), COUNT_LENGTHS[rng.integers(len(COUNT_LENGTHS))]
        yield NUMBERS[start], share / COUNT_STARTS
        for k in range(1, max(COUNT_LENGTHS) + 1):  # k words said; stop with P(length = k | length >= k)
            longer = sum(n >= k for n in COUNT_LENGTHS)
            stop = (k in COUNT_LENGTHS) / longer
            if k == length:
                yield ".", stop
                return
            yield NUMBERS[start + k], 1.0 - stop
    else:
        name, colour, thing = (rng.integers(len(words)) for words in (NAMES, COLOURS, OBJECTS))
        yield NAMES[name], share / len(NAMES)
        yield "has", 1.0
        yield "a", 1.0
        yield COLOURS[colour], 1.0 / len(COLOURS)
        yield OBJECTS[thing], 1.0 / len(OBJECTS)
        for word in ("and", "the", OBJECTS[thing], "is", COLOURS[colour], "."):
            yield word, 1.0


@dataclass(frozen=True)
class Corpus:
    """`examples` windows of the grammar's text, each starting at a sentence: token ids
    `inputs` [examples, length], `labels` the token after each (the language-modelling task),
    and `probabilities` the true probability of each label."""

    inputs: torch.Tensor
    labels: torch.Tensor
    probabilities: np.ndarray

    @property
    def floor_perplexity(self) -> float:
        """The perplexity of the grammar itself on these labels: the least a model can reach."""
        return math.exp(-float(np.log(self.probabilities).mean()))

    @property
    def determined(self) -> float:
        """The share of labels the grammar fixes (probability 1): the next-token accuracy a model
        that has learned the grammar reaches on them alone."""
        return float((self.probabilities == 1.0).mean())

    def to_file(self) -> dict:
        """What `torch.save` writes: a data file of the `tokens` task."""
        return {"inputs": self.inputs, "labels": self.labels, "task": "tokens"}


def make_corpus(examples: int, length: int, seed: int = 0) -> Corpus:
    """`examples` windows of `length` tokens of the grammar's text (and the token after each)."""
    if examples < 1 or length < 1:
        raise ValueError(f"examples and length must be positive, got {examples} and {length}")
    rng = np.random.default_rng(seed)
    ids = np.empty((examples, length + 1), np.int64)
    probabilities = np.empty((examples, length + 1))
    for row in range(examples):
        words: list[tuple[str, float]] = []
        while len(words) <= length:
            words += _sentence(rng)
        ids[row] = [INDEX[w] for w, _ in words[:length + 1]]
        probabilities[row] = [p for _, p in words[:length + 1]]
    return Corpus(torch.from_numpy(ids[:, :-1].copy()), torch.from_numpy(ids[:, 1:].copy()), probabilities[:, 1:])


def text(ids: Sequence[int]) -> str:
    """Token ids as the grammar's words."""
    return " ".join(VOCAB[i] if 0 <= i < len(VOCAB) else f"<{i}>" for i in ids)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tcc.language", description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", required=True, help="data file to write (torch.save)")
    parser.add_argument("--examples", type=int, default=512, help="windows of text (default 512)")
    parser.add_argument("--length", type=int, default=32, help="tokens a window (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="the grammar's random seed (default 0)")
    args = parser.parse_args(argv)
    if args.examples < 1 or args.length < 1:
        parser.error(f"--examples and --length must be positive, got {args.examples} and {args.length}")
    corpus = make_corpus(args.examples, args.length, args.seed)
    out = Path(args.output)
    partial = out.with_name(out.name + ".partial")
    torch.save(corpus.to_file(), partial)
    partial.replace(out)
    print(f"{out}: {args.examples} x {args.length} tokens over a vocabulary of {len(VOCAB)}; the grammar's own "
          f"perplexity {corpus.floor_perplexity:.3f}, {100 * corpus.determined:.1f}% of next tokens determined")
    print(f"e.g. {text(corpus.inputs[0].tolist())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
