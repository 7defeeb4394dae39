"""The personalisation round's label-prior shift with closed-form heads, offline, on a finished run.

For each client (its partition and tier depth, as the run had them), the
final global model is evaluated on the client's validation split as it is,
with its heads moved to the client's own label prior (`shift_to_own_labels`),
and as the personalisation round now does it: moved only when the client's
labels differ from the federation's beyond chance (`labels_differ`). Prints
and writes the mean gain per exit over the clients.

    python bench/personalize_prior.py outputs/<run> --nodes 20
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from benchkit import RESULTS, Report
from torch.utils.data import DataLoader

from adapters.state import get_state, set_state
from adapters.training import evaluate, label_counts
from anytime_fl.predict import load_run
from client_app.personalize import labels_differ, shift_to_own_labels
from client_app.tiers import client_depth
from fedtasks.task import load_partition


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a finished run's folder (adapters.safetensors, head_fit.json)")
    ap.add_argument("--nodes", type=int, default=20, help="the run's number of clients")
    ap.add_argument("--out", default=str(RESULTS / "personalize_prior.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    report = Report("personalize_prior", args)
    model, spec, cfg = load_run(args.run)
    federation = json.loads((Path(args.run) / "head_fit.json").read_text())["fits"][-1]["label-counts"]
    state = get_state(model)
    gains: dict[str, list[np.ndarray]] = {"always": [], "when-labels-differ": []}
    shifted = 0
    for pid in range(args.nodes):
        train, val = load_partition(cfg, spec, pid, args.nodes)
        depth = client_depth({"partition-id": pid, "num-partitions": args.nodes}, cfg, model.num_blocks)
        loader = DataLoader(val, batch_size=cfg["eval-batch-size"])
        before = np.array(evaluate(model, loader, depth)["accuracy"])
        own = label_counts(train, model.num_classes)
        shift_to_own_labels(model, depth, own, federation)
        after = np.array(evaluate(model, loader, depth)["accuracy"])
        set_state(model, state)
        differs = labels_differ(own.numpy(), federation)
        shifted += differs
        gains["always"].append(after - before)
        gains["when-labels-differ"].append(after - before if differs else np.zeros_like(before))
    report["task"] = cfg["task"]
    report["clients-shifted"] = shifted
    for rule, per_client in gains.items():
        deepest = max(len(g) for g in per_client)  # exits beyond every client's depth have no gain
        per_exit = [float(np.mean([g[i] for g in per_client if len(g) > i])) for i in range(deepest)]
        report[rule] = {"gain-per-exit": [round(v, 4) for v in per_exit], "mean": round(float(np.mean(per_exit)), 4)}
        print(f"{rule}: mean gain per exit " + " ".join(f"{v:+.3f}" for v in per_exit), flush=True)
    print(f"{shifted} of {args.nodes} clients' labels differ from the federation's (chi-square, 0.01)")
    report.write(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
