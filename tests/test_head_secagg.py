"""Secure aggregation of the head statistics (`head-secagg`): the ring and the protocol's
pieces, then fits through the real ServerApp and ClientApp code on the in-process grid, with
mixed depths, a node that drops after the key stage, too few survivors, and DP noise."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from flwr.app import Context, RecordDict
from safetensors.numpy import load_file

from adapters import head_codec
from adapters.head_fit import feature_bound
from anytime_fl import checkconfig
from client_app.secagg import flatten
from core import secagg
from core.config import ConfigError, validate
from core.records import to_numpy
from runtime.models import initial_state
from server_app import app as server_app
from server_app import head_fit, head_secagg, results
from server_app.exchange import Exchange
from tests.checks import TINY, one_line
from tests.localgrid import LocalGrid

# tiers 1,2 over 6 nodes: depths 1,2,1,2,1,2. The plain fit's defences off, so both fits sum the same nodes;
# its statistics at 32 bits, as precise as the secure sums' fixed point: the default 22 bits move these tiny
# fits' ill-conditioned weights (lambda 1e-6, fewer examples than features) by ~1 %.
NODES = 6
CFG = {
    **TINY,
    "head-refit-every": 0,
    "head-weight-cap": 0.0,
    "head-influence": 0.0,
    "head-screen": 1.0,
    "head-bits": 32,
}


class Recording(LocalGrid):
    """The in-process grid, keeping every reply the server receives and failing chosen stages."""

    def __init__(self, *args, fail: dict[str, set[int]] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.replies: list = []
        for kind, nodes in (fail or {}).items():
            self.handlers[kind] = self._failing(self.handlers[kind], nodes)

    @staticmethod
    def _failing(handler, nodes):
        def call(msg, context):
            if context.node_id in nodes:
                raise ConnectionError("node went away")
            return handler(msg, context)

        return call

    def send_and_receive(self, messages, *, timeout=None):
        replies = list(super().send_and_receive(messages, timeout=timeout))
        self.replies.extend(replies)
        return replies


def _node_configs(pids: list[int], num: int = NODES) -> list[dict]:
    return [{"partition-id": p, "num-partitions": num} for p in pids]


def _fit(tmp_path, cfg: dict, pids: list[int], num: int = NODES, **grid_options):
    """One fit before round 1 through server_app.head_fit, as the ServerApp runs it."""
    cfg = validate({**cfg, "output-dir": str(tmp_path)})
    grid = Recording(len(pids), cfg, _node_configs(pids, num), **grid_options)
    fitted, summary = head_fit.fit_heads(grid, Exchange(grid, cfg, tmp_path), initial_state(cfg), cfg, 0)
    return fitted, summary, grid


def _heads(arrays: dict, exits) -> dict:
    return {k: v for k, v in arrays.items() if k.startswith("heads.") and ".fc." in k and int(k.split(".")[1]) in exits}


def _assert_same_heads(got: dict, want: dict, exits) -> None:
    """Equal to the fixed point's tolerance. The sums agree to 2^-23 per entry and node
    (test_the_secure_sums_are_the_plain_sums_to_the_fixed_points_step), but lambda 1e-6 leaves
    the solve ill-conditioned: that moves weights of ~700 by up to ~0.2 (as a different torch
    thread count does), where rounding the statistics to float32 moves them by ~5-10
    (docs/benchmarks.md, 2f). Weight and bias are one linear map on [h, 1]: both are held to the
    scale of the exit's weights."""
    for k, w in _heads(want, exits).items():
        scale = float(np.abs(want[k.rsplit(".", 1)[0] + ".weight"]).max())
        np.testing.assert_allclose(got[k], w, rtol=0, atol=5e-3 * scale, err_msg=k)


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


def test_the_client_app_answers_every_stage_the_server_sends():
    from client_app.app import app

    # the in-process grid calls the handlers directly; Flower routes by these names
    assert {head_secagg.KEYS, head_secagg.SHARES, head_secagg.MASKED, head_secagg.UNMASK} <= set(app._registered_funcs)


