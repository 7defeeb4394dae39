"""Exit heads in closed form: ridge regression on each exit's features.

Every exit head ends in a linear layer on phi = LayerNorm(summary + cls).
Its ridge-regression solution needs only two sums over the training
examples, G = sum phi phi^T and R = sum phi y^T (phi with a constant 1 for the
bias, y one-hot). Sums add up across clients, so the federated solution is
exactly the central one, however skewed each client's labels are: averaging
softmax heads trained on skewed clients is what costs federated training
most of its accuracy (docs/benchmarks.md).

`exit_statistics` runs on a client (torch); `solve_heads` on the server
(numpy only).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from .model import AnytimeViT
from .training import model_device

GRAM = "gram"
CROSS = "cross"


def stat_name(exit_index: int, kind: str) -> str:
    """Statistics are named like the head they fit (heads.<i>.*), so depth rules apply to them."""
    return f"heads.{exit_index}.fc.{kind}"


@torch.no_grad()
def exit_statistics(model: AnytimeViT, loader: DataLoader, depth: int) -> tuple[dict[str, np.ndarray], int]:
    """G (its upper triangle, row-major) and R of exits 1..depth over the loader's examples
    (float64); and the example count."""
    feats: dict[int, torch.Tensor] = {}
    hooks = [
        model.heads[i].fc.register_forward_hook(lambda _m, inp, _out, i=i: feats.__setitem__(i, inp[0]))
        for i in range(depth)
    ]
    dim, classes = model.heads[0].fc.in_features, model.num_classes
    gram = torch.zeros(depth, dim + 1, dim + 1, dtype=torch.float64)
    cross = torch.zeros(depth, dim + 1, classes, dtype=torch.float64)
    seen = 0
    model.eval()
    dev = model_device(model)
    try:
        for x, y in loader:
            model(x.to(dev), depth=depth)
            onehot = torch.nn.functional.one_hot(y.long(), classes).double()
            for i in range(depth):
                phi = torch.cat([feats[i].double().cpu(), torch.ones(len(y), 1, dtype=torch.float64)], dim=1)
                gram[i] += phi.T @ phi
                cross[i] += phi.T @ onehot
            seen += len(y)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    upper = np.triu_indices(dim + 1)  # G is symmetric: half of it travels
    for i in range(depth):
        # float64 on the wire: with a small ridge penalty float32 sums would
        # cost the solve several digits (condition number ~ 1 / ridge-lambda)
        out[stat_name(i, GRAM)] = gram[i].numpy()[upper]
        out[stat_name(i, CROSS)] = cross[i].numpy()
    return out, seen


def solve_heads(
    sums: dict[str, np.ndarray], counts: dict[int, int], lam: float, scale: float = 1.0
) -> dict[str, np.ndarray]:
    """heads.<i>.fc.weight/bias minimising the mean squared error to one-hot labels + lam |W|^2,
    times `scale`.

    `sums` holds G and R summed over clients, `counts` the examples behind
    each exit's sums. lam is relative to the mean of phi phi^T (LayerNorm
    features have unit scale), so it does not grow with the federation.
    An exit fitted on fewer nodes than the widest one has its bias shifted
    by the log ratio of the two label priors. The regression predicts
    scores near 0 and 1; `scale` turns them into
    logits whose softmax is confident where the scores are (early exit
    reads that confidence) and whose cross-entropy gradient in local
    training does not tear the fitted heads apart.
    """
    heads: dict[str, np.ndarray] = {}
    fitted = {i: n for i, n in counts.items() if n > 0}
    # Exit 1 is run by every node, a deep exit by the deep tiers only, whose
    # label mix differs: shift a deep exit's logits from its nodes' label
    # prior to the federation's.
    widest = federation_exit(counts)
    prior = _log_prior(sums, widest) if widest is not None else None
    for i, n in sorted(fitted.items()):
        cross = sums[stat_name(i, CROSS)] / n
        gram = np.zeros((len(cross), len(cross)))
        gram[np.triu_indices(len(cross))] = sums[stat_name(i, GRAM)] / n
        gram = gram + np.triu(gram, 1).T
        w = scale * np.linalg.solve(gram + lam * np.eye(len(gram)), cross)  # (D+1, C)
        bias = w[-1] + prior - _log_prior(sums, i)
        heads[f"heads.{i}.fc.weight"] = np.ascontiguousarray(w[:-1].T, dtype=np.float32)
        heads[f"heads.{i}.fc.bias"] = np.ascontiguousarray(bias, dtype=np.float32)
    return heads


def federation_exit(counts: dict[int, int]) -> int | None:
    """The exit fitted on the most examples (the shallowest of equals): its labels are the federation's."""
    fitted = {i: n for i, n in counts.items() if n > 0}
    return max(fitted, key=lambda i: (fitted[i], -i), default=None)


def exit_label_counts(sums: dict[str, np.ndarray], exit_index: int) -> np.ndarray:
    """Examples per class behind an exit's sums: R's constant row."""
    return sums[stat_name(exit_index, CROSS)][-1]


def _log_prior(sums: dict[str, np.ndarray], exit_index: int) -> np.ndarray:
    """log label frequencies behind an exit's sums; an unseen class counts half an example."""
    counts = np.maximum(exit_label_counts(sums, exit_index), 0.5)
    return np.log(counts / counts.sum())
