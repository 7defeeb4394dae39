"""Natural splits: one writer (FEMNIST) or one speaker (Speech Commands) per client."""

from __future__ import annotations

import numpy as np
from datasets import Dataset, concatenate_datasets
from flwr_datasets.partitioner import NaturalIdPartitioner, Partitioner

from .base import DataError, column

NO_ID = ""  # rows no one owns, e.g. silence clips cut from background noise


class _NaturalIds(NaturalIdPartitioner):
    """Flower Datasets' NaturalIdPartitioner with its index built by numpy.

    Same ids, same order (sorted), same partitions. Under `datasets` 4 a
    column is a lazy sequence that the parent reads row by row (~9 s per 100k
    rows: minutes for FEMNIST's 800k), and `Dataset.unique` rewrites a
    dataset that has an indices mapping; reading the column once as an array
    avoids both.
    """

    _ids: np.ndarray | None = None

    def _id_array(self) -> np.ndarray:
        if self._ids is None:
            self._ids = column(self.dataset, self._partition_by).astype(object)
        return self._ids

    def _create_int_partition_id_to_natural_id(self) -> None:
        self._partition_id_to_natural_id = dict(enumerate(np.unique(self._id_array()).tolist()))

    def _create_partition_id_to_indices(self) -> None:
        _, inverse = np.unique(self._id_array(), return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        bounds = np.searchsorted(inverse[order], np.arange(len(self._partition_id_to_natural_id) + 1))
        self._partition_id_to_indices = {k: order[bounds[k] : bounds[k + 1]] for k in range(len(bounds) - 1)}


class OneIdPerPartition(Partitioner):
    """`num_partitions` natural ids drawn with `seed`, each the whole of one partition.

    Flower Datasets' `NaturalIdPartitioner` makes one partition per id in the
    data (3,597 FEMNIST writers, ~2,600 speakers), while a federation has as
    many partitions as nodes. So the ids are sampled, as LEAF samples FEMNIST
    writers: each node gets every example of one writer/speaker and no id is
    shared, while examples of the ids not drawn stay unused. Rows whose id is
    `NO_ID` (Speech Commands' silence, recorded by no speaker) are dealt
    evenly over all partitions with the same seed.
    """

    def __init__(self, partition_by: str, num_partitions: int, seed: int, what: str = "natural id"):
        super().__init__()
        if num_partitions < 1:
            raise ValueError("num_partitions must be >= 1")
        self._natural = _NaturalIds(partition_by=partition_by)
        self._num_partitions = num_partitions
        self._seed = seed
        self._what = what
        self._chosen: list[int] | None = None  # natural partition per partition id
        self._shared: list[np.ndarray] = []  # rows of the NO_ID pool per partition id
        self._pool: Dataset | None = None

    @property
    def dataset(self) -> Dataset:
        return Partitioner.dataset.fget(self)

    @dataset.setter
    def dataset(self, value: Dataset) -> None:
        Partitioner.dataset.fset(self, value)
        self._natural.dataset = value

    @property
    def num_partitions(self) -> int:
        return self._num_partitions

    def _build(self) -> None:
        if self._chosen is not None:
            return
        ids = self._natural.partition_id_to_natural_id if self._natural.num_partitions else {}
        owned = [k for k, v in sorted(ids.items()) if v not in (NO_ID, None)]
        if self._num_partitions > len(owned):
            raise DataError(
                f"the training data has {len(owned)} {self._what}s, too few for {self._num_partitions} "
                f"partitions of one {self._what} each: run with at most {len(owned)} nodes"
            )
        rng = np.random.default_rng(self._seed)
        self._chosen = [owned[i] for i in sorted(rng.choice(len(owned), self._num_partitions, replace=False))]
        pool_ids = [k for k, v in ids.items() if v in (NO_ID, None)]
        if pool_ids:
            self._pool = self._natural.load_partition(pool_ids[0])
            self._shared = [np.sort(c) for c in np.array_split(rng.permutation(len(self._pool)), self._num_partitions)]

    def natural_id(self, partition_id: int):
        """The writer/speaker a partition holds."""
        self._build()
        return self._natural.partition_id_to_natural_id[self._chosen[partition_id]]

    def load_partition(self, partition_id: int) -> Dataset:
        if not 0 <= partition_id < self._num_partitions:
            raise ValueError(f"partition_id {partition_id} is outside 0..{self._num_partitions - 1}")
        self._build()
        own = self._natural.load_partition(self._chosen[partition_id])
        if self._pool is None or not len(self._shared[partition_id]):
            return own
        return concatenate_datasets([own, self._pool.select(self._shared[partition_id])])
