"""Personalisation on a client: fine-tune the global adapters on local data.

The server asks for it with an `evaluate.personalize` message (after the
last round), which Flower routes to `client_app.app.personalize_exits`. The
client fine-tunes the exits it runs for `personalize-epochs` at
`personalize-lr` on its training split, and reports validation accuracy per
exit before and after, plus the training loss before and after. Only
metrics travel back: the personalised weights never leave the client, and
the model object (shared by every message this process handles) gets the
received global weights back.

With closed-form heads (`heads` other than "trained") the server sends the
federation's label counts instead, and personalisation moves each head's
bias from that label prior to the node's own, when the node's labels differ
from it beyond chance (`labels_differ`): fine-tuning those heads, or the
adapters under them, lowered the nodes' own accuracy.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from adapters.model import AnytimeViT
from adapters.state import get_state, set_state
from adapters.training import TrainSettings, evaluate, label_counts, logit_prior, train_local

# How sure a node must be that its labels are not the federation's before its heads move to them.
PRIOR_TEST_LEVEL = 0.01


@torch.no_grad()
def shift_to_own_labels(model: AnytimeViT, depth: int, own, federation) -> None:
    """Closed-form heads predict with the federation's label prior; a personal model
    uses its node's: each head's bias moves by log p_node(y) - log p_federation(y).

    (An unseen class counts half an example.) Fine-tuning the fitted heads with
    cross-entropy instead costs accuracy (docs/benchmarks.md).
    """
    shift = logit_prior(torch.as_tensor(own, dtype=torch.float32), 1.0) - logit_prior(
        torch.as_tensor(federation, dtype=torch.float32), 1.0
    )
    for i in range(depth):
        model.heads[i].fc.bias += shift.to(model.heads[i].fc.bias.device)


def labels_differ(own, federation, level: float = PRIOR_TEST_LEVEL) -> bool:
    """Whether a node's label counts depart from the federation's label prior by more than the
    sampling noise of its few examples: Pearson's chi-square test at `level`.

    Where every node holds every class alike (the characters task), the node's counts differ
    from the federation's by chance only, and a shift to them cost 10-15 points on its own
    validation data (docs/benchmarks.md): then the heads stay as the federation fitted them.
    """
    from scipy.stats import chisquare

    own = np.asarray(own, dtype=np.float64)
    prior = np.maximum(np.asarray(federation, dtype=np.float64), 0.5)  # an unseen class: half an example
    if own.sum() <= 0:
        return False
    expected = prior / prior.sum() * own.sum()
    return bool(chisquare(own, expected).pvalue < level)


def fine_tune(model: AnytimeViT, depth: int, train_ds, cfg: dict[str, Any], seed: int = 0) -> dict:
    """Train blocks 1..depth's adapters/heads in place on train_ds (see train_local)."""
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(train_ds, batch_size=cfg["batch-size"], shuffle=True, generator=gen)
    return train_local(model, loader, depth, TrainSettings.from_config(cfg, personalize=True))


def personalize(
    model: AnytimeViT,
    depth: int,
    train_ds,
    val_ds,
    cfg: dict[str, Any],
    seed: int = 0,
    federation_labels: list[int] | None = None,
) -> dict:
    """Fine-tune blocks 1..depth's adapters/heads on train_ds; metrics before/after.

    Returns flat metrics: `accuracy-before-i` / `accuracy-after-i` (validation,
    i = 1..depth; absent when val_ds is empty), `train-loss-before` /
    `train-loss-after` (mean cross-entropy over the exits on train_ds).
    The model's trainable weights are restored before returning.
    """
    global_state = get_state(model)
    metrics: dict[str, float | int] = {"depth": depth, "num-examples": len(val_ds), "num-train-examples": len(train_ds)}
    if len(train_ds) == 0:
        return metrics
    train_eval = DataLoader(train_ds, batch_size=cfg["eval-batch-size"])
    val = DataLoader(val_ds, batch_size=cfg["eval-batch-size"]) if len(val_ds) else None
    try:
        before_train = evaluate(model, train_eval, depth)
        before_val = evaluate(model, val, depth) if val else None
        changed = True
        if federation_labels is None:
            fine_tune(model, depth, train_ds, cfg, seed)
        else:
            # Closed-form heads: a prior shift, no gradient steps; fine-tuning (adapters
            # alone or with the heads) lowered the nodes' own accuracy (docs/outputs.md).
            own = label_counts(train_ds, model.num_classes)
            changed = labels_differ(own.numpy(), federation_labels)
            metrics["label-prior-differs"] = int(changed)
            if changed:
                shift_to_own_labels(model, depth, own, federation_labels)
        if changed:
            after_train = evaluate(model, train_eval, depth)
            after_val = evaluate(model, val, depth) if val else None
        else:  # a model left as it was scores as it did: no second pass over the data
            after_train, after_val = before_train, before_val
    finally:
        set_state(model, global_state)
    metrics["train-loss-before"] = float(np.mean(before_train["loss"]))
    metrics["train-loss-after"] = float(np.mean(after_train["loss"]))
    if before_val and after_val:
        for i, (a, b) in enumerate(zip(before_val["accuracy"], after_val["accuracy"]), start=1):
            metrics[f"accuracy-before-{i}"] = float(a)
            metrics[f"accuracy-after-{i}"] = float(b)
    return metrics
