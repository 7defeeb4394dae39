"""Fashion-MNIST read from local IDX files (no network).

The Debian package `dataset-fashion-mnist` installs the four original gzipped
IDX files in /usr/share/datasets/fashion-mnist/; any folder holding the same
four files works too.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
_PREFIX = {"train": "train", "test": "t10k"}
# IDX magic: two zero bytes, type code 0x08 (uint8), number of dimensions.
_MAGIC_IMAGES = 0x00000803
_MAGIC_LABELS = 0x00000801
_HOW_TO_GET = "install it with `apt-get install dataset-fashion-mnist`, or pass a folder holding the four IDX files"


def _read_idx(path: Path, magic: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    header = np.frombuffer(raw, dtype=">u4", count=1)[0] if len(raw) >= 4 else None
    if header != magic:
        raise ValueError(f"{path}: not an IDX file of the expected kind (magic {header!r}, wanted {magic:#010x})")
    ndim = magic & 0xFF
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(int)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {tuple(dims)} but holds {data.size} bytes")
    # copy: frombuffer views are read-only and torch.from_numpy warns on them
    return data.reshape(tuple(dims)).copy()


def load_fashion_mnist(split: str, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 of split "train" or "test"."""
    if split not in _PREFIX:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    root = Path(data_dir or DEFAULT_DIR).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"no Fashion-MNIST folder at {root}: {_HOW_TO_GET}")
    paths = [root / f"{_PREFIX[split]}-{kind}-idx{n}-ubyte.gz" for kind, n in (("images", 3), ("labels", 1))]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"missing Fashion-MNIST file {path}: {_HOW_TO_GET}")
    images = _read_idx(paths[0], _MAGIC_IMAGES)
    labels = _read_idx(paths[1], _MAGIC_LABELS).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{root}: {len(images)} images but {len(labels)} labels in split {split!r}")
    return images, labels
