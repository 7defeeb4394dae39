"""The personalisation round: every node fine-tunes the final global adapters
locally and reports accuracy per exit before and after; the server keeps
only the metrics (mean, spread over clients) in personalization.json.

The global weights are not changed and no weights come back.
"""

from __future__ import annotations

import json
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType
from flwr.common.logger import log
from flwr.serverapp import Grid

from core.messages import by_depth, reply_node
from core.records import metrics_or_empty
from core.run_files import PERSONALIZATION as FILE

from . import head_fit

# Flower routes "<category>.<action>" to the ClientApp function registered as @app.evaluate("personalize").
PERSONALIZE = f"{MessageType.EVALUATE}.personalize"


def request(
    grid: Grid,
    send,
    arrays: dict[str, np.ndarray],
    server_round: int,
    node_depth: dict[int, int] | None = None,
    label_counts: list[int] | None = None,
) -> list[tuple[int, Message]]:
    """Send the final global adapters to all nodes as `evaluate.personalize` messages (Flower's
    action routing: client_app.app.personalize_exits answers them) through `send`
    (server_app.exchange.Exchange: its retries, patience and progress lines); (node, reply) pairs.

    A node whose depth the rounds taught gets the arrays of its blocks only; another gets all.
    """
    config = {"server-round": server_round}
    if label_counts:
        config["label-counts"] = [int(c) for c in label_counts]
    messages = by_depth(arrays, grid.get_node_ids(), node_depth, ConfigRecord(config), PERSONALIZE)
    replies = send(messages, "personalisation")
    return [(reply_node(r, messages), r) for r in replies]


def summarize(replies: list[tuple[int, Message]], cfg: dict) -> dict:
    """Per exit, over the clients that run it: accuracy before/after and the gain's mean, std, min, max."""
    per_exit: dict[int, list[tuple[float, float]]] = {}
    clients, failed, loss_before, loss_after = [], 0, [], []
    for node, msg in replies:
        if msg.has_error():
            failed += 1
            log(WARNING, "personalisation: node %d failed: %s", node, msg.error.reason)
            continue
        m = metrics_or_empty(msg.content)
        depth = int(m.get("depth", 0))
        client = {
            "partition-id": int(m.get("partition-id", -1)),
            "depth": depth,
            "num-examples": int(m.get("num-examples", 0)),
        }
        if "train-loss-before" in m:
            loss_before.append(float(m["train-loss-before"]))
            loss_after.append(float(m["train-loss-after"]))
        gains = []
        for i in range(1, depth + 1):
            if f"accuracy-before-{i}" in m:
                before, after = float(m[f"accuracy-before-{i}"]), float(m[f"accuracy-after-{i}"])
                per_exit.setdefault(i, []).append((before, after))
                gains.append(round(after - before, 4))
        client["gain"] = gains
        clients.append(client)
    exits = []
    for i in sorted(per_exit):
        ba = np.asarray(per_exit[i])
        gain = ba[:, 1] - ba[:, 0]
        exits.append(
            {
                "exit": i,
                "clients": len(ba),
                "accuracy-before": round(float(ba[:, 0].mean()), 4),
                "accuracy-after": round(float(ba[:, 1].mean()), 4),
                # population std over clients: the spread of this federation, not an estimate
                "gain-mean": round(float(gain.mean()), 4),
                "gain-std": round(float(gain.std()), 4),
                "gain-min": round(float(gain.min()), 4),
                "gain-max": round(float(gain.max()), 4),
            }
        )
    return {
        "epochs": cfg["personalize-epochs"],
        "lr": cfg["personalize-lr"],
        "clients": len(clients),
        "failed": failed,
        "train-loss-before": round(float(np.mean(loss_before)), 4) if loss_before else None,
        "train-loss-after": round(float(np.mean(loss_after)), 4) if loss_after else None,
        "exits": exits,
        "per-client": clients,
    }


def personalization_round(
    grid: Grid,
    send,
    arrays: dict[str, np.ndarray],
    cfg: dict,
    run_dir: Path,
    server_round: int,
    node_depth: dict[int, int] | None = None,
) -> dict:
    counts = head_fit.label_counts(run_dir) if cfg["heads"] != "trained" else None
    summary = summarize(request(grid, send, arrays, server_round, node_depth, counts), cfg)
    (Path(run_dir) / FILE).write_text(json.dumps(summary, indent=2))
    gains = " ".join(f"{e['gain-mean']:+.3f}" for e in summary["exits"])
    log(
        INFO,
        "personalisation (%d clients, personalize-epochs=%d, personalize-lr=%g): mean accuracy gain per exit: %s%s",
        summary["clients"],
        cfg["personalize-epochs"],
        cfg["personalize-lr"],
        gains or "n/a",
        f" | {summary['failed']} failed" if summary["failed"] else "",
    )
    return summary
