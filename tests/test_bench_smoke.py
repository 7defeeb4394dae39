"""The benchmark scripts run end to end at a minimal size and write sane reports.

sim_overhead.py is left out: one `flwr run` alone takes about a minute.
"""

import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.bench  # whole benchmark scripts on small settings (a minute together)

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module", autouse=True)
def bench_on_path():
    sys.path.insert(0, str(BENCH))
    yield
    sys.path.remove(str(BENCH))


def test_communication_orders_full_finetuning_above_adapters_above_topk(tmp_path):
    import communication

    out = tmp_path / "comm.json"
    communication.main(
        [
            "--models",
            "vit_micro_patch7_28",
            "--num-classes",
            "10",
            "--tiers",
            "3,12",
            "--topk",
            "0.1,0.01",
            "--batch",
            "1",
            "--out",
            str(out),
        ]
    )
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    full = rows["full fine-tuning (FedAvg)"]
    assert full["params"] == 1_349_770  # vit_micro (1,339,776) + a 10-class head
    assert full["up"] > 4 * full["params"]  # float32 plus .npy headers
    d3, d12 = rows["ours, depth 3 (dense)"], rows["ours, depth 12 (dense)"]
    assert full["up"] > d12["up"] > d3["up"]
    assert d12["up"] > rows["ours, depth 12, top-k 0.1"]["up"] > rows["ours, depth 12, top-k 0.01"]["up"]
    assert rows["ours, depth 12, top-k 0.1"]["up"] < 0.1 * d12["up"]
    # a head fit at the default 22 bits costs less than one dense update, and under 3/4 of float32
    stats = rows["head statistics, depth 12 (22 bits)"]
    assert stats["up"] <= d12["up"]
    assert stats["up"] < 0.75 * rows["head statistics, depth 12, float32, every feature (before head-bits)"]["up"]


def test_speed_reports_throughput_memory_and_ratio_per_configuration(tmp_path):
    import speed

    out = tmp_path / "speed.json"
    speed.main(
        [
            "--models",
            "vit_micro_patch7_28@28/7",
            "--depths",
            "3",
            "--batch",
            "4",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--repeats",
            "1",
            "--threads",
            "1",
            "--out",
            str(out),
        ]
    )
    report = json.loads(out.read_text())
    rows = {r["config"]: r for r in report["rows"]}
    assert set(rows) == {"ours d3", "full fine-tuning"}
    assert all(r["examples-per-s"] > 0 and r["peak-rss-mb"] > 0 for r in rows.values())
    assert rows["full fine-tuning"]["speed-vs-full"] == 1.0
    assert rows["ours d3"]["trainable-params"] < rows["full fine-tuning"]["trainable-params"] / 5
    assert len(report["load-start"]) == 3 and len(report["load-end"]) == 3


def test_accuracy_runs_all_three_methods_on_the_same_clients(tmp_path):
    import accuracy

    out = tmp_path / "acc.json"
    accuracy.main(
        [
            "--rounds",
            "1",
            "--nodes",
            "4",
            "--no-sweep",
            "--out",
            str(out),
            "--run-config",
            "backbone-weights=''",
            "task='digits'",  # the machinery, fast; the default task is measured in bench/
            "tiers='2,4'",
            "min-nodes=2",
            "fraction-train=0.5",
        ]
    )
    report = json.loads(out.read_text())
    rows = {r["key"]: r for r in report["rows"]}
    assert set(rows) == {"ours", "full", "head"}
    assert report["same-clients-every-round"] is True
    assert len(rows["ours"]["accuracy"]) == 12 and len(rows["full"]["accuracy"]) == 1
    # one round, two clients: what each sends, twice
    assert rows["full"]["bytes-up-total"] == 2 * rows["full"]["bytes-per-client-round"]
    assert rows["head"]["bytes-up-total"] < rows["ours"]["bytes-up-total"] < rows["full"]["bytes-up-total"]


def test_peers_runs_each_kind_of_method_on_the_same_clients(tmp_path):
    import peers

    out = tmp_path / "peers.json"
    peers.main(
        [
            "--rounds",
            "1",
            "--nodes",
            "4",
            "--methods",
            "ours,depthfl-kd,headonly,exclusion",
            "--out",
            str(out),
            "--run-config",
            "backbone-weights=''",
            "task='digits'",  # the machinery, fast; the default task is measured in bench/
            "tiers='2,4'",
            "min-nodes=2",
            "fraction-train=0.5",
            "local-epochs=1",
        ]
    )
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["ours"]["same-clients"] is True
    assert len(rows["ours"]["accuracy"]) == 12 and len(rows["depthfl-kd"]["accuracy"]) == 4
    assert len(rows["headonly"]["accuracy"]) == 4 and len(rows["exclusion"]["accuracy"]) == 1
    # the multi-exit peers are also read with ours' exit ensemble; its exit 1 is exit 1 itself
    ens = rows["depthfl-kd"]["accuracy-exit-ensemble"]
    assert len(ens) == 4 and ens[0] == rows["depthfl-kd"]["accuracy"][0]
    assert "accuracy-exit-ensemble" not in rows["exclusion"]
    # the baselines report validation accuracy (learning rates are chosen on it, not on test)
    assert len(rows["depthfl-kd"]["val-accuracy-per-exit"]) == 4 and 0 <= rows["exclusion"]["val-accuracy"] <= 1
    # per training round the peers' full weights dwarf our sparse adapter updates (ours' head
    # fits, counted in its total, are most of what a one-round run sends)
    per_round = {m: rows[m]["MB-per-client-round"] for m in ("headonly", "ours", "depthfl-kd")}
    assert max(per_round["headonly"], per_round["ours"]) < per_round["depthfl-kd"] / 10
    assert rows["ours"]["head-fit-bytes-up-total"] > 0
    assert all(r["rounds-to-90%"] == 1 for r in rows.values())


