"""Audio clips to log-mel spectrograms the ViT reads as one-channel images.

Features (AST style): 1 s of 16 kHz audio, a 25 ms Hann window (400
samples, zero-padded to a 1024-point FFT so that none of the 128 narrow
low-frequency mel filters falls between two FFT bins and stays empty), a
10 ms hop, 128 HTK mel bins from 20 Hz to 8 kHz. The mel power in dB is
clipped to [-80, +40] dB and scaled to [0, 1], so the spectrogram goes through
the same image pipeline as pixels (`fedtasks.base.to_backbone`: resized to the
backbone's input, the channel repeated for 3-channel backbones, the backbone's
mean/std applied). A fixed dB range, not a per-clip one, keeps loudness:
silence stays dark and speech bright.
"""

from __future__ import annotations

import importlib
import io
import sys
import types

import numpy as np
import soundfile as sf
import torch

from .base import DataError

SAMPLE_RATE = 16_000
CLIP_SAMPLES = SAMPLE_RATE  # 1 s
WIN_LENGTH = 400  # 25 ms
HOP_LENGTH = 160  # 10 ms
N_FFT = 1024
N_MELS = 128
F_MIN, F_MAX = 20.0, 8000.0
DB_FLOOR, DB_CEIL = -80.0, 40.0
N_FRAMES = 1 + CLIP_SAMPLES // HOP_LENGTH  # 101: centred frames
FEATURE_SHAPE = (N_MELS, N_FRAMES)
_BATCH = 256  # clips per STFT call: bounds memory on the full test set


def import_torchaudio():
    """torchaudio, even where its compiled extension cannot load.

    The PyPI wheel of torchaudio 2.11 is built against CUDA; on a CPU build
    of torch its C extension fails at import with OSError. The transforms
    used here are pure Python, so when (and only when) the plain import
    fails, the extension module is replaced by a stub that reports it absent,
    which is what torchaudio itself does on builds without it.
    """
    try:
        return importlib.import_module("torchaudio")
    except OSError:
        pass
    for name in [m for m in sys.modules if m == "torchaudio" or m.startswith("torchaudio.")]:
        del sys.modules[name]
    stub = types.ModuleType("torchaudio._extension")
    stub._IS_TORCHAUDIO_EXT_AVAILABLE = False
    stub._IS_ALIGN_AVAILABLE = False
    stub.fail_if_no_align = lambda f: f
    sys.modules["torchaudio._extension"] = stub
    return importlib.import_module("torchaudio")


_mel = None


def _mel_transform():
    global _mel
    if _mel is None:
        torchaudio = import_torchaudio()
        _mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=SAMPLE_RATE,
            n_fft=N_FFT,
            win_length=WIN_LENGTH,
            hop_length=HOP_LENGTH,
            f_min=F_MIN,
            f_max=F_MAX,
            n_mels=N_MELS,
            power=2.0,
            norm=None,
            mel_scale="htk",
        )
    return _mel


def log_mel(waves: np.ndarray) -> np.ndarray:
    """(N, 16000) float waveforms in [-1, 1] -> (N, 128, 101) float32 in [0, 1]."""
    waves = np.asarray(waves, dtype=np.float32)
    if waves.ndim != 2 or waves.shape[1] != CLIP_SAMPLES:
        raise ValueError(f"expected waveforms of shape (N, {CLIP_SAMPLES}), got {waves.shape}")
    mel = _mel_transform()
    out = np.empty((len(waves), *FEATURE_SHAPE), dtype=np.float32)
    with torch.no_grad():
        for i in range(0, len(waves), _BATCH):
            power = mel(torch.from_numpy(waves[i : i + _BATCH]))
            db = 10.0 * torch.log10(power.clamp_min(1e-10))
            out[i : i + _BATCH] = ((db.clamp(DB_FLOOR, DB_CEIL) - DB_FLOOR) / (DB_CEIL - DB_FLOOR)).numpy()
    return out


def read_audio(source: dict | str) -> tuple[np.ndarray, int]:
    """Mono float32 samples and rate of a WAV given as a path or {'bytes', 'path'}."""
    if isinstance(source, dict):
        where = source.get("path") or "<audio bytes>"
        data = io.BytesIO(source["bytes"]) if source.get("bytes") else source.get("path")
    else:
        where = data = source
    if data is None:
        raise DataError("an audio entry holds neither bytes nor a path")
    try:
        samples, rate = sf.read(data, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError) as err:
        raise DataError(f"{where}: not a readable audio file (expected WAV): {err}") from None
    return samples.mean(axis=1), rate


def _at_16k(samples: np.ndarray, rate: int) -> np.ndarray:
    if rate == SAMPLE_RATE:
        return samples
    torchaudio = import_torchaudio()
    return torchaudio.functional.resample(torch.from_numpy(samples), rate, SAMPLE_RATE).numpy()


def fit_clip(samples: np.ndarray, rate: int) -> np.ndarray:
    """Resample to 16 kHz if needed, then zero-pad or cut to exactly 1 s."""
    samples = _at_16k(samples, rate)
    if len(samples) >= CLIP_SAMPLES:
        return samples[:CLIP_SAMPLES]
    return np.pad(samples, (0, CLIP_SAMPLES - len(samples)))


def clip_features(sources) -> np.ndarray:
    """Log-mel features (N, 128, 101) of the first second of each audio source."""
    waves = np.zeros((len(sources), CLIP_SAMPLES), dtype=np.float32)
    for i, src in enumerate(sources):
        waves[i] = fit_clip(*read_audio(src))
    return log_mel(waves)


def one_second_clips(source: dict | str) -> list[bytes]:
    """A long recording (background noise) cut into non-overlapping 1 s WAV clips.

    A recording shorter than 1 s gives one clip (padded later, like any clip).
    """
    samples = _at_16k(*read_audio(source))
    clips = []
    for k in range(max(1, len(samples) // CLIP_SAMPLES)):
        buf = io.BytesIO()
        sf.write(buf, samples[k * CLIP_SAMPLES : (k + 1) * CLIP_SAMPLES], SAMPLE_RATE, format="WAV", subtype="FLOAT")
        clips.append(buf.getvalue())
    return clips


def file_features(path: str) -> np.ndarray:
    """The (128, 101) log-mel image of one audio file's first second."""
    return clip_features([path])[0]
