"""Exit heads fitted in closed form (`heads = "ridge"` or "ridge-init"): before round 1
and after every `head-refit-every` rounds.

Every node sends the sums a ridge regression of its exits' linear
layers needs (adapters/head_fit.py); the server adds them up per exit and
solves. Sums add exactly, so the heads are those a central fit on every
node's training split would give, however skewed each node's labels are.
The run's strategy does not see this exchange: the statistics are summed
as they are (no clipping, noise or robust rule), which run() refuses for
the differential-privacy strategies.
"""

from __future__ import annotations

import json
import time
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log

from adapters.head_fit import CROSS, GRAM, exit_label_counts, federation_exit, solve_heads, stat_name
from core.naming import up_to_depth
from core.records import arrays_of, metrics_or_empty, to_numpy, to_record
from core.run_files import HEAD_FIT as FILE


def due(cfg: dict, server_round: int) -> bool:
    """Whether the heads are fitted before round 1 (server_round 0) or after `server_round`."""
    if cfg["heads"] == "trained":
        return False
    every = cfg["head-refit-every"]
    last = server_round == cfg["num-server-rounds"]
    return server_round == 0 or (every > 0 and (server_round % every == 0 or last))


def fit_heads(
    grid,
    send,
    arrays: dict[str, np.ndarray],
    cfg: dict,
    server_round: int,
    node_depth: dict[int, int] | None = None,
) -> tuple[dict[str, np.ndarray], dict | None]:
    """`arrays` with the heads of every exit some node runs replaced by the ridge fit on
    the features of the adapters in `arrays`; and a summary of the exchange (None if no node answered).

    A node whose depth the rounds taught (`node_depth`) receives the arrays of its blocks only.
    """
    t0 = time.time()
    node_depth = node_depth or {}
    config = ConfigRecord({"server-round": server_round})
    records: dict[int | None, ArrayRecord] = {}  # converted once per depth, not once per node
    messages = []
    for node in grid.get_node_ids():
        depth = node_depth.get(node)
        if depth not in records:
            records[depth] = to_record(up_to_depth(arrays, depth))
        content = RecordDict({"arrays": records[depth], "config": config})
        messages.append(Message(content=content, message_type=MessageType.QUERY, dst_node_id=node))
    label = "head fit" if server_round == 0 else f"round {server_round} head refit"
    replies = send(messages, label)
    sums: dict[str, np.ndarray] = {}
    counts: dict[int, int] = {}
    clients, failed, up, down = 0, 0, 0, 0
    for reply in replies:
        try:
            stats, depth, n, metrics = _check(reply, sums)
        except ValueError as err:
            failed += 1
            log(WARNING, "%s: reply of node %s left out: %s", label, reply.metadata.src_node_id, err)
            continue
        for k, v in stats.items():
            sums[k] = sums[k] + v if k in sums else v.astype(np.float64)
        for i in range(depth):
            counts[i] = counts.get(i, 0) + n
        clients += 1
        up += int(metrics.get("bytes-up", 0))
        down += int(metrics.get("bytes-down", 0))
    if not clients:
        log(WARNING, "%s: no node sent statistics; the exit heads stay as they are", label)
        return arrays, None
    fitted = {**arrays, **solve_heads(sums, counts, cfg["ridge-lambda"], cfg["ridge-scale"])}
    summary = {
        "after-round": server_round,
        # the federation's training labels per class: personalisation moves heads from this prior to a node's
        "label-counts": [int(round(c)) for c in exit_label_counts(sums, federation_exit(counts))],
        "clients": clients,
        "failed": failed,
        "examples-per-exit": [counts[i] for i in sorted(counts)],
        "bytes-up": up,
        "bytes-down": down,
        "seconds": round(time.time() - t0, 3),
    }
    log(
        INFO,
        "%s: exits 1-%d fitted by ridge regression on %d nodes' features (%s examples per exit), up %.2f MB, %.1fs",
        label,
        max(counts) + 1,
        clients,
        "/".join(str(c) for c in summary["examples-per-exit"]),
        up / 1e6,
        summary["seconds"],
    )
    return fitted, summary


def fits(run_dir: Path) -> list[dict]:
    """The fits head_fit.json records, oldest first ([] when the run made none)."""
    path = Path(run_dir) / FILE
    return json.loads(path.read_text())["fits"] if path.is_file() else []


def label_counts(run_dir: Path) -> list[int] | None:
    """The federation's label counts of the run's last fit, if any."""
    done = fits(run_dir)
    return done[-1].get("label-counts") if done else None


def record(run_dir: Path, summary: dict, cfg: dict) -> None:
    """Append one fit to head_fit.json (fits after a resumed run's last checkpoint are dropped first)."""
    kept = [f for f in fits(run_dir) if f["after-round"] < summary["after-round"]] + [summary]
    doc = {"ridge-lambda": cfg["ridge-lambda"], "ridge-scale": cfg["ridge-scale"], "fits": kept}
    (Path(run_dir) / FILE).write_text(json.dumps(doc, indent=2))


def _check(reply: Message, sums: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int, int, dict]:
    """A reply's statistics, depth and example count; ValueError says what is wrong with it."""
    if reply.has_error():
        raise ValueError(reply.error.reason[:200])
    metrics = metrics_or_empty(reply.content)
    depth, n = metrics.get("depth"), metrics.get("num-examples")
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"'depth' must be an integer >= 1, got {depth!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"'num-examples' must be an integer >= 1, got {n!r}")
    stats = to_numpy(arrays_of(reply.content))
    expected = {stat_name(i, kind) for i in range(depth) for kind in (GRAM, CROSS)}
    if set(stats) != expected:
        raise ValueError(f"expected the statistics of exits 1-{depth}, got {sorted(stats)[:4]}...")
    for k, v in stats.items():
        if k in sums and v.shape != sums[k].shape:
            raise ValueError(f"{k} has shape {v.shape}, other nodes sent {sums[k].shape}")
        if not np.all(np.isfinite(v)):
            raise ValueError(f"{k} is not finite")
    return stats, depth, n, metrics
