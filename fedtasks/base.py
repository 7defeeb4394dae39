"""What every federated task provides, and the shared tensor plumbing.

A task turns its source (hub or local files) into a Hugging Face `Dataset`
with `image` (array) and `label` columns, partitions the training split with
a Flower Datasets partitioner, and hands out tensors already brought to the
backbone's input (channels, size, normalisation) so clients do that work once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from core.config import keys_in

if TYPE_CHECKING:  # only for annotations: importing them costs seconds
    from datasets import Dataset
    from flwr_datasets.partitioner import Partitioner


# Run-config keys that decide what data a task hands out.
DATA_KEYS = ("task", "data-dir", "hub-dataset", "speech-classes", "dirichlet-alpha", "seed", "val-fraction")


class DataError(ValueError):
    """A missing or malformed dataset; the message names the path and what was expected."""


@dataclass(frozen=True)
class InputSpec:
    """The backbone's input: what every image is brought to."""

    in_chans: int
    img_size: int
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)


def to_backbone(images: np.ndarray | torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """(N,H,W) or (N,H,W,C) or (N,C,H,W) pixels in [0,1] -> normalised (N,C,S,S) float32."""
    x = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    if x.ndim == 3:
        x = x.unsqueeze(1)
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] != spec.in_chans:
        # grey -> RGB repeats the channel; RGB -> grey averages (ITU weights matter little here)
        x = x.mean(1, keepdim=True).expand(-1, spec.in_chans, -1, -1) if spec.in_chans in (1, 3) else None
        if x is None:
            raise DataError(f"cannot bring images to {spec.in_chans} channels")
        x = x.contiguous()
    if x.shape[-2:] != (spec.img_size, spec.img_size):
        x = F.interpolate(x, size=(spec.img_size, spec.img_size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(_per_channel(spec.mean, spec.in_chans)).view(1, -1, 1, 1)
    std = torch.tensor(_per_channel(spec.std, spec.in_chans)).view(1, -1, 1, 1)
    return (x - mean) / std


def _per_channel(values, n):
    values = tuple(values)
    return values * n if len(values) == 1 else values[:n] if len(values) >= n else (sum(values) / len(values),) * n


def tensors(images: np.ndarray, labels: np.ndarray, spec: InputSpec) -> TensorDataset:
    return TensorDataset(to_backbone(images, spec), torch.as_tensor(np.asarray(labels), dtype=torch.long))


def client_splits(images: np.ndarray, labels: np.ndarray, spec: InputSpec, val_fraction: float, seed: int):
    """(train, validation) Subsets of one partition, split with a fixed seed."""
    from torch.utils.data import Subset

    full = tensors(images, labels, spec)
    tr, va = split_indices(len(full), val_fraction, seed)
    return Subset(full, tr.tolist()), Subset(full, va.tolist())


def column(ds, name: str) -> np.ndarray:
    """One column of a Hugging Face Dataset as an array, in one read.

    Indexing a `datasets` 4 Dataset by name gives a lazy Column whose
    iteration reads row by row; this reads only that column, at once.
    """
    return np.asarray(ds.select_columns([name]).with_format("numpy")[:][name])


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed-seed train/validation split of range(n); validation may be empty."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction)) if n > 1 else 0
    n_val = min(n_val, n - 1) if n > 1 else 0
    return np.sort(order[n_val:]), np.sort(order[:n_val])


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
        from flwr_datasets.partitioner import DirichletPartitioner

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
        return cached(("partitioner", data_key(cfg), num_partitions), make).load_partition(partition_id)


# Run-config keys that decide what data a task hands out.
DATA_KEYS = keys_in("data")


def data_key(cfg: dict[str, Any]) -> tuple:
    return tuple(cfg.get(k) for k in DATA_KEYS)


_cache: dict[tuple, Any] = {}


def cached(key, make):
    # Clients in one simulation worker serve many partitions; loading and
    # converting the data once per process saves most of a round's start-up.
    if key not in _cache:
        _cache[key] = make()
    return _cache[key]
