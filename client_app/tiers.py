"""A client's depth budget: how many blocks its device runs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from core.config import ConfigError, check_depth, parse_tiers, tier_fractions


def partition_of(node_config: dict[str, Any]) -> tuple[int, int]:
    try:
        pid, n = int(node_config["partition-id"]), int(node_config["num-partitions"])
    except KeyError as err:
        raise ConfigError(
            f"node-config {err.args[0]}",
            'missing: start the SuperNode with --node-config "partition-id=<i> num-partitions=<n>"',
        ) from err
    if not 0 <= pid < n:
        raise ConfigError("node-config partition-id", f"must be in 0..{n - 1}, got {pid}")
    return pid, n


def tier_of(partition_id: int, num_partitions: int, cfg: dict[str, Any]) -> int:
    """Index of the tier a partition belongs to under `tier-assignment`."""
    tiers = parse_tiers(cfg)
    fractions = tier_fractions(cfg)  # one per tier: core.config checked it
    if fractions is None:
        return partition_id % len(tiers)
    # Contiguous blocks of partition ids per tier, sized by the fractions.
    edge = 0.0
    for i, f in enumerate(fractions):
        edge += f * num_partitions
        if partition_id < round(edge):
            return i
    return len(tiers) - 1


def client_depth(node_config: dict[str, Any], cfg: dict[str, Any], num_blocks: int) -> int:
    """The node's own `max-depth` wins; otherwise its tier's depth."""
    if "max-depth" in node_config:
        try:
            depth = int(node_config["max-depth"])
        except (TypeError, ValueError):
            raise ConfigError("node-config max-depth", f"must be an integer, got {node_config['max-depth']!r}")
        check_depth("node-config max-depth", depth, num_blocks)
        return depth
    pid, n = partition_of(node_config)
    depth = parse_tiers(cfg)[tier_of(pid, n, cfg)]
    check_depth("tiers", depth, num_blocks)
    return depth


def node_run_config(cfg: dict[str, Any], node_config: dict[str, Any]) -> dict[str, Any]:
    """The run config as this node sees it: its own `data-dir` replaces the run's.

    The run config comes from the user's machine and is the same for every
    node, but where a machine keeps its data is for that machine's operator
    to say (`--node-config "data-dir='/srv/data'"`).
    """
    if "data-dir" not in node_config:
        return cfg
    value = node_config["data-dir"]
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(
            "node-config data-dir", f"must be a folder path in quotes, e.g. data-dir='/srv/data'; got {value!r}"
        )
    folder = Path(value).expanduser()
    if not folder.is_dir():
        raise ConfigError("node-config data-dir", f"no folder at {folder} on this node")
    return {**cfg, "data-dir": str(folder)}


CACHE_OFF = "off"


def node_cache_dir(node_config: dict[str, Any]) -> Path | None:
    """Where this node keeps its partition and built backbone between messages.

    `--node-config "cache-dir='/var/cache/anytime-fl'"`; 'off' turns the
    cache off; by default `$XDG_CACHE_HOME/anytime-fl` (~/.cache/anytime-fl).
    """
    value = node_config.get("cache-dir")
    if value is None:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        return Path(base).expanduser() / "anytime-fl"
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(
            "node-config cache-dir",
            f"must be a folder path in quotes or 'off', e.g. cache-dir='/var/cache/anytime-fl'; got {value!r}",
        )
    return None if value == CACHE_OFF else Path(value).expanduser()
