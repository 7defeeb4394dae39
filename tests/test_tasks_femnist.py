"""FEMNIST from local layouts (offline): one writer per client, 62 classes, 28x28 grey."""

import pytest
from datasets import DatasetDict

from fedtasks.base import DataError, InputSpec
from fedtasks.femnist import TEST_FRACTION
from fedtasks.task import get_task, load_partition
from tests.task_fixtures import (
    cfg,
    clear_caches,
    fake_hub,
    hf_cache,  # noqa: F401 - fixture
    make_femnist_imagefolder,
    make_femnist_parquet,
    partitions,
    row_keys,
)

pytestmark = pytest.mark.usefixtures("hf_cache")
WRITERS = 6


@pytest.fixture(scope="module")
def femnist_dir(tmp_path_factory, hf_cache):
    return make_femnist_parquet(tmp_path_factory.mktemp("femnist"), writers=WRITERS)


def writers_of(ds):
    return sorted(set(ds["writer_id"]))


def test_test_split_is_a_fixed_tenth_of_the_hub_train_split(femnist_dir):
    c = cfg("femnist", femnist_dir)
    task = get_task(c)
    train, test = task.load_split(c, "train"), task.load_split(c, "test")
    total = sum(5 + w for w in range(WRITERS))
    assert len(train) + len(test) == total and len(test) == round(TEST_FRACTION * total)
    assert not set(row_keys(train, "image")) & set(row_keys(test, "image"))
    images, labels = task.to_arrays(test)
    assert images.shape == (len(test), 28, 28) and labels.max() < 62 and task.num_classes == 62


def test_one_writer_per_partition_and_nothing_lost(femnist_dir):
    c = cfg("femnist", femnist_dir)
    parts = partitions(c, WRITERS)
    assert all(len(writers_of(p)) == 1 for p in parts)
    assert len({writers_of(p)[0] for p in parts}) == WRITERS
    keys = [k for p in parts for k in row_keys(p, "image")]
    assert sorted(keys) == sorted(row_keys(get_task(c).load_split(c, "train"), "image"))


def test_fewer_nodes_than_writers_draws_writers_by_seed(femnist_dir):
    def drawn(seed):
        return [writers_of(p) for p in partitions(cfg("femnist", femnist_dir, seed=seed), 3)]

    first = drawn(0)
    assert all(len(w) == 1 for w in first) and len({w[0] for w in first}) == 3
    clear_caches()
    assert drawn(0) == first
    assert any(drawn(s) != first for s in range(1, 6))


def test_more_nodes_than_writers_says_so(femnist_dir):
    c = cfg("femnist", femnist_dir)
    with pytest.raises(DataError, match=f"{WRITERS} writers.*at most {WRITERS} nodes"):
        get_task(c).partition(c, 0, WRITERS + 1)


def test_grey_images_reach_a_three_channel_backbone(femnist_dir):
    train, _ = load_partition(cfg("femnist", femnist_dir), InputSpec(in_chans=3, img_size=32), 0, WRITERS)
    x, _ = train[0]
    assert x.shape == (3, 32, 32) and bool((x[0] == x[2]).all())


def test_imagefolder_with_metadata(tmp_path):
    c = cfg("femnist", make_femnist_imagefolder(tmp_path / "f", writers=3))
    task = get_task(c)
    assert len(task.load_split(c, "train")) + len(task.load_split(c, "test")) == 3 + 4 + 5
    parts = partitions(c, 3)
    assert [len(writers_of(p)) for p in parts] == [1, 1, 1]


def test_hub_path_with_its_single_split(femnist_dir, monkeypatch):
    clear_caches()
    from datasets import load_dataset

    raw = load_dataset("parquet", data_files={"train": [str(p) for p in femnist_dir.glob("*.parquet")]})
    asked = fake_hub(monkeypatch, DatasetDict(raw))
    c = cfg("femnist", "")
    parts = partitions(c, 4)
    assert asked[0] == ("flwrlabs/femnist", None)
    assert all(len(writers_of(p)) == 1 for p in parts)
    assert len(get_task(c).load_split(c, "test")) == round(TEST_FRACTION * len(raw["train"]))
    clear_caches()


def test_missing_writer_column_names_it(tmp_path):
    root = make_femnist_imagefolder(tmp_path / "f", writers=2)
    meta = root / "train" / "metadata.csv"
    meta.write_text(meta.read_text().replace("writer_id", "author"))
    c = cfg("femnist", root)
    with pytest.raises(DataError, match="'writer_id' column"):
        get_task(c).load_split(c, "train")
