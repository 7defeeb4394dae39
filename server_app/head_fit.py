"""Exit heads fitted in closed form (`heads = "ridge"` or "ridge-init"): before round 1
and after every `head-refit-every` rounds.

Every node sends the sums a ridge regression of its exits' linear
layers needs (adapters/head_fit.py); the server adds them up per exit and
solves. Sums add exactly, so the heads are those a central fit on every
node's training split would give, however skewed each node's labels are.
The run's strategy does not see this exchange. Each reply is checked
against what real features allow and its weight capped, and a node whose
labels disagree with every other node's is left out of the exit's fit
(server_app/head_guard.py); what is left out is logged and recorded with
its reason. The sums carry no noise, which run() refuses for the
differential-privacy strategies. With `head-secagg` the statistics come
masked instead (server_app/head_secagg.py): the server reads only their
sums, and only the sums are checked.
"""

from __future__ import annotations

import json
import time
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType
from flwr.common.logger import log

from adapters import head_codec
from adapters.head_fit import (
    CROSS,
    GRAM,
    dp_shift,
    exit_label_counts,
    feature_bound,
    federation_exit,
    noise_std,
    pack_gram,
    projections,
    solve_heads,
    stat_name,
)
from core.config import clients_train_heads, ensemble_votes, head_fit_rounds
from core.messages import by_depth, reply_node
from core.naming import sent_up_to
from core.records import arrays_of, metrics_or_empty, to_numpy
from core.run_files import HEAD_FIT as FILE

from . import head_guard, head_secagg
from .nothing_accepted import nothing_accepted


def due(cfg: dict, server_round: int) -> bool:
    """Whether the heads are fitted before round 1 (server_round 0) or after `server_round`."""
    return server_round in head_fit_rounds(cfg)


def plan(arrays: dict[str, np.ndarray], cfg: dict) -> tuple[int, int]:
    """(k, width): the nodes send the statistics of k of the `width` features of each exit's fc
    input (k = width, `head-features` 0: no projection)."""
    width = arrays["heads.0.fc.weight"].shape[1]
    return (min(cfg["head-features"], width) if cfg["head-features"] > 0 else width), width


def fitting_features(arrays: dict[str, np.ndarray], cfg: dict) -> int:
    """The widest k whose statistics per exit, at `head-bits`, fit in what a node sends per block in
    one dense float32 adapter update: the `head-features` that makes a head fit cost no more. The
    update is what the node sends: with `heads = "ridge"` its adapters, not the heads the server fits."""
    classes, width = arrays["heads.0.fc.weight"].shape
    exits = _num_exits(arrays)
    sent = sent_up_to(arrays, exits, clients_train_heads(cfg))
    per_block = 4 * sum(arrays[k].size for k in sent) // exits
    return head_codec.stat_dim(per_block, classes, width, cfg["head-bits"])


def fit_heads(
    grid,
    send,
    arrays: dict[str, np.ndarray],
    cfg: dict,
    server_round: int,
    node_depth: dict[int, int] | None = None,
) -> tuple[dict[str, np.ndarray], dict | None]:
    """`arrays` with the heads of every exit some node runs replaced by the ridge fit on
    the features of the adapters in `arrays`; and a summary of the exchange. NothingAccepted
    when no node's statistics could be used; with `head-secagg`, SecAggFailed when too few
    nodes stay to unmask the sums.

    A node whose depth the rounds taught (`node_depth`) receives the arrays of its blocks only.
    """
    t0 = time.time()
    k, width = plan(arrays, cfg)
    proj = projections(arrays, _num_exits(arrays), k, cfg["seed"])
    config = {"server-round": server_round, "stat-dim": k, "stat-seed": cfg["seed"], "stat-bits": cfg["head-bits"]}
    label = "head fit" if server_round == 0 else f"round {server_round} head refit"
    bounds = [feature_bound(arrays, i) for i in range(_num_exits(arrays))]
    noise = lambda depth: noise_std(cfg, bounds[:depth])  # noqa: E731  the std a node of that depth adds
    if cfg["head-secagg"]:
        sums, counts, shifts, part = head_secagg.secure_sums(
            grid, send, arrays, node_depth, config, label, cfg, k + 1, bounds, noise
        )
        secure = part["secure-aggregation"]
        if not counts:
            reasons = [r["reason"] for r in secure["exits-refused"]] or ["no exit is sent by two or more nodes"]
            raise nothing_accepted(label, secure["survivors"], reasons, cfg["round-timeout"])
        part.update({"clients": secure["survivors"], "failed": len(part["left-out"]), "capped": [], "screened": []})
    else:
        sums, counts, shifts, part = _plain_sums(
            grid, send, arrays, node_depth, config, label, cfg, k + 1, bounds, noise
        )
    heads = solve_heads(sums, counts, cfg["ridge-lambda"], cfg["ridge-scale"], proj, shifts, ensemble_votes(cfg))
    fitted = {**arrays, **heads}
    summary = {
        "after-round": server_round,
        # the federation's training labels per class: personalisation moves heads from this prior to a node's
        "label-counts": [max(0, int(round(c))) for c in exit_label_counts(sums, federation_exit(counts))],
        "clients": part["clients"],
        "failed": part["failed"],
        "left-out": part["left-out"],
        "capped": part["capped"],
        "screened": part["screened"],
        "examples-per-exit": [int(round(counts.get(i, 0))) for i in range(max(counts) + 1)],
        "features": {"sent": k, "width": width},
        "bytes-up": part["bytes-up"],
        "bytes-down": part["bytes-down"],
        "seconds": round(time.time() - t0, 3),
    }
    if "secure-aggregation" in part:
        summary["secure-aggregation"] = part["secure-aggregation"]
    if cfg["head-dp-epsilon"] > 0:
        summary["privacy"] = privacy_summary(cfg, bounds)
    log(
        INFO,
        "%s: exits 1-%d fitted by ridge regression on %d nodes' features (%s examples per exit), up %.2f MB, %.1fs%s%s",
        label,
        max(counts) + 1,
        summary["clients"],
        "/".join(str(c) for c in summary["examples-per-exit"]),
        summary["bytes-up"] / 1e6,
        summary["seconds"],
        _secure_note(summary.get("secure-aggregation")),
        (
            f"; differentially private statistics, the run's fits together ({cfg['head-dp-epsilon']:g}, "
            f"{cfg['head-dp-delta']:g})-DP"
            if "privacy" in summary
            else ""
        ),
    )
    return fitted, summary


