"""Flower's own strategies run per group of blocks (strategies/flower.py), on hand-made replies.

Where a Flower rule and a built-in one compute the same thing, both must
give the same weights; the others are checked against their textbook rule.
"""

import math

import numpy as np
import pytest
from flwr.app import ConfigRecord
from flwr.serverapp.strategy import FedAvg

from core.codec import topk_encode
from core.config import ConfigError, validate
from core.records import to_numpy, to_record
from server_app import checkpoint
from strategies.flower import FlowerGroups
from strategies.registry import build_strategy
from tests.flowerkit import reply
from tests.test_strategies import BASE, BLOCK, GLOBAL, ROUND1, ROUND2, _deltas, _replies

# Ten clients of depth 3: every block has every sender.
EQUAL = [(i, 3, 10 + 7 * i, 100 + i) for i in range(1, 11)]

# Every Flower 1.42 Message-API strategy that aggregates arrays, with the
# arguments it needs; the DP wrappers wrap strategy-inner (flwr:FedAvg).
ARRAY_STRATEGIES = {
    "FedAvg": "",
    "FedAvgM": "server_momentum=0.9",
    "FedAdam": "eta=0.01",
    "FedYogi": "eta=0.01",
    "FedAdagrad": "eta=0.01",
    "FedProx": "proximal_mu=0.1",
    "FedMedian": "",
    "FedTrimmedAvg": "beta=0.2",
    "Krum": "num_malicious_nodes=1",
    "MultiKrum": "num_malicious_nodes=1 num_nodes_to_select=3",
    "Bulyan": "num_malicious_nodes=1",
    "QFedAvg": "q=0.1 client_learning_rate=1.0",
    "DifferentialPrivacyServerSideFixedClipping": "noise_multiplier=0.1 clipping_norm=1.0",
    "DifferentialPrivacyServerSideAdaptiveClipping": "noise_multiplier=0.1",
}


class _Grid:
    def __init__(self, n=10):
        self.ids = list(range(1, n + 1))

    def get_node_ids(self):
        return list(self.ids)


def _build(spec, args="", **cfg):
    return build_strategy(spec, validate({**BASE, "strategy": spec, "strategy-args": args, **cfg}))


def _rounds(s, rounds, make_replies=_replies):
    arrays = to_record(GLOBAL)
    for rnd, clients in enumerate(rounds, start=1):
        s.configure_train(rnd, arrays, ConfigRecord(), _Grid())
        new, _ = s.aggregate_train(rnd, make_replies(clients))
        arrays = new if new is not None else arrays
    return to_numpy(arrays)


SAME_RULE = [
    ("flwr:FedAvg", "", "fedavg"),
    ("flwr:FedAvgM", "server_momentum=0.9", "fedavgm"),
    ("flwr:FedMedian", "", "median"),
    ("flwr:FedTrimmedAvg", "beta=0.2", "trimmed-mean"),
]


@pytest.mark.parametrize("spec, args, ours", SAME_RULE)
def test_flower_rule_and_ours_give_the_same_weights_on_equal_depth_clients(spec, args, ours):
    second = [(i, 3, 5 + 3 * i, 200 + i) for i in range(1, 8)]
    got = _rounds(_build(spec, args), [EQUAL, second])
    want = _rounds(build_strategy(ours, validate({**BASE, "strategy": ours})), [EQUAL, second])
    for k in GLOBAL:
        assert np.allclose(got[k], want[k], rtol=1e-5, atol=1e-6), (spec, k)


@pytest.mark.parametrize("groups", ["tier", "block"])
@pytest.mark.parametrize("spec, args, ours", SAME_RULE)
def test_per_group_flower_rule_matches_ours_on_mixed_depths(spec, args, ours, groups):
    # These rules act on each coordinate, so groups change nothing; ROUND2
    # has nobody of depth 3, whose block must keep its value.
    got = _rounds(_build(spec, args, **{"strategy-groups": groups}), [ROUND1, ROUND2])
    want = _rounds(build_strategy(ours, validate({**BASE, "strategy": ours})), [ROUND1, ROUND2])
    for k in GLOBAL:
        assert np.allclose(got[k], want[k], rtol=1e-5, atol=1e-6), (spec, groups, k)


