"""CIFAR-100 from local layouts (offline) and through FederatedDataset with a faked hub."""

import numpy as np
import pytest
from datasets import DatasetDict

from core.config import ConfigError, validate
from fedtasks.base import DataError, InputSpec
from fedtasks.cifar100 import CLASSES
from fedtasks.task import get_task, load_partition, load_test, partition_stats
from tests.task_fixtures import (
    cfg,
    cifar_dataset,
    clear_caches,
    fake_hub,
    hf_cache,  # noqa: F401 - fixture
    make_cifar_arrow,
    make_cifar_imagefolder,
    make_cifar_parquet,
    partitions,
    row_keys,
)

pytestmark = pytest.mark.usefixtures("hf_cache")


@pytest.fixture(scope="module")
def parquet_dir(tmp_path_factory, hf_cache):
    return make_cifar_parquet(tmp_path_factory.mktemp("cifar-parquet"))


def test_parquet_layout_loads_both_splits(parquet_dir):
    c = cfg("cifar100", parquet_dir)
    task = get_task(c)
    train, test = task.load_split(c, "train"), task.load_split(c, "test")
    assert (len(train), len(test)) == (300, 100)
    images, labels = task.to_arrays(test)
    assert images.shape == (100, 32, 32, 3) and images.dtype == np.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert sorted(labels.tolist()) == list(range(100))


def test_partitions_cover_the_training_set_once(parquet_dir):
    c = cfg("cifar100", parquet_dir)
    parts = partitions(c, 7)
    assert len(parts) == 7 and all(len(p) > 0 for p in parts)
    keys = [k for p in parts for k in row_keys(p, "image")]
    train_keys = row_keys(get_task(c).load_split(c, "train"), "image")
    assert len(keys) == len(set(keys)), "an example is in two partitions"
    assert sorted(keys) == sorted(train_keys), "partitions lost or invented examples"


def test_same_seed_same_partitions_other_seed_other(parquet_dir):
    a = [row_keys(p, "image") for p in partitions(cfg("cifar100", parquet_dir, seed=3), 5)]
    clear_caches()  # recompute from the files, not from the per-process cache
    b = [row_keys(p, "image") for p in partitions(cfg("cifar100", parquet_dir, seed=3), 5)]
    c = [row_keys(p, "image") for p in partitions(cfg("cifar100", parquet_dir, seed=4), 5)]
    assert a == b
    assert a != c


def test_smaller_alpha_is_more_skewed(parquet_dir):
    def mean_classes(alpha):
        return np.mean(
            [r["classes"] for r in partition_stats(cfg("cifar100", parquet_dir, **{"dirichlet-alpha": alpha}), 5)]
        )

    assert validate({})["dirichlet-alpha"] == 0.5
    assert mean_classes(0.05) < mean_classes(100.0)


def test_client_tensors_and_server_test_set(parquet_dir):
    c = cfg("cifar100", parquet_dir)
    spec = InputSpec(in_chans=3, img_size=16)
    train, val = load_partition(c, spec, 0, 4)
    x, y = train[0]
    assert x.shape == (3, 16, 16) and 0 <= int(y) < 100
    assert len(train) + len(val) == len(get_task(c).partition(c, 0, 4))
    assert len(load_test(c, spec)) == 100


def test_arrow_and_imagefolder_layouts(tmp_path):
    c = cfg("cifar100", make_cifar_arrow(tmp_path / "arrow"))
    assert len(get_task(c).load_split(c, "train")) == 200
    c = cfg("cifar100", make_cifar_imagefolder(tmp_path / "folders"))
    task = get_task(c)
    _, labels = task.to_arrays(task.load_split(c, "test"))
    # folders are named after classes: they get the hub's indices, not 0, 1, 2, 3 (and the
    # class "train" is a class, not a split)
    assert sorted(labels.tolist()) == [CLASSES.index(c) for c in ("apple", "bear", "train", "worm")] == [0, 3, 90, 99]
    assert len(task.load_split(c, "train")) == 4 * 4


def test_unreadable_image_names_the_file(tmp_path):
    root = make_cifar_imagefolder(tmp_path / "folders", classes=("apple", "bear"), per_class=2)
    bad = root / "train" / "bear" / "1.png"
    bad.write_bytes(b"not a png")
    c = cfg("cifar100", root)
    task = get_task(c)
    with pytest.raises(DataError, match=str(bad)):
        task.to_arrays(task.load_split(c, "train"))


def test_hub_path_goes_through_federated_dataset(monkeypatch):
    clear_caches()
    # the hub's own column names and splits
    rng = np.random.default_rng(0)
    hub = DatasetDict({"train": cifar_dataset(rng, 3), "test": cifar_dataset(rng, 1)})
    asked = fake_hub(monkeypatch, hub)
    remote = cfg("cifar100", "", seed=11)
    task = get_task(remote)
    parts = partitions(remote, 4)
    assert asked and asked[0] == ("uoft-cs/cifar100", None)
    assert sum(len(p) for p in parts) == 300
    assert len(get_task(remote).load_split(remote, "test")) == 100
    # same data, same seed: the hub path splits exactly like the local path
    hub_labels = [sorted(p["label"]) for p in parts]
    p = task.partitioner(remote, 4)
    p.dataset = task.prepare(hub)["train"]
    assert hub_labels == [sorted(p.load_partition(i)["label"]) for i in range(4)]
    clear_caches()


def test_hub_failure_is_a_data_error(monkeypatch):
    import datasets
    import flwr_datasets.common.telemetry as telemetry

    monkeypatch.setattr(telemetry, "FLWR_TELEMETRY_ENABLED", "0")

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    c = cfg("cifar100", "", **{"hub-dataset": "someone/cifar100-copy"})
    with pytest.raises(DataError, match="someone/cifar100-copy.*data-dir"):
        get_task(c).load_split(c, "test")
    clear_caches()


def test_missing_and_malformed_local_data(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "nope")):
        get_task(cfg("cifar100", tmp_path / "nope")).load_split(cfg("cifar100", tmp_path / "nope"), "train")
    (tmp_path / "empty").mkdir()
    c = cfg("cifar100", tmp_path / "empty")
    with pytest.raises(DataError, match="no 'train' split"):
        get_task(c).load_split(c, "train")
    bad = tmp_path / "bad"
    bad.mkdir()
    rng = np.random.default_rng(0)
    cifar_dataset(rng, 1).rename_column("fine_label", "klass").to_parquet(str(bad / "train.parquet"))
    cifar_dataset(rng, 1).to_parquet(str(bad / "test.parquet"))
    c = cfg("cifar100", bad)
    with pytest.raises(DataError, match="'fine_label' or 'label'"):
        get_task(c).load_split(c, "train")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "train.parquet").write_bytes(b"not parquet")
    (broken / "test.parquet").write_bytes(b"not parquet")
    c = cfg("cifar100", broken)
    with pytest.raises(DataError, match=f"{broken}.*could not read"):
        get_task(c).load_split(c, "train")


def test_unknown_task_names_the_key():
    with pytest.raises(ConfigError, match="'task'.*cifar100.*femnist.*speechcommands"):
        get_task(validate({"task": "cifar10"}))
