"""The run directory: config, per-round results (JSON lines + CSV), weights."""

from __future__ import annotations

import csv
import json
import os
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common.logger import log
from safetensors.numpy import save_file

from core.records import metrics_or_empty
from core.run_files import PARTITION_STATS, RESULTS, WEIGHTS
from core.run_files import RESULTS_CSV as CSV
from fedtasks import stats
from strategies.depth_fedavg import RoundStats


def flatten(row: dict, prefix: str = "") -> dict:
    """{'server': {'accuracy': [..]}} -> {'server-accuracy-1': ..} for the CSV."""
    out = {}
    for k, v in row.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "-"))
        elif isinstance(v, list):
            for i, x in enumerate(v, start=1):
                out[f"{key}-{i}"] = x
        else:
            out[key] = v
    return out


def read_rows(run_dir: Path) -> list[dict]:
    """The rows of results.jsonl; a damaged line (e.g. cut by a crash mid-write) is reported and skipped."""
    path = Path(run_dir) / RESULTS
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("round"), int):
            log(
                WARNING,
                "%s line %d is damaged (cut off by a crash?) and is left out; the %d rows before it are kept",
                path,
                number,
                len(rows),
            )
            continue
        rows.append(row)
    return rows


def append_row(run_dir: Path, row: dict) -> None:
    with open(Path(run_dir) / RESULTS, "a") as fh:
        fh.write(json.dumps(row) + "\n")
    write_csv(run_dir)


class RowsLost(ValueError):
    """Rows of results.jsonl that a resume cannot rebuild; the message names the file and rounds."""


def rows_to_resume(run_dir: Path, server_round: int, last_row: dict | None) -> list[dict]:
    """The rows a run resumed after `server_round` keeps: rounds 1..server_round, the last one
    taken from the checkpoint (`last_row`) when results.jsonl lost it (a line cut by a crash).
    RowsLost when an earlier round's row is gone: nothing holds it any more."""
    rows = [r for r in read_rows(run_dir) if r["round"] <= server_round]
    if (
        server_round not in {r["round"] for r in rows}
        and isinstance(last_row, dict)
        and last_row.get("round") == server_round
    ):
        log(WARNING, "%s: the row of round %d is rebuilt from the checkpoint", Path(run_dir) / RESULTS, server_round)
        rows.append(last_row)
    missing = sorted(set(range(1, server_round + 1)) - {r["round"] for r in rows})
    if missing:
        raise RowsLost(
            f"{Path(run_dir) / RESULTS} lacks the rows of rounds {', '.join(map(str, missing))} (damaged or removed "
            f"lines), which the checkpoint after round {server_round} cannot rebuild: restore the file, "
            "or start a new run-name"
        )
    return sorted(rows, key=lambda r: r["round"])


def truncate_after(run_dir: Path, server_round: int, last_row: dict | None = None) -> None:
    """Keep the rows up to a checkpoint's round (see rows_to_resume); later ones are re-run on resume."""
    rows = rows_to_resume(run_dir, server_round, last_row)
    path = Path(run_dir) / RESULTS
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)  # a crash here leaves the old file whole
    write_csv(run_dir)


def write_csv(run_dir: Path) -> None:
    flat = [flatten(r) for r in read_rows(run_dir)]
    if not flat:
        return
    fields = list(dict.fromkeys(k for r in flat for k in r))
    with open(Path(run_dir) / CSV, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(flat)


def save_weights(run_dir: Path, arrays: dict[str, np.ndarray], metadata: dict) -> Path:
    path = Path(run_dir) / WEIGHTS
    save_file(
        {k: np.ascontiguousarray(v) for k, v in arrays.items()},
        str(path),
        metadata={k: json.dumps(v) for k, v in metadata.items()},
    )
    # safetensors creates its file owner-only (0600); give it the mode of the run's other outputs.
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)
    return path