# -- through the apps ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """The plain fit before round 1 over all nodes, and each node's statistics as it sent them."""
    fitted, summary, grid = _fit(tmp_path_factory.mktemp("plain"), CFG, list(range(NODES)))
    dim, classes = fitted["heads.0.fc.weight"].shape[1] + 1, fitted["heads.0.fc.weight"].shape[0]
    stats = {
        r.metadata.src_node_id: head_codec.decode(
            to_numpy(r.content.array_records["arrays"]),
            r.content.metric_records["metrics"]["depth"],
            dim,
            classes,
            CFG["head-bits"],
        )
        for r in grid.replies
    }
    return fitted, summary, stats


@pytest.fixture(scope="module")
def secure_run(tmp_path_factory):
    """A run with `head-secagg` through the ServerApp loop: its run folder, grid and log lines."""
    cfg = {**CFG, "head-secagg": True, "output-dir": str(tmp_path_factory.mktemp("secure")), "run-name": "s"}
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("flwr").addHandler(handler)
    try:
        grid = Recording(NODES, cfg)
        run_dir = server_app.run(grid, cfg)
    finally:
        logging.getLogger("flwr").removeHandler(handler)
    return run_dir, grid, lines


def test_heads_with_secure_aggregation_equal_the_plain_fit_with_mixed_depths(secure_run, plain):
    run_dir, _, lines = secure_run
    fit = head_fit.fits(run_dir)[0]
    # closed-form heads are not trained: the final weights hold the fit before round 1
    _assert_same_heads(load_file(str(run_dir / results.WEIGHTS)), plain[0], {0, 1})
    assert fit["examples-per-exit"] == plain[1]["examples-per-exit"] and fit["label-counts"] == plain[1]["label-counts"]
    secure = fit["secure-aggregation"]
    assert (secure["nodes"], secure["survivors"], secure["dropped"], secure["exits-unmasked"]) == (6, 6, [], 2)
    assert fit["clients"] == NODES and fit["bytes-up"] > plain[1]["bytes-up"]
    assert any("secure aggregation: the server read only the sums of 6 of 6 nodes" in line for line in lines)
    assert any("head-secagg" in line and "head-screen" in line for line in lines)  # the warning before round 1


def test_the_server_never_receives_a_nodes_statistics(secure_run, plain):
    run_dir, grid, _ = secure_run
    bits = head_fit.fits(run_dir)[0]["secure-aggregation"]["scale-bits"]
    fit_replies = [r for r in grid.replies if r.metadata.message_type.startswith("query.secagg_")]
    assert len(fit_replies) == 4 * NODES
    masked = 0
    for reply in fit_replies:
        node = reply.metadata.src_node_id
        own, _ = flatten(plain[2][node], len(plain[2][node]) // 2)
        for rec in reply.content.array_records.values():
            assert list(rec.keys()) == ["masked"]
            y = secagg.dequantize(rec["masked"].numpy(), bits)
            assert not np.isclose(y, own[: len(y)], atol=1.0).mean() > 0.001
            masked += 1
        for cfg in reply.content.config_records.values():  # keys, sealed shares, node ids: no statistics
            for v in cfg.values():
                assert all(isinstance(x, (bytes, int)) for x in (v if isinstance(v, list) else [v]))
    assert masked == NODES


def test_the_secure_sums_are_the_plain_sums_to_the_fixed_points_step(tmp_path, plain):
    cfg = validate({**CFG, "head-secagg": True, "output-dir": str(tmp_path)})
    arrays, grid = initial_state(cfg), Recording(NODES, cfg)
    bounds = [feature_bound(arrays, i) for i in range(12)]
    config = {"server-round": 0, "stat-dim": 192, "stat-seed": cfg["seed"]}
    sums, counts, _, record = head_secagg.secure_sums(
        grid, Exchange(grid, cfg, tmp_path), arrays, None, config, "fit", cfg, 193, bounds, lambda d: 0.0
    )
    step = 2.0 ** -record["secure-aggregation"]["scale-bits"]
    for name, value in sums.items():
        want = sum(s[name].astype(np.float64) for s in plain[2].values() if name in s)
        assert np.abs(value - want).max() <= NODES * step / 2, name
    assert counts == {0: plain[1]["examples-per-exit"][0], 1: plain[1]["examples-per-exit"][1]}


def test_a_node_that_drops_after_the_key_stage_costs_only_its_own_statistics(tmp_path):
    # node 2 (partition 1, depth 2) shares its keys, then never sends its masked statistics
    cfg = {**CFG, "head-secagg": True, "output-dir": str(tmp_path), "run-name": "d"}
    run_dir = server_app.run(Recording(NODES, cfg, fail={head_secagg.MASKED: {2}}), cfg)
    fit = head_fit.fits(run_dir)[0]
    secure = fit["secure-aggregation"]
    assert secure["dropped"] == [{"node": 2, "partition-id": 1}] and secure["survivors"] == NODES - 1
    assert fit["left-out"][0]["node"] == 2 and fit["left-out"][0]["reason"].startswith("masked:")
    survivors = [0, 2, 3, 4, 5]
    want, summary, _ = _fit(tmp_path / "plain", CFG, survivors)
    _assert_same_heads(load_file(str(run_dir / results.WEIGHTS)), want, {0, 1})
    assert fit["examples-per-exit"] == summary["examples-per-exit"]


def test_too_few_survivors_stop_the_run_in_one_line_naming_the_key(tmp_path):
    cfg = {**CFG, "head-secagg": True, "output-dir": str(tmp_path), "run-name": "f"}
    grid = Recording(4, cfg, fail={head_secagg.MASKED: {1, 2}})  # threshold 3 of 4
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=cfg)
    with pytest.raises(server_app.RunFailed) as err:
        server_app.main(grid, ctx)
    one_line(str(err.value), "head fit", "head-secagg-threshold=0.5", "needs 3 of the 4", "only 2 sent masked")
    assert not any(r.metadata.message_type == "train" for r in grid.replies)  # stopped before round 1


