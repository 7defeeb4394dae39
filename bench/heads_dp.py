"""Accuracy of the closed-form exit heads against the privacy of their statistics.

The fit before round 1 of the default run, on the frozen backbone: every
node computes its statistics once (exit_statistics, the depth of its tier),
then for each epsilon every node adds the noise `head-dp-epsilon` would have
it add (calibrated for all the run's fits, `core.config.head_fit_rounds`),
and the server combines and solves them as the ServerApp does
(server_app.head_fit.combine, solve_heads). Several noise draws per epsilon;
test accuracy per exit, its mean over exits, and the noise std.

    python bench/heads_dp.py                                  # the default task, 20 nodes
    python bench/heads_dp.py --epsilons 8,4,1 --draws 3 --run-config "head-refit-every=0"
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from benchkit import RESULTS, Report, parse_overrides, table
from torch.utils.data import DataLoader

from adapters.build import build_model
from adapters.head_fit import add_dp_noise, exit_statistics, feature_bound, noise_std, solve_heads
from adapters.state import get_state, set_state
from adapters.training import evaluate
from client_app.tiers import client_depth
from core.config import head_fit_rounds, validate
from fedtasks.task import load_partition, load_test
from runtime.models import model_and_spec
from server_app.head_fit import combine


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=20)
    ap.add_argument("--epsilons", default="8,4,1", help="the run's epsilon values to measure (beside no noise)")
    ap.add_argument("--draws", type=int, default=3, help="noise draws per epsilon")
    ap.add_argument("--run-config", nargs="*", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default=str(RESULTS / "heads_dp.json"))
    args = ap.parse_args(argv)
    cfg = validate(parse_overrides(args.run_config))
    torch.set_num_threads(cfg["client-threads"])
    base, spec = model_and_spec(cfg)
    model = build_model(cfg, base.num_classes)
    arrays = get_state(model, model.num_blocks)
    bounds = [feature_bound(arrays, i) for i in range(model.num_blocks)]
    nodes = []
    for pid in range(args.nodes):
        train, _ = load_partition(cfg, spec, pid, args.nodes)
        depth = client_depth({"partition-id": pid, "num-partitions": args.nodes}, cfg, model.num_blocks)
        sums, n = exit_statistics(model, DataLoader(train, batch_size=cfg["eval-batch-size"]), depth)
        nodes.append({"node": pid, "partition-id": pid, "stats": sums, "depth": depth, "n": n})
    test = DataLoader(load_test(cfg, spec), batch_size=cfg["eval-batch-size"])
    dim = model.heads[0].fc.in_features + 1
    report = Report("heads_dp", args)
    report["fits-per-run"] = len(head_fit_rounds(cfg))
    rows = []
    for eps in [0.0] + [float(e) for e in args.epsilons.split(",")]:
        run_cfg = {**cfg, "head-dp-epsilon": eps}
        accs, stds = [], []
        for draw in range(args.draws if eps > 0 else 1):
            rng = np.random.default_rng([cfg["seed"], draw])
            accepted = []
            for a in nodes:
                std = noise_std(run_cfg, bounds[: a["depth"]])
                stats = add_dp_noise(a["stats"], std, rng) if eps > 0 else a["stats"]
                accepted.append({**a, "stats": stats, "noise-std": std})
                stds.append(std)
            sums, counts, shifts, _, _ = combine(accepted, run_cfg, dim)
            heads = solve_heads(sums, counts, cfg["ridge-lambda"], cfg["ridge-scale"], shifts=shifts)
            set_state(model, heads)
            accs.append(evaluate(model, test)["accuracy"])
        acc = np.mean(accs, axis=0)
        row = {
            "epsilon": eps or "none",
            "draws": len(accs),
            "noise-std": round(float(np.max(stds)), 2) if eps > 0 else 0.0,
            "mean-over-exits": round(float(acc.mean()), 4),
            "spread-over-draws": round(float(np.ptp([np.mean(a) for a in accs])), 4),
            "accuracy": [round(float(a), 4) for a in acc],
        }
        rows.append(row)
        print(f"epsilon {row['epsilon']}: mean over exits {row['mean-over-exits']:.4f}", flush=True)
        report["rows"] = rows
        report.write(args.out)
    print(table(rows, ["epsilon", "draws", "noise-std", "mean-over-exits", "spread-over-draws"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
