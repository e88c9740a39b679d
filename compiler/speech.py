"""A speech corpus made on this machine: spoken commands and digit strings from a small grammar,
spoken by espeak-ng (the Debian package `espeak-ng`) in many voices (accent x voice variant: the
speakers), speeds and pitches, with added noise, at 16 kHz; log-mel features by librosa.

`make_corpus(directory)` writes `train.pt`, `dev.pt` and `test.pt`, CTC data files
(`{"inputs": [N, mels, frames], "labels": [transcripts], "task": "ctc", "vocab": VOCAB}`) that
`tcc eval --data`, `tcc compile --train-data` and `tcc select` read as they are, plus
`corpus.json` (the spec, and each utterance's speaker, speed, pitch and SNR). The speakers of
dev and test are held out of train. Everything follows from the spec and its seed; a directory
that already holds the spec's corpus is left as it is (the cache).

    python -m tcc.speech OUT/ [--utterances 3000] [--seed 0]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from tcc.ir.errors import TccError, printable

RATE = 16_000  # Hz: the corpus's audio and what `log_mel` takes
VOCAB = ("_", " ", *"abcdefghijklmnopqrstuvwxyz")  # the CTC blank first, then the word separator
ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-gb-x-gbcwmd", "en-029")
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5")

DIGITS = ("zero", "oh", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_DEVICES = ("light", "lights", "fan", "radio", "heater", "door", "window", "music")
_GRAMMAR = {  # a sentence is one of these, a word list per slot
    "switch": (("turn",), ("on", "off"), ("the",), _DEVICES),
    "open": (("open", "close"), ("the",), ("door", "window")),
    "go": (("go", "move"), ("up", "down", "left", "right", "back", "forward")),
    "set": (("set",), ("the",), ("volume", "heater", "timer"), ("to",), DIGITS[2:]),
    "word": (("yes", "no", "stop", "start", "pause", "play"),),
}


@dataclass(frozen=True)
class CorpusSpec:
    """What a corpus is made of; the same spec (seed included) makes the same corpus."""

    utterances: int = 3000
    seed: int = 0
    mels: int = 40
    frames: int = 200  # 10 ms hops: 2 s; longer utterances are spoken again, faster
    speeds: tuple[int, int] = (130, 210)  # espeak-ng words per minute
    pitches: tuple[int, int] = (25, 75)
    snr_db: tuple[float, float] = (10.0, 30.0)  # white noise
    held_out: int = 12  # speakers kept for dev and test (half each), never in train
    split: tuple[float, float] = (0.1, 0.1)  # dev and test shares of the utterances

    def to_json(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # tuples as the lists JSON reads back


@dataclass(frozen=True)
class Utterance:
    text: str
    speaker: str  # accent+variant
    speed: int
    pitch: int
    snr_db: float
    part: str  # train, dev or test


def speakers() -> list[str]:
    """Every voice: espeak-ng's English accents with each voice variant (`accent+variant`)."""
    return [f"{accent}+{variant}" for accent in ACCENTS for variant in VARIANTS]


def sentence(rng: np.random.Generator) -> str:
    """A random sentence of the grammar: a command, or a string of two to five digits."""
    kinds = [*_GRAMMAR, "digits"]
    kind = kinds[int(rng.integers(len(kinds)))]
    if kind == "digits":
        return " ".join(DIGITS[int(i)] for i in rng.integers(0, len(DIGITS), int(rng.integers(2, 6))))
    return " ".join(slot[int(rng.integers(len(slot)))] for slot in _GRAMMAR[kind])


