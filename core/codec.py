"""Wire format of client updates: dense deltas or packed top-k entries.

numpy only, shared by the client (encode) and the strategies (decode), so
neither side imports the other.

Dense (`topk-fraction = 1`): one float32 array per parameter, under its name.

Sparse (`topk-fraction < 1`): the kept entries of every parameter a client
trained travel in two arrays, whatever the number of parameters:

- `@values`: the kept values, float16 (float32 for a tensor whose values
  exceed float16's range), in the canonical layout: parameters in sorted
  name order, each flattened, entries in index order;
- `@mask`: one bit per entry of that layout (numpy `packbits`), or `@gaps`:
  uint16 distances between kept entries, whichever is smaller (gaps win
  below 1/16 density) and fits.

The layout is implied by the parameters the sender trained, which the server
knows from its depth and the run's `heads` setting, so no names, shapes or
int32 indices are sent. Packing
matters for small models: Flower serialises each array with a ~128-byte
header, which for a ViT-micro adapter (288 tensors, many of 32 entries)
would alone cost ~9% of the dense update if every tensor travelled as its
own index + value pair.

Byte budget at 10% kept: int32 index + float32 value per entry = 20% of the
dense bytes; bitmask + float32 = 13.1%; bitmask + float16 = 8.1%. Half
precision is what brings it under 10%; its rounding error is not lost but
kept in the error-feedback residual and sent in a later round.
"""

from __future__ import annotations

import io
import math

import numpy as np

MASK, GAPS, VALUES = "@mask", "@gaps", "@values"
_PACKED = (MASK, GAPS, VALUES)
_F16_MAX = float(np.finfo(np.float16).max)


class CodecError(ValueError):
    pass


def is_packed(payload: dict[str, np.ndarray]) -> bool:
    return any(k in payload for k in _PACKED)


def topk_select(acc: np.ndarray, fraction: float) -> np.ndarray:
    """Sorted flat indices of the ceil(fraction * size) largest |entries|."""
    flat = acc.ravel()
    k = min(flat.size, max(1, math.ceil(fraction * flat.size)))
    idx = np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :]
    idx.sort()
    return idx


def _values_dtype(values: list[np.ndarray]) -> type:
    biggest = max((float(np.max(np.abs(v))) for v in values if v.size), default=0.0)
    return np.float16 if biggest <= _F16_MAX else np.float32


