"""Every strategy by name, on hand-made updates from clients of mixed depth.

Expected values are written out with the textbook rule for each strategy,
independently of the code under test.
"""

import numpy as np
import pytest
from flwr.app import ConfigRecord

from core.codec import topk_encode
from core.config import ConfigError, validate
from core.records import to_numpy, to_record
from strategies.registry import STRATEGIES, build_strategy
from tests.flowerkit import reply

# Three blocks; a depth-d client trains the parameters of blocks 1..d.
GLOBAL = {
    "adapters.0.w": np.array([1.0, -1.0, 0.5], np.float32),
    "heads.0.w": np.array([0.0, 2.0], np.float32),
    "adapters.1.w": np.array([3.0, 3.0, 3.0], np.float32),
    "heads.2.w": np.array([7.0, -7.0], np.float32),
}
BLOCK = {"adapters.0.w": 1, "heads.0.w": 1, "adapters.1.w": 2, "heads.2.w": 3}
# The clients here send their heads' deltas, as they do when they train the heads
# (with closed-form heads they leave them out: test_closed_form_heads_*).
BASE = {"tiers": "1,2,3", "heads": "trained"}

# (node, depth, num-examples, seed) of round 1: every tier takes part.
ROUND1 = [(1, 1, 10, 1), (2, 1, 500, 2), (3, 2, 40, 3), (4, 2, 5, 4), (5, 3, 25, 5)]
# Round 2: nobody of tier 3 (depth 3) comes.
ROUND2 = [(1, 1, 10, 6), (3, 2, 40, 7), (4, 2, 5, 8)]


def _deltas(depth, seed):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in GLOBAL.items() if BLOCK[k] <= depth}


def _replies(clients):
    return [reply(_deltas(d, s), n, d, node) for node, d, n, s in clients]


def _strategy(name, **cfg):
    s = build_strategy(name, validate({**BASE, "strategy": name, **cfg}))
    s.global_arrays = {k: v.copy() for k, v in GLOBAL.items()}
    return s


def _run(s, clients):
    arrays, _ = s.aggregate_train(1, _replies(clients))
    s.global_arrays = to_numpy(arrays)
    return s.global_arrays


def _senders(clients, name):
    """Deltas and weights of the clients that trained `name`."""
    picked = [(_deltas(d, s)[name].astype(np.float64), float(n)) for _, d, n, s in clients if BLOCK[name] <= d]
    return np.stack([p[0] for p in picked]), np.array([p[1] for p in picked])


def _mean(clients, name):
    deltas, w = _senders(clients, name)
    return (w[:, None] * deltas).sum(0) / w.sum()


def _hand_rule(name, rounds):
    """Expected global arrays after `rounds`, written out per strategy."""
    g = {k: v.astype(np.float64) for k, v in GLOBAL.items()}
    m = {k: np.zeros_like(v) for k, v in g.items()}
    v2 = {k: np.zeros_like(v) for k, v in g.items()}
    t = dict.fromkeys(g, 0)
    for clients in rounds:
        for k in g:
            if not any(BLOCK[k] <= d for _, d, _, _ in clients):
                continue  # nobody trained it this round: value and state stay
            deltas, _ = _senders(clients, k)
            avg = _mean(clients, k)
            if name in ("fedavg", "fedprox"):
                g[k] = g[k] + avg
            elif name == "fedavgm":
                m[k] = 0.9 * m[k] + avg
                g[k] = g[k] + 1.0 * m[k]
            elif name in ("fedadam", "fedyogi"):
                m[k] = 0.9 * m[k] + 0.1 * avg
                if name == "fedadam":
                    v2[k] = 0.99 * v2[k] + 0.01 * avg**2
                else:
                    v2[k] = v2[k] - 0.01 * avg**2 * np.sign(v2[k] - avg**2)
                t[k] += 1
                lr = 0.01 * np.sqrt(1 - 0.99 ** t[k]) / (1 - 0.9 ** t[k])
                g[k] = g[k] + lr * m[k] / (np.sqrt(v2[k]) + 1e-3)
            elif name == "median":
                g[k] = g[k] + np.median(deltas, axis=0)
            elif name == "trimmed-mean":
                cut = int(0.2 * len(deltas))
                g[k] = g[k] + np.sort(deltas, axis=0)[cut : len(deltas) - cut].mean(0)
    return g


