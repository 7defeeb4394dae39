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

Bytes: G grows with the square of the feature width, so the statistics
travel in fixed point around the node's mean (adapters/head_codec.py; the
server sums and solves in float64) and, where the features are wider than
the budget allows, as the sums of a projection of phi per exit
(orthonormal rows: the exit's current head directions, then fixed random
ones drawn from the run's seed): the heads are fitted in the projected
space and mapped back (`projections`; head_codec.stat_dim gives the width).
The default budget is one dense adapter update of the same depth
(docs/benchmarks.md).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from core.config import head_fit_rounds

from .model import AnytimeViT
from .training import model_device

GRAM = "gram"
CROSS = "cross"


def stat_name(exit_index: int, kind: str) -> str:
    """Statistics are named like the head they fit (heads.<i>.*), so depth rules apply to them."""
    return f"heads.{exit_index}.fc.{kind}"


def projection(width: int, k: int, seed: int) -> np.ndarray | None:
    """A fixed (k, width) matrix with orthonormal rows that client and server draw alike from
    `seed`; None when k >= width (the features travel as they are).

    Orthonormal rows keep |P h| <= |h|: the bound LayerNorm puts on phi holds for P phi.
    """
    if k >= width:
        return None
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((width, k)))
    return np.ascontiguousarray(q.T)