def topk_encode(
    delta: dict[str, np.ndarray], fraction: float, residual: dict[str, np.ndarray] | None = None
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Keep the largest-magnitude `fraction` of each parameter's delta.

    Returns (payload, new residual). The residual (error feedback) is what
    the receiver will not see: the entries left out plus the rounding of
    the kept ones. Added to the next round's delta, it makes the sum of
    what was sent track the sum of the true updates over rounds.
    """
    residual = residual or {}
    acc = {name: np.asarray(d, dtype=np.float32) + residual.get(name, 0.0) for name, d in delta.items()}
    if fraction >= 1.0:
        return {n: a.astype(np.float32) for n, a in acc.items()}, {n: np.zeros_like(a) for n, a in acc.items()}
    names = sorted(acc)
    picks = [topk_select(acc[n], fraction) for n in names]
    kept = [acc[n].ravel()[i] for n, i in zip(names, picks)]
    offsets = np.cumsum([0] + [acc[n].size for n in names])
    flat_idx = np.concatenate([i + off for i, off in zip(picks, offsets[:-1])]) if names else np.zeros(0, np.int64)
    values = np.concatenate(kept).astype(_values_dtype(kept)) if names else np.zeros(0, np.float16)
    payload = {VALUES: values, **_encode_positions(flat_idx, int(offsets[-1]))}

    sent = _scatter(flat_idx, values, int(offsets[-1]))
    new_residual = {}
    for n, start in zip(names, offsets[:-1]):
        new_residual[n] = acc[n] - sent[start : start + acc[n].size].reshape(acc[n].shape)
    return payload, new_residual


def _encode_positions(flat_idx: np.ndarray, total: int) -> dict[str, np.ndarray]:
    gaps = np.diff(flat_idx, prepend=-1) - 1  # zero when entries are adjacent
    mask_bytes = (total + 7) // 8
    if 2 * gaps.size < mask_bytes and (gaps.size == 0 or gaps.max() <= np.iinfo(np.uint16).max):
        return {GAPS: gaps.astype(np.uint16)}
    bits = np.zeros(total, dtype=bool)
    bits[flat_idx] = True
    return {MASK: np.packbits(bits)}


def _scatter(flat_idx: np.ndarray, values: np.ndarray, total: int) -> np.ndarray:
    dense = np.zeros(total, dtype=np.float32)
    dense[flat_idx] = values.astype(np.float32)
    return dense


def _decode_positions(payload: dict[str, np.ndarray], total: int, count: int) -> np.ndarray:
    if (MASK in payload) == (GAPS in payload):
        raise CodecError(f"a sparse update needs exactly one of {MASK!r} or {GAPS!r}")
    if MASK in payload:
        mask = np.asarray(payload[MASK])
        if mask.dtype != np.uint8 or mask.ndim != 1 or mask.size != (total + 7) // 8:
            raise CodecError(
                f"mask of {mask.size} {mask.dtype} bytes does not fit the {total} entries the sender's depth implies"
            )
        bits = np.unpackbits(mask)
        if bits[total:].any():
            raise CodecError("mask has bits set past the last entry")
        idx = np.flatnonzero(bits[:total])
    else:
        gaps = np.asarray(payload[GAPS])
        if gaps.dtype != np.uint16 or gaps.ndim != 1:
            raise CodecError(f"gaps must be a 1-D uint16 array, got {gaps.ndim}-D {gaps.dtype}")
        idx = np.cumsum(gaps.astype(np.int64) + 1) - 1
        if idx.size and idx[-1] >= total:
            raise CodecError(f"gaps run past the {total} entries the sender's depth implies")
    if idx.size != count:
        raise CodecError(f"{idx.size} positions for {count} values")
    return idx


def decode(
    payload: dict[str, np.ndarray], shapes: dict[str, tuple], layout: list[str] | None = None
) -> dict[str, np.ndarray]:
    """Dense float32 deltas from a payload; raises CodecError on anything malformed.

    `shapes` holds every parameter the receiver knows. A sparse payload
    covers exactly the parameters in `layout` (the ones its sender trained);
    a dense one names its parameters itself.
    """
    if not is_packed(payload):
        out = {}
        for key, arr in payload.items():
            if key not in shapes:
                raise CodecError(f"unknown parameter {key!r}")
            arr = np.asarray(arr)
            if tuple(arr.shape) != tuple(shapes[key]):
                raise CodecError(f"{key}: shape {tuple(arr.shape)} != {tuple(shapes[key])}")
            if not np.issubdtype(arr.dtype, np.floating):
                raise CodecError(f"{key}: dtype {arr.dtype} is not floating point")
            out[key] = arr.astype(np.float32)
        return out

    extra = sorted(set(payload) - set(_PACKED))
    if extra:
        raise CodecError(f"a sparse update mixes in other arrays: {', '.join(extra[:3])}")
    if VALUES not in payload:
        raise CodecError(f"a sparse update needs {VALUES!r}")
    if layout is None:
        raise CodecError("a sparse update needs the sender's layout to be decoded")
    unknown = [n for n in layout if n not in shapes]
    if unknown:
        raise CodecError(f"unknown parameter {unknown[0]!r}")
    values = np.asarray(payload[VALUES])
    if values.ndim != 1 or values.dtype not in (np.float16, np.float32):
        raise CodecError(f"values must be a 1-D float16/float32 array, got {values.ndim}-D {values.dtype}")
    names = sorted(layout)
    sizes = [math.prod(shapes[n]) for n in names]
    offsets = np.cumsum([0] + sizes)
    dense = _scatter(_decode_positions(payload, int(offsets[-1]), values.size), values, int(offsets[-1]))
    return {n: dense[a:b].reshape(shapes[n]) for n, a, b in zip(names, offsets[:-1], offsets[1:])}


def array_bytes(arr: np.ndarray) -> int:
    """Bytes Flower serialises for one array: its .npy form, header included."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.tell()


def payload_bytes(payload: dict[str, np.ndarray]) -> int:
    """Bytes of a record's arrays as sent: .npy data with headers, plus names.

    Flower's protobuf framing (a few bytes per array) is not counted.
    """
    return int(sum(array_bytes(a) + len(k.encode()) for k, a in payload.items()))
