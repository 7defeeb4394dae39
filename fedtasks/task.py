"""The Task interface and the partition/test loaders shared by every task."""

from __future__ import annotations

from typing import Any

import numpy as np
from datasets import Dataset
from flwr_datasets.partitioner import DirichletPartitioner, Partitioner
from torch.utils.data import TensorDataset

from anytime_fl.config import ConfigError

from .base import DATA_KEYS, InputSpec, client_splits, column, tensors


class Task:
    """A federated benchmark. Subclasses fill in the data source."""

    name: str = ""
    num_classes: int = 0
    label_column: str = "label"
    id_column: str = ""  # the natural id (writer, speaker) of a natural split

    def __init__(self, cfg: dict[str, Any] | None = None):
        self.cfg = cfg or {}

    def load_split(self, cfg: dict[str, Any], split: str) -> Dataset:
        """The 'train' or 'test' split as a Dataset (hub or local files)."""
        raise NotImplementedError

    def to_arrays(self, ds: Dataset) -> tuple[np.ndarray, np.ndarray]:
        """Pixels in [0,1] as (N,H,W[,C]) and integer labels."""
        raise NotImplementedError

    def partitioner(self, cfg: dict[str, Any], num_partitions: int) -> Partitioner:
        """Label-skewed Dirichlet split unless the task has a natural one."""
        return DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by=self.label_column,
            alpha=cfg["dirichlet-alpha"],
            min_partition_size=min(10, max(1, self._train_size(cfg) // (2 * num_partitions))),
            self_balancing=True,
            seed=cfg["seed"],
        )

    def _train_size(self, cfg) -> int:
        return len(self.load_split(cfg, "train"))

    def partition(self, cfg: dict[str, Any], partition_id: int, num_partitions: int) -> Dataset:
        def make():
            p = self.partitioner(cfg, num_partitions)
            p.dataset = self.load_split(cfg, "train")
            return p

        # One partitioner per process: a Dirichlet draw or a natural-id index
        # over the whole training set is the same for every partition id.
        return _cached(("partitioner", _cfg_key(cfg), num_partitions), make).load_partition(partition_id)


def _cfg_key(cfg: dict[str, Any]) -> tuple:
    return tuple(cfg.get(k) for k in DATA_KEYS)


_cache: dict[tuple, Any] = {}


def _cached(key, make):
    # Clients in one simulation worker serve many partitions; loading and
    # converting the data once per process saves most of a round's start-up.
    if key not in _cache:
        _cache[key] = make()
    return _cache[key]


def get_task(cfg: dict[str, Any]) -> Task:
    from .registry import TASKS

    if cfg["task"] not in TASKS:
        raise ConfigError("task", f"unknown task {cfg['task']!r}; known: {', '.join(sorted(TASKS))}")
    return TASKS[cfg["task"]](cfg)


def load_partition(cfg: dict[str, Any], spec: InputSpec, partition_id: int, num_partitions: int):
    """(train, validation) TensorDatasets of one client, split with a fixed seed."""

    def make():
        task = get_task(cfg)
        part = task.partition(cfg, partition_id, num_partitions)
        images, labels = task.to_arrays(part)
        return client_splits(images, labels, spec, cfg["val-fraction"], cfg["seed"] + partition_id)

    return _cached(("part", _cfg_key(cfg), spec, partition_id, num_partitions), make)


def load_test(cfg: dict[str, Any], spec: InputSpec) -> TensorDataset:
    def make():
        task = get_task(cfg)
        return tensors(*task.to_arrays(task.load_split(cfg, "test")), spec)

    return _cached(("test", _cfg_key(cfg), spec), make)


def partition_stats(cfg: dict[str, Any], num_partitions: int) -> list[dict]:
    """Examples and classes per partition, for the user to see the heterogeneity."""

    def make():
        task = get_task(cfg)
        rows = []
        for pid in range(num_partitions):
            part = task.partition(cfg, pid, num_partitions)
            labels = column(part, task.label_column).astype(np.int64)
            counts = np.bincount(labels, minlength=task.num_classes)
            row = {"partition-id": pid, "examples": int(len(labels)), "classes": int((counts > 0).sum())}
            if task.id_column:
                ids = sorted({str(v) for v in column(part, task.id_column).tolist()} - {""})
                row[task.id_column] = ",".join(ids)
            row["label-counts"] = counts.tolist()
            rows.append(row)
        return rows

    return _cached(("stats", _cfg_key(cfg), num_partitions), make)
