"""Benchmarks that come from the Hugging Face hub or, offline, a local folder.

`data-dir = ''` loads the task's hub dataset through Flower Datasets'
`FederatedDataset` (needs a network); a folder path loads the same data from
local files (`fedtasks.local`). Either way the raw splits go through the
task's `prepare`, which renames the columns to `image`/`audio`, `label` and
the natural id, so partitioning and conversion are the same for both.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Image, Value

from .base import DataError, Task, column
from .local import load_local

# Per process: clients in one simulation worker serve many partitions, and
# listing or opening the full data set (tens of thousands of files) once is enough.
_splits: dict[tuple, DatasetDict] = {}
_federated: dict[tuple, Any] = {}


class SourcedTask(Task):
    """A task with a hub dataset and a local layout of the same data."""

    hub_dataset: str = ""  # "name" or "name:config"
    layouts: str = ""  # the local layouts, in words, for error messages
    required_splits: tuple[str, ...] = ("train", "test")

    def prepare(self, raw: DatasetDict) -> DatasetDict:
        """Raw hub/local splits -> 'train' and 'test' with the task's columns."""
        raise NotImplementedError

    def load_local(self, data_dir: str) -> DatasetDict:
        """The raw splits in `data_dir`, with the hub's columns."""
        return load_local(data_dir, ("train", "test"), self.layouts, self.required_splits)

    # -- where the data comes from --------------------------------------

    def _hub_name(self, cfg) -> tuple[str, str | None]:
        repo, _, config = (cfg.get("hub-dataset") or self.hub_dataset).partition(":")
        return repo, config or None

    def _source_key(self, cfg) -> tuple:
        return (self.name, cfg["data-dir"], cfg["hub-dataset"], *self.variant(cfg))

    def variant(self, cfg) -> tuple:
        """Run-config values that change what `prepare` makes."""
        return ()

    def _federated_dataset(self, cfg, partitioners: dict):
        from flwr_datasets import FederatedDataset

        repo, config = self._hub_name(cfg)
        # No shuffle: partitions then depend on `seed` only, and the local
        # path hands the partitioner the data in file order too.
        return FederatedDataset(
            dataset=repo, subset=config, partitioners=partitioners, preprocessor=self.prepare, shuffle=False
        )

    def _hub_failed(self, cfg, err: Exception) -> DataError:
        repo, config = self._hub_name(cfg)
        what = repo + (f" ({config})" if config else "")
        return DataError(
            f"could not load {what} from the Hugging Face hub ({type(err).__name__}: {err}). "
            f"Without a network, set data-dir to a local copy ({self.layouts}); "
            "hub-dataset may name another hub copy (parquet) of the same data"
        )

    def splits(self, cfg) -> DatasetDict:
        """'train' and 'test', prepared; loaded once per process."""
        key = self._source_key(cfg)
        if key not in _splits:
            if cfg["data-dir"]:
                _splits[key] = self.prepare(self.load_local(cfg["data-dir"]))
            else:
                try:
                    fds = self._federated_dataset(cfg, {"train": 1})
                    _splits[key] = DatasetDict({s: fds.load_split(s) for s in ("train", "test")})
                except DataError:
                    raise
                except Exception as err:  # noqa: BLE001 - offline, unknown name, unsupported script...
                    raise self._hub_failed(cfg, err) from None
        return _splits[key]

    # -- the Task interface ------------------------------------------------

    def load_split(self, cfg, split):
        return self.splits(cfg)[split]

    def partition(self, cfg, partition_id, num_partitions):
        if cfg["data-dir"]:
            return super().partition(cfg, partition_id, num_partitions)
        key = (self._source_key(cfg), cfg["seed"], cfg["dirichlet-alpha"], num_partitions)
        if key not in _federated:
            _federated[key] = self._federated_dataset(cfg, {"train": self.partitioner(cfg, num_partitions)})
        try:
            return _federated[key].load_partition(partition_id, "train")
        except DataError:
            raise
        except Exception as err:  # noqa: BLE001
            raise self._hub_failed(cfg, err) from None


def rename_columns(ds: Dataset, wanted: dict[str, tuple[str, ...]], where: str) -> Dataset:
    """Keep one column per role, renamed to the role: {'image': ('img', 'image'), ...}."""
    chosen = {}
    for role, candidates in wanted.items():
        found = [c for c in candidates if c in ds.column_names]
        if not found:
            raise DataError(
                f"{where}: no {' or '.join(repr(c) for c in candidates)} column (columns: {', '.join(ds.column_names)})"
            )
        chosen[found[0]] = role
    ds = ds.select_columns(list(chosen))
    renames = {src: dst for src, dst in chosen.items() if src != dst}
    return ds.rename_columns(renames) if renames else ds


def label_indices(ds: Dataset, class_names: list[str], where: str, column_name: str = "label") -> np.ndarray:
    """The label column as indices into `class_names`, whatever its storage.

    A ClassLabel or string label is matched by name (an image folder's class
    folders, the hub's names) and, failing that, as a number ('7' is class 7);
    an integer label must already be an index.
    """
    feature = ds.features[column_name]
    values = column(ds, column_name)
    k = len(class_names)
    if isinstance(feature, ClassLabel):
        lut = np.array([_class_index(n, class_names, where) for n in feature.names], dtype=np.int64)
        return lut[values.astype(np.int64)] if len(values) else values.astype(np.int64)
    if isinstance(feature, Value) and feature.dtype in ("string", "large_string"):
        lut = {n: _class_index(n, class_names, where) for n in set(values.tolist())}
        return np.array([lut[v] for v in values.tolist()], dtype=np.int64)
    values = values.astype(np.int64)
    bad = values[(values < 0) | (values >= k)]
    if len(bad):
        raise DataError(f"{where}: label {int(bad[0])} is outside 0..{k - 1}")
    return values


def _class_index(name: str, class_names: list[str], where: str) -> int:
    if name in class_names:
        return class_names.index(name)
    if str(name).isdigit() and int(name) < len(class_names):
        return int(name)
    expected = ", ".join(class_names[:8])
    raise DataError(f"{where}: unknown class {name!r}; expected one of {expected}, ... or 0..{len(class_names) - 1}")


def with_labels(ds: Dataset, labels: np.ndarray) -> Dataset:
    """`ds` with its label column replaced by integer indices (no data rewrite)."""
    return ds.remove_columns(["label"]).add_column("label", labels.astype(np.int64))


def image_arrays(ds: Dataset, mode: str, size: int, where: str) -> np.ndarray:
    """Images as (N, size, size[, 3]) float32 in [0, 1], converted to `mode` ('L' or 'RGB')."""
    from PIL import Image as PILImage
    from PIL import UnidentifiedImageError

    try:
        # Decoded here rather than by `datasets`, so a bad file can be named.
        ds = ds.cast_column("image", Image(decode=False))
    except Exception as err:  # noqa: BLE001
        raise DataError(f"{where}: the image column holds no images ({err})") from None
    shape = (size, size) if mode == "L" else (size, size, 3)
    out = np.empty((len(ds), *shape), dtype=np.float32)
    for i, row in enumerate(ds.select_columns(["image"])):
        src = row["image"]
        try:
            with PILImage.open(io.BytesIO(src["bytes"]) if src.get("bytes") else src["path"]) as img:
                pic = img.convert(mode)
        except (OSError, UnidentifiedImageError, TypeError) as err:
            raise DataError(f"{src.get('path') or f'{where} image {i}'}: not a readable image ({err})") from None
        if pic.size != (size, size):
            pic = pic.resize((size, size))
        out[i] = np.asarray(pic, dtype=np.float32) / 255.0
    return out
