"""Server checkpoints: adapter weights, strategy state, round and RNG states.

Written to a temporary file and renamed into place, so an interrupted run
(Ctrl-C, a killed process) always leaves the previous checkpoint readable.
"""

from __future__ import annotations

import json
import os
import pickle
import random
from pathlib import Path

import numpy as np
import torch

NAME = "checkpoint.npz"


def save(run_dir: Path, server_round: int, arrays: dict[str, np.ndarray], strategy_state: dict[str, np.ndarray], extra: dict) -> Path:
    path = Path(run_dir) / NAME
    tmp = path.with_suffix(".tmp.npz")
    rng = pickle.dumps({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()})
    meta = {"round": server_round, **extra}
    payload = {f"a/{k}": v for k, v in arrays.items()}
    payload.update({f"s/{k}": v for k, v in strategy_state.items()})
    payload["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    payload["rng"] = np.frombuffer(rng, dtype=np.uint8)
    with open(tmp, "wb") as fh:
        np.savez(fh, **payload)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def load(run_dir: Path) -> dict | None:
    """The last checkpoint in run_dir, or None when there is none."""
    path = Path(run_dir) / NAME
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        arrays = {k[2:]: z[k] for k in z.files if k.startswith("a/")}
        state = {k[2:]: z[k] for k in z.files if k.startswith("s/")}
        meta = json.loads(bytes(z["meta"]).decode())
        rng = pickle.loads(bytes(z["rng"]))
    return {"round": meta["round"], "meta": meta, "arrays": arrays, "strategy": state, "rng": rng}


def restore_rng(rng: dict) -> None:
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
