"""Speech Commands from the unpacked archive and the hub's schema (offline):
speaker split, 12/35 classes, silence cut from background noise."""

import numpy as np
import pytest
import soundfile as sf

from core.config import ConfigError, validate
from fedtasks.audio import FEATURE_SHAPE
from fedtasks.base import DataError, InputSpec
from fedtasks.speechcommands import CLASSES, WORDS
from fedtasks.task import get_task, load_partition, load_test
from tests.task_fixtures import (
    cfg,
    clear_caches,
    fake_hub,
    hf_cache,  # noqa: F401 - fixture
    make_speech_hub_parquet,
    make_speech_wavs,
    partitions,
    row_keys,
    speech_hub_dataset,
)

pytestmark = pytest.mark.usefixtures("hf_cache")
SPEAKERS = 5  # the fixture's last speaker is the test speaker
WORDS_USED = ("yes", "no", "up", "cat", "visual")


@pytest.fixture(scope="module")
def wav_dir(tmp_path_factory, hf_cache):
    return make_speech_wavs(tmp_path_factory.mktemp("speech"), speakers=SPEAKERS, words=WORDS_USED)


def test_archive_layout_splits_by_lists(wav_dir):
    c = cfg("speechcommands", wav_dir)
    task = get_task(c)
    train, test = task.load_split(c, "train"), task.load_split(c, "test")
    test_speakers = set(test["speaker_id"]) - {""}
    assert test_speakers == {f"{SPEAKERS - 1:04x}beef"}
    assert not test_speakers & set(train["speaker_id"])
    listed = len((wav_dir / "testing_list.txt").read_text().split())
    silence = CLASSES[12].index("_silence_")
    # 3.5 s of noise -> 3 clips; every 10th goes to test, so none here
    assert list(test["label"]).count(silence) == 0 and list(train["label"]).count(silence) == 3
    assert len(test) == listed
    all_wavs = len(list(wav_dir.glob("*/*_nohash_*.wav")))
    assert len(train) == all_wavs - listed - 1 + 3  # one clip is in validation_list.txt


def test_twelve_classes_map_words_to_unknown(wav_dir):
    c = cfg("speechcommands", wav_dir)
    task = get_task(c)
    assert task.num_classes == 12
    _, labels = task.to_arrays(task.load_split(c, "test"))
    names = [CLASSES[12][i] for i in labels]
    assert set(names) == {"yes", "no", "up", "_unknown_"}  # cat, visual -> unknown


def test_one_speaker_per_partition_silence_dealt_nothing_lost(wav_dir):
    c = cfg("speechcommands", wav_dir)
    n = SPEAKERS - 1
    parts = partitions(c, n)
    speakers = [set(p["speaker_id"]) - {""} for p in parts]
    assert all(len(s) == 1 for s in speakers)
    assert len(set().union(*speakers)) == n, "a speaker is in two clients"
    keys = [k for p in parts for k in row_keys(p, "audio")]
    assert len(keys) == len(set(keys))
    assert sorted(keys) == sorted(row_keys(get_task(c).load_split(c, "train"), "audio"))
    silence = CLASSES[12].index("_silence_")
    assert sorted(list(p["label"]).count(silence) for p in parts) == [0, 1, 1, 1]


def test_same_seed_same_speakers(wav_dir):
    def drawn(seed):
        return [sorted(set(p["speaker_id"]) - {""}) for p in partitions(cfg("speechcommands", wav_dir, seed=seed), 2)]

    first = drawn(7)
    clear_caches()
    assert drawn(7) == first
    assert any(drawn(s) != first for s in range(8, 14))


def test_features_have_the_documented_shape(wav_dir):
    c = cfg("speechcommands", wav_dir)
    task = get_task(c)
    feats, labels = task.to_arrays(task.partition(c, 0, 2))
    assert feats.shape == (len(labels), *FEATURE_SHAPE) == (len(labels), 128, 101)
    assert np.isfinite(feats).all() and feats.min() >= 0.0 and feats.max() <= 1.0
    train, _ = load_partition(c, InputSpec(in_chans=3, img_size=32), 0, 2)
    x, _ = train[0]
    assert x.shape == (3, 32, 32) and bool(x.isfinite().all())
    assert len(load_test(c, InputSpec(in_chans=1, img_size=28))) == len(task.load_split(c, "test"))


