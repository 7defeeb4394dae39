"""Anytime inference: early exit per input, the cost of each exit, and the
accuracy-vs-cost trade-off of confidence-based exiting.

An input leaves at the first exit whose softmax confidence (largest class
probability) reaches the threshold; the last exit allowed always answers.
Exit d's prediction does not depend on anything after block d, so the
accuracy/cost of every threshold can be read off one full forward pass over
a test set (`anytime_report`) and equals what `early_exit` would give.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from .build import backbone_input
from .model import AnytimeViT

# Dense near 1: trained exits are usually very confident, and that is where
# the trade-off moves fastest.
DEFAULT_THRESHOLDS = tuple(round(t, 3) for t in np.linspace(0.0, 0.9, 10)) + (
    0.95,
    0.97,
    0.98,
    0.99,
    0.995,
    0.999,
    1.0,
)


@dataclass
class EarlyExit:
    logits: torch.Tensor  # (B, C) logits of the exit each input left at
    exits: torch.Tensor  # (B,) 1-based exit (= blocks run) per input
    confidence: torch.Tensor  # (B,) softmax confidence at that exit


@torch.no_grad()
def early_exit(model: AnytimeViT, x: torch.Tensor, threshold: float, max_depth: int | None = None) -> EarlyExit:
    """Run each input only up to the first exit whose confidence >= threshold.

    Inputs that have exited are dropped from the batch, so deeper blocks run
    on the remaining inputs only. threshold 0 stops every input at exit 1;
    a threshold above 1 runs every input to `max_depth` (default: all blocks).
    """
    depth = model.num_blocks if max_depth is None else max_depth
    if not 1 <= depth <= model.num_blocks:
        raise ValueError(f"max_depth must be in 1..{model.num_blocks}, got {depth}")
    was_training = model.training
    model.eval()
    try:
        return _early_exit(model, x, threshold, depth)
    finally:
        model.train(was_training)


def _early_exit(model: AnytimeViT, x: torch.Tensor, threshold: float, depth: int) -> EarlyExit:
    n = x.shape[0]
    out_logits = torch.zeros(n, model.num_classes, device=x.device)
    out_exits = torch.zeros(n, dtype=torch.long, device=x.device)
    out_conf = torch.zeros(n, device=x.device)
    active = torch.arange(n, device=x.device)
    tokens = model.embed(x)
    history: list[torch.Tensor] = []
    logits = None
    # Same steps as AnytimeViT.forward (tests check they agree), on a
    # shrinking batch.
    for i in range(depth):
        tokens = model.block(i, tokens)
        cls = tokens[:, 0]
        history.append(cls)
        summary, new_cls = model.adapter_for(i)(torch.stack(history, dim=1))
        logits = model.exit_logits(i, model.head_logits(i, summary, cls, tokens), logits)
        conf = logits.softmax(-1).amax(-1)
        done = torch.ones_like(conf, dtype=torch.bool) if i + 1 == depth else conf >= threshold
        idx = active[done]
        out_logits[idx] = logits[done].float()
        out_exits[idx] = i + 1
        out_conf[idx] = conf[done].float()
        keep = ~done
        if not keep.any():
            break
        active = active[keep]
        tokens = torch.cat([new_cls[keep].unsqueeze(1), tokens[keep, 1:]], dim=1)
        history = [h[keep] for h in history]
        logits = logits[keep]
    return EarlyExit(out_logits, out_exits, out_conf)


def flops_per_exit(model: AnytimeViT) -> list[int]:
    """FLOPs for one input to reach exit d (blocks, adapters and heads 1..d), d = 1..L.

    Counted by torch's FlopCounterMode (matmuls, convolutions, attention;
    element-wise ops are not counted) in one full forward pass, reading the
    running total as each exit head finishes: nothing an exit needs runs
    after its head. Two settings make every attention visible to the counter
    without changing its FLOPs: the math SDPA backend (the counter has no
    formula for the fused CPU kernel), and autograd on (keeps
    nn.MultiheadAttention off its fused inference path).
    """
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    flops: list[int] = []
    hooks = [h.register_forward_hook(lambda *_: flops.append(int(counter.get_total_flops()))) for h in model.heads]
    try:
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH), counter:
            model(torch.zeros(1, *backbone_input(model.backbone), device=next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return flops


@torch.no_grad()
def exit_confidences(model: AnytimeViT, loader) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, correct), each (L, N): every exit's softmax confidence and hit."""
    model.eval()
    conf, correct = [], []
    dev = next(model.parameters()).device
    for x, y in loader:
        x, y = x.to(dev), y.to(dev)
        logits = torch.stack(model(x))  # (L, B, C)
        p = logits.softmax(-1)
        conf.append(p.amax(-1))
        correct.append(p.argmax(-1) == y)
    if not conf:
        return np.zeros((model.num_blocks, 0), np.float32), np.zeros((model.num_blocks, 0), bool)
    return torch.cat(conf, 1).cpu().numpy(), torch.cat(correct, 1).cpu().numpy()


def threshold_exits(conf: np.ndarray, threshold: float) -> np.ndarray:
    """0-based exit per input: the first whose confidence >= threshold, else the last."""
    passes = conf >= threshold
    passes[-1] = True
    return passes.argmax(0)  # argmax gives the first True


def anytime_curve(conf: np.ndarray, correct: np.ndarray, flops: list[int], thresholds=DEFAULT_THRESHOLDS) -> list[dict]:
    """Accuracy, mean FLOPs and mean blocks of confidence-based exiting per threshold."""
    num_exits, n = conf.shape
    cost = np.asarray(flops[:num_exits], dtype=np.float64)
    rows = []
    for t in thresholds:
        exits = threshold_exits(conf, t)
        hit = correct[exits, np.arange(n)]
        rows.append(
            {
                "threshold": float(t),
                "accuracy": round(float(hit.mean()), 4) if n else 0.0,
                "mean-flops": float(cost[exits].mean()) if n else 0.0,
                "mean-blocks": round(float(exits.mean() + 1), 4) if n else 0.0,
                "exit-counts": np.bincount(exits, minlength=num_exits).tolist(),
            }
        )
    return rows


def anytime_report(model: AnytimeViT, loader, thresholds=DEFAULT_THRESHOLDS) -> dict:
    """Accuracy and cost at every exit, and the curve of confidence-based exiting."""
    flops = flops_per_exit(model)
    conf, correct = exit_confidences(model, loader)
    acc = correct.mean(1) if correct.shape[1] else np.zeros(len(flops))
    return {
        "num-examples": int(correct.shape[1]),
        "num-blocks": model.num_blocks,
        "flops-counter": "torch.utils.flop_counter.FlopCounterMode, one input, matmul/conv/attention FLOPs",
        "exits": [
            {"exit": d, "blocks": d, "accuracy": round(float(a), 4), "flops": f}
            for d, (a, f) in enumerate(zip(acc, flops), start=1)
        ],
        "dynamic": anytime_curve(conf, correct, flops, thresholds),
    }
