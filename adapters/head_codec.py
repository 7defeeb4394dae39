"""How a node's head statistics travel: centred fixed point, `bits` per number.

G = sum phi phi^T of LayerNorm'd features is dominated by the features'
mean, n mu mu^T; the directions that tell the classes apart vary little
around it. Rounding G as it is, even to 24 bits fixed point, loses them
(the fit falls from 0.38 to 0.29 on the characters task), and float16
does too. So a node sends what G is made of: its sum of phi and label
counts exactly (float64), and the scatter around its mean,
C = G - s s^T / n, and R - mu counts^T, with each feature divided by its
own spread (sqrt C_jj, sent too) and then rounded to `bits` with one scale
per array. Without that per-feature scale a few features of large
variance set the step for all (4 digits nodes lost 9 points at 22 bits);
with it the fit is that of float32 statistics from 16 bits up on the
characters task (docs/benchmarks.md section 2d). At 22 bits every feature
of the default task costs less than one dense adapter update.

`bits` 0 sends G's upper triangle and R in float32 (before this codec).
numpy only: the client encodes, the server decodes before it checks.
"""

from __future__ import annotations

import numpy as np

from .head_fit import CROSS, GRAM, pack_gram, stat_name, unpack_gram

MOMENTS = "moments"
# numbers packed at a time: bounds the (chunk, bits) intermediate at ViT-B's 1.2M numbers per exit
_CHUNK = 1 << 16


def encode(stats: dict[str, np.ndarray], depth: int, bits: int) -> dict[str, np.ndarray]:
    """The arrays a node sends for exits 1..depth's G (upper triangle) and R."""
    if bits == 0:
        return {k: np.asarray(v, dtype=np.float32) for k, v in stats.items()}
    out = {}
    for i in range(depth):
        gram = unpack_gram(np.asarray(stats[stat_name(i, GRAM)], dtype=np.float64))
        cross = np.asarray(stats[stat_name(i, CROSS)], dtype=np.float64)
        total = gram[:, -1]  # sum of phi, the example count last
        mean = _mean(total)
        scatter = gram[:-1, :-1] - np.outer(total[:-1], mean[:-1])
        centred = cross[:-1] - np.outer(mean[:-1], cross[-1])
        spread = _spread(scatter)
        scatter, centred = scatter / np.outer(spread, spread), centred / spread[:, None]
        (q_scatter, s_scatter), (q_cross, s_cross) = _round(pack_gram(scatter), bits), _round(centred.ravel(), bits)
        out[stat_name(i, GRAM)] = _pack(q_scatter, bits)
        out[stat_name(i, CROSS)] = _pack(q_cross, bits)
        out[stat_name(i, MOMENTS)] = np.concatenate([[s_scatter, s_cross], total, cross[-1], spread])
    return out


