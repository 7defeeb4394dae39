"""CIFAR-100 (the paper's first benchmark): 100 classes, Dirichlet label skew.

Hub: `uoft-cs/cifar100` (columns `img`, `fine_label`); the training split is
spread over the nodes by Flower Datasets' `DirichletPartitioner` with
concentration `dirichlet-alpha` (0.5 by default; smaller = more skewed).
"""

from __future__ import annotations

from datasets import DatasetDict

from .base import column
from .sources import SourcedTask, image_arrays, label_indices, rename_columns, with_labels

# Index order of the hub's `fine_label` (alphabetical), so that class folders
# named after the classes get the same indices as the hub.
CLASSES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can "
    "castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin "
    "elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster "
    "man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck "
    "pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk "
    "skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger "
    "tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm"
).split()
SIZE = 32

LAYOUTS = (
    "a folder with 'train' and 'test' splits as save_to_disk output, parquet files (train-*.parquet, test-*.parquet, "
    "columns img/image and fine_label/label) or image folders train/<class>/*.png and test/<class>/*.png "
    "(class = CIFAR-100 name or index 0..99)"
)


class Cifar100Task(SourcedTask):
    name = "cifar100"
    num_classes = len(CLASSES)
    class_names = CLASSES
    hub_dataset = "uoft-cs/cifar100"
    layouts = LAYOUTS

    def prepare(self, raw: DatasetDict) -> DatasetDict:
        out = {}
        for split, ds in raw.items():
            where = f"CIFAR-100 {split} split"
            ds = rename_columns(ds, {"image": ("img", "image"), "label": ("fine_label", "label")}, where)
            out[split] = with_labels(ds, label_indices(ds, CLASSES, where))
        return DatasetDict(out)

    def to_arrays(self, ds):
        return image_arrays(ds, "RGB", SIZE, "CIFAR-100"), column(ds, "label").astype("int64")
