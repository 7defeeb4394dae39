"""FedAvgM: depth-aware FedAvg with server momentum (Hsu et al., 2019)."""

from __future__ import annotations

import numpy as np

from .depth_fedavg import DepthAwareFedAvg


class DepthAwareFedAvgM(DepthAwareFedAvg):
    """m <- momentum * m + delta; w <- w + server_lr * m, per parameter.

    A parameter's momentum only advances in rounds where someone sent it:
    a tier that sat out a round must not be pushed by stale momentum.

    Args:
        momentum: the server momentum (`server-momentum`).
        **kwargs: as for DepthAwareFedAvg.
    """

    slots = ("momentum",)

    def __init__(self, *, momentum: float = 0.9, **kwargs):
        super().__init__(**kwargs)
        self.momentum = float(momentum)

    @classmethod
    def config_kwargs(cls, cfg):
        return {**super().config_kwargs(cfg), "momentum": cfg["server-momentum"]}

    def server_update(self, name, current, delta):
        m = self.momentum * self.state["momentum"].get(name, 0.0) + delta
        self.state["momentum"][name] = np.asarray(m, dtype=np.float32)
        return current + self.server_lr * m
