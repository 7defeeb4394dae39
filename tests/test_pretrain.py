"""Offline pre-training on a tiny fake Fashion-MNIST folder (no network, seconds)."""

from __future__ import annotations

import gzip
import json
import struct

import numpy as np
import pytest

from adapters.backbone import load_backbone
from anytime_fl.fashion_mnist import load_fashion_mnist
from anytime_fl.pretrain import main, pretrain

CARD_KEYS = {
    "backbone",
    "img_size",
    "patch_size",
    "in_chans",
    "embed_dim",
    "depth",
    "data",
    "epochs",
    "batch_size",
    "lr",
    "test_accuracy",
    "seconds",
    "torch",
    "timm",
    "command",
}


def write_idx(path, array: np.ndarray) -> None:
    """Gzipped IDX file of uint8 data: magic 0x0000080N, then N big-endian dims."""
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fmnist(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "fmnist"
    folder.mkdir()
    for prefix, n in (("train", 96), ("t10k", 32)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    return folder


def test_loader_reads_idx(fake_fmnist):
    x, y = load_fashion_mnist("train", str(fake_fmnist))
    assert x.shape == (96, 28, 28) and x.dtype == np.uint8
    assert y.shape == (96,) and y.dtype == np.int64


def test_pretrain_writes_loadable_weights_and_card(fake_fmnist, tmp_path):
    out = tmp_path / "w" / "vit.safetensors"
    card = pretrain(str(out), epochs=1, batch_size=32, data_dir=str(fake_fmnist), train_limit=64, log=lambda *_: None)
    assert out.is_file()
    saved = json.loads(out.with_name(out.name + ".json").read_text())
    assert CARD_KEYS <= saved.keys() and saved == card
    assert saved["data"] == "Fashion-MNIST train, 64 images"
    assert (saved["img_size"], saved["patch_size"], saved["in_chans"], saved["depth"]) == (28, 7, 1, 12)
    model = load_backbone("vit_micro_patch7_28", weights=str(out))
    assert model.num_classes == 0


def test_missing_data_dir_names_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere.*apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", str(missing))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        pretrain(str(tmp_path / "w.safetensors"), data_dir=str(missing), log=lambda *_: None)


def test_missing_file_and_bad_magic(fake_fmnist):
    (fake_fmnist / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte.gz"):
        load_fashion_mnist("test", str(fake_fmnist))
    write_idx(fake_fmnist / "train-labels-idx1-ubyte.gz", np.zeros((2, 2)))  # 2-D: images' magic is wrong here
    with pytest.raises(ValueError, match="magic"):
        load_fashion_mnist("train", str(fake_fmnist))


def test_cli_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--epochs", "0"])
    assert exc.value.code == 2 and "must be positive" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path / "w.safetensors"), "--data-dir", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "nowhere" in err and "Traceback" not in err
