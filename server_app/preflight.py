"""Checks the server makes before round 1, so a run that cannot work stops
with one line instead of failing on every client (or waiting forever)."""

from __future__ import annotations

import time
from logging import INFO
from typing import Any

from flwr.common.logger import log
from flwr.serverapp import Grid

from core.config import ConfigError, check_attackers
from fedtasks.base import DataError
from fedtasks.stats import document

POLL_SECONDS = 1.0


def wait_for_nodes(grid: Grid, cfg: dict[str, Any], clock=time.monotonic, sleep=time.sleep) -> int:
    """Wait up to `min-nodes-timeout` seconds for `min-nodes` nodes; the number connected."""
    want, limit = cfg["min-nodes"], cfg["min-nodes-timeout"]
    deadline = clock() + limit
    said = False
    while True:
        have = len(list(grid.get_node_ids()))
        if have >= want:
            return have
        if clock() >= deadline:
            raise ConfigError(
                "min-nodes",
                f"only {have} of the {want} nodes it asks for connected within "
                f"min-nodes-timeout={limit}s (a simulation has num-supernodes nodes); "
                "lower min-nodes or start more SuperNodes",
            )
        if not said:
            log(INFO, "Waiting up to %ds for %d nodes (min-nodes); %d connected", limit, want, have)
            said = True
        sleep(POLL_SECONDS)


def await_round_nodes(grid: Grid, want: int, label: str, clock=time.monotonic, sleep=time.sleep, every=30.0) -> int:
    """Wait (without limit) until `want` nodes are connected before a round samples them.

    Flower's `sample_nodes` waits the same way but logs every second
    ("Waiting for nodes to connect: 2 connected ..."); this logs when the
    count changes and every `every` seconds, then the strategy samples at once.
    """
    said_count, said_at = None, 0.0
    while (have := len(list(grid.get_node_ids()))) < want:
        now = clock()
        if have != said_count or now - said_at >= every:
            log(INFO, "%s: waiting for nodes to connect: %d connected (min-nodes %d)", label, have, want)
            said_count, said_at = have, now
        sleep(POLL_SECONDS)
    return have


def partition_document(cfg: dict[str, Any], num_nodes: int) -> dict:
    """partition-stats of the federation, refusing one where a client would get no training example
    (or an attacking partition id it does not have)."""
    check_attackers(cfg, num_nodes)
    try:
        doc = document(cfg, num_nodes)
    except ValueError as err:  # the partitioner's own complaint, e.g. more partitions than it can fill
        if isinstance(err, (ConfigError, DataError)):
            raise
        raise DataError(f"cannot split task {cfg['task']!r} over {num_nodes} nodes: {err}") from None
    empty = [r["partition-id"] for r in doc["partitions"] if r["examples"] < 1]
    if empty:
        shown = ", ".join(map(str, empty[:10])) + (" ..." if len(empty) > 10 else "")
        raise DataError(
            f"{len(empty)} of {num_nodes} partitions of task {cfg['task']!r} hold no example "
            f"(partition-id {shown}): use fewer nodes or a larger dirichlet-alpha"
        )
    return doc