def test_every_issue_strategy_is_registered():
    assert set(STRATEGIES) == {"fedavg", "fedavgm", "fedadam", "fedyogi", "fedprox", "median", "trimmed-mean"}


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_strategy_matches_its_rule_over_two_rounds_of_mixed_depths(name):
    s = _strategy(name)
    _run(s, ROUND1)
    got = _run(s, ROUND2)
    want = _hand_rule(name, [ROUND1, ROUND2])
    assert set(got) == set(GLOBAL)
    for k in GLOBAL:
        # Compared as steps from the start: adaptive steps are ~0.01, and
        # Adam and Yogi differ by ~3e-5 on them after two rounds.
        np.testing.assert_allclose(
            got[k] - GLOBAL[k], want[k] - GLOBAL[k], rtol=1e-4, atol=1e-6, err_msg=f"{name}: {k}"
        )


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_a_round_with_an_empty_tier_keeps_that_tiers_parameters_and_state(name):
    s = _strategy(name)
    _run(s, ROUND1)
    before, state = dict(s.global_arrays), s.state_dict()
    after = _run(s, ROUND2)
    np.testing.assert_array_equal(after["heads.2.w"], before["heads.2.w"])
    for key, value in s.state_dict().items():
        if key.endswith("/heads.2.w"):
            np.testing.assert_array_equal(value, state[key])
    assert not np.array_equal(after["adapters.1.w"], before["adapters.1.w"])


def test_fedavg_weights_by_examples_when_counts_differ_widely():
    s = _strategy("fedavg")
    small = {"adapters.0.w": np.array([1000.0, 0.0, 0.0], np.float32)}
    big = {"adapters.0.w": np.array([0.0, 1.0, 0.0], np.float32)}
    got = to_numpy(s.aggregate_train(1, [reply(small, 1, 1, 1), reply(big, 10**9, 1, 2)])[0])
    step = got["adapters.0.w"].astype(np.float64) - GLOBAL["adapters.0.w"]
    np.testing.assert_allclose(step, [1000 / (1e9 + 1), 1e9 / (1e9 + 1), 0], atol=1e-7)
    assert step[0] > 0  # the small client still counts, in proportion


@pytest.mark.parametrize("name", ["median", "trimmed-mean"])
def test_robust_strategies_resist_a_client_sending_huge_values(name):
    honest = [(i, 1, 10, i) for i in range(1, 5)]
    attacker = reply(
        {"adapters.0.w": np.full(3, 1e6, np.float32), "heads.0.w": np.full(2, -1e6, np.float32)}, 10**6, 1, 99
    )
    robust, plain = _strategy(name), _strategy("fedavg")
    got = to_numpy(robust.aggregate_train(1, _replies(honest) + [attacker])[0])
    naive = to_numpy(plain.aggregate_train(1, _replies(honest) + [attacker])[0])
    for k in ("adapters.0.w", "heads.0.w"):
        honest_deltas, _ = _senders(honest, k)
        lo, hi = honest_deltas.min(0), honest_deltas.max(0)
        step = got[k] - GLOBAL[k]
        assert np.all((step >= lo - 1e-6) & (step <= hi + 1e-6)), f"{name} left the honest range on {k}"
        assert np.abs(naive[k] - GLOBAL[k]).max() > 1e5  # the plain mean is dragged away


