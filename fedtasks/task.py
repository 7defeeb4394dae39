"""The Task interface and the partition/test loaders shared by every task."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from datasets import Dataset
from flwr_datasets.partitioner import DirichletPartitioner, Partitioner
from torch.utils.data import Subset, TensorDataset

from .base import InputSpec, split_indices, tensors


class Task:
    """A federated benchmark. Subclasses fill in the data source."""

    name: str = ""
    num_classes: int = 0
    label_column: str = "label"

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
        p = self.partitioner(cfg, num_partitions)
        p.dataset = self.load_split(cfg, "train")
        return p.load_partition(partition_id)


def _cfg_key(cfg: dict[str, Any]) -> tuple:
    keys = ("task", "data-dir", "dirichlet-alpha", "seed", "val-fraction")
    return tuple(cfg[k] for k in keys)


_cache: dict[tuple, Any] = {}


def _cached(key, make):
    # Clients in one simulation worker serve many partitions; loading and
    # converting the data once per process saves most of a round's start-up.
    if key not in _cache:
        _cache[key] = make()
    return _cache[key]


def get_task(cfg: dict[str, Any]) -> Task:
    from .registry import TASKS

    return TASKS[cfg["task"]]()


def load_partition(cfg: dict[str, Any], spec: InputSpec, partition_id: int, num_partitions: int):
    """(train, validation) TensorDatasets of one client, split with a fixed seed."""

    def make():
        task = get_task(cfg)
        part = task.partition(cfg, partition_id, num_partitions)
        images, labels = task.to_arrays(part)
        full = tensors(images, labels, spec)
        tr, va = split_indices(len(full), cfg["val-fraction"], cfg["seed"] + partition_id)
        return Subset(full, tr.tolist()), Subset(full, va.tolist())

    return _cached(("part", _cfg_key(cfg), spec, partition_id, num_partitions), make)


def load_test(cfg: dict[str, Any], spec: InputSpec) -> TensorDataset:
    def make():
        task = get_task(cfg)
        return tensors(*task.to_arrays(task.load_split(cfg, "test")), spec)

    return _cached(("test", _cfg_key(cfg), spec), make)


@functools.lru_cache(maxsize=8)
def _stats(key, num_partitions, cfg_items):
    cfg = dict(cfg_items)
    task = get_task(cfg)
    p = task.partitioner(cfg, num_partitions)
    p.dataset = task.load_split(cfg, "train")
    rows = []
    for pid in range(num_partitions):
        labels = np.asarray(p.load_partition(pid)[task.label_column])
        counts = np.bincount(labels, minlength=task.num_classes)
        rows.append({"partition-id": pid, "examples": int(len(labels)), "classes": int((counts > 0).sum()),
                     "label-counts": counts.tolist()})
    return rows


def partition_stats(cfg: dict[str, Any], num_partitions: int) -> list[dict]:
    """Examples and classes per partition, for the user to see the heterogeneity."""
    return _stats(_cfg_key(cfg), num_partitions, tuple(sorted(cfg.items())))
