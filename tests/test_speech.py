"""The speech corpus (`tcc.speech`): espeak-ng's audio, log-mel features, the plan's held-out
speakers and determinism, the data files tcc reads as a CTC task, and bad audio."""

from __future__ import annotations

import json
import wave

import numpy as np
import pytest
import torch

import tcc
from conftest import need
from tcc import speech, zoo
from tcc.data import load_dataset
from tcc.ir.errors import TccError
from tcc.passes.tasks import CTC

SMALL = speech.CorpusSpec(utterances=24, frames=160, held_out=4)


def test_the_plan_holds_speakers_out_and_follows_its_seed():
    plan = speech.plan(speech.CorpusSpec(utterances=400, seed=3))
    assert plan == speech.plan(speech.CorpusSpec(utterances=400, seed=3))
    assert plan != speech.plan(speech.CorpusSpec(utterances=400, seed=4))
    voices = {part: {u.speaker for u in plan if u.part == part} for part in ("train", "dev", "test")}
    assert voices["train"].isdisjoint(voices["dev"] | voices["test"]) and voices["dev"].isdisjoint(voices["test"])
    assert len(voices["dev"] | voices["test"]) <= 12 and len(voices["train"]) > 40
    assert [sum(u.part == p for u in plan) for p in ("train", "dev", "test")] == [320, 40, 40]
    symbols = set(speech.VOCAB[1:])
    assert all(set(u.text) <= symbols and u.text == " ".join(u.text.split()) for u in plan)
    assert len({u.text for u in plan}) > 100 and len({w for u in plan for w in u.text.split()}) >= 40


def test_log_mel_features():
    rate = speech.RATE
    tone = np.sin(2 * np.pi * 1000 * np.arange(rate // 2) / rate).astype(np.float32)
    features = speech.log_mel(tone, 40, 100)
    assert features.shape == (40, 100) and features.dtype == np.float32
    band = features[:, 10:40].mean(axis=1).argmax()  # the tone's band, during the tone
    assert 10 < band < 30 and features[band, 70:].max() < features[band, 10:40].min() - 5  # then silence


@pytest.mark.parametrize("audio, message", [
    (np.zeros((2, 100), np.float32), "audio must be 1-D float samples at 16000 Hz, got float32 of shape [2, 100]"),
    (np.zeros(100, np.int16), "audio must be 1-D float samples at 16000 Hz, got int16"),
    (np.zeros(16_000 * 3, np.float32), "3.00 s of audio, more than the 100 frames of 10 ms hold"),
])
def test_bad_audio_is_named(audio, message):
    with pytest.raises(TccError, match="^clip.wav: " + message.replace("[", r"\[").replace("]", r"\]")):
        speech.log_mel(audio, 40, 100, "clip.wav")


def test_wav_files_of_the_wrong_kind(tmp_path):
    stereo = tmp_path / "stereo.wav"
    with wave.open(str(stereo), "wb") as f:
        f.setnchannels(2), f.setsampwidth(2), f.setframerate(16_000), f.writeframes(b"\x00" * 400)
    with pytest.raises(TccError, match="stereo.wav: 2 channel\\(s\\) of 16-bit samples; tcc reads 16-bit mono PCM"):
        speech.read_wav(stereo)
    (tmp_path / "text.wav").write_text("not audio")
    with pytest.raises(TccError, match="text.wav: not a WAV file"):
        speech.read_wav(tmp_path / "text.wav")
    fast = tmp_path / "fast.wav"
    with wave.open(str(fast), "wb") as f:
        f.setnchannels(1), f.setsampwidth(2), f.setframerate(22_050), f.writeframes(b"\x00" * 400)
    with pytest.raises(TccError, match="fast.wav: 22050 Hz audio; the speech models take 16000 Hz"):
        speech.wav_features(fast)
    with wave.open(str(fast), "wb") as f:
        f.setnchannels(1), f.setsampwidth(2), f.setframerate(16_000), f.writeframes(b"\x10\x00" * 8000)
    assert speech.wav_features(fast).shape == (40, 200)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    need("espeak-ng")
    directory = tmp_path_factory.mktemp("corpus")
    return directory, speech.make_corpus(directory, SMALL, workers=2)


def test_espeak_speaks_at_16_khz():
    need("espeak-ng")
    audio = speech.speak("turn on the light", "en-us+m3", 160, 50)
    assert audio.dtype == np.float32 and 0.6 * speech.RATE < audio.size < 2.5 * speech.RATE
    assert 0.01 < np.abs(audio).max() <= 1.0


def test_the_corpus_is_ctc_data_tcc_reads(corpus):
    directory, files = corpus
    about = json.loads((directory / "corpus.json").read_text())
    assert about["spec"] == SMALL.to_json() and about["rate"] == speech.RATE and len(about["utterances"]) == 24
    model = zoo.SpeechTransformer(frames=SMALL.frames).eval()
    graph = tcc.compile(model, (torch.zeros(2, 40, SMALL.frames),)).graph
    for part, file in files.items():
        data = load_dataset(file, graph)
        assert isinstance(data.task, CTC) and data.task.vocab == speech.VOCAB
        assert data.inputs[0].shape[1:] == (40, SMALL.frames) and torch.isfinite(data.inputs[0]).all()
        assert list(data.labels) == [u["text"] for u in about["utterances"] if u["part"] == part]
    # the cache: the same spec leaves the files as they are; another one remakes them
    stamp = files["train"].stat().st_mtime_ns
    assert speech.make_corpus(directory, SMALL) == files and files["train"].stat().st_mtime_ns == stamp


def test_the_corpus_follows_its_seed(corpus, tmp_path):
    directory, files = corpus
    again = speech.make_corpus(tmp_path, SMALL, workers=1)
    for part in files:
        first, second = torch.load(files[part]), torch.load(again[part])
        assert first["labels"] == second["labels"] and torch.equal(first["inputs"], second["inputs"])


def test_the_recognizer_trains_at_the_width_asked():
    """`zoo.train_speech(width=...)`: heads of 16 channels, an FFN twice as wide, and training
    lowers the CTC loss (the last epoch's mean below the first's)."""
    torch.manual_seed(0)
    x, texts = torch.randn(8, 16, 40), ["one two", "three", "four five", "six"] * 2
    losses = []
    model = zoo.train_speech(x, texts, speech.VOCAB, epochs=3, batch=4, width=32,
                             on_epoch=lambda epoch, loss, _model: losses.append(loss))
    layer = model.layers[0]
    assert (layer.query.in_features, layer.heads, layer.ffn_in.out_features) == (32, 2, 64)
    assert model.ctc_head.out_features == len(speech.VOCAB) and losses[-1] < losses[0]
