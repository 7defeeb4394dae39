"""Strategies by the name the run config's `strategy` key uses.

Adding one: write strategies/<name>.py with a DepthAwareFedAvg subclass that
overrides `reduce` and/or `server_update`, then add one line here.
"""

from .depth_fedavg import DepthAwareFedAvg

STRATEGIES = {
    "fedavg": DepthAwareFedAvg,
}


def build_strategy(name: str, **kwargs):
    if name not in STRATEGIES:
        raise KeyError(name)
    return STRATEGIES[name](**kwargs)