BAD_UPDATES = {
    "nan": ({"adapters.0.w": np.array([np.nan, 0, 0], np.float32)}, 10, 1, "non-finite"),
    "inf": ({"heads.0.w": np.array([np.inf, 0], np.float32)}, 10, 1, "non-finite"),
    "wrong shape": ({"adapters.0.w": np.zeros(4, np.float32)}, 10, 1, "shape"),
    "unknown name": ({"adapters.0.zz": np.zeros(3, np.float32)}, 10, 1, "unknown parameter"),
    "beyond depth": ({"adapters.1.w": np.zeros(3, np.float32)}, 10, 1, "beyond the client's depth"),
    "depth too big": ({"adapters.0.w": np.zeros(3, np.float32)}, 10, 9, "'depth' must be"),
    "no examples": ({"adapters.0.w": np.zeros(3, np.float32)}, 0, 1, "num-examples"),
    "integer values": ({"adapters.0.w": np.array([1, 2, 3], np.int64)}, 10, 1, "not floating point"),
}


@pytest.mark.parametrize("name", sorted(STRATEGIES))
@pytest.mark.parametrize("bad", sorted(BAD_UPDATES))
def test_a_bad_update_is_dropped_with_its_reason_and_changes_nothing(name, bad, caplog):
    arrays, n, depth, reason = BAD_UPDATES[bad]
    good = [(1, 2, 10, 1), (2, 3, 30, 2), (3, 1, 20, 3)]
    with_bad, clean = _strategy(name), _strategy(name)
    got = to_numpy(with_bad.aggregate_train(1, _replies(good) + [reply(arrays, n, depth, 66)])[0])
    want = to_numpy(clean.aggregate_train(1, _replies(good))[0])
    assert with_bad.round_stats.dropped == 1 and with_bad.round_stats.clients == 3
    assert reason in with_bad.round_stats.dropped_reasons[0]
    assert any("dropped the update of node 66" in r.getMessage() for r in caplog.records)
    for k in GLOBAL:
        assert np.all(np.isfinite(got[k]))
        np.testing.assert_array_equal(got[k], want[k])


def test_a_round_of_only_bad_updates_returns_no_arrays():
    s = _strategy("fedavg")
    arrays, metrics = s.aggregate_train(1, [reply({"adapters.0.w": np.full(3, np.nan, np.float32)}, 10, 1, 5)])
    assert arrays is None and metrics is None


def test_sparse_updates_are_decoded_from_the_senders_depth():
    clients = [(1, 1, 10, 1), (2, 3, 30, 2)]
    payloads = {node: topk_encode(_deltas(d, seed), 0.5)[0] for node, d, _, seed in clients}
    s = _strategy("fedavg")
    got = to_numpy(s.aggregate_train(1, [reply(payloads[node], n, d, node) for node, d, n, _ in clients])[0])
    dense_twin = _strategy("fedavg")
    sent = {node: _decoded(payloads[node], d) for node, d, _, _ in clients}
    want = to_numpy(dense_twin.aggregate_train(1, [reply(sent[node], n, d, node) for node, d, n, _ in clients])[0])
    for k in GLOBAL:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6)
    assert s.round_stats.bytes_up > 0
    # The same payload claimed by a shallower client does not fit its layout.
    lying = _strategy("fedavg")
    lying.aggregate_train(1, [reply(payloads[2], 30, 2, 2), reply(payloads[1], 10, 1, 1)])
    assert lying.round_stats.dropped == 1 and "does not fit" in lying.round_stats.dropped_reasons[0]


@pytest.mark.parametrize("name", ["fedavg", "fedadam", "median"])
def test_closed_form_heads_stay_out_of_updates_and_keep_their_value(name):
    # heads = "ridge": clients send their adapters only, dense or packed; the server's heads stay put
    adapters = lambda d, seed: {k: v for k, v in _deltas(d, seed).items() if not k.startswith("heads.")}  # noqa: E731
    dense = [reply(adapters(d, seed), n, d, node) for node, d, n, seed in ROUND1]
    packed = [reply(topk_encode(adapters(d, seed), 0.5)[0], n, d, node) for node, d, n, seed in ROUND1]
    for replies in (dense, packed):
        s = _strategy(name, heads="ridge")
        new = to_numpy(s.aggregate_train(1, replies)[0])
        assert s.round_stats.dropped == 0
        assert all(np.array_equal(new[k], GLOBAL[k]) for k in GLOBAL if k.startswith("heads."))
        assert all(not np.array_equal(new[k], GLOBAL[k]) for k in GLOBAL if k.startswith("adapters."))
    # a packed update laid out over the heads too (a client that trains them) does not fit
    s = _strategy(name, heads="ridge")
    s.aggregate_train(1, [reply(topk_encode(_deltas(2, 1), 0.5)[0], 10, 2, 1)])
    assert s.round_stats.dropped == 1


