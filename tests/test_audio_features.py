"""Log-mel features of 1 s clips, and the torchaudio import guard."""

import sys

import numpy as np
import pytest

from fedtasks import audio
from fedtasks.audio import CLIP_SAMPLES, FEATURE_SHAPE, SAMPLE_RATE, fit_clip, log_mel, one_second_clips


def tone(freq, amp=0.5, seconds=1.0):
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_shape_range_and_loudness():
    feats = log_mel(np.stack([tone(1000), tone(1000, amp=0.01), np.zeros(CLIP_SAMPLES, np.float32)]))
    assert feats.shape == (3, *FEATURE_SHAPE) == (3, 128, 101)
    assert np.isfinite(feats).all() and feats.min() >= 0 and feats.max() <= 1
    assert feats[0].max() > feats[1].max() > feats[2].max() == 0.0  # fixed dB scale keeps loudness


def test_a_tone_lights_its_mel_bin():
    def htk_mel(f):
        return 2595 * np.log10(1 + f / 700)

    lo, hi = htk_mel(audio.F_MIN), htk_mel(audio.F_MAX)
    for freq in (300, 1000, 4000):
        expected = (htk_mel(freq) - lo) / (hi - lo) * (audio.N_MELS + 1) - 1
        peak = log_mel(tone(freq)[None])[0].mean(axis=1).argmax()
        assert abs(peak - expected) <= 2, (freq, peak, expected)


def test_no_empty_mel_filter():
    # white noise reaches every band: no row may sit at the floor
    feats = log_mel((0.1 * np.random.default_rng(0).standard_normal((1, CLIP_SAMPLES))).astype(np.float32))
    assert feats[0].mean(axis=1).min() > 0.2


def test_clips_are_fitted_to_one_second_at_16k():
    assert fit_clip(tone(440, seconds=0.3), SAMPLE_RATE).shape == (CLIP_SAMPLES,)
    assert fit_clip(tone(440, seconds=2.0), SAMPLE_RATE).shape == (CLIP_SAMPLES,)
    half_at_8k = np.sin(np.arange(4000) / 10).astype(np.float32)
    out = fit_clip(half_at_8k, 8000)
    assert out.shape == (CLIP_SAMPLES,) and np.abs(out[:7900]).max() > 0.5 and np.abs(out[8100:]).max() == 0


def test_long_recordings_are_cut_into_whole_seconds():
    import io

    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, tone(200, seconds=3.7), SAMPLE_RATE, format="WAV")
    clips = one_second_clips({"bytes": buf.getvalue(), "path": None})
    assert len(clips) == 3
    assert all(sf.info(io.BytesIO(c)).frames == CLIP_SAMPLES for c in clips)


@pytest.fixture
def fresh_torchaudio():
    """Unload torchaudio before and after, so each test imports it anew."""

    def unload():
        for name in [m for m in sys.modules if m == "torchaudio" or m.startswith("torchaudio.")]:
            del sys.modules[name]

    unload()
    yield
    unload()
    audio._mel = None


def test_guard_stubs_the_extension_only_when_the_import_fails(fresh_torchaudio, monkeypatch):
    real_import = audio.importlib.import_module
    calls = []

    def failing_first(name):
        calls.append(name)
        if len(calls) == 1:
            real_import("torchaudio._internal.module_utils")  # leave a partial import behind, as a real failure does
            raise OSError("Could not load this library: _torchaudio.abi3.so")
        return real_import(name)

    monkeypatch.setattr(audio.importlib, "import_module", failing_first)
    torchaudio = audio.import_torchaudio()
    assert calls == ["torchaudio", "torchaudio"]
    assert sys.modules["torchaudio._extension"]._IS_TORCHAUDIO_EXT_AVAILABLE is False
    mel = torchaudio.transforms.MelSpectrogram(sample_rate=SAMPLE_RATE, n_mels=8)
    assert mel(__import__("torch").zeros(1, 1600)).shape[1] == 8


def test_guard_leaves_a_working_import_alone(fresh_torchaudio, monkeypatch):
    sentinel = object()
    monkeypatch.setattr(audio.importlib, "import_module", lambda name: sentinel)
    assert audio.import_torchaudio() is sentinel
    assert "torchaudio._extension" not in sys.modules