def write_partition_stats(
    cfg: dict[str, Any], run_dir: Path, num_partitions: int, doc: dict | None = None
) -> Path | None:
    """The ServerApp's hook: partition-stats.json in the run folder, one log line.

    `num_partitions` is the number of connected nodes (in simulation, every
    node); with none connected yet there is nothing to describe.
    """
    if num_partitions < 1:
        log(INFO, "No nodes connected yet: partition statistics not written")
        return None
    doc = doc or stats.document(cfg, num_partitions)
    path = stats.write_json(doc, Path(run_dir) / PARTITION_STATS)
    e, c = doc["summary"]["examples-per-partition"], doc["summary"]["classes-per-partition"]
    log(
        INFO,
        "%s over %d partitions: examples min/median/max %d/%g/%d, classes %d/%g/%d of %d (%s)",
        cfg["task"],
        num_partitions,
        e["min"],
        e["median"],
        e["max"],
        c["min"],
        c["median"],
        c["max"],
        doc["num-classes"],
        path,
    )
    return path


def model_sizes(model, arrays: dict[str, np.ndarray]) -> dict:
    """Trainable and backbone sizes, and what one client sends dense or would send fine-tuning everything."""
    adapter = int(sum(a.size for a in arrays.values()))
    backbone = int(sum(p.numel() for p in model.backbone.parameters()))
    return {
        "adapter-params": adapter,
        "adapter-fraction": adapter / (adapter + backbone),
        "dense-adapter-bytes": 4 * adapter,
        # What one client would send per round if it fine-tuned every weight.
        "full-finetune-bytes": 4 * (adapter + backbone),
    }


def round_row(
    server_round: int,
    *,
    seconds: float,
    server_eval: dict,
    stats: RoundStats,
    train_metrics,
    eval_metrics,
    replies,
    sizes: dict,
    head_fit_bytes_up: int = 0,
    served_round: int | None = None,
) -> dict:
    """One round's line of results.jsonl: the server's test accuracy, what the strategy
    accepted (`stats`), each replying client's own figures, and the bytes moved. `served-round`:
    the round whose adapters the server evaluated (`serve-last-fit`: the last head fit's)."""
    per_client = []
    for msg in replies:
        if msg.has_error():
            continue
        m = metrics_or_empty(msg.content)
        per_client.append({k: m[k] for k in PER_CLIENT if k in m})
    return {
        "round": server_round,
        "seconds": round(seconds, 3),
        "server": server_eval,
        "clients": stats.clients,
        "dropped": stats.dropped,
        "clients-per-depth": stats.clients_per_depth(),
        "clients-per-tier": stats.clients_per_tier,
        "bytes-up": stats.bytes_up,
        "bytes-down": sum(c.get("bytes-down", 0) for c in per_client),
        "dense-adapter-bytes": sizes["dense-adapter-bytes"],
        "full-finetune-bytes": sizes["full-finetune-bytes"],
        "per-client": per_client,
        "train": dict(train_metrics) if train_metrics is not None else {},
        "federated-eval": dict(eval_metrics) if eval_metrics is not None else {},
        "head-fit-bytes-up": head_fit_bytes_up,
        "served-round": server_round if served_round is None else served_round,
    }


PER_CLIENT = ("partition-id", "depth", "num-examples", "bytes-up", "bytes-down", "dense-bytes")


def format_round(row: dict, num_rounds: int) -> str:
    """The round's one log line."""
    accs = " ".join(f"{a:.2f}" for a in row["server"]["accuracy"])
    tiers = " ".join(f"d{d}:{n}" for d, n in row["clients-per-depth"].items())
    heads = f" + head statistics up {row['head-fit-bytes-up'] / 1e6:.2f} MB" if row.get("head-fit-bytes-up") else ""
    served = row.get("served-round", row["round"])
    model = f" (round {served}'s adapters, the last head fit)" if served != row["round"] else ""
    # the served model stands still between head fits; the nodes' training loss shows the rounds' progress
    losses = [v for k, v in row.get("train", {}).items() if k.startswith("train-loss-")]
    loss = f" | train loss {sum(losses) / len(losses):.3f}" if losses else ""
    return (
        f"round {row['round']}/{num_rounds} | test acc per exit{model}: {accs}{loss} "
        f"| clients {row['clients']} ({tiers})"
        f"{' dropped ' + str(row['dropped']) if row['dropped'] else ''} | up {row['bytes-up'] / 1e6:.2f} MB "
        f"down {row['bytes-down'] / 1e6:.2f} MB{heads} | {row['seconds']:.1f}s"
    )
