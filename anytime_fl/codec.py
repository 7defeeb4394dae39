"""Wire format of client updates: dense deltas or top-k indices + values.

numpy only, shared by the client (encode) and the strategies (decode), so
neither side imports the other. A parameter `w` travels either as `w`
(the dense delta) or as `w@idx` (int32 flat indices) + `w@val` (float32
values); a tensor full of zeros is never sent.
"""

from __future__ import annotations

import math

import numpy as np

IDX, VAL = "@idx", "@val"


class CodecError(ValueError):
    pass


def topk_encode(
    delta: dict[str, np.ndarray], fraction: float, residual: dict[str, np.ndarray] | None = None
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Keep the largest-magnitude `fraction` of each parameter's delta.

    What is not sent is returned as the new residual (error feedback): it is
    added to the next round's delta, so over rounds the sum of what was sent
    tracks the sum of the true updates.
    """
    residual = residual or {}
    payload: dict[str, np.ndarray] = {}
    new_residual: dict[str, np.ndarray] = {}
    for name, d in delta.items():
        acc = d.astype(np.float32) + residual.get(name, 0.0)
        if fraction >= 1.0:
            payload[name] = acc.astype(np.float32)
            new_residual[name] = np.zeros_like(acc)
            continue
        flat = acc.ravel()
        k = max(1, math.ceil(fraction * flat.size))
        idx = np.argpartition(np.abs(flat), flat.size - k)[flat.size - k:].astype(np.int32)
        idx.sort()
        payload[name + IDX] = idx
        payload[name + VAL] = flat[idx].astype(np.float32)
        rest = flat.copy()
        rest[idx] = 0.0
        new_residual[name] = rest.reshape(acc.shape)
    return payload, new_residual


def decode(payload: dict[str, np.ndarray], shapes: dict[str, tuple]) -> dict[str, np.ndarray]:
    """Dense deltas from a payload; raises CodecError on anything malformed."""
    out: dict[str, np.ndarray] = {}
    for key, arr in payload.items():
        if key.endswith(VAL):
            continue
        if key.endswith(IDX):
            name = key[: -len(IDX)]
            if name not in shapes:
                raise CodecError(f"unknown parameter {name!r}")
            if name + VAL not in payload:
                raise CodecError(f"{name}: indices without values")
            vals = np.asarray(payload[name + VAL])
            idx = np.asarray(arr)
            size = int(np.prod(shapes[name]))
            if idx.ndim != 1 or vals.shape != idx.shape or not np.issubdtype(idx.dtype, np.integer):
                raise CodecError(f"{name}: malformed sparse encoding")
            if idx.size and (idx.min() < 0 or idx.max() >= size):
                raise CodecError(f"{name}: index out of range for shape {shapes[name]}")
            dense = np.zeros(size, dtype=np.float32)
            dense[idx] = vals
            out[name] = dense.reshape(shapes[name])
        else:
            if key not in shapes:
                raise CodecError(f"unknown parameter {key!r}")
            if tuple(arr.shape) != tuple(shapes[key]):
                raise CodecError(f"{key}: shape {tuple(arr.shape)} != {tuple(shapes[key])}")
            out[key] = np.asarray(arr, dtype=np.float32)
    for key in payload:
        if key.endswith(VAL) and key[: -len(VAL)] + IDX not in payload:
            raise CodecError(f"{key[:-len(VAL)]}: values without indices")
    return out


def payload_bytes(payload: dict[str, np.ndarray]) -> int:
    return int(sum(a.nbytes for a in payload.values()))
