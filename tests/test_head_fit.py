"""Exit heads fitted in closed form before round 1 (heads = "ridge" / "ridge-init")."""

import json

import numpy as np
import pytest
import torch
from flwr.app import MessageType
from safetensors.numpy import load_file
from torch.utils.data import DataLoader, TensorDataset

from adapters.backbone import load_backbone
from adapters.head_fit import exit_statistics, solve_heads, stat_name
from adapters.model import AnytimeViT
from adapters.state import get_state, set_state
from core.config import ConfigError, check_heads_privacy, validate
from core.naming import param_block
from runtime.models import initial_state
from server_app import head_fit, results
from server_app.app import run
from tests.localgrid import LocalGrid

CLASSES = 4


@pytest.fixture()
def model():
    return _model()


def _model(patch_mean: bool = False) -> AnytimeViT:
    torch.manual_seed(0)
    m = AnytimeViT(load_backbone("vit_micro_patch7_28"), num_classes=CLASSES, patch_mean=patch_mean)
    with torch.no_grad():  # adapters that modulate, so the features are not the backbone's alone
        for a in m.adapters:
            a.up.weight.normal_(0, 0.05)
    return m


def _data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, CLASSES, (n,), generator=g))


def _features(model, ds, depth):
    """Each exit's fc input, by a forward hook: what the ridge fit regresses on."""
    feats = {}
    hooks = [
        model.heads[i].fc.register_forward_hook(lambda _m, inp, _o, i=i: feats.setdefault(i, []).append(inp[0]))
        for i in range(depth)
    ]
    with torch.no_grad():
        model.eval()
        model(ds.tensors[0], depth=depth)
    for h in hooks:
        h.remove()
    return [torch.cat(feats[i]).double().numpy() for i in range(depth)]


def test_two_clients_statistics_add_up_to_the_central_ones(model):
    a, b = _data(37, 1), _data(29, 2)
    union = TensorDataset(*(torch.cat(t) for t in zip(a.tensors, b.tensors)))
    sa, na = exit_statistics(model, DataLoader(a, batch_size=16), 5)
    sb, nb = exit_statistics(model, DataLoader(b, batch_size=8), 5)
    su, nu = exit_statistics(model, DataLoader(union, batch_size=64), 5)
    assert na + nb == nu == 66
    assert set(su) == {stat_name(i, k) for i in range(5) for k in ("gram", "cross")}
    for k in su:
        np.testing.assert_allclose(sa[k] + sb[k], su[k], rtol=1e-5, atol=1e-4)
    # the cross sums of the bias column count each class's examples
    counts = np.bincount(union.tensors[1].numpy(), minlength=CLASSES)
    np.testing.assert_allclose(su[stat_name(0, "cross")][-1], counts)


@pytest.mark.parametrize("patch_mean", [False, True])
def test_solved_heads_are_the_ridge_regression_of_their_features(patch_mean):
    model = _model(patch_mean)
    ds, depth, lam = _data(80, 3), 3, 1e-3
    sums, n = exit_statistics(model, DataLoader(ds, batch_size=32), depth)
    heads = solve_heads(sums, {i: n for i in range(depth)}, lam)
    assert set(heads) == {f"heads.{i}.fc.{p}" for i in range(depth) for p in ("weight", "bias")}
    y = np.eye(CLASSES)[ds.tensors[1].numpy()]
    for i, phi in enumerate(_features(model, ds, depth)):
        x = np.hstack([phi, np.ones((len(phi), 1))])
        w = np.linalg.solve(x.T @ x / n + lam * np.eye(x.shape[1]), x.T @ y / n)
        # float32 statistics: 80 examples of 97 features leave G singular but for lam, whose
        # solve then moves by a few 1e-4 on weights of order 1
        np.testing.assert_allclose(heads[f"heads.{i}.fc.weight"], w[:-1].T, rtol=0, atol=2e-3)
        np.testing.assert_allclose(heads[f"heads.{i}.fc.bias"], w[-1], rtol=0, atol=2e-3)
    # loaded into the model, the exits answer with the fitted linear maps
    set_state(model, {**get_state(model), **heads})
    model.eval()
    with torch.no_grad():
        logits = model(ds.tensors[0], depth=depth)
    phis = _features(model, ds, depth)
    for i in range(depth):
        want = phis[i] @ heads[f"heads.{i}.fc.weight"].T + heads[f"heads.{i}.fc.bias"]
        np.testing.assert_allclose(logits[i].numpy(), want, rtol=1e-4, atol=1e-4)


