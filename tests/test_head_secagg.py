"""Secure aggregation of the head statistics (`head-secagg`): the ring and the protocol's pieces."""

from __future__ import annotations

import numpy as np
import pytest

from core import secagg

# -- the ring and the protocol's pieces ---------------------------------------------------------


def test_masked_fixed_point_statistics_sum_to_the_float_sum_within_the_scale():
    rng = np.random.default_rng(0)
    bound = float(np.sqrt(192))
    bits = secagg.scale_bits(bound)
    xs = [rng.uniform(-1, 1, 500) * secagg.entry_bound(100, bound) for _ in range(5)]
    ys = [secagg.quantize(x, bits, secagg.entry_bound(100, bound)) for x in xs]
    for a in range(5):  # pairwise masks, + for the lower node id
        for b in range(a + 1, 5):
            stream = secagg.mask_stream(secagg.new_seed(), 500)
            secagg.apply_mask(ys[a], stream, secagg.pair_sign(a, b))
            secagg.apply_mask(ys[b], stream, secagg.pair_sign(b, a))
    total = np.zeros(500, np.uint64)
    for y in ys:
        total += y
    assert np.abs(secagg.dequantize(total, bits) - sum(xs)).max() <= 5 * 2.0 ** -(bits + 1)
    # one masked vector alone says nothing of its statistics
    assert np.abs(secagg.dequantize(ys[0], bits)).min() > 1e3 * np.abs(xs[0]).max() * 1e-6
    assert np.mean(np.abs(secagg.dequantize(ys[0], bits) - xs[0]) < 1.0) < 0.01


@pytest.mark.parametrize("noise", [0.0, 2267.0])
def test_the_scale_is_the_largest_at_which_no_honest_sum_wraps(noise):
    bound = float(np.sqrt(192))
    bits = secagg.scale_bits(bound, noise)
    worst = secagg.MAX_EXAMPLES * (bound**2 + 1) + secagg.MAX_NODES * secagg.NOISE_CLIP * noise
    assert worst * 2.0**bits < 2.0**62 <= worst * 2.0 ** (bits + 1)
    with pytest.raises(secagg.SecAggError):  # a value the scale cannot hold is refused, not wrapped
        secagg.quantize(np.array([2.0**62 / 2.0**bits]), bits, 2.0**63)


def test_a_mask_is_a_keystream_whose_prefix_masks_fewer_exits():
    seed = secagg.new_seed()
    long, short = secagg.mask_stream(seed, 1000), secagg.mask_stream(seed, 10)
    assert np.array_equal(long[:10], short) and not np.array_equal(long, secagg.mask_stream(secagg.new_seed(), 1000))
    assert long.dtype == np.uint64 and (long >> np.uint64(63)).mean() == pytest.approx(0.5, abs=0.1)


@pytest.mark.parametrize("n", [2, 3, 4, 5, 20])
def test_the_threshold_is_a_majority_of_at_least_two(n):
    t = secagg.threshold(n, 0.5)
    assert 2 <= t <= n and t > n / 2 and secagg.threshold(n, 1.0) == n


def test_exits_two_nodes_run_are_sent_in_bands_of_the_same_nodes():
    assert secagg.shared_exits([1, 2, 1]) == 1  # exit 2 would be the one depth-2 node's own
    assert secagg.shared_exits([3, 6, 9, 12, 12]) == 12
    assert secagg.bands([3, 6, 6, 3, 9]) == [(0, 3), (3, 6), (6, 9)]
    assert secagg.covered({1: 3, 2: 6, 3: 6}, [1, 2, 3], 6) == 2


def test_sealed_shares_open_only_for_the_node_they_were_sealed_for():
    (sk1, pk1), (sk2, pk2), (sk3, _) = secagg.key_pair(), secagg.key_pair(), secagg.key_pair()
    secret = secagg.key_secret(sk1)
    shares = secagg.split(secret, 2, 3)
    sealed = secagg.seal(secagg.shared_key(sk1, pk2), 1, 2, [b"a" * 52, b"b" * 52], shares[1])
    seeds, key_share = secagg.unseal(secagg.shared_key(sk2, pk1), sealed, 1, 2, 2)
    assert seeds == [b"a" * 52, b"b" * 52] and key_share == shares[1]
    with pytest.raises(secagg.SecAggError):  # node 3 cannot read it
        secagg.unseal(secagg.shared_key(sk3, pk1), sealed, 1, 3, 2)
    with pytest.raises(secagg.SecAggError):  # relayed as if from another node
        secagg.unseal(secagg.shared_key(sk2, pk1), sealed, 3, 2, 2)
    assert secagg.key_secret(secagg.key_from_secret(secagg.rebuild([shares[0], shares[2]], 2))) == secret