def _secure_note(secure: dict | None) -> str:
    """The log line's account of a secure aggregation: what the server read, who dropped."""
    if secure is None:
        return ""
    dropped = len(secure["dropped"])
    return (
        f"; secure aggregation: the server read only the sums of {secure['survivors']} of {secure['nodes']} nodes"
        + (f" ({dropped} dropped after sharing keys, their masks removed)" if dropped else "")
        + f", {secure['message-rounds']} message rounds"
    )


def _plain_sums(grid, send, arrays, node_depth, config, label, cfg, dim, bounds, noise):
    """Every node's statistics in the clear, each checked, capped and screened, then summed."""
    classes = arrays["heads.0.fc.weight"].shape[0]
    messages = by_depth(arrays, grid.get_node_ids(), node_depth, ConfigRecord(config), MessageType.QUERY)
    replies = send(messages, label)
    accepted: list[dict] = []
    left_out: list[dict] = []
    shapes: dict[str, tuple] = {}
    up, down = 0, 0
    reasons: list[str] = []
    for reply in replies:
        node = reply_node(reply, messages)
        try:
            stats, depth, n, metrics = _check(reply, shapes, dim, bounds, noise, config["stat-bits"], classes)
        except ValueError as err:
            pid = metrics_or_empty(reply.content).get("partition-id") if not reply.has_error() else None
            reasons.append(str(err))
            left_out.append({"node": int(node), "partition-id": pid, "reason": str(err)[:300]})
            log(WARNING, "%s: reply of node %s left out: %s", label, node, err)
            continue
        accepted.append(
            {
                "node": int(node),
                "partition-id": metrics.get("partition-id"),
                "stats": stats,
                "depth": depth,
                "n": n,
                "noise-std": noise(depth),
            }
        )
        up += int(metrics.get("bytes-up", 0))
        down += int(metrics.get("bytes-down", 0))
    if not accepted:
        raise nothing_accepted(label, len(replies), reasons, cfg["round-timeout"])
    sums, counts, shifts, capped, screened = combine(accepted, cfg, dim)
    for c in capped:
        log(
            WARNING,
            "%s: node %s counts as %.0f of its %d examples (head-weight-cap)",
            label,
            c["node"],
            c["counted-as"],
            c["num-examples"],
        )
    for s_ in screened:
        log(WARNING, "%s: node %s left out of exits %s: %s", label, s_["node"], s_["exits"], "; ".join(s_["why"]))
    part = {
        "clients": len(accepted),
        "failed": len(left_out),
        "left-out": left_out,
        "capped": capped,
        "screened": screened,
        "bytes-up": up,
        "bytes-down": down,
    }
    return sums, counts, shifts, part


def _num_exits(arrays: dict[str, np.ndarray]) -> int:
    return len({k.split(".")[1] for k in arrays if k.startswith("heads.")})


def privacy_summary(cfg: dict, bounds: list[float]) -> dict:
    """What head_fit.json says of the statistics' differential privacy."""
    return {
        "epsilon": cfg["head-dp-epsilon"],
        "delta": cfg["head-dp-delta"],
        "unit": "one training example of a node, replaced; over all the run's fits together",
        "fits": len(head_fit_rounds(cfg)),
        "noise-std-per-depth": [round(noise_std(cfg, bounds[:d]), 4) for d in range(1, len(bounds) + 1)],
    }


