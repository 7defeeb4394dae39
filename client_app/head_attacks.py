"""What an attacking client sends as head statistics (`attack-partitions`, `attack-heads`):
a benchmark and testing aid for the server's checks (server_app/head_guard.py).

Each attack but 'noise' and 'scale-class' sends statistics some data set
with real features gives, so only the weight cap and the screen can stop it.
"""

from __future__ import annotations

import numpy as np

from adapters.head_fit import CROSS, GRAM, pack_gram, stat_name, unpack_gram


def poison(mode: str, sums: dict[str, np.ndarray], n: int, noise) -> tuple[dict[str, np.ndarray], int]:
    """(statistics, example count) the attacker reports instead of `sums` over its n examples;
    `noise(sums)` makes the 'noise' attack's arrays."""
    if mode == "noise":
        return noise(sums), n
    if mode == "inflate-count":
        return {k: v * 100 for k, v in sums.items()}, n * 100
    out = dict(sums)
    for k, v in sums.items():
        if not k.endswith(CROSS):
            continue
        if mode == "scale-class":
            v = v.copy()
            v[:-1, 0] *= 1000
        elif mode == "rotate-labels":
            v = np.roll(v, 1, axis=1)
        elif mode == "fake-data":
            gram_name = stat_name(int(k.split(".")[1]), GRAM)
            gram = unpack_gram(sums[gram_name])
            v = np.zeros_like(v)
            v[:, 0] = 10 * gram[:, -1]  # every example labelled 0: class 0's sum is the sum of phi
            out[gram_name] = (10 * pack_gram(gram)).astype(sums[gram_name].dtype)
        else:
            raise ValueError(f"unknown head attack {mode!r}")
        out[k] = v.astype(sums[k].dtype)
    return out, n * 10 if mode == "fake-data" else n
