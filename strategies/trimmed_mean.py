"""Coordinate-wise trimmed mean of the senders' deltas (Yin et al., 2018)."""

from __future__ import annotations

import numpy as np

from .depth_fedavg import DepthAwareFedAvg


class DepthAwareTrimmedMean(DepthAwareFedAvg):
    """Per coordinate, drop the floor(trim * n) largest and smallest of the n
    senders' values and average the rest (unweighted, as for the median).
    With fewer than 1/trim senders nothing is trimmed: it is the mean.

    Args:
        trim_fraction: the share dropped at each end (`trim-fraction`).
        **kwargs: as for DepthAwareFedAvg.
    """

    def __init__(self, *, trim_fraction: float = 0.2, **kwargs):
        super().__init__(**kwargs)
        self.trim_fraction = float(trim_fraction)

    @classmethod
    def config_kwargs(cls, cfg):
        return {**super().config_kwargs(cfg), "trim_fraction": cfg["trim-fraction"]}

    def reduce(self, name, deltas, weights):
        n = len(deltas)
        cut = int(self.trim_fraction * n)
        ordered = np.sort(np.stack(deltas).astype(np.float64), axis=0)
        return ordered[cut : n - cut].mean(axis=0).astype(np.float32)