def test_an_exit_only_one_node_runs_is_neither_sent_nor_fitted(tmp_path):
    # depths 1, 2, 1: exit 2's sum would be node 2's own statistics
    fitted, summary, _ = _fit(tmp_path, {**CFG, "head-secagg": True}, [0, 1, 2], num=3)
    secure = summary["secure-aggregation"]
    assert secure["exits-sent"] == secure["exits-unmasked"] == 1
    assert summary["examples-per-exit"] == [sum(summary["label-counts"])]
    initial = initial_state(validate(CFG))
    assert np.array_equal(fitted["heads.1.fc.weight"], initial["heads.1.fc.weight"])
    assert not np.array_equal(fitted["heads.0.fc.weight"], initial["heads.0.fc.weight"])


def test_privacy_noise_is_added_before_masking_and_composes(tmp_path):
    fitted, summary, _ = _fit(tmp_path, {**CFG, "head-secagg": True, "head-dp-epsilon": 1e6}, [0, 1, 2, 3], num=4)
    assert summary["privacy"]["epsilon"] == 1e6 and summary["secure-aggregation"]["survivors"] == 4
    assert all(np.isfinite(v).all() for v in _heads(fitted, {0, 1}).values())


# -- the keys -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "user,key",
    [
        ({"head-secagg": True, "heads": "trained"}, "head-secagg"),
        ({"head-secagg-threshold": 0.4}, "head-secagg-threshold"),
        ({"head-secagg-threshold": 1.5}, "head-secagg-threshold"),
        ({"head-secagg": "maybe"}, "head-secagg"),
    ],
)
def test_secure_aggregation_keys_are_validated_by_name(user, key):
    with pytest.raises(ConfigError, match=key):
        validate(user)


def test_check_config_warns_what_secure_aggregation_gives_up(capsys):
    assert checkconfig.main(["--quiet", "--run-config", "head-secagg=true"]) == 0
    err = capsys.readouterr().err
    assert "warning: head-secagg" in err and "head-weight-cap" in err and "head-screen" in err
    assert checkconfig.main(["--quiet", "--run-config", "head-secagg=false"]) == 0
    assert capsys.readouterr().err == ""
    assert validate({})["head-secagg"] is False


def test_head_fit_json_says_secure_aggregation_was_used(secure_run):
    doc = json.loads((secure_run[0] / head_fit.FILE).read_text())
    secure = doc["fits"][0]["secure-aggregation"]
    assert secure["message-rounds"] == 4 and secure["ring-bits"] == 64
    assert set(secure["bytes-up-per-stage"]) == {"keys", "shares", "masked", "unmask"}
    assert sum(secure["bytes-up-per-stage"].values()) == doc["fits"][0]["bytes-up"]
