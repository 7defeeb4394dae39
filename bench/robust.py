"""Robust and private aggregation: one client of N sends noise instead of its update.

Every run uses the project's real ServerApp round loop and ClientApp code in
one process (`tests.localgrid.LocalGrid`, no Ray), the same seed, data
split and clients, and differs only in `strategy` / `strategy-args` and in
whether `attack-partitions` names an attacker. The attacker sends
N(0, std^2) noise (std 10 by default: N(0, 100)) for every parameter it
trains, every round. Reported: the server's test accuracy at the deepest
exit and averaged over exits after the last round, and its drop from the
clean FedAvg run.

Runs (`--runs`, default all): clean (fedavg, no attacker), fedavg, krum,
bulyan, median (Flower's FedMedian), and with `--runs ... dp qfedavg
fedadagrad`: server-side fixed clipping + noise around FedAvg, QFedAvg and
FedAdagrad, all on the clean federation. These runs train the heads
(`heads = "trained"`).

Head attacks (`--runs head-clean head-noise head-scale head-rotate
head-inflate head-fake`): closed-form heads (`heads = "ridge"`), the
attacker sending poisoned statistics (`attack-heads`: noise, class 0's
feature sum x1000, labels rotated by one class, everything x100, its
features ten times over all labelled 0); reported: the test accuracy per
exit after the fit before round 1 (`--head-tiers`, one round, no refit)
and its largest drop from head-clean over the exits, with what the server
left out.

    python bench/robust.py                              # 10 clients, 12 rounds, depth 6; 4-9 min a run on 2 busy cores
    python bench/robust.py --rounds 20 --tiers 3,6,9,12 --runs clean fedavg median
    python bench/robust.py --runs head-clean head-noise head-scale head-rotate head-inflate head-fake
"""

from __future__ import annotations

import argparse
import tempfile
import time

from benchkit import RESULTS, Report, parse_overrides, table

RUNS = {
    "clean": ("fedavg", "", False),
    "fedavg": ("fedavg", "", True),
    "krum": ("flwr:Krum", "num_malicious_nodes=1", True),
    "multikrum": ("flwr:MultiKrum", "num_malicious_nodes=1 num_nodes_to_select=5", True),
    "bulyan": ("flwr:Bulyan", "num_malicious_nodes=1", True),
    "median": ("flwr:FedMedian", "", True),
    "trimmed": ("flwr:FedTrimmedAvg", "beta=0.2", True),
    "dp": ("flwr:DifferentialPrivacyServerSideFixedClipping", "noise_multiplier={z} clipping_norm={c}", False),
    "qfedavg": ("flwr:QFedAvg", "q=0.1 client_learning_rate=1.0", False),
    "fedadagrad": ("flwr:FedAdagrad", "eta={eta}", False),
}
DEFAULT_RUNS = ["clean", "fedavg", "krum", "bulyan", "median"]
HEAD_RUNS = {
    "head-clean": "",
    "head-noise": "noise",
    "head-scale": "scale-class",
    "head-rotate": "rotate-labels",
    "head-inflate": "inflate-count",
    "head-fake": "fake-data",
}


def head_run(name: str, args, base: dict) -> dict:
    """One closed-form head fit with the attacker's statistics poisoned `HEAD_RUNS[name]`'s way."""
    from server_app import head_fit
    from server_app.app import run
    from tests.localgrid import LocalGrid

    mode = HEAD_RUNS[name]
    cfg = {
        **base,
        "num-server-rounds": 1,
        "local-epochs": 1,
        "tiers": args.head_tiers,
        "heads": "ridge",
        "head-refit-every": 0,
        "attack-partitions": str(args.attacker) if mode else "",
        "attack-heads": mode or "noise",
        "run-name": name,
    }
    t0 = time.time()
    fit = head_fit.fits(run(LocalGrid(args.nodes, cfg), cfg))[0]
    acc = fit["server"]["accuracy"]
    return {
        "run": name,
        "attack-heads": mode,
        "acc-per-exit": acc,
        "acc-mean": round(sum(acc) / len(acc), 4),
        "left-out": [(x["partition-id"], x["reason"][:80]) for x in fit["left-out"]],
        "capped": [(x["partition-id"], x["counted-as"]) for x in fit["capped"]],
        "screened": [(x["partition-id"], x["exits"]) for x in fit["screened"]],
        "seconds": round(time.time() - t0, 1),
    }


