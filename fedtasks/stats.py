"""Partition statistics (examples and classes per client) as a table, JSON and CSV.

Written before training, so a user sees the heterogeneity a run has: by
`anytime-fl partitions` and by the ServerApp into its run folder.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from .base import DATA_KEYS
from .task import get_task, partition_stats

_COUNTS = ("partition-id", "examples", "classes", "label-counts")  # the other keys: a natural id


def document(cfg: dict[str, Any], num_partitions: int) -> dict:
    """Per-partition rows plus a summary, with the settings that made them."""
    rows = partition_stats(cfg, num_partitions)
    task = get_task(cfg)
    examples = np.array([r["examples"] for r in rows])
    classes = np.array([r["classes"] for r in rows])
    return {
        "task": cfg["task"],
        "num-partitions": num_partitions,
        "num-classes": task.num_classes,
        "settings": {k: cfg[k] for k in DATA_KEYS if k in cfg},
        "summary": {
            "examples": int(examples.sum()),
            "examples-per-partition": _spread(examples),
            "classes-per-partition": _spread(classes),
        },
        "partitions": rows,
    }


def _spread(values: np.ndarray) -> dict:
    return {"min": int(values.min()), "median": float(np.median(values)), "max": int(values.max())}


def table(doc: dict) -> str:
    rows = doc["partitions"]
    id_col = next((k for k in (rows[0] if rows else {}) if k not in _COUNTS), None)
    head = ["partition", "examples", "classes"] + ([id_col] if id_col else []) + ["most common labels (label:count)"]
    lines = []
    for r in rows:
        counts = np.asarray(r["label-counts"])
        top = np.argsort(-counts, kind="stable")[:3]
        common = " ".join(f"{int(i)}:{int(counts[i])}" for i in top if counts[i])
        lines.append(
            [str(r["partition-id"]), str(r["examples"]), f"{r['classes']}/{doc['num-classes']}"]
            + ([str(r[id_col])] if id_col else [])
            + [common]
        )
    widths = [max([len(h)] + [len(line[i]) for line in lines]) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths[:-1]) + "  {}"
    s = doc["summary"]
    out = [f"{doc['task']}: {doc['num-partitions']} partitions, {s['examples']} training examples", fmt.format(*head)]
    out += [fmt.format(*line) for line in lines]
    e, c = s["examples-per-partition"], s["classes-per-partition"]
    out.append(
        f"examples per partition min/median/max {e['min']}/{e['median']:g}/{e['max']}; "
        f"classes per partition {c['min']}/{c['median']:g}/{c['max']} of {doc['num-classes']}"
    )
    return "\n".join(out)


def write_json(doc: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))
    return path


def write_csv(doc: dict, path: Path) -> Path:
    """One row per partition: id, examples, classes, natural id if any, a column per label."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = doc["partitions"]
    extra = [k for k in (rows[0] if rows else {}) if k not in _COUNTS]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["partition-id", "examples", "classes", *extra, *(f"label-{i}" for i in range(doc["num-classes"]))])
        for r in rows:
            w.writerow([r["partition-id"], r["examples"], r["classes"], *(r[k] for k in extra), *r["label-counts"]])
    return path
