"""Characters rendered from typefaces: an offline stand-in for FEMNIST.

62 classes (0-9, A-Z, a-z) drawn from the 22 text typefaces that ship with
matplotlib (DejaVu Sans / Sans Mono / Serif and STIX in four styles each,
six Computer Modern faces), so nothing is downloaded. Every image is
*rendered*, not photographed or handwritten: each one is a glyph at a random
size, with a random rotation, shear, scale and shift, strokes thickened at
random and pixel noise added, brought to 28x28 grey.

The split is natural, as FEMNIST's is by writer: each client holds every
character of one typeface (`OneIdPerPartition` draws the typefaces with
`seed`, at most 22 clients). The server's test set is 4 more renders of
every character of all 22 typefaces (5,456 images), drawn from a seed of
their own, so it is the same for every run.

The shipped backbone was pre-trained on Fashion-MNIST (clothing): its frozen
features are far from what separates characters, which is what makes this
task need adaptation (docs/benchmarks.md).
"""

from __future__ import annotations

import functools
import string
from pathlib import Path

import numpy as np
from datasets import Dataset

from .base import DataError, Task, column
from .natural import OneIdPerPartition

CLASSES = list(string.digits + string.ascii_uppercase + string.ascii_lowercase)
TYPEFACES = (
    "DejaVuSans",
    "DejaVuSans-Bold",
    "DejaVuSans-Oblique",
    "DejaVuSans-BoldOblique",
    "DejaVuSansMono",
    "DejaVuSansMono-Bold",
    "DejaVuSansMono-Oblique",
    "DejaVuSansMono-BoldOblique",
    "DejaVuSerif",
    "DejaVuSerif-Bold",
    "DejaVuSerif-Italic",
    "DejaVuSerif-BoldItalic",
    "STIXGeneral",
    "STIXGeneralBol",
    "STIXGeneralItalic",
    "STIXGeneralBolIta",
    "cmr10",
    "cmb10",
    "cmss10",
    "cmtt10",
    "cmti10",
    "cmmi10",
)
SIZE = 28
TRAIN_RENDERS = 4  # renders of each character per typeface a client holds
TEST_RENDERS = 4
_TRAIN_SEED, _TEST_SEED = 1, 2  # fixed: the data is the same for every run
_CANVAS = 64  # rendered large, transformed, then brought down to SIZE


def font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@functools.lru_cache(maxsize=None)
def _font(name: str, size: int):
    from PIL import ImageFont

    path = font_dir() / f"{name}.ttf"
    if not path.is_file():
        raise DataError(f"typeface {path} not found: the chars task renders matplotlib's bundled fonts")
    return ImageFont.truetype(str(path), size)


def render(typeface: str, char: str, rng: np.random.Generator) -> np.ndarray:
    """One glyph as (SIZE, SIZE) float32 pixels in [0, 1], white on black."""
    from PIL import Image, ImageDraw, ImageFilter

    size = int(rng.uniform(34, 44))
    im = Image.new("L", (_CANVAS, _CANVAS), 0)
    # anchored on the baseline, so a lower-case letter sits lower and smaller
    # than its capital, as in handwriting on a line
    ImageDraw.Draw(im).text((_CANVAS / 2, _CANVAS * 0.72), char, fill=255, font=_font(typeface, size), anchor="ms")
    if rng.random() < 0.3:
        im = im.filter(ImageFilter.MaxFilter(3))
    angle = np.deg2rad(rng.uniform(-12, 12))
    shear, scale = rng.uniform(-0.2, 0.2), rng.uniform(0.85, 1.1)
    shift = rng.uniform(-5, 5, 2)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    inv = np.linalg.inv(rot @ np.array([[1.0, shear], [0.0, 1.0]]) * scale)
    c = np.full(2, _CANVAS / 2)
    off = c - inv @ (c + shift)
    coeffs = (inv[0, 0], inv[0, 1], off[0], inv[1, 0], inv[1, 1], off[1])
    im = im.transform(im.size, Image.AFFINE, coeffs, resample=Image.BILINEAR).resize((SIZE, SIZE), Image.LANCZOS)
    x = np.asarray(im, dtype=np.float32) / 255.0
    x /= max(float(x.max()), 1e-3)  # thin faces keep full contrast after the downscale
    return np.clip(x + rng.normal(0.0, 0.05, x.shape), 0.0, 1.0).astype(np.float32)


def render_typefaces(typefaces, renders: int, seed: int) -> Dataset:
    """`renders` images of every character of each typeface; a typeface's
    images depend only on its name, `renders` and `seed`."""
    images, labels, faces = [], [], []
    for face in typefaces:
        rng = np.random.default_rng([seed, TYPEFACES.index(face)])
        for label, char in enumerate(CLASSES):
            for _ in range(renders):
                images.append(render(face, char, rng))
                labels.append(label)
                faces.append(face)
    return Dataset.from_dict({"image": np.stack(images), "label": np.asarray(labels, np.int64), "typeface": faces})


class CharsTask(Task):
    name = "chars"
    num_classes = len(CLASSES)
    class_names = CLASSES
    id_column = "typeface"

    def load_split(self, cfg, split):
        if split == "train":
            return render_typefaces(TYPEFACES, TRAIN_RENDERS, _TRAIN_SEED)
        return render_typefaces(TYPEFACES, TEST_RENDERS, _TEST_SEED)

    def partition(self, cfg, partition_id, num_partitions):
        # Overrides Task.partition (and so its partitioner): a client renders only
        # its own typeface (0.3 s) instead of all 22; client_typefaces draws them.
        if num_partitions > len(TYPEFACES):
            # a ValueError, as a partitioner's own complaint: callers name their key (--num-partitions, nodes)
            raise ValueError(
                f"the chars task has {len(TYPEFACES)} typefaces, too few for {num_partitions} partitions "
                f"of one typeface each: run with at most {len(TYPEFACES)} nodes"
            )
        face = client_typefaces(cfg["seed"], num_partitions)[partition_id]
        return render_typefaces([face], TRAIN_RENDERS, _TRAIN_SEED)

    def to_arrays(self, ds):
        return np.asarray(column(ds, "image"), dtype=np.float32), column(ds, "label").astype(np.int64)


@functools.lru_cache(maxsize=None)
def client_typefaces(seed: int, num_partitions: int) -> tuple[str, ...]:
    """The typeface of each partition id: the draw `OneIdPerPartition` makes over the typefaces."""
    p = OneIdPerPartition("typeface", num_partitions, seed, what="typeface")
    p.dataset = Dataset.from_dict({"typeface": list(TYPEFACES)})
    return tuple(p.natural_id(i) for i in range(num_partitions))