def test_a_deep_exit_fitted_on_fewer_nodes_moves_to_the_federations_label_prior(model):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(60, 1, 28, 28, generator=g)
    deep = TensorDataset(x[:30], torch.tensor([0, 1] * 15))  # a depth-2 node: classes 0 and 1
    shallow = TensorDataset(x[30:], torch.tensor([2, 3, 3] * 10))  # a depth-1 node: classes 2 and 3
    sd, nd = exit_statistics(model, DataLoader(deep, batch_size=30), 2)
    ss, ns = exit_statistics(model, DataLoader(shallow, batch_size=30), 1)
    sums = {k: v + ss[k] if k in ss else v for k, v in sd.items()}
    heads = solve_heads(sums, {0: nd + ns, 1: nd}, 1e-3, scale=3.0)
    alone = solve_heads({stat_name(0, k): sd[stat_name(1, k)] for k in ("gram", "cross")}, {0: nd}, 1e-3, scale=3.0)
    np.testing.assert_allclose(heads["heads.1.fc.weight"], alone["heads.0.fc.weight"], rtol=1e-6)
    federation = np.log(np.array([15, 15, 10, 20]) / 60)
    own = np.log(np.array([15, 15, 0.5, 0.5]) / 31)
    np.testing.assert_allclose(heads["heads.1.fc.bias"] - alone["heads.0.fc.bias"], federation - own, rtol=1e-5)


def test_votes_weigh_each_head_by_the_examples_its_fit_saw(model):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(60, 1, 28, 28, generator=g)
    deep = TensorDataset(x[:20], torch.tensor([0, 1, 2, 3] * 5))  # a depth-2 node
    shallow = TensorDataset(x[20:], torch.tensor([0, 1, 2, 3] * 10))  # a depth-1 node, twice its examples
    sd, nd = exit_statistics(model, DataLoader(deep, batch_size=20), 2)
    ss, ns = exit_statistics(model, DataLoader(shallow, batch_size=40), 1)
    sums = {k: v + ss[k] if k in ss else v for k, v in sd.items()}
    counts = {0: nd + ns, 1: nd}
    equal = solve_heads(sums, counts, 1e-3, scale=3.0)
    voted = solve_heads(sums, counts, 1e-3, scale=3.0, votes=True)
    for k in ("weight", "bias"):
        np.testing.assert_array_equal(voted[f"heads.0.fc.{k}"], equal[f"heads.0.fc.{k}"])
    # exit 2 saw a third of exit 1's examples: its vote in the ensemble's mean is a third (the labels are
    # balanced on both nodes, so no prior shift is added to the bias)
    for k in ("weight", "bias"):
        np.testing.assert_allclose(voted[f"heads.1.fc.{k}"], equal[f"heads.1.fc.{k}"] / 3, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "ensemble, votes, scaled", [(True, "examples", True), (True, "equal", False), (False, "examples", False)]
)
def test_votes_apply_to_the_exit_ensemble_only(ensemble, votes, scaled):
    from core.config import ensemble_votes

    assert ensemble_votes(validate({"exit-ensemble": ensemble, "ensemble-votes": votes})) is scaled


def _cfg(tmp_path, **over):
    return {
        "task": "digits",
        "num-server-rounds": 1,
        "local-epochs": 1,
        "fraction-evaluate": 0.0,
        "personalize-epochs": 0,
        "output-dir": str(tmp_path),
        "run-name": "fit",
        **over,
    }