def decode(arrays: dict[str, np.ndarray], depth: int, dim: int, classes: int, bits: int) -> dict[str, np.ndarray]:
    """G's upper triangle and R (float64) of exits 1..depth from what `encode` sent for `dim`
    features (the constant included) and `classes` classes; ValueError names what is malformed."""
    names = {stat_name(i, kind) for i in range(depth) for kind in (GRAM, CROSS)}
    if bits == 0:
        if set(arrays) != names:
            raise ValueError(f"expected the statistics of exits 1-{depth}, got {sorted(arrays)[:4]}...")
        return {k: np.asarray(v, dtype=np.float64) for k, v in arrays.items()}
    names |= {stat_name(i, MOMENTS) for i in range(depth)}
    if set(arrays) != names:
        raise ValueError(f"expected the {bits}-bit statistics of exits 1-{depth}, got {sorted(arrays)[:4]}...")
    feats = dim - 1
    out = {}
    for i in range(depth):
        g_name, r_name, m_name = (stat_name(i, kind) for kind in (GRAM, CROSS, MOMENTS))
        moments = np.asarray(arrays[m_name])
        size = 2 + dim + classes + feats
        if moments.dtype != np.float64 or moments.shape != (size,):
            raise ValueError(f"{m_name}: {moments.dtype} {moments.shape}, not {size} float64")
        if not np.all(np.isfinite(moments)) or moments[0] < 0 or moments[1] < 0:
            raise ValueError(f"{m_name}: scales must be finite and non-negative")
        s_scatter, s_cross = moments[:2]
        total, counts, spread = np.split(moments[2:], [dim, dim + classes])
        mean = _mean(total)
        scatter = unpack_gram(_unpack(arrays[g_name], feats * (feats + 1) // 2, bits, g_name) * s_scatter)
        scatter *= np.outer(spread, spread)
        centred = _unpack(arrays[r_name], feats * classes, bits, r_name).reshape(feats, classes) * s_cross
        centred *= spread[:, None]
        gram = np.empty((dim, dim))
        gram[:-1, :-1] = scatter + np.outer(total[:-1], mean[:-1])
        gram[:, -1] = gram[-1, :] = total
        out[g_name] = pack_gram(gram)
        out[r_name] = np.vstack([centred + np.outer(mean[:-1], counts), counts])
    return out


def exit_bytes(features: int, classes: int, bits: int) -> int:
    """Bytes of one exit's statistics of `features` features (the constant not counted) on the wire
    (array data, not the headers Flower adds)."""
    dim = features + 1
    if bits == 0:
        return 4 * (dim * (dim + 1) // 2 + dim * classes)
    scatter, centred = _packed_bytes(features * (features + 1) // 2, bits), _packed_bytes(features * classes, bits)
    return scatter + centred + 8 * (2 + dim + classes + features)


def stat_dim(budget: int, classes: int, width: int, bits: int) -> int:
    """The widest projection k <= width whose statistics per exit take at most `budget` bytes."""
    k = width
    while k > 1 and exit_bytes(k, classes, bits) > budget:
        k -= 1
    return k


def _mean(total: np.ndarray) -> np.ndarray:
    """phi's mean from its sum (the example count last); zero for a node with no examples."""
    return total / total[-1] if total[-1] != 0 else np.zeros_like(total)


def _packed_bytes(count: int, bits: int) -> int:
    return -(-count * bits // 8)


def _msb_first(bits: int) -> np.ndarray:
    """The shift of each of a number's `bits` bits, most significant first, as `_pack` lays them out."""
    return np.arange(bits - 1, -1, -1, dtype=np.uint64)


def _spread(scatter: np.ndarray) -> np.ndarray:
    """Each feature's root scatter (1 where it has none): dividing by it gives every feature the
    same share of the bits, however unequal their variances."""
    spread = np.sqrt(np.maximum(np.diag(scatter), 0.0))
    return np.where(spread > 0, spread, 1.0)


def _round(values: np.ndarray, bits: int) -> tuple[np.ndarray, float]:
    """Integers in +-(2^(bits-1) - 1) and the scale that maps them back (0 for an all-zero array)."""
    top = float(np.abs(values).max(initial=0.0))
    if not np.isfinite(top):
        raise ValueError("statistics that are not finite cannot be rounded")
    if top == 0.0:
        return np.zeros(len(values), np.int64), 0.0
    scale = top / (2 ** (bits - 1) - 1)
    return np.rint(values / scale).astype(np.int64), scale


def _pack(q: np.ndarray, bits: int) -> np.ndarray:
    """`bits` bits per number, most significant first, offset to be non-negative."""
    shifts = _msb_first(bits)
    parts = []
    for start in range(0, len(q), _CHUNK):
        u = (q[start : start + _CHUNK] + (1 << (bits - 1))).astype(np.uint64)
        parts.append(((u[:, None] >> shifts) & np.uint64(1)).astype(np.uint8).ravel())
    return np.packbits(np.concatenate(parts) if parts else np.zeros(0, np.uint8))


def _unpack(buf: np.ndarray, count: int, bits: int, name: str) -> np.ndarray:
    buf = np.asarray(buf)
    if buf.dtype != np.uint8 or buf.shape != (_packed_bytes(count, bits),):
        raise ValueError(f"{name}: {buf.dtype} {buf.shape}, not {count} numbers of {bits} bits")
    weights = np.uint64(1) << _msb_first(bits)
    flat = np.unpackbits(buf)
    out = np.empty(count, np.float64)
    for start in range(0, count, _CHUNK):
        stop = min(count, start + _CHUNK)
        chunk = flat[start * bits : stop * bits].reshape(stop - start, bits).astype(np.uint64)
        out[start:stop] = (chunk * weights).sum(axis=1).astype(np.int64) - (1 << (bits - 1))
    return out