def _decoded(payload, depth):
    from core.codec import decode

    layout = [k for k in GLOBAL if BLOCK[k] <= depth]
    return decode(payload, {k: v.shape for k, v in GLOBAL.items()}, layout)


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi"])
def test_optimiser_state_survives_a_checkpoint(name, tmp_path):
    from server_app import checkpoint

    running = _strategy(name)
    _run(running, ROUND1)
    assert running.state_dict() and all(isinstance(v, np.ndarray) for v in running.state_dict().values())
    checkpoint.save(tmp_path, 1, running.global_arrays, running.state_dict(), {})
    saved = checkpoint.load(tmp_path)
    resumed = _strategy(name)
    resumed.global_arrays = saved["arrays"]
    resumed.load_state_dict(saved["strategy"])
    a, b = _run(running, ROUND2), _run(resumed, ROUND2)
    for k in GLOBAL:
        np.testing.assert_array_equal(a[k], b[k])


class _Grid:
    def get_node_ids(self):
        return [1, 2]


def test_fedprox_sends_its_mu_to_the_clients_and_others_do_not():
    prox = _strategy("fedprox", **{"proximal-mu": 0.3, "fraction-train": 1.0})
    msgs = list(prox.configure_train(1, to_record(GLOBAL), ConfigRecord(), _Grid()))
    assert [m.content.config_records["config"]["proximal-mu"] for m in msgs] == [0.3, 0.3]
    plain = _strategy("fedavg", **{"fraction-train": 1.0})
    msgs = list(plain.configure_train(1, to_record(GLOBAL), ConfigRecord(), _Grid()))
    assert "proximal-mu" not in msgs[0].content.config_records["config"]


def test_hyper_parameters_come_from_the_run_config():
    s = _strategy("fedadam", **{"server-lr": 0.5, "beta1": 0.5, "beta2": 0.9, "tau": 0.1})
    assert (s.server_lr, s.beta1, s.beta2, s.tau) == (0.5, 0.5, 0.9, 0.1)
    assert _strategy("fedadam").server_lr == 0.01 and _strategy("fedavg").server_lr == 1.0
    assert _strategy("trimmed-mean", **{"trim-fraction": 0.4}).trim_fraction == 0.4
    assert _strategy("fedavgm", **{"server-momentum": 0.5}).momentum == 0.5


@pytest.mark.parametrize(
    "cfg, key",
    [
        ({"strategy": "fedsgd"}, "strategy"),
        ({"tier-names": "phone,laptop"}, "tier-names"),
        ({"tier-names": "a,a,b"}, "tier-names"),
        ({"trim-fraction": 0.5}, "trim-fraction"),
        ({"beta2": 1.0}, "beta2"),
        ({"server-lr": -1.0}, "server-lr"),
    ],
)
def test_bad_strategy_settings_name_their_key(cfg, key):
    with pytest.raises(ConfigError) as err:
        full = validate({**BASE, **cfg})
        build_strategy(full["strategy"], full)
    assert err.value.key == key


def test_clients_per_tier_are_counted_by_name_and_empty_tiers_show_zero(caplog):
    s = _strategy("fedavg", **{"tier-names": "phone,tablet,server"})
    _run(s, ROUND2)
    assert s.round_stats.clients_per_tier == {"phone": 1, "tablet": 2, "server": 0}
    assert any("phone 1, tablet 2, server 0" in r.getMessage() for r in caplog.records)