def test_groups_follow_the_tiers_or_the_blocks():
    s = _build("flwr:FedAvg", tiers="1,3")
    s.global_arrays = dict(GLOBAL)
    assert s.groups() == {"b1": ["adapters.0.w", "heads.0.w"], "b2-3": ["adapters.1.w", "heads.2.w"]}
    s = _build("flwr:FedAvg", tiers="1,3", **{"strategy-groups": "block"})
    s.global_arrays = dict(GLOBAL)
    assert s.groups() == {"b1": ["adapters.0.w", "heads.0.w"], "b2": ["adapters.1.w"], "b3": ["heads.2.w"]}


def test_a_group_nobody_sent_keeps_its_value_and_its_inner_state():
    s = _build("flwr:FedAvgM", "server_momentum=0.9")
    arrays = to_record(GLOBAL)
    s.configure_train(1, arrays, ConfigRecord(), _Grid())
    arrays = s.aggregate_train(1, _replies(ROUND1))[0]
    s.configure_train(2, arrays, ConfigRecord(), _Grid())
    momentum = [v.copy() for v in s.inner["b3"].momentum_vector]
    before = to_numpy(arrays)
    new = to_numpy(s.aggregate_train(2, _replies(ROUND2))[0])  # nobody of depth 3
    np.testing.assert_array_equal(new["heads.2.w"], before["heads.2.w"])
    for a, b in zip(s.inner["b3"].momentum_vector, momentum, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(new["adapters.1.w"], before["adapters.1.w"])


def test_sparse_updates_are_decoded_before_the_inner_strategy_sees_them():
    def packed(clients):
        out = []
        for node, d, n, seed in clients:
            payload, _ = topk_encode(_deltas(d, seed), 0.5)
            out.append(reply(payload, n, d, node))
        return out

    got = _rounds(_build("flwr:FedAvg"), [ROUND1], packed)
    want = _rounds(build_strategy("fedavg", validate(BASE)), [ROUND1], packed)
    for k in GLOBAL:
        assert np.allclose(got[k], want[k], atol=1e-6)
        assert not np.array_equal(got[k], GLOBAL[k]) or BLOCK[k] > 3


def test_closed_form_heads_are_in_no_group_and_keep_their_value(caplog):
    # heads = "ridge": clients send no head deltas, so the groups hold the adapters only
    s = _build("flwr:FedAvg", heads="ridge")
    s.global_arrays = dict(GLOBAL)
    assert all(not n.startswith("heads.") for names in s.groups().values() for n in names)

    def adapters_only(clients):
        return [
            reply({k: v for k, v in _deltas(d, seed).items() if k.startswith("adapters.")}, n, d, node)
            for node, d, n, seed in clients
        ]

    got = _rounds(s, [ROUND1], adapters_only)
    want = _rounds(build_strategy("fedavg", validate({"tiers": "1,2,3"})), [ROUND1], adapters_only)
    for k in GLOBAL:
        np.testing.assert_allclose(got[k], want[k], atol=1e-6)
        assert np.array_equal(got[k], GLOBAL[k]) == k.startswith("heads.")
    assert "left out of that group" not in caplog.text


@pytest.mark.parametrize("spec", ["flwr:Krum", "flwr:Bulyan", "flwr:FedMedian", "flwr:MultiKrum"])
def test_robust_flower_rules_keep_a_noisy_client_out(spec):
    args = {"flwr:FedMedian": "", "flwr:MultiKrum": "num_malicious_nodes=1 num_nodes_to_select=3"}.get(
        spec, "num_malicious_nodes=1"
    )
    noise = np.random.default_rng(0)

    def attacked(clients):
        out = _replies(clients)
        out.append(
            reply({k: noise.normal(0, 100, v.shape).astype(np.float32) for k, v in GLOBAL.items()}, 10**6, 3, 99)
        )
        return out

    got = _rounds(_build(spec, args), [EQUAL], attacked)
    for k in GLOBAL:
        deltas = np.stack([_deltas(3, s)[k] for _, _, _, s in EQUAL])
        step = got[k] - GLOBAL[k]
        assert np.all((step >= deltas.min(0) - 1e-5) & (step <= deltas.max(0) + 1e-5)), (spec, k)
    plain = _rounds(_build("flwr:FedAvg"), [EQUAL], attacked)
    assert max(np.abs(plain[k] - GLOBAL[k]).max() for k in GLOBAL) > 10


def test_krum_picks_one_honest_client_per_group():
    s = _build("flwr:Krum", "num_malicious_nodes=1", **{"strategy-groups": "block"})
    got = _rounds(s, [EQUAL])
    for k in GLOBAL:
        candidates = [GLOBAL[k] + _deltas(3, seed)[k] for _, _, _, seed in EQUAL]
        assert any(np.allclose(got[k], c, atol=1e-6) for c in candidates), k


def test_dp_clipping_is_split_over_groups_so_a_whole_update_stays_within_the_clip():
    c = 0.5
    s = _build(
        "flwr:DifferentialPrivacyServerSideFixedClipping",
        f"noise_multiplier=0.0 clipping_norm={c}",
        **{"strategy-groups": "block"},
    )
    got = _rounds(s, [EQUAL[:1]])  # one client: the aggregate is its clipped update
    groups = 3
    for name, inner in s.inner.items():
        assert inner.clipping_norm == pytest.approx(c / math.sqrt(groups)), name
        assert inner.num_sampled_clients == 1
    total = math.sqrt(sum(float(np.sum((got[k] - GLOBAL[k]) ** 2)) for k in GLOBAL))
    assert total == pytest.approx(c, rel=1e-4)  # each group was longer than its share, so clipped to it


def test_dp_noise_per_group_is_that_of_one_mechanism_of_the_given_multiplier():
    z, c = 2.0, 1.0
    s = _build("flwr:DifferentialPrivacyServerSideFixedClipping", f"noise_multiplier={z} clipping_norm={c}")
    _rounds(s, [EQUAL])
    for inner in s.inner.values():
        # std = noise_multiplier * clipping_norm / senders, as for the whole update at once
        assert inner.noise_multiplier * inner.clipping_norm / inner.num_sampled_clients == pytest.approx(
            z * c / len(EQUAL)
        )


def _with_loss(clients):
    out = _replies(clients)
    for msg, (_, d, _, _) in zip(out, clients):
        for i in range(1, d + 1):
            msg.content.metric_records["metrics"][f"train-loss-{i}"] = float(i)
    return out


def test_qfedavg_weighs_each_client_by_its_mean_training_loss():
    s = _build("flwr:QFedAvg", "q=0.0 client_learning_rate=1.0")
    got = _rounds(s, [EQUAL], _with_loss)
    for k in GLOBAL:  # q = 0: plain unweighted mean of the updates
        mean = np.mean([_deltas(3, seed)[k] for _, _, _, seed in EQUAL], axis=0)
        assert np.allclose(got[k] - GLOBAL[k], mean, atol=1e-5)


def test_qfedavg_takes_the_clients_learning_rate_of_each_round_unless_given():
    s = _build("flwr:QFedAvg", "q=0.1", **{"lr-schedule": "cosine", "num-server-rounds": 3, "lr": 0.1})
    _rounds(s, [EQUAL, EQUAL, EQUAL], _with_loss)
    assert [inner.client_learning_rate for inner in s.inner.values()] == [pytest.approx(0.005)] * len(s.inner)
    fixed = _build("flwr:QFedAvg", "q=0.1 client_learning_rate=1.0", **{"lr-schedule": "cosine"})
    _rounds(fixed, [EQUAL, EQUAL], _with_loss)
    assert {inner.client_learning_rate for inner in fixed.inner.values()} == {1.0}


def test_fedprox_mu_reaches_the_clients():
    s = _build("flwr:FedProx", "proximal_mu=0.25")
    msgs = list(s.configure_train(1, to_record(GLOBAL), ConfigRecord(), _Grid(2)))
    assert [m.content.config_records["config"]["proximal-mu"] for m in msgs] == [0.25, 0.25]


def test_inner_sampling_does_not_change_which_nodes_we_sample():
    import random

    picks = []
    for spec in ("fedavg", "flwr:Krum"):
        random.seed(3)
        s = build_strategy(spec, validate({**BASE, "strategy": spec, "fraction-train": 0.5}))
        picks.append(
            [
                sorted(m.metadata.dst_node_id for m in s.configure_train(r, to_record(GLOBAL), ConfigRecord(), _Grid()))
                for r in (1, 2)
            ]
        )
    assert picks[0] == picks[1]


@pytest.mark.parametrize(
    "spec, args",
    [
        ("flwr:FedAvgM", "server_momentum=0.9"),
        ("flwr:FedAdam", "eta=0.01"),
        ("flwr:DifferentialPrivacyServerSideAdaptiveClipping", "noise_multiplier=0.1"),
    ],
)
def test_inner_state_survives_a_checkpoint(spec, args, tmp_path):
    running = _build(spec, args)
    _rounds(running, [ROUND1])
    assert running.state_dict()
    checkpoint.save(tmp_path, 1, running.global_arrays, running.state_dict(), {})
    saved = checkpoint.load(tmp_path)
    resumed = _build(spec, args)
    resumed.load_state_dict(saved["strategy"])
    arrays = to_record(running.global_arrays)
    out = []
    for s in (running, resumed):
        np.random.seed(5)
        s.configure_train(2, arrays, ConfigRecord(), _Grid())
        out.append(to_numpy(s.aggregate_train(2, _replies(ROUND2))[0]))
    for k in GLOBAL:
        np.testing.assert_array_equal(out[0][k], out[1][k])


@pytest.mark.parametrize("name", sorted(ARRAY_STRATEGIES))
def test_every_array_strategy_of_flower_aggregates_mixed_depths(name):
    s = _build(f"flwr:{name}", ARRAY_STRATEGIES[name])

    def with_loss(clients):
        out = _replies(clients)
        for msg in out:
            msg.content.metric_records["metrics"]["train-loss-1"] = 0.7
        return out

    rounds = [[(i, 1 + i % 3, 10, i) for i in range(1, 24)]] * 2  # every group has 7+ senders
    got = _rounds(s, rounds, with_loss)
    for k in GLOBAL:
        assert np.all(np.isfinite(got[k])) and not np.array_equal(got[k], GLOBAL[k]), (name, k)


class HalfStep(FedAvg):
    """A user's strategy: FedAvg's average, half way from the current weights."""

    def configure_train(self, server_round, arrays, config, grid):
        self.current = to_numpy(arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        arrays, metrics = super().aggregate_train(server_round, replies)
        avg = to_numpy(arrays)
        return to_record({k: (self.current[k] + avg[k]) / 2 for k in avg}), metrics


def test_a_users_own_strategy_class_by_import_path():
    got = _rounds(_build("tests.test_flower_strategies:HalfStep"), [EQUAL])
    want = _rounds(build_strategy("fedavg", validate(BASE)), [EQUAL])
    for k in GLOBAL:
        assert np.allclose(got[k] - GLOBAL[k], (want[k] - GLOBAL[k]) / 2, atol=1e-6)


@pytest.mark.parametrize(
    "cfg, key, words",
    [
        ({"strategy": "flwr:Nope"}, "strategy", "has no 'Nope'"),
        ({"strategy": "krum"}, "strategy", "unknown strategy"),
        ({"strategy": "no_such_pkg.mod:Cls"}, "strategy", "cannot import"),
        ({"strategy": "os:getcwd"}, "strategy", "not a Flower"),
        ({"strategy": "flwr:FedXgbBagging"}, "strategy", "XGBoost"),
        ({"strategy": "flwr:DifferentialPrivacyClientSideFixedClipping"}, "strategy", "ServerSide"),
        ({"strategy": "flwr:Krum", "strategy-args": "num_malicous_nodes=1"}, "strategy-args", "num_malicous_nodes"),
        ({"strategy": "flwr:Krum", "strategy-args": "num_malicious_nodes"}, "strategy-args", "name=value"),
        ({"strategy": "flwr:FedTrimmedAvg", "strategy-args": "beta=0.7"}, "strategy-args", "beta"),
        ({"strategy": "flwr:DifferentialPrivacyServerSideFixedClipping"}, "strategy-args", "noise_multiplier"),
        (
            {
                "strategy": "flwr:DifferentialPrivacyServerSideFixedClipping",
                "strategy-args": "noise_multiplier=1 clipping_norm=-1",
            },
            "strategy-args",
            "clipping norm",
        ),
        (
            {
                "strategy": "flwr:DifferentialPrivacyServerSideFixedClipping",
                "strategy-args": "noise_multiplier=1 clipping_norm=1",
                "strategy-inner": "flwr:FedAvgX",
            },
            "strategy-inner",
            "FedAvgX",
        ),
        (
            {
                "strategy": "flwr:DifferentialPrivacyServerSideFixedClipping",
                "strategy-args": "noise_multiplier=1 clipping_norm=1",
                "strategy-inner-args": "bogus=1",
            },
            "strategy-inner-args",
            "bogus",
        ),
        ({"strategy-groups": "layer"}, "strategy-groups", "tier"),
        ({"attack-partitions": "0,x"}, "attack-partitions", "partition ids"),
    ],
)
def test_a_bad_strategy_name_or_argument_names_its_key(cfg, key, words):
    with pytest.raises(ConfigError) as err:
        full = validate({**BASE, **cfg})
        build_strategy(full["strategy"], full)
    assert err.value.key == key
    assert words in str(err.value)
    assert "\n" not in str(err.value)


def test_a_wrapper_wraps_strategy_inner():
    s = _build(
        "flwr:DifferentialPrivacyServerSideFixedClipping",
        "noise_multiplier=0 clipping_norm=1",
        **{"strategy-inner": "flwr:FedMedian"},
    )
    assert isinstance(s, FlowerGroups)
    _rounds(s, [EQUAL])
    assert {type(i.strategy).__name__ for i in s.inner.values()} == {"FedMedian"}


def test_in_tier_mode_a_client_ending_inside_a_group_is_left_out_of_it_and_logged(caplog):
    # tiers 1,3: group b2-3 holds blocks 2 and 3; node 3 runs depth 2 (its own max-depth)
    clients = [(1, 3, 10, 1), (2, 3, 10, 2), (3, 2, 10, 3)]
    tier = _rounds(_build("flwr:FedAvg", tiers="1,3"), [clients])
    block = _rounds(_build("flwr:FedAvg", tiers="1,3", **{"strategy-groups": "block"}), [clients])
    without = np.mean([_deltas(3, s)["adapters.1.w"] for s in (1, 2)], axis=0)
    with_it = np.mean([_deltas(d, s)["adapters.1.w"] for _, d, _, s in clients], axis=0)
    assert np.allclose(tier["adapters.1.w"] - GLOBAL["adapters.1.w"], without, atol=1e-6)
    assert np.allclose(block["adapters.1.w"] - GLOBAL["adapters.1.w"], with_it, atol=1e-6)
    assert any("node 3 (depth 2) holds only part of blocks 2-3" in r.getMessage() for r in caplog.records)
