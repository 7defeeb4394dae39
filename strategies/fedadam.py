"""FedAdam: depth-aware FedAvg with an Adam server optimiser (Reddi et al., 2021)."""

from __future__ import annotations

import numpy as np

from .depth_fedavg import DepthAwareFedAvg


class DepthAwareFedAdam(DepthAwareFedAvg):
    """Adam on the averaged delta (the negative pseudo-gradient), per parameter.

    m <- b1 m + (1 - b1) delta;  v <- second_moment(v, delta);
    w <- w + lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + tau).
    t counts the rounds in which this parameter was updated: the blocks of
    deep tiers are updated in fewer rounds than shallow ones, so one global
    round counter would under-correct their bias.

    Args:
        beta1, beta2: decays of the first and second moments (`beta1`, `beta2`).
        tau: added to the root of the second moment (`tau`).
        **kwargs: as for DepthAwareFedAvg.
    """

    default_server_lr = 1e-2
    slots = ("m", "v", "steps")

    def __init__(self, *, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3, **kwargs):
        super().__init__(**kwargs)
        self.beta1, self.beta2, self.tau = float(beta1), float(beta2), float(tau)

    @classmethod
    def config_kwargs(cls, cfg):
        return {**super().config_kwargs(cfg), "beta1": cfg["beta1"], "beta2": cfg["beta2"], "tau": cfg["tau"]}

    def second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        return self.beta2 * v + (1 - self.beta2) * delta**2

    def server_update(self, name, current, delta):
        delta = delta.astype(np.float64)
        m = self.beta1 * self.state["m"].get(name, 0.0) + (1 - self.beta1) * delta
        v = self.second_moment(self.state["v"].get(name, np.zeros_like(delta)), delta)
        t = int(self.state["steps"].get(name, 0)) + 1
        self.state["m"][name] = np.asarray(m, dtype=np.float32)
        self.state["v"][name] = np.asarray(v, dtype=np.float32)
        self.state["steps"][name] = np.asarray(t, dtype=np.int64)
        lr = self.server_lr * np.sqrt(1 - self.beta2**t) / (1 - self.beta1**t)
        return current + lr * m / (np.sqrt(v) + self.tau)