def plan(spec: CorpusSpec) -> list[Utterance]:
    """The corpus's utterances (texts, voices, prosody, noise, parts), from the spec's seed alone."""
    rng = np.random.default_rng(spec.seed)
    voices = speakers()
    if not 2 <= spec.held_out < len(voices):
        raise TccError(f"corpus: held_out must lie in [2, {len(voices) - 1}] speakers, got {spec.held_out}")
    order = rng.permutation(len(voices))
    held = [voices[i] for i in order[:spec.held_out]]
    parts = {"dev": held[:spec.held_out // 2], "test": held[spec.held_out // 2:],
             "train": [voices[i] for i in order[spec.held_out:]]}
    counts = {"dev": round(spec.utterances * spec.split[0]), "test": round(spec.utterances * spec.split[1])}
    counts["train"] = spec.utterances - counts["dev"] - counts["test"]
    out = []
    for part in ("train", "dev", "test"):
        for _ in range(counts[part]):
            speaker = parts[part][int(rng.integers(len(parts[part])))]
            out.append(Utterance(sentence(rng), speaker, int(rng.integers(spec.speeds[0], spec.speeds[1] + 1)),
                                 int(rng.integers(spec.pitches[0], spec.pitches[1] + 1)),
                                 float(rng.uniform(*spec.snr_db)), part))
    return out


def espeak() -> str:
    """The espeak-ng program (a TccError naming the package when it is not installed)."""
    program = shutil.which("espeak-ng")
    if program is None:
        raise TccError("espeak-ng is not installed: the speech corpus is spoken by it (Debian package espeak-ng; "
                       "`make install` installs it)")
    return program


def speak(text: str, speaker: str, speed: int, pitch: int) -> np.ndarray:
    """espeak-ng's audio of `text` at `RATE` Hz, float32 in [-1, 1]."""
    import librosa
    with tempfile.TemporaryDirectory(prefix="tcc-speak-") as tmp:
        wav = Path(tmp) / "u.wav"
        subprocess.run([espeak(), "-v", speaker, "-s", str(speed), "-p", str(pitch), "-w", str(wav), text],
                       check=True, capture_output=True, timeout=60)
        audio, rate = read_wav(wav)
    return librosa.resample(audio, orig_sr=rate, target_sr=RATE).astype(np.float32)


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """A 16-bit PCM mono WAV file's samples (float32 in [-1, 1]) and rate; a TccError naming the
    file when it is not one."""
    import wave
    try:
        with wave.open(str(path), "rb") as f:
            channels, width, rate, count = f.getnchannels(), f.getsampwidth(), f.getframerate(), f.getnframes()
            data = f.readframes(count)
    except (OSError, EOFError, wave.Error) as e:
        raise TccError(f"{path}: not a WAV file ({e})") from None
    if channels != 1 or width != 2:
        raise TccError(f"{path}: {channels} channel(s) of {8 * width}-bit samples; tcc reads 16-bit mono PCM")
    return np.frombuffer(data, "<i2").astype(np.float32) / 32768.0, rate


def wav_features(path: str | Path, mels: int = CorpusSpec.mels, frames: int = CorpusSpec.frames) -> np.ndarray:
    """The `[mels, frames]` log-mel features of a 16 kHz mono WAV file, as the corpus's (what its
    models take); a TccError naming the file for another rate, layout or length."""
    audio, rate = read_wav(Path(path))
    if rate != RATE:
        raise TccError(f"{path}: {rate} Hz audio; the speech models take {RATE} Hz (resample it first)")
    return log_mel(audio, mels, frames, str(path))


def log_mel(audio: np.ndarray, mels: int, frames: int, where: str = "audio") -> np.ndarray:
    """`[mels, frames]` log-mel features of `RATE` Hz audio (25 ms windows, 10 ms hops), padded
    with silence to `frames`; a TccError naming `where` for audio that is not 1-D, or longer."""
    import librosa
    audio = np.asarray(audio)
    if audio.ndim != 1 or audio.size == 0 or not np.issubdtype(audio.dtype, np.floating):
        raise TccError(f"{where}: audio must be 1-D float samples at {RATE} Hz, got {audio.dtype} of shape "
                       f"{list(audio.shape)}")
    hop = RATE // 100
    if audio.size > (frames - 1) * hop:
        raise TccError(f"{where}: {audio.size / RATE:.2f} s of audio, more than the {frames} frames of "
                       f"{1000 * hop // RATE} ms hold")
    padded = np.zeros((frames - 1) * hop, np.float32)
    padded[:audio.size] = audio
    power = librosa.feature.melspectrogram(y=padded, sr=RATE, n_fft=RATE // 40, hop_length=hop, n_mels=mels,
                                           center=True)
    return np.log(power + 1e-6).astype(np.float32)


def _render(job: tuple[Utterance, CorpusSpec, int]) -> tuple[np.ndarray, Utterance]:
    """One utterance's features: spoken (again, faster, while it overflows the frames), noise added
    at its SNR (seeded by its index)."""
    utterance, spec, index = job
    speed = utterance.speed
    limit = (spec.frames - 1) * (RATE // 100)
    while True:
        audio = speak(utterance.text, utterance.speaker, speed, utterance.pitch)
        if audio.size <= limit or speed >= 450:
            break
        speed = min(450, math.ceil(speed * audio.size / limit * 1.05))
    audio = audio[:limit]
    noise = np.random.default_rng([spec.seed, index]).standard_normal(audio.size).astype(np.float32)
    power = float(np.mean(audio ** 2)) or 1e-8
    audio = audio + noise * math.sqrt(power / 10 ** (utterance.snr_db / 10))
    return log_mel(audio, spec.mels, spec.frames), dataclasses.replace(utterance, speed=speed)


def make_corpus(directory: str | Path, spec: CorpusSpec = CorpusSpec(), *, workers: int | None = None,
                progress: bool = False) -> dict[str, Path]:
    """Write the corpus of `spec` into `directory` (unless it already holds it): train/dev/test
    CTC data files and `corpus.json`. Returns the data files by part."""
    import torch
    from tqdm import tqdm
    directory = Path(directory)
    files = {part: directory / f"{part}.pt" for part in ("train", "dev", "test")}
    about = directory / "corpus.json"
    if about.is_file() and all(f.is_file() for f in files.values()):
        try:
            if json.loads(about.read_text())["spec"] == spec.to_json():
                return files
        except (ValueError, KeyError):
            pass
    utterances = plan(spec)
    jobs = [(u, spec, i) for i, u in enumerate(utterances)]
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        rendered = list(tqdm(pool.map(_render, jobs), total=len(jobs), desc="speaking", disable=not progress,
                             unit="utt"))
    directory.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".corpus-", dir=directory))
    try:
        for part, file in files.items():
            mine = [(x, u) for x, u in rendered if u.part == part]
            torch.save({"inputs": torch.from_numpy(np.stack([x for x, _ in mine])),
                        "labels": [u.text for _, u in mine], "task": "ctc", "vocab": list(VOCAB)},
                       staging / file.name)
        (staging / about.name).write_text(json.dumps(
            {"spec": spec.to_json(), "vocab": list(VOCAB), "rate": RATE,
             "utterances": [dataclasses.asdict(u) for _, u in rendered]}, indent=1))
        for name in (*(f.name for f in files.values()), about.name):
            os.replace(staging / name, directory / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return files


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tcc.speech", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", help="where the corpus goes (kept as a cache: the same spec is not remade)")
    parser.add_argument("--utterances", type=int, default=CorpusSpec.utterances)
    parser.add_argument("--seed", type=int, default=CorpusSpec.seed)
    parser.add_argument("--frames", type=int, default=CorpusSpec.frames, help="10 ms frames per utterance")
    parser.add_argument("--mels", type=int, default=CorpusSpec.mels)
    args = parser.parse_args(argv)
    try:
        spec = CorpusSpec(utterances=args.utterances, seed=args.seed, frames=args.frames, mels=args.mels)
        files = make_corpus(args.directory, spec, progress=sys.stderr.isatty())
    except TccError as e:
        print(f"tcc: error: {printable(str(e))}", file=sys.stderr)
        return 2
    for part, file in files.items():
        print(f"{part}: {file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