def test_ridge_heads_are_fitted_once_before_round_1_from_every_node(fake_grid, tmp_path):
    cfg = _cfg(tmp_path, **{"num-server-rounds": 1})
    grid = fake_grid(num_nodes=4, run_config=cfg)
    run_dir = run(grid, cfg)
    queries = [d for d in grid.delivered if d["type"] == MessageType.QUERY and d["round"] == 0]
    assert sorted(d["node"] for d in queries) == [1, 2, 3, 4]
    first_train = next(i for i, d in enumerate(grid.delivered) if d["type"] == MessageType.TRAIN)
    assert all(grid.delivered.index(q) < first_train for q in queries)
    doc = json.loads((run_dir / head_fit.FILE).read_text())
    assert [f["after-round"] for f in doc["fits"]] == [0, 1]  # and again after the last round
    fit = doc["fits"][0]
    assert fit["clients"] == 4 and fit["failed"] == 0
    # tiers 3/6/9/12, one node each: exit i is fitted on the nodes that run it
    per_exit = fit["examples-per-exit"]
    assert len(per_exit) == 12 and per_exit[0] > per_exit[3] > per_exit[6] > per_exit[9] > 0
    assert per_exit[0] == per_exit[2] and per_exit[9] == per_exit[11]
    # the closed-form heads alone already classify the digits (10 classes, chance 0.1)
    assert max(fit["server"]["accuracy"]) > 0.6


def test_heads_are_refitted_every_n_rounds_and_after_the_last(fake_grid, tmp_path):
    cfg = _cfg(tmp_path, **{"num-server-rounds": 3, "head-refit-every": 2, "tiers": "4"})
    grid = fake_grid(num_nodes=2, run_config=cfg)
    run_dir = run(grid, cfg)
    assert grid.rounds(MessageType.QUERY) == [0, 2, 3]
    # before round 1 the nodes' depths are unknown: all 12 blocks; a refit sends each node its 4 blocks
    blocks = {
        d["round"]: {param_block(n) for n in d["arrays"]} for d in grid.delivered if d["type"] == MessageType.QUERY
    }
    assert blocks[0] == set(range(1, 13)) and blocks[2] == blocks[3] == {1, 2, 3, 4}
    doc = json.loads((run_dir / head_fit.FILE).read_text())
    assert [f["after-round"] for f in doc["fits"]] == [0, 2, 3]
    rows = results.read_rows(run_dir)
    assert [r["head-fit-bytes-up"] > 0 for r in rows] == [False, True, True]
    assert rows[-1]["head-fit-bytes-up"] == doc["fits"][-1]["bytes-up"] > 0
    # exits 1-4 were fitted; no node runs exits 5-12, so their heads keep the initial values
    final, initial = load_file(str(run_dir / results.WEIGHTS)), initial_state(validate(cfg))
    for i in range(12):
        same = np.array_equal(final[f"heads.{i}.fc.weight"], initial[f"heads.{i}.fc.weight"])
        assert same == (i >= 4), i


def test_a_resumed_run_keeps_the_fits_up_to_its_checkpoint(tmp_path):
    cfg = validate({"head-refit-every": 1})
    for r in (0, 1, 2, 3):
        head_fit.record(tmp_path, {"after-round": r}, cfg)
    head_fit.record(tmp_path, {"after-round": 2, "again": True}, cfg)  # a resume after round 1
    fits = json.loads((tmp_path / head_fit.FILE).read_text())["fits"]
    assert [f["after-round"] for f in fits] == [0, 1, 2] and fits[-1]["again"]


def test_trained_heads_send_no_query(fake_grid, tmp_path):
    cfg = _cfg(tmp_path, **{"heads": "trained"})
    grid = fake_grid(num_nodes=2, run_config=cfg)
    run_dir = run(grid, cfg)
    assert not [d for d in grid.delivered if d["type"] == MessageType.QUERY]
    assert not (run_dir / head_fit.FILE).exists()


def test_a_failing_node_is_left_out_of_the_fit(fake_grid, tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, **{"num-server-rounds": 1})
    grid = fake_grid(num_nodes=3, run_config=cfg, raise_errors=False)
    handler = grid.handlers[MessageType.QUERY]

    def broken_on_node_2(msg, context):
        if context.node_id == 2:
            raise RuntimeError("disk full")
        return handler(msg, context)

    grid.handlers[MessageType.QUERY] = broken_on_node_2
    run_dir = run(grid, cfg)
    fit = json.loads((run_dir / head_fit.FILE).read_text())["fits"][0]
    assert fit["clients"] == 2 and fit["failed"] == 1


