"""Tiny copies of the three benchmarks in their local layouts, made by the tests.

Images are random pixels and audio is generated tones and noise: the tests
check loading, partitioning and features, not what a model learns.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from datasets import ClassLabel, Dataset, Features, Image, Value
from PIL import Image as PILImage

from core.config import validate
from fedtasks.task import get_task

RATE = 16_000


def cfg(task: str, data_dir, **over) -> dict:
    return validate({"task": task, "data-dir": str(data_dir), "backbone-weights": "", **over})


def partitions(c: dict, n: int) -> list[Dataset]:
    """Every partition of a task's training split into n clients."""
    task = get_task(c)
    return [task.partition(c, pid, n) for pid in range(n)]


def _pixels(rng, n, shape):
    return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(n)]


# -- CIFAR-100 -------------------------------------------------------------


def cifar_dataset(rng, per_class: int, classes: int = 100) -> Dataset:
    labels = np.repeat(np.arange(classes), per_class)
    feats = Features({"img": Image(), "fine_label": ClassLabel(num_classes=100), "coarse_label": Value("int64")})
    return Dataset.from_dict(
        {"img": _pixels(rng, len(labels), (32, 32, 3)), "fine_label": labels, "coarse_label": labels // 5},
        features=feats,
    )


def make_cifar_parquet(root: Path, per_class: int = 3, seed: int = 0) -> Path:
    """The hub's layout: train-*.parquet and test-*.parquet, columns img/fine_label/coarse_label."""
    rng = np.random.default_rng(seed)
    (root / "cifar100").mkdir(parents=True)
    cifar_dataset(rng, per_class).to_parquet(str(root / "cifar100" / "train-00000-of-00001.parquet"))
    cifar_dataset(rng, 1).to_parquet(str(root / "cifar100" / "test-00000-of-00001.parquet"))
    return root


def make_cifar_arrow(root: Path, per_class: int = 2, seed: int = 1) -> Path:
    from datasets import DatasetDict

    rng = np.random.default_rng(seed)
    DatasetDict({"train": cifar_dataset(rng, per_class), "test": cifar_dataset(rng, 1)}).save_to_disk(str(root))
    return root


def make_cifar_imagefolder(
    root: Path, classes=("apple", "bear", "train", "worm"), per_class: int = 4, seed: int = 2
) -> Path:
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("test", 1)):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i, px in enumerate(_pixels(rng, n, (32, 32, 3))):
                PILImage.fromarray(px).save(root / split / name / f"{i}.png")
    return root


# -- FEMNIST ---------------------------------------------------------------


def femnist_rows(rng, writers: int, per_writer: int):
    """(images, writer ids, characters) with a different size per writer."""
    images, ids, chars = [], [], []
    for w in range(writers):
        n = per_writer + w  # unequal writers, like the real data
        images += _pixels(rng, n, (28, 28))
        ids += [f"f{w:04d}_{w % 7:02d}"] * n
        chars += rng.integers(0, 62, n).tolist()
    return images, ids, chars


def make_femnist_parquet(root: Path, writers: int = 6, per_writer: int = 5, seed: int = 3) -> Path:
    """flwrlabs/femnist's layout: one train split, columns image/writer_id/character/hsf_id."""
    rng = np.random.default_rng(seed)
    images, ids, chars = femnist_rows(rng, writers, per_writer)
    feats = Features(
        {
            "image": Image(),
            "writer_id": Value("string"),
            "character": ClassLabel(num_classes=62),
            "hsf_id": Value("int64"),
        }
    )
    root.mkdir(parents=True, exist_ok=True)
    Dataset.from_dict(
        {"image": images, "writer_id": ids, "character": chars, "hsf_id": [0] * len(ids)}, features=feats
    ).to_parquet(str(root / "train-00000-of-00001.parquet"))
    return root


def make_femnist_imagefolder(root: Path, writers: int = 3, per_writer: int = 3, seed: int = 4) -> Path:
    """train/ with the PNGs and metadata.csv (file_name, writer_id, character)."""
    import string

    rng = np.random.default_rng(seed)
    images, ids, chars = femnist_rows(rng, writers, per_writer)
    names = string.digits + string.ascii_uppercase + string.ascii_lowercase
    (root / "train").mkdir(parents=True)
    lines = ["file_name,writer_id,character"]
    for i, (px, w, c) in enumerate(zip(images, ids, chars, strict=True)):
        PILImage.fromarray(px).save(root / "train" / f"{i:05d}.png")
        lines.append(f"{i:05d}.png,{w},{names[c]}")
    (root / "train" / "metadata.csv").write_text("\n".join(lines) + "\n")
    return root


# -- Speech Commands -------------------------------------------------------


