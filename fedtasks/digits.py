"""Handwritten digits (scikit-learn's bundled copy of UCI optdigits), offline.

1,797 real 8x8 digits ship inside scikit-learn, so the default run needs no
network. They stand in for CIFAR-100: the backbone is pre-trained on
Fashion-MNIST (clothing), so the federation adapts it to a different domain.
"""

from __future__ import annotations

import numpy as np
from datasets import Dataset

from .base import Task, split_indices

TEST_FRACTION = 0.2
_SPLIT_SEED = 0  # fixed: the centralised test set is the same for every run


class DigitsTask(Task):
    name = "digits"
    num_classes = 10

    def load_split(self, cfg, split):
        from sklearn.datasets import load_digits

        d = load_digits()
        images = (d.images / 16.0).astype(np.float32)
        train_idx, test_idx = split_indices(len(images), TEST_FRACTION, _SPLIT_SEED)
        idx = train_idx if split == "train" else test_idx
        return Dataset.from_dict({"image": images[idx], "label": d.target[idx].astype(np.int64)})

    def to_arrays(self, ds):
        ds = ds.with_format("numpy")[:]
        return np.asarray(ds["image"], dtype=np.float32), np.asarray(ds["label"], dtype=np.int64)