def one_run(name: str, args, base: dict) -> dict:
    from server_app import results
    from server_app.app import run
    from tests.localgrid import LocalGrid

    strategy, sargs, attacked = RUNS[name]
    cfg = {
        **base,
        "strategy": strategy,
        "strategy-args": sargs.format(z=args.dp_noise, c=args.dp_clip, eta=args.eta),
        "attack-partitions": str(args.attacker) if attacked else "",
        # the closed-form head fit sums every node's statistics with no robust rule: off here
        "heads": "trained",
        "run-name": name,
    }
    t0 = time.time()
    run_dir = run(LocalGrid(args.nodes, cfg), cfg)
    rows = results.read_rows(run_dir)
    # The deepest exit the clients train; exits past it stay untrained.
    deepest = max(int(t) for t in str(args.tiers).split(","))
    acc = rows[-1]["server"]["accuracy"][:deepest]
    return {
        "run": name,
        "strategy": strategy,
        "strategy-args": cfg["strategy-args"],
        "attacker": attacked,
        "acc-deepest": round(float(acc[-1]), 4),
        "acc-mean": round(sum(acc) / len(acc), 4),
        "exit": deepest,
        "acc-per-round": [round(float(r["server"]["accuracy"][deepest - 1]), 4) for r in rows],
        "seconds": round(time.time() - t0, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, choices=sorted(RUNS) + list(HEAD_RUNS))
    ap.add_argument("--nodes", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--tiers", default="6", help="client depths; one depth gives every block all senders")
    ap.add_argument("--head-tiers", default="3,6,9,12", help="client depths of the head-attack runs")
    ap.add_argument("--attacker", type=int, default=0, help="partition id of the attacker")
    ap.add_argument("--std", type=float, default=10.0, help="std of the attacker's noise")
    ap.add_argument("--dp-noise", type=float, default=0.01, help="noise multiplier of the dp run")
    ap.add_argument("--dp-clip", type=float, default=3.0, help="clipping norm of a whole update in the dp run")
    ap.add_argument("--eta", type=float, default=0.01, help="FedAdagrad's server learning rate")
    ap.add_argument("--run-config", nargs="*", default=[], help="further KEY=VALUE overrides")
    ap.add_argument("--out", default=str(RESULTS / "robust.json"))
    args = ap.parse_args()

    base = {
        "num-server-rounds": args.rounds,
        "tiers": args.tiers,
        "fraction-train": 1.0,
        "fraction-evaluate": 0.0,
        "personalize-epochs": 0,
        "local-epochs": 1,
        "attack-noise-std": args.std,
        "output-dir": tempfile.mkdtemp(prefix="anytime-robust-"),
        **parse_overrides(args.run_config),
    }
    report = Report("robust", args)
    report["run-config"] = base
    heads = []
    for name in [r for r in args.runs if r in HEAD_RUNS]:
        heads.append(head_run(name, args, base))
        clean = next((h["acc-per-exit"] for h in heads if h["run"] == "head-clean"), None)
        if clean is not None:
            heads[-1]["worst-drop"] = round(max(c - a for c, a in zip(clean, heads[-1]["acc-per-exit"])), 4)
        print(f"{name}: mean over exits {heads[-1]['acc-mean']:.3f} ({heads[-1]['seconds']} s)", flush=True)
        report["head-runs"] = heads
        report.write(args.out)
    if heads:
        print(table(heads, ["run", "attack-heads", "acc-mean", "worst-drop", "left-out", "capped", "screened"]))
    rows = []
    for name in [r for r in args.runs if r in RUNS]:
        rows.append(one_run(name, args, base))
        print(f"{name}: deepest exit {rows[-1]['acc-deepest']:.3f} ({rows[-1]['seconds']} s)", flush=True)
        report["runs"] = rows
        report.write(args.out)  # after every run: a cut benchmark keeps what it measured
    clean = next((r["acc-deepest"] for r in rows if r["run"] == "clean"), None)
    for r in rows:
        r["drop-vs-clean"] = round(clean - r["acc-deepest"], 4) if clean is not None else ""
    report["runs"] = rows
    if not rows:
        report.write(args.out)
        return
    print(
        table(
            rows,
            ["run", "strategy", "strategy-args", "attacker", "acc-deepest", "acc-mean", "drop-vs-clean", "seconds"],
        )
    )
    report.write(args.out)


if __name__ == "__main__":
    main()