def test_thirty_five_words_no_silence(wav_dir):
    c = cfg("speechcommands", wav_dir, **{"speech-classes": 35})
    task = get_task(c)
    assert task.num_classes == 35
    labels = set(task.load_split(c, "train")["label"])
    assert labels == {WORDS.index(w) for w in WORDS_USED}


def test_hub_schema_cuts_long_silence_and_drops_missing_speakers(tmp_path):
    c = cfg("speechcommands", make_speech_hub_parquet(tmp_path / "hub", speakers=4))
    task = get_task(c)
    train = task.load_split(c, "train")
    silence = CLASSES[12].index("_silence_")
    assert list(train["label"]).count(silence) == 2 * 3  # two 3.2 s recordings -> 3 clips each
    assert set(train["speaker_id"]) == {"", *(f"{s:04x}cafe" for s in range(4))}
    parts = partitions(c, 4)
    assert [len(set(p["speaker_id"]) - {""}) for p in parts] == [1, 1, 1, 1]
    feats, _ = task.to_arrays(parts[0])
    assert feats.shape[1:] == FEATURE_SHAPE and np.isfinite(feats).all()


def test_hub_path_asks_for_v002_and_splits_by_speaker(monkeypatch):
    from datasets import DatasetDict

    clear_caches()
    rng = np.random.default_rng(0)
    asked = fake_hub(
        monkeypatch,
        DatasetDict(
            {"train": speech_hub_dataset(rng, 3, ("go", "bed"), 2.5), "test": speech_hub_dataset(rng, 1, ("go",), 1.0)}
        ),
    )
    c = cfg("speechcommands", "")
    parts = partitions(c, 3)
    assert asked[0] == ("google/speech_commands", "v0.02")
    assert [len(set(p["speaker_id"]) - {""}) for p in parts] == [1, 1, 1]
    assert sum(len(p) for p in parts) == 3 * 2 + 2 * 2  # words + two 2.5 s recordings cut in 2 clips each
    clear_caches()


def test_speech_classes_is_validated():
    with pytest.raises(ConfigError, match="'speech-classes'"):
        validate({"speech-classes": 20})


def test_malformed_archives_name_the_path(tmp_path, wav_dir):
    import shutil

    root = tmp_path / "nolist"
    shutil.copytree(wav_dir, root)
    (root / "testing_list.txt").unlink()
    with pytest.raises(DataError, match=f"{root}.*testing_list.txt"):
        get_task(cfg("speechcommands", root)).load_split(cfg("speechcommands", root), "train")
    (root / "testing_list.txt").write_text("")
    (root / "yes" / "nospeaker.wav").write_bytes(b"")
    with pytest.raises(DataError, match="nospeaker.wav.*<speaker>_nohash_<n>.wav"):
        get_task(cfg("speechcommands", root)).load_split(cfg("speechcommands", root), "train")
    (root / "yes" / "nospeaker.wav").unlink()
    (root / "hello").mkdir()
    with pytest.raises(DataError, match="hello.*35 Speech Commands words"):
        get_task(cfg("speechcommands", root)).load_split(cfg("speechcommands", root), "train")


def test_unreadable_clip_names_the_file(tmp_path):
    root = make_speech_wavs(tmp_path / "s", speakers=2, words=("go",), test_speakers=0, noise_seconds=0.5)
    bad = sorted((root / "go").glob("*.wav"))[-1]  # [0] is in validation_list.txt
    bad.write_bytes(b"RIFF not really a wav")
    c = cfg("speechcommands", root)
    task = get_task(c)
    with pytest.raises(DataError, match=bad.name):
        task.to_arrays(task.load_split(c, "train"))
    sf.write(bad, np.zeros(8000, dtype=np.float32), 8000)  # 0.5 s at 8 kHz: resampled and padded
    feats, _ = task.to_arrays(task.load_split(c, "train"))
    assert feats.shape[1:] == FEATURE_SHAPE
