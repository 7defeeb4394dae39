"""FedYogi: FedAdam with Yogi's additive second moment (Zaheer et al., 2018)."""

from __future__ import annotations

import numpy as np

from .fedadam import DepthAwareFedAdam


class DepthAwareFedYogi(DepthAwareFedAdam):
    """v <- v - (1 - b2) delta^2 sign(v - delta^2): v grows or shrinks by a
    bounded step, so one round of large updates does not flush its memory."""

    def second_moment(self, v, delta):
        sq = delta**2
        return v - (1 - self.beta2) * sq * np.sign(v - sq)
