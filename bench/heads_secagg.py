"""What secure aggregation of the head statistics (`head-secagg`) costs: bytes, seconds, heads.

The fit before round 1 as the ServerApp runs it (server_app.head_fit.fit_heads,
through the run's Exchange) against the real ClientApp handlers, all nodes in
this one process (tests.localgrid.LocalGrid), three ways: plain with the run
config's defences, plain without the weight cap and the label screen (so it
sums the same nodes as secure aggregation does), and `head-secagg`. Each way
runs `--repeats` times, interleaved, after a warm-up fit; seconds are the
median, split into the nodes' work (inside the exchanges) and the server's.
Per way: bytes up and down per node, test accuracy per exit, and the largest
difference of any head weight from the plain fit without cap and screen.

    python bench/heads_secagg.py                                   # digits, 20 nodes, tiers 3/6/9/12
    python bench/heads_secagg.py --nodes 20 --run-config "task='chars'"
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from benchkit import RESULTS, Report, human_bytes, parse_overrides, table

from core.config import validate
from fedtasks.task import load_test
from runtime.models import initial_state, model_and_spec
from server_app import head_fit
from server_app.evaluation import ServerEvaluator
from server_app.exchange import Exchange
from tests.localgrid import LocalGrid

WAYS = {
    "plain": {},
    "plain, no cap or screen": {"head-weight-cap": 0.0, "head-influence": 0.0, "head-screen": 1.0},
    "head-secagg": {"head-secagg": True},
}
REFERENCE = "plain, no cap or screen"


def fit_once(cfg: dict, nodes: int, out_dir: str) -> dict:
    grid = LocalGrid(nodes, cfg)
    exchange = Exchange(grid, cfg, out_dir)
    in_nodes = [0.0]

    def send(messages, label):  # the in-process grid runs the nodes inside the exchange
        t = time.perf_counter()
        replies = exchange(messages, label)
        in_nodes[0] += time.perf_counter() - t
        return replies

    t = time.perf_counter()
    fitted, summary = head_fit.fit_heads(grid, send, initial_state(cfg), cfg, 0)
    total = time.perf_counter() - t
    return {"heads": fitted, "summary": summary, "seconds": total, "nodes-seconds": in_nodes[0]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--run-config", nargs="*", default=["task='digits'"], metavar="KEY=VALUE")
    ap.add_argument("--out", default=str(RESULTS / "heads_secagg_digits.json"))
    args = ap.parse_args(argv)
    base = {**parse_overrides(args.run_config), "output-dir": str(RESULTS / "tmp")}
    cfg0 = validate(base)
    torch.set_num_threads(cfg0["client-threads"])
    model, spec = model_and_spec(cfg0)
    evaluate = ServerEvaluator(model, load_test(cfg0, spec), cfg0["eval-batch-size"])
    report = Report("heads_secagg", args)
    fit_once(validate({**base, **WAYS["plain"]}), args.nodes, base["output-dir"])  # warm-up: caches, data
    runs: dict[str, list[dict]] = {w: [] for w in WAYS}
    order = list(WAYS)
    for r in range(args.repeats):
        for way in order if r % 2 == 0 else order[::-1]:
            runs[way].append(fit_once(validate({**base, **WAYS[way]}), args.nodes, base["output-dir"]))
    reference = runs[REFERENCE][0]["heads"]
    names = [k for k in reference if k.startswith("heads.") and ".fc." in k]
    rows = []
    for way, done in runs.items():
        s = done[0]["summary"]
        heads = done[0]["heads"]
        acc = evaluate(heads)["accuracy"]
        secure = s.get("secure-aggregation", {})
        row = {
            "way": way,
            "bytes-up-per-node": round(s["bytes-up"] / args.nodes),
            "bytes-down-per-node": round(s["bytes-down"] / args.nodes),
            "up": human_bytes(s["bytes-up"] / args.nodes),
            "seconds": round(float(np.median([d["seconds"] for d in done])), 2),
            "nodes-seconds": round(float(np.median([d["nodes-seconds"] for d in done])), 2),
            "server-seconds": round(float(np.median([d["seconds"] - d["nodes-seconds"] for d in done])), 2),
            "max-head-difference": round(max(float(np.abs(heads[k] - reference[k]).max()) for k in names), 4),
            "largest-head-weight": round(max(float(np.abs(reference[k]).max()) for k in names), 2),
            "mean-over-exits": round(float(np.mean(acc)), 4),
            "accuracy": [round(float(a), 4) for a in acc],
            "capped": len(s["capped"]),
            "screened": len(s["screened"]),
        }
        if secure:
            per_stage = secure["bytes-up-per-stage"].items()
            row["bytes-up-per-stage-per-node"] = {k: round(v / args.nodes) for k, v in per_stage}
            row["threshold"], row["scale-bits"] = secure["threshold"], secure["scale-bits"]
        rows.append(row)
    report["rows"] = rows
    report.write(args.out)
    columns = ["way", "up", "seconds", "nodes-seconds", "server-seconds", "max-head-difference", "mean-over-exits"]
    print(table(rows, columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
