"""Checkpoints hold arrays and JSON only: never unpickled, RNG states round trip, a damaged file is one line."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from server_app import checkpoint
from tests.checks import one_line

ROOT = Path(__file__).resolve().parents[1]


class Evil:
    """Unpickling this writes a marker file: proof that something was unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def test_a_crafted_pickle_in_a_checkpoint_is_never_unpickled(tmp_path):
    marker = tmp_path / "marker"
    payload = np.frombuffer(pickle.dumps(Evil(marker)), dtype=np.uint8)
    meta = np.frombuffer(json.dumps({"round": 1}).encode(), dtype=np.uint8)  # the old format: a pickled RNG state
    with open(tmp_path / checkpoint.NAME, "wb") as fh:
        np.savez(fh, meta=meta, rng=payload, **{"a/w": np.ones(2, np.float32)})
    with pytest.raises(checkpoint.CheckpointError, match="format"):
        checkpoint.load(tmp_path)
    # Today's format, but an object array (np.savez pickles it) where the RNG state goes.
    meta = {"format": checkpoint.FORMAT, "round": 1, "rng": {}}
    with open(tmp_path / checkpoint.NAME, "wb") as fh:
        np.savez(
            fh,
            meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
            **{"r/python": np.array([Evil(marker)], dtype=object), "r/numpy": np.zeros(1), "r/torch": np.zeros(1)},
        )
    with pytest.raises(checkpoint.CheckpointError, match=str(tmp_path / checkpoint.NAME)):
        checkpoint.load(tmp_path)
    assert not marker.exists()
    source = (ROOT / "server_app" / "checkpoint.py").read_text()
    assert "import pickle" not in source and "allow_pickle=True" not in source


def test_rng_states_round_trip_through_a_checkpoint(tmp_path):
    import random

    import torch

    random.seed(3), np.random.seed(4), torch.manual_seed(5), np.random.randn()  # a cached gauss too
    checkpoint.save(tmp_path, 1, {"w": np.ones(2, np.float32)}, {}, {})
    first = (random.random(), np.random.randn(), torch.rand(1).item())
    checkpoint.restore_rng(checkpoint.load(tmp_path)["rng"])
    assert (random.random(), np.random.randn(), torch.rand(1).item()) == first


def test_a_truncated_checkpoint_is_one_line_naming_the_file(tmp_path):
    checkpoint.save(tmp_path, 1, {"w": np.ones(1000, np.float32)}, {}, {})
    path = tmp_path / checkpoint.NAME
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.load(tmp_path)
    one_line(str(err.value), str(path), "truncated")