def test_ridge_with_a_differential_privacy_strategy_is_refused_by_name(tmp_path):
    dp = {
        "strategy": "flwr:DifferentialPrivacyServerSideFixedClipping",
        "strategy-args": "noise_multiplier=0.1 clipping_norm=1.0",
    }
    with pytest.raises(ConfigError, match="head-dp-epsilon"):
        check_heads_privacy(validate(dp))
    with pytest.raises(ConfigError, match="head-dp-epsilon"):  # the ServerApp refuses it before round 1
        run(LocalGrid(2, dp), _cfg(tmp_path, **dp))
    check_heads_privacy(validate({**dp, "heads": "trained"}))
    check_heads_privacy(validate({"strategy": "flwr:Krum"}))


@pytest.mark.parametrize("key,value", [("heads", "zeros"), ("ridge-lambda", 0.0)])
def test_head_fit_keys_are_validated_by_name(key, value):
    with pytest.raises(ConfigError, match=key):
        validate({key: value})


@pytest.mark.parametrize("heads,trained", [("ridge", False), ("ridge-init", True), ("trained", True)])
def test_clients_train_the_heads_unless_they_are_closed_form(model, heads, trained):
    from adapters.training import TrainSettings, train_local

    s = TrainSettings.from_config(validate({"heads": heads, "local-epochs": 1}), server_round=1)
    before = get_state(model, 3)
    train_local(model, DataLoader(_data(16, 6), batch_size=8), 3, s)
    after = get_state(model, 3)
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert any(k.startswith("adapters.") for k in changed)
    assert any(k.startswith("heads.") for k in changed) == trained


def test_personalisation_moves_closed_form_heads_to_the_nodes_label_prior(fake_grid, tmp_path, model):
    from client_app.personalize import shift_to_own_labels
    from server_app.personalization import PERSONALIZE

    before = model.heads[0].fc.bias.detach().clone()
    shift_to_own_labels(model, 1, [3, 1, 0, 0], [10, 10, 10, 10])
    want = np.log(np.array([3, 1, 0.5, 0.5]) / 5.0) - np.log(0.25)
    np.testing.assert_allclose((model.heads[0].fc.bias - before).detach().numpy(), want, rtol=1e-5)

    cfg = _cfg(tmp_path, **{"personalize-epochs": 1, "tiers": "2"})
    grid = fake_grid(num_nodes=2, run_config=cfg)
    run_dir = run(grid, cfg)
    sent = [d["config"] for d in grid.delivered if d["type"] == PERSONALIZE]
    fit = json.loads((run_dir / head_fit.FILE).read_text())["fits"][-1]
    assert len(sent) == 2 and all(list(c["label-counts"]) == fit["label-counts"] for c in sent)
    assert sum(fit["label-counts"]) == fit["examples-per-exit"][0]
    assert json.loads((run_dir / "personalization.json").read_text())["clients"] == 2


@pytest.mark.parametrize("attack", ["scale-class", "rotate-labels"])
def test_a_poisoning_node_is_left_out_of_the_fit_with_its_reason(fake_grid, tmp_path, attack):
    cfg = _cfg(
        tmp_path,
        **{
            "tiers": "2",
            "head-refit-every": 0,
            "attack-partitions": "0",
            "attack-heads": attack,
            "local-epochs": 1,
            "head-features": 100,
        },
    )
    run_dir = run(fake_grid(num_nodes=5, run_config=cfg), cfg)
    fit = json.loads((run_dir / head_fit.FILE).read_text())["fits"][0]
    if attack == "scale-class":  # the checks refuse it: R's columns no longer add up to G's
        assert fit["clients"] == 4 and fit["failed"] == 1
        assert fit["left-out"][0]["partition-id"] == 0 and "constant column" in fit["left-out"][0]["reason"]
        assert fit["examples-per-exit"][0] < sum(fit["label-counts"]) + 1
    else:  # consistent statistics: the screen leaves it out of both exits
        assert fit["clients"] == 5 and fit["failed"] == 0
        assert [(s["partition-id"], s["exits"]) for s in fit["screened"]] == [(0, [1, 2])]
    assert fit["features"] == {"sent": 100, "width": 192}  # the checks and the screen work on projections too
