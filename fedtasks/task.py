"""The loaders every caller uses: the task a run config names, a client's
(train, validation) split, the test set and the per-partition statistics."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch.utils.data import TensorDataset

from core.config import ConfigError

from .base import InputSpec, Task, cached, client_splits, column, data_key, tensors
from .registry import TASKS


def get_task(cfg: dict[str, Any]) -> Task:
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

    return cached(("part", data_key(cfg), spec, partition_id, num_partitions), make)


def load_test(cfg: dict[str, Any], spec: InputSpec) -> TensorDataset:
    def make():
        task = get_task(cfg)
        return tensors(*task.to_arrays(task.load_split(cfg, "test")), spec)

    return cached(("test", data_key(cfg), spec), make)


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

    return cached(("stats", data_key(cfg), num_partitions), make)
