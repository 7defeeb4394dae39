"""Strategies by the name the run config's `strategy` key uses.

Adding one: write strategies/<name>.py with a DepthAwareFedAvg subclass that
overrides `reduce` (how one parameter's deltas combine) and/or
`server_update` (how the combined delta moves the global value), reads its
hyper-parameters in `config_kwargs`, and keeps any optimiser state in
`self.state[slot]` for the slots it declares; then add one line here.
"""

from __future__ import annotations

from typing import Any

from core.config import ConfigError

from .depth_fedavg import DepthAwareFedAvg
from .fedadam import DepthAwareFedAdam
from .fedavgm import DepthAwareFedAvgM
from .fedprox import DepthAwareFedProx
from .fedyogi import DepthAwareFedYogi
from .median import DepthAwareMedian
from .trimmed_mean import DepthAwareTrimmedMean

STRATEGIES = {
    "fedavg": DepthAwareFedAvg,
    "fedavgm": DepthAwareFedAvgM,
    "fedadam": DepthAwareFedAdam,
    "fedyogi": DepthAwareFedYogi,
    "fedprox": DepthAwareFedProx,
    "median": DepthAwareMedian,
    "trimmed-mean": DepthAwareTrimmedMean,
}


def build_strategy(name: str, cfg: dict[str, Any]) -> DepthAwareFedAvg:
    """The strategy `name`, configured from a validated run config."""
    if name not in STRATEGIES:
        raise ConfigError("strategy", f"unknown strategy {name!r}; known: {', '.join(sorted(STRATEGIES))}")
    return STRATEGIES[name].from_config(cfg)
