"""Top-k update codec: round trips, error feedback, byte counts, malformed input."""

import numpy as np
import pytest

from core.codec import GAPS, MASK, VALUES, CodecError, decode, payload_bytes, topk_encode

SHAPES = {"adapters.0.a": (4, 5), "adapters.0.b": (7,), "heads.0.w": (3, 11)}


def _delta(seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return {n: (scale * rng.standard_normal(s)).astype(np.float32) for n, s in SHAPES.items()}


def test_topk_round_trip_keeps_the_largest_entries_and_zeros_the_rest():
    delta = _delta()
    payload, residual = topk_encode(delta, 0.25)
    assert set(payload) <= {MASK, GAPS, VALUES}  # packed: no per-parameter arrays
    out = decode(payload, SHAPES, layout=list(SHAPES))
    for name, d in delta.items():
        k = int(np.ceil(0.25 * d.size))
        kept = np.zeros(d.size, bool)
        kept[np.argsort(-np.abs(d.ravel()))[:k]] = True
        got = out[name].ravel()
        assert np.count_nonzero(got) == k
        # Kept entries equal x up to float16 rounding; everything else is zero.
        np.testing.assert_allclose(got[kept], d.ravel()[kept], rtol=1e-3)
        np.testing.assert_array_equal(got[~kept], 0.0)
        # What was not sent, rounding included, is exactly the residual.
        np.testing.assert_allclose(out[name] + residual[name], d, atol=1e-7)


def test_values_that_fit_float16_exactly_round_trip_exactly():
    delta = {"adapters.0.b": np.array([0.5, -3.0, 0.0, 0.125, 1024.0, 0.0, 2.0], np.float32)}
    payload, _ = topk_encode(delta, 0.5)
    out = decode(payload, SHAPES, layout=["adapters.0.b"])
    np.testing.assert_array_equal(out["adapters.0.b"], [0.5, -3.0, 0.0, 0.0, 1024.0, 0.0, 2.0])


def test_values_beyond_float16_range_travel_as_float32():
    delta = {"adapters.0.b": np.array([1e6, 1.0, 0, 0, 0, 0, 0], np.float32)}
    payload, _ = topk_encode(delta, 0.3)
    assert payload[VALUES].dtype == np.float32
    np.testing.assert_array_equal(decode(payload, SHAPES, layout=["adapters.0.b"])["adapters.0.b"][:2], [1e6, 1.0])


def test_sparse_positions_use_gaps_when_they_are_smaller_than_a_mask():
    shapes = {"heads.0.w": (100, 100)}
    delta = {"heads.0.w": np.random.default_rng(1).standard_normal((100, 100)).astype(np.float32)}
    sparse, _ = topk_encode(delta, 0.01)  # 100 entries: 200 B of gaps < 1250 B of mask
    denser, _ = topk_encode(delta, 0.1)
    assert GAPS in sparse and MASK not in sparse
    assert MASK in denser and GAPS not in denser
    for payload in (sparse, denser):
        out = decode(payload, shapes, layout=list(shapes))["heads.0.w"]
        assert np.count_nonzero(out) == payload[VALUES].size


def test_error_feedback_makes_sent_updates_track_true_updates():
    rng = np.random.default_rng(3)
    true_sum = {n: np.zeros(s, np.float64) for n, s in SHAPES.items()}
    sent_sum = {n: np.zeros(s, np.float64) for n, s in SHAPES.items()}
    naive_sum = {n: np.zeros(s, np.float64) for n, s in SHAPES.items()}
    residual = None
    for _ in range(60):
        # A consistent drift plus noise, like successive local updates.
        delta = {n: (0.1 + 0.5 * rng.standard_normal(s)).astype(np.float32) for n, s in SHAPES.items()}
        payload, residual = topk_encode(delta, 0.1, residual)
        sent = decode(payload, SHAPES, layout=list(SHAPES))
        naive = decode(topk_encode(delta, 0.1)[0], SHAPES, layout=list(SHAPES))
        for n in SHAPES:
            true_sum[n] += delta[n]
            sent_sum[n] += sent[n]
            naive_sum[n] += naive[n]
    for n in SHAPES:
        # Invariant: sent + residual = true, so the gap is only the residual.
        np.testing.assert_allclose(sent_sum[n] + residual[n], true_sum[n], atol=1e-3)
    gap = np.sqrt(sum(np.sum((true_sum[n] - sent_sum[n]) ** 2) for n in SHAPES))
    naive_gap = np.sqrt(sum(np.sum((true_sum[n] - naive_sum[n]) ** 2) for n in SHAPES))
    total = np.sqrt(sum(np.sum(true_sum[n] ** 2) for n in SHAPES))
    assert gap < 0.25 * total
    assert gap < 0.3 * naive_gap  # without feedback most of the drift is lost


def test_ten_percent_of_a_small_model_costs_at_most_ten_percent_of_the_dense_bytes():
    # 288 tensors of the default adapter's sizes: per-array headers would
    # dominate if each tensor travelled as its own arrays.
    rng = np.random.default_rng(0)
    sizes = [
        96,
        13 * 32,
        96,
        96,
        32 * 96,
        32,
        32,
        32,
        96 * 32,
        96,
        32 * 32,
        32,
        32,
        32,
        64 * 32,
        64,
        32 * 64,
        32,
        96 * 32,
        96,
        96,
        96,
        96 * 10,
        10,
    ]
    delta = {
        f"adapters.{b}.p{i}": rng.standard_normal(s).astype(np.float32) for b in range(12) for i, s in enumerate(sizes)
    }
    payload, _ = topk_encode(delta, 0.1)
    dense_raw = sum(d.nbytes for d in delta.values())
    assert payload_bytes(payload) <= 0.10 * dense_raw
    assert payload_bytes(delta) > dense_raw  # headers and names are counted


def test_full_fraction_sends_the_dense_delta_and_no_residual():
    delta = _delta()
    payload, residual = topk_encode(delta, 1.0)
    assert set(payload) == set(delta)
    for n in delta:
        np.testing.assert_array_equal(payload[n], delta[n])
        assert not residual[n].any()


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda p: p.update({VALUES: p[VALUES][:-1]}), "positions for"),
        (lambda p: p.update({MASK: p[MASK][:-1]}), "does not fit"),
        (lambda p: p.update({"adapters.0.b": np.zeros(7, np.float32)}), "mixes"),
        (lambda p: p.update({VALUES: p[VALUES].astype(np.int32)}), "float16/float32"),
        (lambda p: p.pop(MASK), "exactly one"),
    ],
)
def test_malformed_sparse_updates_raise(mutate, reason):
    payload, _ = topk_encode(_delta(), 0.5)
    assert MASK in payload
    mutate(payload)
    with pytest.raises(CodecError, match=reason):
        decode(payload, SHAPES, layout=list(SHAPES))


def test_a_mask_that_does_not_match_the_layout_is_rejected():
    payload, _ = topk_encode(_delta(), 0.5)
    with pytest.raises(CodecError, match="does not fit"):
        decode(payload, SHAPES, layout=["adapters.0.a", "adapters.0.b"])  # the sender claimed less


def test_dense_updates_with_unknown_names_or_wrong_shapes_raise():
    with pytest.raises(CodecError, match="unknown parameter"):
        decode({"adapters.9.zz": np.zeros(3, np.float32)}, SHAPES)
    with pytest.raises(CodecError, match="shape"):
        decode({"adapters.0.b": np.zeros(8, np.float32)}, SHAPES)
