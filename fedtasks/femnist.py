"""FEMNIST (the paper's second benchmark): 62 classes of handwritten
characters, split by writer (Flower Datasets' `NaturalIdPartitioner` on
`writer_id`, one writer per node).

Hub: `flwrlabs/femnist` (columns `image` 28x28 grayscale, `writer_id`,
`character`), which has a training split only: a fixed 10 % of it (seed 0,
the same for every run) is the server's centralised test set, so test
examples come from the writers the clients hold, as in LEAF's per-sample
split. A local copy with its own 'test' split uses that instead.
"""

from __future__ import annotations

import string

from datasets import DatasetDict, Value

from .base import column, split_indices
from .natural import OneIdPerPartition
from .sources import SourcedTask, image_arrays, label_indices, rename_columns, with_labels

CLASSES = list(string.digits + string.ascii_uppercase + string.ascii_lowercase)
SIZE = 28
TEST_FRACTION = 0.1
_TEST_SEED = 0

LAYOUTS = (
    "a folder with a 'train' split (and optionally 'test') as save_to_disk output, parquet files "
    "(train-*.parquet, columns image, writer_id, character) or an image folder train/ holding the PNGs "
    "and a metadata.csv with columns file_name, writer_id, character (0..61 or the character itself)"
)


class FemnistTask(SourcedTask):
    name = "femnist"
    num_classes = len(CLASSES)
    class_names = CLASSES
    id_column = "writer_id"
    hub_dataset = "flwrlabs/femnist"
    layouts = LAYOUTS
    required_splits = ("train",)

    def prepare(self, raw: DatasetDict) -> DatasetDict:
        out = {}
        for split, ds in raw.items():
            where = f"FEMNIST {split} split"
            ds = rename_columns(
                ds, {"image": ("image",), "label": ("character", "label"), "writer_id": ("writer_id",)}, where
            )
            if ds.features["writer_id"] != Value("string"):
                ds = ds.cast_column("writer_id", Value("string"))
            out[split] = with_labels(ds, label_indices(ds, CLASSES, where))
        if "test" not in out:
            train_idx, test_idx = split_indices(len(out["train"]), TEST_FRACTION, _TEST_SEED)
            out["train"], out["test"] = out["train"].select(train_idx), out["train"].select(test_idx)
        return DatasetDict(out)

    def partitioner(self, cfg, num_partitions):
        return OneIdPerPartition("writer_id", num_partitions, cfg["seed"], what="writer")

    def to_arrays(self, ds):
        return image_arrays(ds, "L", SIZE, "FEMNIST"), column(ds, "label").astype("int64")