def _tone(rng, seconds: float, freq: float, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (amp * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


def make_speech_wavs(
    root: Path,
    speakers: int = 5,
    words=("yes", "no", "up", "cat", "visual"),
    test_speakers: int = 1,
    noise_seconds: float = 3.5,
    seed: int = 5,
) -> Path:
    """The unpacked v0.02 archive: <word>/<speaker>_nohash_<n>.wav, _background_noise_/, testing_list.txt.

    The last `test_speakers` speakers are in testing_list.txt; one clip of
    speaker 0 is in validation_list.txt. Clip lengths vary around 1 s.
    """
    rng = np.random.default_rng(seed)
    test, validation = [], []
    for wi, word in enumerate(words):
        (root / word).mkdir(parents=True, exist_ok=True)
        for s in range(speakers):
            spk = f"{s:04x}beef"
            for n in range(1 + (s + wi) % 2):
                rel = f"{word}/{spk}_nohash_{n}.wav"
                sf.write(root / rel, _tone(rng, rng.uniform(0.6, 1.1), 200 + 150 * wi), RATE, subtype="PCM_16")
                if s >= speakers - test_speakers:
                    test.append(rel)
                elif s == 0 and wi == 0 and n == 0:
                    validation.append(rel)
    (root / "_background_noise_").mkdir(exist_ok=True)
    noise = (0.05 * rng.standard_normal(int(noise_seconds * RATE))).astype(np.float32)
    sf.write(root / "_background_noise_" / "white_noise.wav", noise, RATE, subtype="PCM_16")
    (root / "testing_list.txt").write_text("\n".join(test) + "\n")
    (root / "validation_list.txt").write_text("\n".join(validation) + "\n")
    return root


def _wav_bytes(samples: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    sf.write(buf, samples, RATE, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def speech_hub_dataset(rng, speakers: int, words, silence_seconds: float) -> Dataset:
    """Rows in google/speech_commands' schema; silence has no speaker (None)."""
    from datasets import Audio

    from fedtasks.speechcommands import HUB_NAMES, WORDS

    audio, labels, spk = [], [], []
    for wi, word in enumerate(words):
        for s in range(speakers):
            audio.append(
                {"bytes": _wav_bytes(_tone(rng, 1.0, 200 + 150 * wi)), "path": f"{word}/{s:04x}cafe_nohash_0.wav"}
            )
            labels.append(HUB_NAMES.index(word))
            spk.append(f"{s:04x}cafe")
    for k in range(2):
        noise = (0.05 * rng.standard_normal(int(silence_seconds * RATE))).astype(np.float32)
        audio.append({"bytes": _wav_bytes(noise), "path": f"_silence_/{k}.wav"})
        labels.append(HUB_NAMES.index("_silence_"))
        spk.append(None)
    feats = Features(
        {
            "file": Value("string"),
            "audio": {"bytes": Value("binary"), "path": Value("string")},
            "label": ClassLabel(names=HUB_NAMES),
            "is_unknown": Value("bool"),
            "speaker_id": Value("string"),
            "utterance_id": Value("int8"),
        }
    )
    ds = Dataset.from_dict(
        {
            "file": [a["path"] for a in audio],
            "audio": audio,
            "label": labels,
            "is_unknown": [HUB_NAMES[i] in WORDS[10:] for i in labels],
            "speaker_id": spk,
            "utterance_id": [0] * len(labels),
        },
        features=feats,
    )
    return ds.cast_column("audio", Audio(sampling_rate=RATE))


def make_speech_hub_parquet(root: Path, speakers: int = 4, words=("go", "wow"), seed: int = 6) -> Path:
    """The hub's schema as parquet: long silence recordings in train, 1 s silence clips in test."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    speech_hub_dataset(rng, speakers, words, 3.2).to_parquet(str(root / "train-00000-of-00001.parquet"))
    speech_hub_dataset(rng, 1, words, 1.0).to_parquet(str(root / "test-00000-of-00001.parquet"))
    return root


def row_keys(ds: Dataset, column: str) -> list[str]:
    """A content hash per row (its encoded image/audio, or the file path): which examples a split holds."""
    import hashlib

    from datasets import Audio

    feature = ds.features[column]
    if isinstance(feature, (Image, Audio)):
        ds = ds.cast_column(column, type(feature)(decode=False))
    return [
        hashlib.sha1(r[column]["bytes"] or r[column]["path"].encode()).hexdigest() for r in ds.select_columns([column])
    ]


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory):
    """Hugging Face's dataset cache in a temporary folder, so tests leave nothing in ~/.cache."""
    import datasets

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf-cache"))
        yield


def fake_hub(monkeypatch, data) -> list:
    """Serve `data` (a DatasetDict) where Flower Datasets would download from the hub.

    FederatedDataset, its preprocessor and partitioner run for real; only
    `datasets.load_dataset` is replaced and Flower's telemetry turned off, so
    nothing touches the network. Returns the (name, config) it was asked for.
    """
    import datasets
    import flwr_datasets.common.telemetry as telemetry

    asked = []
    monkeypatch.setattr(telemetry, "FLWR_TELEMETRY_ENABLED", "0")

    def load_dataset(path, name=None, **kwargs):
        asked.append((path, name))
        return data

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return asked


def clear_caches() -> None:
    """Forget every per-process dataset, partitioner and tensor cache."""
    from fedtasks import base, sources

    sources._splits.clear()
    sources._federated.clear()
    base._cache.clear()
