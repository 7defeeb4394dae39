"""Read a benchmark's splits from a local folder, with no network.

One `data-dir` may hold any of (checked in this order):

- a `DatasetDict.save_to_disk` folder (`dataset_dict.json` at the top), or
  one `Dataset.save_to_disk` folder per split (`train/`, `test/`);
- parquet files: `train.parquet`, `train-*.parquet` (the hub's shard names,
  at any depth, e.g. `data/train-00000-of-00001.parquet`) or `train/*.parquet`;
- an image folder: `train/<class>/<image>` (labels from the folder names) or
  images anywhere under `train/` with a `metadata.csv`/`metadata.jsonl`
  naming each `file_name` and its columns (Hugging Face's `imagefolder`).

The same for `test`. The columns are the hub's; each task renames them.
"""

from __future__ import annotations

from pathlib import Path

from datasets import DatasetDict, load_dataset, load_from_disk

from .base import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def data_root(data_dir: str, layouts: str) -> Path:
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"data-dir {root}: no such folder; expected {layouts}")
    return root


def _parquet_files(root: Path, split: str) -> list[str]:
    files = []
    for path in root.rglob("*.parquet"):
        rel = path.relative_to(root)
        if path.stem == split or path.name.startswith(split + "-") or rel.parts[0] == split:
            files.append(str(path))
    return sorted(files)


def _has_images(folder: Path) -> bool:
    return folder.is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.rglob("*") if p.is_file())


def load_local(
    data_dir: str, splits: tuple[str, ...], layouts: str, required: tuple[str, ...] = ("train",)
) -> DatasetDict:
    """The splits found under `data_dir` (those in `required` must be there).

    `layouts` says in words what the task expects; every error repeats it
    with the path, so a user sees what to fix.
    """
    root = data_root(data_dir, layouts)
    try:
        found = _load(root, splits)
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - any reader failure becomes one clear message
        raise DataError(
            f"data-dir {root}: could not read the dataset ({type(err).__name__}: {err}); expected {layouts}"
        ) from None
    missing = [s for s in required if s not in found]
    if missing:
        raise DataError(f"data-dir {root}: no '{missing[0]}' split found; expected {layouts}")
    return DatasetDict({s: found[s] for s in splits if s in found})


def _load(root: Path, splits: tuple[str, ...]) -> dict:
    if (root / "dataset_dict.json").is_file():
        dd = load_from_disk(str(root))
        return {s: dd[s] for s in splits if s in dd}
    out = {}
    for split in splits:
        folder = root / split
        if (folder / "state.json").is_file():
            out[split] = load_from_disk(str(folder))
        elif files := _parquet_files(root, split):
            out[split] = load_dataset("parquet", data_files={split: files}, split=split)
        elif _has_images(folder):
            # Explicit files, not data_dir: given a folder, `datasets` reads a
            # class folder named like a split (CIFAR-100 has "train") as that split.
            out[split] = load_dataset("imagefolder", data_files={split: str(folder / "**")}, split=split)
    return out
