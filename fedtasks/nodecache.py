"""A node's partition kept on its disk between messages, as plain arrays.

Each message of a Flower deployment runs in a fresh process; reading the
task's data, partitioning it and converting it costs seconds and imports
the data libraries (`datasets`, Flower Datasets, scikit-learn). The first
message stores the partition's images and labels as an uncompressed .npz
(read back with `allow_pickle=False`) and the task's class count as JSON,
under a key made of every run-config value that decides the data, the
partition id and count, this package's source, the data libraries'
versions and, for a local `data-dir`, the size and modification time of
every file in it. A changed config or changed files give a new key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from .base import DATA_KEYS, InputSpec, client_splits

log = logging.getLogger(__name__)
ARRAYS, META = "partition.npz", "meta.json"
_LIBRARIES = ("datasets", "flwr-datasets", "scikit-learn", "numpy", "pillow", "soundfile")
# Per process too: a simulation worker serves many messages.
_arrays: dict[str, tuple[np.ndarray, np.ndarray, int]] = {}
_splits: dict[tuple, tuple] = {}


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return ""


def _files_stamp(folder: str) -> list:
    """(path, size, mtime) of every file under a local data folder."""
    root = Path(folder).expanduser()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            st = os.stat(os.path.join(dirpath, name))
            out.append([os.path.relpath(os.path.join(dirpath, name), root), st.st_size, st.st_mtime_ns])
    return out


def partition_key(cfg: dict[str, Any], partition_id: int, num_partitions: int) -> str:
    here = Path(__file__).resolve().parent
    code = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(here.glob("*.py")))).hexdigest()
    parts = {
        "cfg": {k: cfg.get(k) for k in DATA_KEYS},
        "partition": [partition_id, num_partitions],
        "code": code,
        "libraries": {d: _version(d) for d in _LIBRARIES},
        "files": _files_stamp(cfg["data-dir"]) if cfg.get("data-dir") else [],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def _read(folder: Path) -> tuple[np.ndarray, np.ndarray, int] | None:
    if not (folder / META).is_file():
        return None
    try:
        meta = json.loads((folder / META).read_text())
        with np.load(folder / ARRAYS, allow_pickle=False) as f:
            return f["images"], f["labels"], int(meta["num_classes"])
    except Exception as err:  # noqa: BLE001 - a damaged entry of any kind is rebuilt, not fatal
        log.warning("removing the unreadable partition cache in %s (%s); rebuilding it", folder, err)
        shutil.rmtree(folder, ignore_errors=True)
        return None


def _write(folder: Path, images: np.ndarray, labels: np.ndarray, num_classes: int) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
    try:
        np.savez(tmp / ARRAYS, images=images, labels=labels)
        (tmp / META).write_text(json.dumps({"num_classes": num_classes, "examples": int(len(labels))}))
        # Readers see a whole entry or none; another process may have won the race.
        os.rename(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / META).is_file():
            raise


def partition_arrays(
    cfg: dict[str, Any], partition_id: int, num_partitions: int, cache_dir: Path
) -> tuple[str, np.ndarray, np.ndarray, int]:
    """(key, images, labels, num_classes) of one partition; from `cache_dir` when it holds them."""
    key = partition_key(cfg, partition_id, num_partitions)
    if key not in _arrays:
        folder = Path(cache_dir) / "partition" / key
        found = _read(folder)
        if found is None:
            from .task import get_task  # the data libraries, only when the data must be read

            task = get_task(cfg)
            images, labels = task.to_arrays(task.partition(cfg, partition_id, num_partitions))
            found = np.ascontiguousarray(images), np.ascontiguousarray(labels), task.num_classes
            try:
                _write(folder, *found)
            except OSError as err:
                log.warning(
                    "could not write the partition cache in %s (%s); each message reads the data again", folder, err
                )
        _arrays[key] = found
    return (key, *_arrays[key])


def client_datasets(cfg: dict[str, Any], spec: InputSpec, partition_id: int, num_partitions: int, cache_dir: Path):
    """(train, validation) of a partition, split as `fedtasks.task.load_partition` splits it."""
    key, images, labels, _ = partition_arrays(cfg, partition_id, num_partitions, cache_dir)
    if (key, spec) not in _splits:
        _splits[key, spec] = client_splits(images, labels, spec, cfg["val-fraction"], cfg["seed"] + partition_id)
    return _splits[key, spec]
