"""The server's checks and screen of the nodes' head statistics (server_app/head_guard.py),
on statistics of synthetic LayerNorm'd features (numpy only: fast)."""

import numpy as np
import pytest
import torch

from adapters.head_fit import (
    CROSS,
    GRAM,
    feature_bound,
    pack_gram,
    projection,
    solve_heads,
    stat_name,
    unpack_gram,
)
from client_app.head_attacks import poison
from server_app.head_guard import cap_weights, check_statistics, disagreement, influence, influence_screen, screen

CLASSES, WIDTH, DEPTH = 5, 16, 2


def _layernormed(x: np.ndarray, gain: np.ndarray, bias: np.ndarray) -> np.ndarray:
    return torch.nn.functional.layer_norm(
        torch.from_numpy(np.asarray(x, np.float64)),
        (x.shape[1],),
        torch.from_numpy(np.asarray(gain, np.float64)),
        torch.from_numpy(np.asarray(bias, np.float64)),
    ).numpy()


def _node(seed: int, classes=range(CLASSES), n: int = 60, gain=None, bias=None):
    """Statistics of n examples of class-clustered features (same class centres for every node)."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).normal(0, 1, (CLASSES, WIDTH))
    y = rng.choice(list(classes), n)
    gain = np.ones(WIDTH) if gain is None else gain
    bias = np.zeros(WIDTH) if bias is None else bias
    stats = {}
    for i in range(DEPTH):
        h = _layernormed(centres[y] + rng.normal(0, 0.7, (n, WIDTH)), gain, bias)
        phi = np.hstack([h, np.ones((n, 1))])
        stats[stat_name(i, GRAM)] = pack_gram(phi.T @ phi).astype(np.float32)
        stats[stat_name(i, CROSS)] = (phi.T @ np.eye(CLASSES)[y]).astype(np.float32)
    return stats, n


def _arrays(gain=None, bias=None):
    gain = np.ones(WIDTH, np.float32) if gain is None else gain
    bias = np.zeros(WIDTH, np.float32) if bias is None else bias
    return {f"heads.{i}.norm.{p}": v for i in range(DEPTH) for p, v in (("weight", gain), ("bias", bias))}


BOUNDS = [feature_bound(_arrays(), i) for i in range(DEPTH)]


def _edit(stats, kind, fn, exit_index=0):
    out = dict(stats)
    name = stat_name(exit_index, kind)
    if kind == GRAM:
        out[name] = pack_gram(fn(unpack_gram(stats[name]))).astype(np.float32)
    else:
        out[name] = fn(stats[name].astype(np.float64).copy()).astype(np.float32)
    return out


def test_honest_statistics_pass():
    for seed in range(5):
        stats, n = _node(seed)
        check_statistics(stats, DEPTH, n, BOUNDS)


def test_the_layernorm_bound_holds_for_real_layernorm_outputs():
    rng = np.random.default_rng(1)
    gain, bias = rng.normal(1, 0.5, WIDTH).astype(np.float32), rng.normal(0, 0.3, WIDTH).astype(np.float32)
    h = _layernormed(rng.normal(0, 5, (2000, WIDTH)) ** 3, gain, bias)  # heavy tails: near the bound
    bound = feature_bound(_arrays(gain, bias), 0)
    assert np.linalg.norm(h, axis=1).max() <= bound
    assert bound == pytest.approx(np.abs(gain).max() * np.sqrt(WIDTH) + np.linalg.norm(bias), rel=1e-6)
    # two halves side by side (exit-patch-mean)
    both = {**_arrays(gain, bias), "heads.0.patch_norm.weight": gain, "heads.0.patch_norm.bias": bias}
    assert feature_bound(both, 0) == pytest.approx(np.sqrt(2) * bound, rel=1e-6)


@pytest.mark.parametrize(
    "attack,match",
    [
        ("corner", "corner"),
        ("counts", "class counts"),
        ("negative-count", "class counts"),
        ("scale-class", "constant column"),
        ("scaled-features", "trace"),
        ("class-norm", "class 0"),
        ("not-psd", "within-class"),
    ],
)
def test_statistics_no_real_features_give_are_refused_by_name(attack, match):
    stats, n = _node(3)

    def corner(g):
        g[-1, -1] += 5
        return g

    def counts(r):
        r[-1, 0] += 3
        return r

    def negative(r):
        r[-1, 0], r[-1, 1] = -2, r[-1, 1] + r[-1, 0] + 2
        return r

    def scaled(g):  # features 10x longer, kept consistent: corner and constant column untouched
        g[:-1, :-1] *= 100
        return g

    def class_norm(r):  # class 0's feature sum far out, R's total kept equal to G's constant column
        shift = 50 * BOUNDS[0] * np.eye(WIDTH + 1)[0]
        r[:, 0] += shift
        r[:, 1] -= shift
        return r

    def not_psd(g):  # less spread than the class means alone imply
        g[:-1, :-1] *= 0.5
        return g

    edits = {
        "corner": (GRAM, corner),
        "counts": (CROSS, counts),
        "negative-count": (CROSS, negative),
        "scaled-features": (GRAM, scaled),
        "class-norm": (CROSS, class_norm),
        "not-psd": (GRAM, not_psd),
    }
    if attack == "scale-class":
        bad, m = poison("scale-class", stats, n, None)
    else:
        bad, m = _edit(stats, *edits[attack], exit_index=1), n
    with pytest.raises(ValueError, match=match):
        check_statistics(bad, DEPTH, m, BOUNDS)


def test_the_noise_attack_is_refused():
    stats, n = _node(4)
    rng = np.random.default_rng(0)
    bad, m = poison("noise", stats, n, lambda s: {k: rng.normal(0, 10, v.shape).astype(v.dtype) for k, v in s.items()})
    with pytest.raises(ValueError):
        check_statistics(bad, DEPTH, m, BOUNDS)


@pytest.mark.parametrize("mode", ["rotate-labels", "inflate-count", "fake-data"])
def test_consistent_attacks_pass_the_checks(mode):
    """What the checks cannot catch: statistics some real data set gives (the cap and screen's job)."""
    stats, n = _node(5)
    bad, m = poison(mode, stats, n, None)
    check_statistics(bad, DEPTH, m, BOUNDS)
    assert m == {"rotate-labels": n, "inflate-count": 100 * n, "fake-data": 10 * n}[mode]


def test_no_node_counts_for_more_than_the_cap_times_the_median():
    w = cap_weights({0: 100, 1: 120, 2: 80, 3: 90, 4: 10_000}, 3.0)
    assert w[0] == w[1] == w[2] == w[3] == 1.0
    assert 10_000 * w[4] == pytest.approx(3 * 100)
    assert set(cap_weights({0: 1, 1: 10_000}, 0.0).values()) == {1.0}


def _exit0(stats, n, weight=1.0):
    return (
        weight * unpack_gram(stats[stat_name(0, GRAM)].astype(np.float64)),
        weight * stats[stat_name(0, CROSS)].astype(np.float64),
        weight * n,
    )


def _with_attacker(nodes, mode):
    """Exit 1's statistics of `nodes` and, last, of an attacker poisoned `mode`'s way, its weight capped."""
    bad, m = poison(mode, *_node(9), None)
    weight = cap_weights({**{j: nd[1] for j, nd in enumerate(nodes)}, len(nodes): m}, 3.0)[len(nodes)]
    return [_exit0(*nd) for nd in nodes] + [_exit0(bad, m, weight)]


@pytest.mark.parametrize("mode", ["rotate-labels", "fake-data"])
def test_the_screen_leaves_out_a_node_whose_labels_disagree_with_everyone_elses(mode):
    # label-skewed honest nodes: two or three classes each; node 5 alone has class 4
    nodes = [_node(s, classes) for s, classes in enumerate([(0, 1), (1, 2), (2, 3), (0, 3), (0, 1, 2), (3, 4)])]
    honest = [_exit0(*nd) for nd in nodes]
    assert disagreement(honest, 1e-6).max() < 0.1
    assert screen(honest, 1e-6, 0.5) == {}  # the node alone with class 4 is not judged on it
    attacked = _with_attacker(nodes, mode)
    dropped = screen(attacked, 1e-6, 0.5)
    assert list(dropped) == [len(honest)] and dropped[len(honest)] > 0.5
    assert screen(attacked, 1e-6, 1.0) == {}  # 1 turns it off


@pytest.mark.parametrize("mode", ["inflate-count", "fake-data"])
def test_the_influence_screen_leaves_out_a_node_that_raises_everyone_elses_error(mode):
    # honest nodes of unequal sizes, every class each: their influence stays near the median
    nodes = [_node(s, n=40 + 10 * s) for s in range(6)]
    honest = [_exit0(*nd) for nd in nodes]
    scores = influence(honest, 1e-6)
    assert (scores > 0).all() and scores.max() < 3 * np.median(scores)
    assert influence_screen(honest, 1e-6, 5.0) == {}
    attacked = _with_attacker(nodes, mode)
    dropped = influence_screen(attacked, 1e-6, 5.0)
    assert list(dropped) == [len(honest)] and dropped[len(honest)] > 5.0
    assert influence_screen(attacked, 1e-6, 0.0) == {}  # 0 turns it off


def test_influence_is_what_the_others_lose_when_a_node_joins():
    """The shortcut (the total's loss minus the node's own) against the loss of every other
    node computed one by one."""
    from adapters.head_fit import ridge

    stats = [_exit0(*_node(s)) for s in range(4)]

    def loss(w, g, r, n):
        return float(np.trace(w.T @ g @ w) - 2 * np.sum(w * r) + n)

    g, r, n = (sum(s[k] for s in stats) for k in range(3))
    w_all = ridge(g, r, n, 1e-6)
    for j in range(4):
        others = [s for i, s in enumerate(stats) if i != j]
        w = ridge(sum(s[0] for s in others), sum(s[1] for s in others), sum(s[2] for s in others), 1e-6)
        want = sum(loss(w_all, *s) - loss(w, *s) for s in others) / sum(s[2] for s in others)
        assert influence(stats, 1e-6)[j] == pytest.approx(want, rel=1e-6, abs=1e-9)


def test_a_projection_is_orthonormal_and_fixed_by_the_seed():
    p = projection(40, 12, seed=7)
    np.testing.assert_allclose(p @ p.T, np.eye(12), atol=1e-12)
    np.testing.assert_array_equal(p, projection(40, 12, seed=7))
    assert not np.array_equal(p, projection(40, 12, seed=8))
    assert projection(40, 40, seed=7) is None


def test_a_refit_on_the_span_of_the_last_fit_is_the_full_fit():
    """`projections`: orthonormal rows that hold the current heads' directions, so that the fit of
    unchanged features on them is the fit on every feature (a random projection loses it)."""
    from adapters.head_fit import projections, ridge

    rng = np.random.default_rng(3)
    h, y = rng.normal(0, 1, (400, 24)) * np.linspace(0.05, 1, 24), rng.integers(0, 4, 400)
    phi = np.hstack([h, np.ones((400, 1))])
    full = ridge(phi.T @ phi, phi.T @ np.eye(4)[y], 400, 1e-3)
    first = {"heads.0.fc.weight": rng.normal(0, 1, (4, 24)), "heads.1.fc.weight": full[:-1].T}

    def refit(p):
        x = np.hstack([h @ p.T, np.ones((400, 1))])
        sums = {stat_name(0, GRAM): pack_gram(x.T @ x), stat_name(0, CROSS): x.T @ np.eye(4)[y]}
        heads = solve_heads(sums, {0: 400}, 1e-3, proj=[p])
        return h @ heads["heads.0.fc.weight"].T + heads["heads.0.fc.bias"]

    rand, span = projections(first, 2, 8, seed=5)
    for p in (rand, span):
        assert p.shape == (8, 24)
        np.testing.assert_allclose(p @ p.T, np.eye(8), atol=1e-12)
    np.testing.assert_allclose(refit(span), phi @ full, atol=1e-6)
    assert np.abs(refit(rand) - phi @ full).max() > 1e-2
    assert projections(first, 2, 24, seed=5) == [None, None]


def test_heads_solved_on_projected_statistics_read_the_full_features():
    rng = np.random.default_rng(2)
    h, y = rng.normal(0, 1, (300, 24)), rng.integers(0, 3, 300)
    p = projection(24, 10, seed=1)
    phi = np.hstack([h @ p.T, np.ones((300, 1))])
    sums = {stat_name(0, GRAM): pack_gram(phi.T @ phi), stat_name(0, CROSS): phi.T @ np.eye(3)[y]}
    heads = solve_heads(sums, {0: 300}, 1e-3, proj=[p])
    assert heads["heads.0.fc.weight"].shape == (3, 24)
    w = np.linalg.solve(phi.T @ phi / 300 + 1e-3 * np.eye(11), phi.T @ np.eye(3)[y] / 300)
    np.testing.assert_allclose(h @ heads["heads.0.fc.weight"].T + heads["heads.0.fc.bias"], phi @ w, atol=1e-5)
