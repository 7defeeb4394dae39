"""Strategies by the name the run config's `strategy` key uses.

Adding one: write strategies/<name>.py with a DepthAwareFedAvg subclass that
overrides `reduce` (how one parameter's deltas combine) and/or
`server_update` (how the combined delta moves the global value), reads its
hyper-parameters in `config_kwargs`, and keeps any optimiser state in
`self.state[slot]` for the slots it declares; then add one line here.

Any other value of `strategy` names a Flower Message-API strategy class,
run per group of blocks by `FlowerGroups` (see docs/strategies.md):
`flwr:<Class>` from flwr.serverapp.strategy, or `package.module:Class`.
"""

from __future__ import annotations

from typing import Any

from core.config import ConfigError, parse_tiers

from .depth_fedavg import DepthAwareFedAvg
from .fedadam import DepthAwareFedAdam
from .fedavgm import DepthAwareFedAvgM
from .fedprox import DepthAwareFedProx
from .fedyogi import DepthAwareFedYogi
from .flower import FlowerGroups
from .flower_spec import client_lr, refuse_unused_inner, strategy_factory
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
    """The strategy `name`, configured from a validated run config.

    Raises ConfigError naming the key at fault, before any round runs.
    """
    if name in STRATEGIES:
        refuse_unused_inner(cfg, name)
        return STRATEGIES[name].from_config(cfg)
    if ":" not in name:
        raise ConfigError(
            "strategy",
            f"unknown strategy {name!r}; known: {', '.join(sorted(STRATEGIES))}, "
            "or flwr:<Class> (e.g. flwr:Krum), or package.module:Class",
        )
    factory = strategy_factory(cfg)
    return FlowerGroups(
        factory=factory,
        label=name,
        groups=cfg["strategy-groups"],
        tiers=parse_tiers(cfg),
        client_lr=client_lr(cfg),
        **DepthAwareFedAvg.config_kwargs(cfg),
    )
