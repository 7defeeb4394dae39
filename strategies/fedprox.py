"""FedProx: depth-aware FedAvg whose clients add a proximal term (Li et al., 2020)."""

from __future__ import annotations

from .depth_fedavg import DepthAwareFedAvg


class DepthAwareFedProx(DepthAwareFedAvg):
    """Server side is FedAvg; every train message carries `proximal-mu`, and
    the client adds mu/2 * ||w - w_received||^2 over what it trains.

    Args:
        proximal_mu: the proximal term's weight (`proximal-mu`).
        **kwargs: as for DepthAwareFedAvg.
    """

    def __init__(self, *, proximal_mu: float = 0.01, **kwargs):
        super().__init__(**kwargs)
        self.proximal_mu = float(proximal_mu)

    @classmethod
    def config_kwargs(cls, cfg):
        return {**super().config_kwargs(cfg), "proximal_mu": cfg["proximal-mu"]}

    def extra_train_config(self):
        return {"proximal-mu": self.proximal_mu}
