"""How head statistics travel (adapters/head_codec.py): centred fixed point, numpy only."""

import numpy as np
import pytest
from torch.utils.data import DataLoader

from adapters.head_codec import MOMENTS, decode, encode, exit_bytes, stat_dim
from adapters.head_fit import CROSS, GRAM, exit_statistics, pack_gram, solve_heads, stat_name, unpack_gram
from core.codec import payload_bytes
from tests.test_head_fit import CLASSES, _data, _model

DEPTH, WIDTH = 2, 24


def _stats(seed=0, n=300, spread=1e-3):
    """Statistics of features that sit close to a common mean and tell the classes apart along
    directions of small variance: what rounding G as it is loses."""
    rng = np.random.default_rng(seed)
    mean = rng.normal(0, 1, WIDTH)
    centres = rng.normal(0, spread, (CLASSES, WIDTH))
    y = rng.integers(0, CLASSES, n)
    out = {}
    for i in range(DEPTH):
        phi = np.hstack([mean + centres[y] + rng.normal(0, spread / 3, (n, WIDTH)), np.ones((n, 1))])
        out[stat_name(i, GRAM)] = pack_gram(phi.T @ phi)
        out[stat_name(i, CROSS)] = phi.T @ np.eye(CLASSES)[y]
    return out, n


@pytest.mark.parametrize("bits", [0, 12, 22, 32])
def test_decoding_gives_back_the_statistics_to_the_precision_of_its_bits(bits):
    stats, n = _stats()
    back = decode(encode(stats, DEPTH, bits), DEPTH, WIDTH + 1, CLASSES, bits)
    assert set(back) == set(stats)
    for i in range(DEPTH):
        g, g2 = unpack_gram(stats[stat_name(i, GRAM)]), unpack_gram(back[stat_name(i, GRAM)])
        if bits == 0:  # float32: about 7 digits of G itself
            assert np.abs(g2 - g).max() <= 1e-7 * np.abs(g).max()
            continue
        # the sum of phi and the label counts travel exactly: the identities the guard checks hold
        np.testing.assert_array_equal(g2[:, -1], g[:, -1])
        np.testing.assert_array_equal(back[stat_name(i, CROSS)][-1], stats[stat_name(i, CROSS)][-1])
        # the rest to within half a step of the scatter around the mean, however large the mean
        scatter = g[:-1, :-1] - np.outer(g[:-1, -1], g[:-1, -1]) / n
        assert np.abs(g2 - g).max() <= 2.0 ** -(bits - 1) * np.abs(scatter).max()


def test_centring_keeps_the_fit_that_rounding_g_as_it_is_loses():
    stats, n = _stats()
    counts = {i: n for i in range(DEPTH)}
    exact = solve_heads(stats, counts, 1e-6)
    coded = solve_heads(decode(encode(stats, DEPTH, 22), DEPTH, WIDTH + 1, CLASSES, 22), counts, 1e-6)
    w = exact["heads.0.fc.weight"]
    assert np.abs(coded["heads.0.fc.weight"] - w).max() < 1e-3 * np.abs(w).max()
    # the same 22 bits spent on G itself (one scale for the whole array) lose the class directions
    top = np.abs(stats[stat_name(0, GRAM)]).max() / (2**21 - 1)
    rounded = {**stats, stat_name(0, GRAM): np.rint(stats[stat_name(0, GRAM)] / top) * top}
    naive = solve_heads(rounded, counts, 1e-6)["heads.0.fc.weight"]
    assert np.abs(naive - w).max() > 0.1 * np.abs(w).max()


def test_real_statistics_round_trip_and_cost_what_exit_bytes_says():
    model = _model()
    stats, n = exit_statistics(model, DataLoader(_data(50, 1), batch_size=25), 3)
    dim = model.heads[0].fc.in_features
    for bits in (0, 22):
        wire = encode(stats, 3, bits)
        data = sum(v.nbytes for v in wire.values())
        assert data == 3 * exit_bytes(dim, CLASSES, bits)
        assert payload_bytes(wire) >= data
        back = decode(wire, 3, dim + 1, CLASSES, bits)
        for k, v in stats.items():
            np.testing.assert_allclose(back[k], v, rtol=0, atol=1e-4 * np.abs(v).max())
    assert exit_bytes(192, 62, 22) < 0.75 * exit_bytes(192, 62, 0)  # the default task's exits


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda w: w.pop(stat_name(1, MOMENTS)), "expected the 22-bit statistics"),
        (lambda w: w.__setitem__(stat_name(0, GRAM), w[stat_name(0, GRAM)][:-1]), "not 300 numbers of 22 bits"),
        (lambda w: w.__setitem__(stat_name(0, CROSS), w[stat_name(0, CROSS)].astype(np.float32)), "float32"),
        (lambda w: w[stat_name(0, MOMENTS)].__setitem__(0, np.nan), "finite"),
        (lambda w: w.__setitem__(stat_name(0, MOMENTS), w[stat_name(0, MOMENTS)][:3]), "not 55 float64"),
    ],
)
def test_a_malformed_reply_is_refused_by_name(edit, match):
    stats, _ = _stats()
    wire = encode(stats, DEPTH, 22)
    edit(wire)
    with pytest.raises(ValueError, match=match):
        decode(wire, DEPTH, WIDTH + 1, CLASSES, 22)


def test_non_finite_statistics_cannot_be_encoded():
    stats, _ = _stats()
    stats[stat_name(0, CROSS)][0, 0] = np.inf
    with pytest.raises(ValueError, match="not finite"):
        encode(stats, DEPTH, 22)


def test_the_widest_projection_that_fits_a_budget():
    for bits in (0, 22):
        k = stat_dim(20_000, 10, 192, bits)
        assert exit_bytes(k, 10, bits) <= 20_000 < exit_bytes(k + 1, 10, bits)
        assert stat_dim(10**9, 10, 192, bits) == 192
    assert stat_dim(20_000, 10, 192, 22) > stat_dim(20_000, 10, 192, 0)


def test_features_of_unequal_spread_each_keep_their_precision():
    """A few features that vary a lot beside many that vary little but tell the classes apart:
    one scale for the whole scatter would round the small ones away."""
    stats, n = _stats(spread=1e-3)
    rng = np.random.default_rng(1)
    for i in range(DEPTH):
        g = unpack_gram(stats[stat_name(i, GRAM)])
        # add sum z z^T for z = 1e3 * noise on 3 features (zero mean: the sums of phi stay as they are)
        z = rng.normal(0, 1e3, (n, 3))
        z -= z.mean(axis=0)
        g[:3, :3] += z.T @ z
        stats[stat_name(i, GRAM)] = pack_gram(g)
    counts = {i: n for i in range(DEPTH)}
    exact = solve_heads(stats, counts, 1e-6)["heads.0.fc.weight"]
    coded = solve_heads(decode(encode(stats, DEPTH, 22), DEPTH, WIDTH + 1, CLASSES, 22), counts, 1e-6)
    assert np.abs(coded["heads.0.fc.weight"] - exact).max() < 1e-3 * np.abs(exact).max()