def projections(arrays: dict[str, np.ndarray], depth: int, k: int, seed: int) -> list[np.ndarray | None]:
    """Per exit 1..depth, the (k, width) projection its statistics are sent on: orthonormal rows
    that span the exit's current head weights first (the last fit's solution, which node and
    server hold alike in `arrays`), then `projection`'s fixed random directions; None for every
    exit when k >= width.

    The frozen features tell the classes apart along directions in which they vary little, so
    neither a random projection nor the features' principal directions keep them (each cost
    1.4 points on the characters task at 155 of 192 features); the last fit's weights point
    along them, and a refit on their span plus random directions is the full fit while the
    adapters have not moved (docs/benchmarks.md section 2d). The first fit reads randomly
    initialised heads: a random projection."""
    out: list[np.ndarray | None] = []
    for i in range(depth):
        w = np.asarray(arrays[f"heads.{i}.fc.weight"], dtype=np.float64)
        rand = projection(w.shape[1], k, seed)
        if rand is None:
            out.append(None)
            continue
        # at most half of the k rows: the rest keep reading new directions as the adapters move
        _, sv, vt = np.linalg.svd(w, full_matrices=False)
        lead = vt[: min(k // 2, int((sv > sv[:1].max(initial=0.0) * 1e-6).sum()))]
        q, _ = np.linalg.qr(np.hstack([lead.T, rand.T]))
        out.append(np.ascontiguousarray(q[:, :k].T))
    return out


def unpack_gram(upper: np.ndarray) -> np.ndarray:
    """The symmetric G from its upper triangle (row-major), in float64."""
    dim = int((np.sqrt(8 * len(upper) + 1) - 1) / 2)
    if dim * (dim + 1) // 2 != len(upper):
        raise ValueError(f"{len(upper)} numbers are not the upper triangle of a square matrix")
    gram = np.zeros((dim, dim))
    gram[np.triu_indices(dim)] = upper
    return gram + np.triu(gram, 1).T


def pack_gram(gram: np.ndarray) -> np.ndarray:
    return gram[np.triu_indices(len(gram))]


@torch.no_grad()
def exit_statistics(
    model: AnytimeViT, loader: DataLoader, depth: int, proj: list | None = None
) -> tuple[dict[str, np.ndarray], int]:
    """G (its upper triangle, row-major) and R of exits 1..depth over the loader's examples
    (float64; adapters/head_codec.py encodes them for the wire), of the features times `proj[i]` at exit i when given
    (`projections`); and the example count."""
    feats: dict[int, torch.Tensor] = {}
    hooks = [
        model.heads[i].fc.register_forward_hook(lambda _m, inp, _out, i=i: feats.__setitem__(i, inp[0]))
        for i in range(depth)
    ]
    dim, classes = model.heads[0].fc.in_features, model.num_classes
    per_exit = proj if proj is not None else [None] * depth
    ps = [None if m is None else torch.from_numpy(np.asarray(m, dtype=np.float64)).T for m in per_exit]
    if ps[0] is not None:
        dim = ps[0].shape[1]
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
                f = feats[i].double().cpu()
                p = ps[i]
                phi = torch.cat([f if p is None else f @ p, torch.ones(len(y), 1, dtype=torch.float64)], dim=1)
                gram[i] += phi.T @ phi
                cross[i] += phi.T @ onehot
            seen += len(y)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    upper = np.triu_indices(dim + 1)  # G is symmetric: half of it travels
    for i in range(depth):
        # float64 here: adapters/head_codec.py decides what travels
        out[stat_name(i, GRAM)] = gram[i].numpy()[upper]
        out[stat_name(i, CROSS)] = cross[i].numpy()
    return out, seen


def solve_heads(
    sums: dict[str, np.ndarray],
    counts: dict[int, float],
    lam: float,
    scale: float = 1.0,
    proj: list | None = None,
    shifts: dict[int, float] | None = None,
    votes: bool = False,
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
    training does not tear the fitted heads apart. Statistics of projected
    features (`proj`, one matrix per exit: `projections`) give weights on
    the projection, mapped back to phi.
    `shifts` per exit: added to G's diagonal (`dp_shift`, for noisy statistics).
    `votes`: each head's logits also times its examples over the widest exit's, so that in the
    exit ensemble (the mean of heads 1..k) a head counts as much as the data it was fitted on:
    a deep head that only the deep tiers reach is a worse fit alone, and with equal votes it
    pulled the deep exits below the middle ones (docs/benchmarks.md, section 0).
    """
    heads: dict[str, np.ndarray] = {}
    fitted = {i: n for i, n in counts.items() if n > 0}
    # Exit 1 is run by every node, a deep exit by the deep tiers only, whose
    # label mix differs: shift a deep exit's logits from its nodes' label
    # prior to the federation's.
    widest = federation_exit(counts)
    prior = _log_prior(sums, widest) if widest is not None else None
    for i, n in sorted(fitted.items()):
        gram, cross = unpack_gram(sums[stat_name(i, GRAM)]), sums[stat_name(i, CROSS)]
        vote = n / fitted[widest] if votes else 1.0
        w = scale * vote * ridge(gram, cross, n, lam, (shifts or {}).get(i, 0.0))  # (D+1, C)
        bias = w[-1] + prior - _log_prior(sums, i)
        p = None if proj is None else proj[i]
        weight = w[:-1].T if p is None else w[:-1].T @ p
        heads[f"heads.{i}.fc.weight"] = np.ascontiguousarray(weight, dtype=np.float32)
        heads[f"heads.{i}.fc.bias"] = np.ascontiguousarray(bias, dtype=np.float32)
    return heads


def ridge(gram: np.ndarray, cross: np.ndarray, n: float, lam: float, shift: float = 0.0) -> np.ndarray:
    """argmin_W |phi W - y|^2 / n + lam |W|^2 from G, R and the example count n, in float64;
    `shift` (in G's units) is added to G's diagonal first (the noise floor of DP statistics)."""
    gram = np.asarray(gram, dtype=np.float64) / n
    return np.linalg.solve(gram + (lam + shift / n) * np.eye(len(gram)), np.asarray(cross, dtype=np.float64) / n)


def feature_bound(arrays: dict[str, np.ndarray], exit_index: int) -> float:
    """The largest |h| an exit's fc input h can have, from its LayerNorms' affine parameters.

    LayerNorm(x) = g * z + b with z of zero mean and |z|^2 = D var / (var + eps) < D,
    so |LayerNorm(x)| <= max|g| sqrt(D) + |b|; h is one such half or two side by side.
    """
    total = 0.0
    for norm in ("norm", "patch_norm"):
        g = arrays.get(f"heads.{exit_index}.{norm}.weight")
        if g is None:
            continue
        b = arrays[f"heads.{exit_index}.{norm}.bias"].astype(np.float64)
        total += (float(np.abs(g).max()) * np.sqrt(g.size) + float(np.linalg.norm(b))) ** 2
    return float(np.sqrt(total))


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


# -- differentially private statistics (sufficient-statistics perturbation) ------------------


def dp_noise_std(bounds: list[float], epsilon: float, delta: float, fits: int) -> float:
    """The std of the Gaussian noise on every entry of a node's statistics (exits 1..len(bounds))
    that makes `fits` releases of them together (epsilon, delta)-DP for any one of its examples.

    Neighbouring data sets differ in one example, replaced (the example count is public: the
    server weighs and checks by it). One example's phi = [h, 1] with |h| <= B moves G by
    phi phi^T - phi' phi'^T, whose upper triangle has norm <= 2 (B^2 + 1), and R by
    phi y^T - phi' y'^T, norm <= 2 sqrt(B^2 + 1); it reaches every exit it runs, so the
    sensitivity adds up over the exits in L2. Each fit is a Gaussian mechanism, rho = D^2 / (2 s^2)
    zero-concentrated DP; `fits` of them compose to fits * rho, which is (epsilon, delta)-DP when
    rho_total = (sqrt(epsilon + log(1/delta)) - sqrt(log(1/delta)))^2 (Bun & Steinke 2016).
    """
    if epsilon <= 0 or fits < 1:
        raise ValueError("epsilon must be > 0 and fits >= 1")
    sens = float(np.sqrt(sum(4 * (b * b + 1) ** 2 + 4 * (b * b + 1) for b in bounds)))
    log_inv_delta = float(np.log(1 / delta))
    rho_total = (np.sqrt(epsilon + log_inv_delta) - np.sqrt(log_inv_delta)) ** 2
    return sens / float(np.sqrt(2 * rho_total / fits))


def noise_std(cfg: dict, bounds: list[float]) -> float:
    """The std of the privacy noise a node adds to the statistics of the exits with these feature
    bounds under the run config (`head-dp-epsilon`; 0 when off): client and server compute it alike."""
    if cfg["head-dp-epsilon"] <= 0:
        return 0.0
    return dp_noise_std(bounds, cfg["head-dp-epsilon"], cfg["head-dp-delta"], len(head_fit_rounds(cfg)))


def add_dp_noise(sums: dict[str, np.ndarray], std: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """`sums` with N(0, std^2) added to every entry but G's constant corner (the public example count)."""
    out = {}
    for name, value in sums.items():
        noisy = value.astype(np.float64) + rng.normal(0.0, std, value.shape)
        if name.endswith(GRAM):
            noisy[-1] = value[-1]  # the row-major upper triangle ends with the corner
        out[name] = noisy
    return out


def dp_shift(stds: list[float], dim: int) -> float:
    """What to add to the diagonal of a sum of noisy G's (`dim` x `dim`, one noise std per node)
    so that it stays positive semi-definite: the summed noise is a symmetric Gaussian matrix of
    entry std sqrt(sum std^2), whose largest eigenvalue is about 2 sqrt(sum std^2) sqrt(dim)
    (the edge of the semicircle law)."""
    return 2.0 * float(np.sqrt(sum(s * s for s in stds) * dim))
