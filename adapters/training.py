"""Local training and per-exit evaluation of an AnytimeViT."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset, TensorDataset

from core.config import clients_train_heads, round_lr, settings
from core.naming import sent_up_to

from .model import AnytimeViT
from .optim import make_optimizer
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
    optimizer: str = "adamw"  # "adamw" or "sgd" (momentum 0.9), a fresh one every round
    logit_adjust: float = 0.0  # tau of logit adjustment by the client's label prior (0 = off)
    class_counts: torch.Tensor | None = None  # the client's training label counts
    block_grad: bool = True  # False: the frozen blocks build no graph (gradient stops there)
    clients_train_heads: bool = True  # False: only the adapters train (core.config.clients_train_heads)

    @classmethod
    def from_config(
        cls,
        cfg: dict[str, Any],
        *,
        personalize: bool = False,
        prox_mu: float = 0.0,
        server_round: int = 0,
        num_rounds: int = 0,
        class_counts: torch.Tensor | None = None,
    ) -> "TrainSettings":
        """Settings of federated training in `server_round` (of `num_rounds`, 0 = the run's), or of
        the personalisation round; `prox_mu` comes from the strategy and `class_counts` (the
        client's labels, for logit adjustment) from its data."""
        values = settings(cfg)
        if personalize:
            # A personal model should learn its own label prior, with AdamW at
            # its own small learning rate, whatever federated training uses.
            values.update(
                epochs=cfg["personalize-epochs"], lr=cfg["personalize-lr"], optimizer="adamw", logit_adjust=0.0
            )
            return cls(**values, clients_train_heads=clients_train_heads(cfg))
        values["lr"] = round_lr(cfg, server_round, num_rounds)
        return cls(**values, prox_mu=prox_mu, class_counts=class_counts, clients_train_heads=clients_train_heads(cfg))


def label_counts(ds, num_classes: int) -> torch.Tensor:
    """Training examples per class of a (Subset of a) TensorDataset, or any dataset of (x, y)."""
    if isinstance(ds, Subset) and isinstance(ds.dataset, TensorDataset):
        labels = ds.dataset.tensors[1][torch.as_tensor(ds.indices, dtype=torch.long)]
    elif isinstance(ds, TensorDataset):
        labels = ds.tensors[1]
    else:
        labels = torch.as_tensor([int(y) for _, y in ds], dtype=torch.long)
    return torch.bincount(labels.long().flatten(), minlength=num_classes).float()


def logit_prior(counts: torch.Tensor, tau: float) -> torch.Tensor:
    """tau * log p(y) of the client's labels; a class it never saw gets a
    prior of half an example, so its logit is pushed down, not to -inf."""
    p = counts.clamp_min(0.5)
    return tau * torch.log(p / p.sum())


def exit_losses(
    logits: list[torch.Tensor], y: torch.Tensor, s: TrainSettings, prior: torch.Tensor | None = None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    # Logit adjustment (balanced softmax at tau 1): the heads learn p(x|y)
    # scores, not this client's label skew, so averaged heads are not pulled
    # towards each client's own majority classes. Training only.
    per_exit = [F.cross_entropy(z if prior is None else z + prior, y) for z in logits]
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


def no_decay(model: AnytimeViT, named) -> list[torch.Tensor]:
    """The parameters of `named` that take no weight decay, by timm's rule
    (`timm.optim.param_groups_weight_decay`, as DeiT trains): every 1-D one
    (LayerNorm weights, biases) and the tokens the model lists in `no_weight_decay()`."""
    exempt = model.no_weight_decay()
    return [p for n, p in named if p.ndim <= 1 or n in exempt]


def local_optimizer(model: AnytimeViT, names: set[str], s: TrainSettings):
    """The optimiser of the trainable parameters in `names`, and those parameters."""
    named = [(n, p) for n, p in model.trainable_named_parameters() if p.requires_grad and n in names]
    params = [p for _, p in named]
    return make_optimizer(params, s.optimizer, s.lr, s.weight_decay, no_decay=no_decay(model, named)), params


def train_local(model: AnytimeViT, loader: DataLoader, depth: int, s: TrainSettings, opt=None) -> dict:
    """Train the adapters/heads of blocks 1..depth; return mean loss per exit.

    `opt`: an optimiser from `local_optimizer` to continue (its moments kept) instead of a
    fresh one (what a client does every round)."""
    if opt is None:
        # Only blocks 1..depth: a deeper parameter given to AdamW would be moved by
        # weight decay (and FedProx's term) though the client never trains it.
        # Local cross-entropy on a client's skewed labels would pull closed-form heads
        # towards its own classes; the server refits them instead.
        mine = set(sent_up_to(trainable_names(model), depth, s.clients_train_heads))
        opt, _ = local_optimizer(model, mine, s)
    params = opt.params
    anchor = [p.detach().clone() for p in params] if s.prox_mu > 0 else None
    model.train()
    dev = model_device(model)
    sums = torch.zeros(depth, device=dev)
    seen = 0
    prior = None
    if s.logit_adjust > 0 and s.class_counts is not None:
        prior = logit_prior(s.class_counts, s.logit_adjust).to(dev)
    for _ in range(s.epochs):
        for x, y in loader:
            x, y = x.to(dev), y.to(dev)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=s.autocast == "bf16"):
                total, per_exit = exit_losses(model(x, depth=depth, block_grad=s.block_grad), y, s, prior)
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
