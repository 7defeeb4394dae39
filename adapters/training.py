"""Local training and per-exit evaluation of an AnytimeViT."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from core.config import settings

from .adamw import AdamW
from .model import AnytimeViT
from .state import trainable_names


@dataclass
class TrainSettings:
    """How a client trains its adapters and heads; built from the run config
    by `from_config`, the one place a training key becomes a setting."""

    epochs: int = 1
    lr: float = 3e-3
    weight_decay: float = 1e-4
    exit_loss: str = "sum"  # "sum" or "mean" over the exits a client runs
    distill_weight: float = 0.0  # self-distillation from the deepest exit
    distill_temperature: float = 2.0
    prox_mu: float = 0.0  # FedProx proximal term towards the received weights
    autocast: str = "none"  # "bf16": forward pass and loss in bfloat16 autocast

    @classmethod
    def from_config(cls, cfg: dict[str, Any], *, personalize: bool = False, prox_mu: float = 0.0) -> "TrainSettings":
        """Settings of federated training, or of the personalisation round
        (its own epochs and learning rate); `prox_mu` comes from the strategy."""
        values = settings(cfg)
        if personalize:
            values.update(epochs=cfg["personalize-epochs"], lr=cfg["personalize-lr"])
        return cls(**values, prox_mu=prox_mu)


def exit_losses(logits: list[torch.Tensor], y: torch.Tensor, s: TrainSettings) -> tuple[torch.Tensor, list[torch.Tensor]]:
    per_exit = [F.cross_entropy(z, y) for z in logits]
    total = torch.stack(per_exit).sum()
    if s.exit_loss == "mean":
        total = total / len(per_exit)
    if s.distill_weight > 0 and len(logits) > 1:
        t = s.distill_temperature
        teacher = F.softmax(logits[-1].detach() / t, dim=-1)
        kd = sum(F.kl_div(F.log_softmax(z / t, dim=-1), teacher, reduction="batchmean") for z in logits[:-1])
        total = total + s.distill_weight * (t * t) * kd / (len(logits) - 1)
    return total, per_exit


def model_device(model: torch.nn.Module) -> torch.device:
    """Batches go where the model is (the run config's `device` placed it)."""
    return next(model.parameters()).device


def train_local(model: AnytimeViT, loader: DataLoader, depth: int, s: TrainSettings) -> dict:
    """Train the adapters/heads of blocks 1..depth; return mean loss per exit."""
    # Only blocks 1..depth: a deeper parameter given to AdamW would be moved by
    # weight decay (and FedProx's term) though the client never trains it.
    mine = set(trainable_names(model, depth))
    params = [p for n, p in model.trainable_named_parameters() if p.requires_grad and n in mine]
    opt = AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    anchor = [p.detach().clone() for p in params] if s.prox_mu > 0 else None
    model.train()
    dev = model_device(model)
    sums = torch.zeros(depth, device=dev)
    seen = 0
    for _ in range(s.epochs):
        for x, y in loader:
            x, y = x.to(dev), y.to(dev)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=s.autocast == "bf16"):
                total, per_exit = exit_losses(model(x, depth=depth), y, s)
            if anchor is not None:
                total = total + 0.5 * s.prox_mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            sums += torch.stack([loss.detach() for loss in per_exit]) * len(y)
            seen += len(y)
    return {"loss": (sums / max(seen, 1)).cpu().tolist(), "num_examples_seen": seen}


@torch.no_grad()
def evaluate(model: AnytimeViT, loader: DataLoader, depth: int | None = None) -> dict:
    """Accuracy and loss at every exit 1..depth."""
    model.eval()
    depth = depth or model.num_blocks
    dev = model_device(model)
    correct = torch.zeros(depth, device=dev)
    loss = torch.zeros(depth, device=dev)
    n = 0
    for x, y in loader:
        x, y = x.to(dev), y.to(dev)
        for i, z in enumerate(model(x, depth=depth)):
            correct[i] += (z.argmax(-1) == y).sum()
            loss[i] += F.cross_entropy(z, y, reduction="sum")
        n += len(y)
    n = max(n, 1)
    return {"accuracy": (correct / n).cpu().tolist(), "loss": (loss / n).cpu().tolist(), "num_examples": n}