def test_gap_runs_federated_central_and_heads_only(tmp_path):
    import gap

    out = tmp_path / "gap.json"
    gap.main(
        [
            "--rounds",
            "1",
            "--nodes",
            "4",
            "--out",
            str(out),
            "--base",
            "backbone-weights=''",
            "task='digits'",  # the machinery, fast; the default task is measured in bench/
            "tiers='2'",
            "local-epochs=1",
            "min-nodes=2",
            "--exp",
            "fed:logit-adjust=1.0",
            "--exp",
            "cen:central optimizer=sgd lr=0.05",
            "--exp",
            "h:heads",
        ]
    )
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["cen"]["central"] and not rows["fed"]["central"] and rows["h"]["heads-only"]
    assert len(rows["fed"]["val-accuracy-per-exit"]) == 12 and len(rows["cen"]["accuracy"]) == 2
    assert len(rows["h"]["accuracy"]) == 12
    assert all(0.0 <= r["val-accuracy"] <= 1.0 for r in rows.values())


def test_heads_levers_fits_tiers_and_reads_the_exit_ensemble(tmp_path):
    import heads_levers

    out = tmp_path / "levers.json"
    exps = ["ridge-1e-6", "ridge-1e-6-tiers", "ridge-1e-6-tiers-ensemble", "fedavg-adamw-.03"]
    heads_levers.main(
        ["--rounds", "1", "--epochs", "1", "--nodes", "4", "--out", str(out)] + [f"--exp={e}" for e in exps]
    )
    rows = {r["experiment"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == set(exps)
    full, tiers, ens = (
        rows["ridge-1e-6"]["test"],
        rows["ridge-1e-6-tiers"]["test"],
        rows["ridge-1e-6-tiers-ensemble"]["test"],
    )
    # exits 1-3 are fitted on every client with or without tiers; an ensemble of one exit is that exit
    assert tiers[:3] == full[:3] and ens[0] == tiers[0]
    # exit 12 is fitted on one client of four with tiers
    assert tiers[-1] != full[-1]
    assert min(full) > 0.3 and len(ens) == 12
    # heads that also read the mean patch token: a shallow block's CLS token alone says less
    heads_levers.main(
        ["--rounds", "1", "--nodes", "4", "--patch-mean", "--exp=ridge-1e-6", "--out", str(tmp_path / "p.json")]
    )
    patch = json.loads((tmp_path / "p.json").read_text())["rows"][0]["test"]
    assert patch[0] > full[0] + 0.05


def test_headroom_places_the_probe_and_central_full_finetuning_on_the_same_images(tmp_path):
    import headroom

    out = tmp_path / "headroom.json"
    argv = ["--run-config", "task='digits'", "--nodes", "4", "--passes", "1", "--lrs", "1e-3,3e-3", "--out", str(out)]
    assert headroom.main(argv) == 0
    report = json.loads(out.read_text())
    probe, full = report["probe"], report["full"]
    assert len(probe["accuracy"]) == 12 and all(0 <= a <= 1 for a in probe["accuracy"])
    assert report["task"]["train"] > 0 and report["task"]["test"] == 359
    # the rate is the one with the best validation accuracy, and only its test accuracy is reported
    runs = report["full-runs"]
    assert [r["lr"] for r in runs] == [1e-3, 3e-3] and all("accuracy" not in r for r in runs)
    assert full["val-accuracy"] == max(r["val-accuracy"] for r in runs)
    assert report["gap-points"] == round(100 * (full["accuracy"] - sum(probe["accuracy"]) / 12), 1)


def test_heads_dp_reports_accuracy_falling_with_the_privacy_noise(tmp_path):
    import heads_dp

    out = tmp_path / "dp.json"
    heads_dp.main(
        ["--nodes", "3", "--epsilons", "1", "--draws", "1", "--run-config", "task='digits'", "--out", str(out)]
    )
    rows = json.loads(out.read_text())["rows"]
    assert [r["epsilon"] for r in rows] == ["none", 1.0]
    assert rows[0]["noise-std"] == 0 and rows[1]["noise-std"] > 0
    assert rows[0]["mean-over-exits"] > rows[1]["mean-over-exits"] + 0.3  # exact statistics vs heavy noise


def test_personalize_prior_compares_both_rules_on_a_finished_run(tmp_path):
    import personalize_prior

    from server_app.app import run
    from tests.checks import TINY
    from tests.localgrid import LocalGrid

    cfg = {**TINY, "output-dir": str(tmp_path), "run-name": "p"}  # digits, one round, tiers 1 and 2
    run_dir = run(LocalGrid(3, cfg), cfg)
    out = tmp_path / "prior.json"
    personalize_prior.main([str(run_dir), "--nodes", "3", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["task"] == "digits" and 0 <= report["clients-shifted"] <= 3
    for rule in ("always", "when-labels-differ"):
        assert len(report[rule]["gain-per-exit"]) == 2  # the exits the clients run


def test_plateau_writes_a_stale_and_a_refitted_row_per_round(tmp_path):
    import plateau

    out = tmp_path / "plateau.json"
    base = ["--rounds", "1", "--nodes", "3", "--out", str(out)]
    cfg = ["--run-config", "task='digits'", "tiers='2,3'", "local-epochs=1"]
    assert plateau.main(["--name", "fed", "--sample", "2", "--keep-optimizer", *base, *cfg]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["round"], r["heads"]) for r in rows] == [(0, "fitted"), (1, "stale"), (1, "refitted")]
    assert all(len(r["test-per-exit"]) == 3 and 0 <= r["test-mean"] <= 1 for r in rows)
    assert plateau.main(["--name", "cen", "--central", "--iid", *base, *cfg]) == 0
    assert len(json.loads(out.read_text())["rows"]) == 3
    # heads the clients train: the round's row reads them, the refit replaces them only to read out
    assert plateau.main(["--name", "th", "--train-heads", "ridge", *base, *cfg]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["heads"] for r in rows] == ["fitted", "trained", "refitted"]
    assert rows[1]["test-per-exit"] != rows[2]["test-per-exit"]
    assert plateau.main(["--name", "tl", "--train-lambda", "1e-2", *base, *cfg]) == 0


def test_first_steps_measures_the_fixed_heads_along_local_training(tmp_path):
    import first_steps

    out = tmp_path / "steps.json"
    argv = ["--nodes", "3", "--steps", "5", "--out", str(out)]
    exps = ["--exp", "a:task='digits' lr=1e-3", "--exp", "b:task='digits' ridge-lambda=1e-2"]
    assert first_steps.main([*argv, *exps]) == 0
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    assert [c["step"] for c in rows["a"]["curve"]] == [0, 1, 2, 5]
    # a larger ridge penalty gives smaller head weights
    assert max(rows["b"]["head-weight-norms"]) < max(rows["a"]["head-weight-norms"])


def test_heads_secagg_reports_bytes_seconds_and_the_heads_difference(tmp_path):
    import heads_secagg

    out = tmp_path / "secagg.json"
    heads_secagg.main(
        # the plain fit at 32 bits, as precise as the secure ring: 22 bits move these four nodes'
        # ill-conditioned weights by ~3 % (docs/benchmarks.md 2d) and send 0.7x the bytes
        ["--nodes", "4", "--repeats", "1", "--run-config", "task='digits'", "tiers='1,2'", "head-bits=32"]
        + ["--out", str(out)]
    )
    rows = {r["way"]: r for r in json.loads(out.read_text())["rows"]}
    plain, secure = rows["plain, no cap or screen"], rows["head-secagg"]
    assert plain["max-head-difference"] == 0 and secure["max-head-difference"] < 5e-3 * plain["largest-head-weight"]
    assert 1.9 * plain["bytes-up-per-node"] < secure["bytes-up-per-node"] < 2.2 * plain["bytes-up-per-node"]
    assert set(secure["bytes-up-per-stage-per-node"]) == {"keys", "shares", "masked", "unmask"}
    assert secure["accuracy"] == plain["accuracy"]


def test_votes_weighs_the_ensemble_and_p0_is_the_plain_mean(tmp_path):
    import votes

    out = tmp_path / "votes.json"
    argv = ["--nodes", "4", "--powers", "0,1", "--run-config", "task='digits'", "tiers='1,3'", "--out", str(out)]
    assert votes.main(argv) == 0
    report = json.loads(out.read_text())
    # partitions 0 and 2 run one block, 1 and 3 three: exits 2-3 see about half of exit 1's examples
    n = report["examples-per-exit"]
    assert len(n) == 3 and n[1] == n[2] and 0.3 * n[0] < n[1] < 0.7 * n[0]
    rows = report["rows"]
    assert [r["power"] for r in rows] == [0.0, 1.0]
    # exit 1 is its own head under any weighting; deeper exits read a different mean
    assert rows[0]["test-per-exit"][0] == rows[1]["test-per-exit"][0]
    assert all(len(r["val-per-exit"]) == 3 and 0 <= r["test-mean"] <= 1 for r in rows)
