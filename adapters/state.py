"""Trainable state (adapters + exit heads) to and from plain numpy arrays."""

from __future__ import annotations

import numpy as np
import torch

from core.naming import names_up_to

from .model import AnytimeViT


def trainable_names(model: AnytimeViT, depth: int | None = None) -> list[str]:
    names = [n for n, _ in model.trainable_named_parameters()]
    return names if depth is None else names_up_to(names, depth)


def get_state(model: AnytimeViT, depth: int | None = None) -> dict[str, np.ndarray]:
    """Copies of the trainable parameters of blocks 1..depth (all when None)."""
    params = dict(model.trainable_named_parameters())
    return {n: params[n].detach().cpu().numpy().copy() for n in trainable_names(model, depth)}


@torch.no_grad()
def set_state(model: AnytimeViT, arrays: dict[str, np.ndarray]) -> None:
    """Load arrays into trainable parameters; unknown names or shapes raise."""
    params = dict(model.trainable_named_parameters())
    for name, value in arrays.items():
        if name not in params:
            raise KeyError(f"unknown adapter parameter {name!r}")
        p = params[name]
        if tuple(value.shape) != tuple(p.shape):
            raise ValueError(f"{name}: shape {tuple(value.shape)} != {tuple(p.shape)}")
        p.copy_(torch.as_tensor(np.asarray(value), dtype=p.dtype))