def combine(accepted: list[dict], cfg: dict, dim: int) -> tuple[dict, dict, dict, list, list]:
    """Per exit, the capped statistics of the nodes the screen keeps, summed (G as its upper
    triangle, as solve_heads reads it); the examples behind each exit; the diagonal shift that
    keeps noisy sums positive definite; who was capped and who screened out.

    With privacy noise the screen is off: the noise hides the class means it reads."""
    weights = head_guard.cap_weights({j: a["n"] for j, a in enumerate(accepted)}, cfg["head-weight-cap"])
    capped = [
        {
            "node": a["node"],
            "partition-id": a["partition-id"],
            "num-examples": a["n"],
            "counted-as": round(a["n"] * weights[j], 2),
        }
        for j, a in enumerate(accepted)
        if weights[j] < 1.0
    ]
    sums: dict[str, np.ndarray] = {}
    counts: dict[int, float] = {}
    shifts: dict[int, float] = {}
    out: dict[int, dict] = {}
    private = cfg["head-dp-epsilon"] > 0
    for i in range(max(a["depth"] for a in accepted)):
        who = [j for j, a in enumerate(accepted) if a["depth"] > i]
        stats = [
            (*head_guard.exit_stats(accepted[j]["stats"], i, weights[j]), accepted[j]["n"] * weights[j]) for j in who
        ]
        dropped = {} if private else _screen(stats, cfg)
        for idx, why in dropped.items():
            a = accepted[who[idx]]
            entry = out.setdefault(
                who[idx], {"node": a["node"], "partition-id": a["partition-id"], "exits": [], "why": []}
            )
            entry["exits"].append(i + 1)
            entry["why"].append(f"exit {i + 1}: {why}")
        kept = [s for idx, s in enumerate(stats) if idx not in dropped]
        sums[stat_name(i, GRAM)] = pack_gram(sum(s[0] for s in kept))
        sums[stat_name(i, CROSS)] = sum(s[1] for s in kept)
        counts[i] = float(sum(s[2] for s in kept))
        if private:
            shifts[i] = dp_shift([weights[j] * accepted[j]["noise-std"] for j in who], dim)
    return sums, counts, shifts, capped, [out[j] for j in sorted(out)]


def _screen(stats: list[tuple], cfg: dict) -> dict[int, str]:
    """Indices of one exit's `stats` left out, and why: first the nodes whose statistics raise the
    others' error most (a fake data set would also skew the others' fit the label screen reads),
    then, among the rest, those whose labels disagree with everyone else's."""
    lam = cfg["ridge-lambda"]
    out = {
        i: f"adding its statistics raises the others' error {r}x the median node's"
        for i, r in head_guard.influence_screen(stats, lam, cfg["head-influence"]).items()
    }
    rest = [i for i in range(len(stats)) if i not in out]
    for j, score in head_guard.screen([stats[i] for i in rest], lam, cfg["head-screen"]).items():
        out[rest[j]] = f"the others' fit puts {score} of its examples' class means in other classes"
    return out


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


def _check(
    reply: Message, shapes: dict[str, tuple], dim: int, bounds: list[float], noise, bits: int, classes: int
) -> tuple[dict[str, np.ndarray], int, int, dict]:
    """A reply's statistics (decoded from `bits`-bit fixed point, adapters/head_codec.py), depth and
    example count; ValueError says what is wrong with it."""
    if reply.has_error():
        raise ValueError(reply.error.reason[:200])
    metrics = metrics_or_empty(reply.content)
    depth, n = metrics.get("depth"), metrics.get("num-examples")
    if not isinstance(depth, int) or not 1 <= depth <= len(bounds):
        raise ValueError(f"'depth' must be an integer in 1..{len(bounds)}, got {depth!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"'num-examples' must be an integer >= 1, got {n!r}")
    stats = head_codec.decode(to_numpy(arrays_of(reply.content)), depth, dim, classes, bits)
    for k, v in stats.items():
        want = (dim * (dim + 1) // 2,) if k.endswith(GRAM) else None
        if want is not None and v.shape != want:
            raise ValueError(f"{k} has shape {v.shape}, not the upper triangle of {dim} features and the constant")
        if k in shapes and v.shape != shapes[k]:
            raise ValueError(f"{k} has shape {v.shape}, other nodes sent {shapes[k]}")
        if not np.all(np.isfinite(v)):
            raise ValueError(f"{k} is not finite")
    head_guard.check_statistics(stats, depth, n, bounds, noise(depth))
    for k, v in stats.items():
        shapes.setdefault(k, v.shape)
    return stats, depth, n, metrics
