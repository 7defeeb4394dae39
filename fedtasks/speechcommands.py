"""Speech Commands v2 (the paper's third benchmark): keyword spotting, split by
speaker (one speaker per node), each 1 s clip turned into a 128-bin log-mel
spectrogram read by the ViT as a one-channel image (see fedtasks/audio.py).

`speech-classes = 12` (default): the ten words yes, no, up, down, left,
right, on, off, stop, go, plus `_silence_` (1 s clips cut from the
background-noise recordings) and `_unknown_` (the other 25 words).
`speech-classes = 35`: the 35 words, no silence.

Silence is recorded by no speaker, so its clips are dealt evenly over the
nodes (fedtasks/natural.py); every spoken clip of a node is its one speaker's.

Hub: `google/speech_commands`, config `v0.02` (columns `audio`, `label`,
`speaker_id`). Its loading script is not supported by `datasets` 4, so
`hub-dataset` may name a parquet copy with the same columns; offline, the
original archive unpacked into `data-dir` works as it is.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import soundfile as sf
from datasets import Audio, ClassLabel, Dataset, DatasetDict, Features, Value, concatenate_datasets

from .audio import clip_features, one_second_clips
from .base import DataError, column
from .local import data_root
from .natural import NO_ID, OneIdPerPartition
from .sources import SourcedTask, rename_columns

WORDS = (
    "yes no up down left right on off stop go zero one two three four five six seven eight nine "
    "bed bird cat dog happy house marvin sheila tree wow backward forward follow learn visual"
).split()
CORE = WORDS[:10]
SILENCE, UNKNOWN = "_silence_", "_unknown_"
HUB_NAMES = WORDS + [SILENCE]  # the hub's label order (v0.02)
CLASSES = {12: CORE + [SILENCE, UNKNOWN], 35: list(WORDS)}

NOISE_DIR = "_background_noise_"
TEST_LIST, VALIDATION_LIST = "testing_list.txt", "validation_list.txt"
SILENCE_TEST_EVERY = 10  # every 10th 1 s clip of each noise recording is a test clip
# How Audio(decode=False) is stored; building rows with it needs no audio codec.
AUDIO_STRUCT = {"bytes": Value("binary"), "path": Value("string")}
RAW_FEATURES = Features({"audio": AUDIO_STRUCT, "label": ClassLabel(names=HUB_NAMES), "speaker_id": Value("string")})

LAYOUTS = (
    "the Speech Commands v0.02 archive unpacked: <word>/<speaker>_nohash_<n>.wav for the 35 words, "
    f"{NOISE_DIR}/*.wav and {TEST_LIST} (optionally {VALIDATION_LIST}, whose files are left out as in the hub's "
    "train split); or 'train' and 'test' splits as save_to_disk output or parquet files with the hub's columns "
    "audio, label, speaker_id"
)


class SpeechCommandsTask(SourcedTask):
    name = "speechcommands"
    id_column = "speaker_id"
    hub_dataset = "google/speech_commands:v0.02"
    layouts = LAYOUTS

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_names(self) -> list[str]:
        return self.classes

    @property
    def classes(self) -> list[str]:
        return CLASSES[int(self.cfg.get("speech-classes", 12))]

    def variant(self, cfg):
        return (cfg["speech-classes"],)

    def load_local(self, data_dir):
        if _is_wav_layout(Path(data_dir).expanduser()):
            return read_wav_layout(data_dir)
        return super().load_local(data_dir)

    def partitioner(self, cfg, num_partitions):
        return OneIdPerPartition("speaker_id", num_partitions, cfg["seed"], what="speaker")

    def prepare(self, raw: DatasetDict) -> DatasetDict:
        return DatasetDict(
            {split: self._prepare_split(ds, f"Speech Commands {split} split") for split, ds in raw.items()}
        )

    def _prepare_split(self, ds: Dataset, where: str) -> Dataset:
        ds = rename_columns(ds, {"audio": ("audio",), "label": ("label",), "speaker_id": ("speaker_id",)}, where)
        if isinstance(ds.features["audio"], Audio):
            # Only the feature changes (no data is rewritten); samples are read
            # with soundfile because decoding through `datasets` needs torchcodec.
            ds = ds.cast_column("audio", Audio(decode=False))
        words = _word_names(ds, where)
        silence = words == SILENCE
        classes = self.classes
        # 12 classes: the 25 other words are "unknown"; 35: silence is dropped below
        other = classes.index(UNKNOWN) if UNKNOWN in classes else -1
        lut = {w: classes.index(w) if w in classes else other for w in HUB_NAMES}
        labels = np.array([lut[w] for w in words.tolist()], dtype=np.int64)
        speakers = np.array(["" if s is None else str(s) for s in column(ds, "speaker_id").tolist()], dtype=object)
        speakers[silence] = NO_ID
        base = (
            ds.remove_columns(["label", "speaker_id"])
            .add_column("label", labels)
            .add_column("speaker_id", speakers.tolist())
        )
        spoken = base.select(np.flatnonzero(~silence))
        if len(classes) == 35 or not silence.any():
            return spoken
        clips = _silence_clips(base.select(np.flatnonzero(silence)), classes.index(SILENCE), base.features)
        return concatenate_datasets([spoken, clips])

    def to_arrays(self, ds):
        sources = [row["audio"] for row in ds.select_columns(["audio"])]
        return clip_features(sources), column(ds, "label").astype(np.int64)


def _word_names(ds: Dataset, where: str) -> np.ndarray:
    feature = ds.features["label"]
    values = column(ds, "label")
    if isinstance(feature, ClassLabel):
        names = np.array(feature.names, dtype=object)
        words = names[values.astype(np.int64)] if len(values) else np.array([], dtype=object)
    elif isinstance(feature, Value) and feature.dtype in ("string", "large_string"):
        words = values.astype(object)
    else:
        values = values.astype(np.int64)
        if len(values) and (values.min() < 0 or values.max() >= len(HUB_NAMES)):
            raise DataError(f"{where}: integer label outside 0..{len(HUB_NAMES) - 1} (the hub's 35 words + silence)")
        words = np.array(HUB_NAMES, dtype=object)[values]
    unknown = sorted(set(words.tolist()) - set(HUB_NAMES))
    if unknown:
        raise DataError(f"{where}: unknown label {unknown[0]!r}; expected one of the 35 words or {SILENCE}")
    return words


def _silence_clips(rows: Dataset, label: int, features: Features) -> Dataset:
    """Silence rows as 1 s clips: long noise recordings cut up, 1 s clips kept."""
    audio = []
    for row in rows.select_columns(["audio"]):
        src = row["audio"]
        info = sf.info(_io(src))
        if info.frames <= info.samplerate:
            audio.append(src)
        else:
            audio += [{"bytes": b, "path": None} for b in one_second_clips(src)]
    clips = Dataset.from_dict(
        {"audio": audio, "label": [label] * len(audio), "speaker_id": [NO_ID] * len(audio)},
        features=Features({**features, "audio": AUDIO_STRUCT}),
    )
    return clips.cast_column("audio", features["audio"]) if isinstance(features["audio"], Audio) else clips


def _io(src: dict):
    return io.BytesIO(src["bytes"]) if src.get("bytes") else src["path"]


# -- the original archive, unpacked ----------------------------------------


def _is_wav_layout(root: Path) -> bool:
    return root.is_dir() and any((root / w).is_dir() for w in WORDS + [NOISE_DIR])


def read_wav_layout(data_dir: str) -> DatasetDict:
    """'train' and 'test' with the hub's columns from the unpacked archive.

    Word clips in testing_list.txt are the test split, those in
    validation_list.txt are left out (as in the hub's train split), the rest
    is train. Each noise recording is cut into 1 s clips, every 10th of which
    is a test clip.
    """
    root = data_root(data_dir, LAYOUTS)
    test_list = root / TEST_LIST
    if not test_list.is_file():
        raise DataError(f"data-dir {root}: no {TEST_LIST}; expected {LAYOUTS}")
    test = _read_list(test_list)
    validation = _read_list(root / VALIDATION_LIST) if (root / VALIDATION_LIST).is_file() else set()
    rows = {"train": [], "test": []}
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if not entry.is_dir() or entry.name.startswith("_"):
            continue
        if entry.name not in WORDS:
            raise DataError(f"{entry.path}: not one of the 35 Speech Commands words; expected {LAYOUTS}")
        for f in sorted(os.scandir(entry.path), key=lambda e: e.name):
            if not f.name.endswith(".wav"):
                continue
            rel = f"{entry.name}/{f.name}"
            speaker, sep, _ = f.name.partition("_nohash_")
            if not sep:
                raise DataError(f"{f.path}: file name is not <speaker>_nohash_<n>.wav, so its speaker is unknown")
            if rel in validation:
                continue
            row = ({"bytes": None, "path": f.path}, HUB_NAMES.index(entry.name), speaker)
            rows["test" if rel in test else "train"].append(row)
    noise = root / NOISE_DIR
    for path in sorted(noise.glob("*.wav")) if noise.is_dir() else []:
        for k, clip in enumerate(one_second_clips(str(path))):
            split = "test" if k % SILENCE_TEST_EVERY == SILENCE_TEST_EVERY - 1 else "train"
            rows[split].append(({"bytes": clip, "path": None}, HUB_NAMES.index(SILENCE), NO_ID))
    if not rows["train"]:
        raise DataError(f"data-dir {root}: no training clips found; expected {LAYOUTS}")
    return DatasetDict(
        {
            split: Dataset.from_dict(
                {"audio": [r[0] for r in items], "label": [r[1] for r in items], "speaker_id": [r[2] for r in items]},
                features=RAW_FEATURES,
            )
            for split, items in rows.items()
        }
    )


def _read_list(path: Path) -> set[str]:
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}
