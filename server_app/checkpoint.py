"""Server checkpoints: adapter weights, strategy state, round and RNG states.

Written to a temporary file and renamed into place, so an interrupted run
(Ctrl-C, a killed process) always leaves the previous checkpoint readable.

Everything in the file is a plain array or JSON text: a run folder can be
handed over (or tampered with), so nothing read from it is unpickled. The
RNG states are stored as their arrays plus a JSON header.
"""

from __future__ import annotations

import json
import os
import random
import zipfile
from pathlib import Path

import numpy as np
import torch

from core.run_files import CHECKPOINT as NAME

FORMAT = 2  # 1 held a pickled RNG state; such files are refused, not read


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file."""


def rng_state() -> tuple[dict, dict[str, np.ndarray]]:
    """(JSON-able header, arrays) of the Python, NumPy and torch RNG states."""
    version, py_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    header = {
        "python-version": version,
        "python-gauss": gauss,
        "numpy-kind": kind,
        "numpy-pos": int(pos),
        "numpy-has-gauss": int(has_gauss),
        "numpy-cached": float(cached),
    }
    arrays = {
        "python": np.asarray(py_state, dtype=np.uint64),
        "numpy": np.asarray(keys, dtype=np.uint32),
        "torch": torch.get_rng_state().numpy().copy(),
    }
    return header, arrays


def restore_rng(rng: dict) -> None:
    header, arrays = rng["header"], rng["arrays"]
    random.setstate((int(header["python-version"]), tuple(int(x) for x in arrays["python"]), header["python-gauss"]))
    np.random.set_state(
        (
            str(header["numpy-kind"]),
            np.asarray(arrays["numpy"], dtype=np.uint32),
            int(header["numpy-pos"]),
            int(header["numpy-has-gauss"]),
            float(header["numpy-cached"]),
        )
    )
    torch.set_rng_state(torch.from_numpy(np.asarray(arrays["torch"], dtype=np.uint8).copy()))


def save(
    run_dir: Path,
    server_round: int,
    arrays: dict[str, np.ndarray],
    strategy_state: dict[str, np.ndarray],
    extra: dict,
    served: dict[str, np.ndarray] | None = None,
) -> Path:
    """`served`: the arrays the server serves between head refits (`serve-last-fit`) where they are
    not `arrays`; only the entries that differ are stored."""
    path = Path(run_dir) / NAME
    tmp = path.with_suffix(".tmp.npz")
    header, rng_arrays = rng_state()
    meta = {"format": FORMAT, "round": server_round, "rng": header, **extra}
    payload = {f"a/{k}": v for k, v in arrays.items()}
    payload.update({f"s/{k}": v for k, v in strategy_state.items()})
    if served is not None:
        payload.update({f"v/{k}": v for k, v in served.items() if not np.array_equal(v, arrays.get(k))})
    payload.update({f"r/{k}": v for k, v in rng_arrays.items()})
    payload["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with open(tmp, "wb") as fh:
        np.savez(fh, **payload)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def load(run_dir: Path) -> dict | None:
    """The last checkpoint in run_dir, or None when there is none; CheckpointError when it is unusable."""
    path = Path(run_dir) / NAME
    if not path.is_file():
        return None
    if not zipfile.is_zipfile(path):
        # np.load would take it for a pickle and say so ("This file contains pickled data"): it is not one of ours.
        raise CheckpointError(
            f"{path}: not a readable .npz archive (truncated, or not an anytime-fl checkpoint); "
            "restore it or start a new run"
        )
    try:
        with np.load(path, allow_pickle=False) as z:
            if "meta" not in z.files:
                raise CheckpointError(f"{path}: not an anytime-fl checkpoint (no 'meta' entry)")
            meta = json.loads(bytes(z["meta"]).decode())
            if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("round"), int):
                raise CheckpointError(
                    f"{path}: checkpoint format {meta.get('format', 1) if isinstance(meta, dict) else '?'} "
                    f"is not {FORMAT} (older files held a pickled RNG state and are not read); "
                    "start a new run"
                )
            arrays = {k[2:]: z[k] for k in z.files if k.startswith("a/")}
            state = {k[2:]: z[k] for k in z.files if k.startswith("s/")}
            served = {**arrays, **{k[2:]: z[k] for k in z.files if k.startswith("v/")}}
            rng = {"header": meta["rng"], "arrays": {k[2:]: z[k] for k in z.files if k.startswith("r/")}}
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, ValueError, KeyError, OSError, EOFError, UnicodeDecodeError) as err:
        # allow_pickle=False turns an object array into a ValueError: nothing is unpickled.
        raise CheckpointError(
            f"{path}: unreadable checkpoint ({type(err).__name__}: {err}); "
            "it may be truncated: restore it or start a new run"
        ) from None
    if set(rng["arrays"]) != {"python", "numpy", "torch"}:
        raise CheckpointError(f"{path}: checkpoint lacks the RNG states (python, numpy, torch)")
    if set(served) != set(arrays):
        raise CheckpointError(f"{path}: its served arrays name entries its arrays lack")
    return {"round": meta["round"], "meta": meta, "arrays": arrays, "served": served, "strategy": state, "rng": rng}
