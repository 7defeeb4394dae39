"""anytime-fl ServerApp: build the adapter state and strategy, run the rounds."""

from __future__ import annotations

import os
import random
import sys
import time
from logging import ERROR, INFO, WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from adapters.backbone import BackboneError
from core.config import ConfigError, check_depths, check_heads_privacy, secagg_note, serves_last_fit, validate
from core.records import metrics_or_empty, to_numpy, to_record
from fedtasks.base import DataError
from fedtasks.task import load_test
from runtime.models import initial_state, model_and_spec
from strategies.registry import build_strategy

from . import checkpoint, head_fit, lock, preflight, results
from .evaluation import ServerEvaluator
from .exchange import Exchange, SuperLinkUnavailable, duplicate_partitions, warn_duplicates
from .finish import finish_run
from .head_secagg import SecAggFailed
from .nothing_accepted import NothingAccepted, nothing_accepted
from .rundir import open_run_dir

app = ServerApp()


class RunFailed(Exception):
    """The run stopped on a configuration or data problem (already logged in one line)."""


# Processes Flower starts for one run; only there may the traceback limit change.
_FLOWER_PROCESSES = ("flwr-simulation", "flwr-serverapp")


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        run(grid, dict(context.run_config))
    except (
        ConfigError,
        BackboneError,
        DataError,
        FileNotFoundError,
        SuperLinkUnavailable,
        NothingAccepted,
        SecAggFailed,
    ) as err:
        # A configuration or data problem, a SuperLink that stayed away, a round
        # that accepted no reply or a head fit too few nodes stayed to unmask (the
        # last finished round is checkpointed): one clear line, not a traceback.
        log(ERROR, "anytime-fl stopped: %s", err)
        # Flower marks a run failed (and its process exits non-zero) only when
        # the ServerApp raises an Exception; a SystemExit counts as success.
        # It logs that exception with its traceback: the line above says it all.
        if os.path.basename(sys.argv[0]) in _FLOWER_PROCESSES:
            sys.tracebacklimit = 0
        raise RunFailed(f"anytime-fl stopped: {err}") from None


@lock.releasing
def run(grid: Grid, user_cfg: dict) -> Path:
    cfg = validate(user_cfg)
    strategy = build_strategy(cfg["strategy"], cfg)  # a bad name or argument stops here, before round 1
    check_heads_privacy(cfg)
    if note := secagg_note(cfg):
        log(WARNING, note)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, spec = model_and_spec(cfg)
    check_depths(cfg, model.num_blocks)
    test_set = load_test(cfg, spec)
    num_nodes = preflight.wait_for_nodes(grid, cfg)
    partitions = preflight.partition_document(cfg, num_nodes)
    run_dir, resumed = open_run_dir(cfg)
    results.write_partition_stats(cfg, run_dir, num_nodes, doc=partitions)

    arrays = initial_state(cfg)
    # What the server evaluates and checkpoints as the run's model: with `serve-last-fit`, the
    # adapters of the last head fit until the next one (heads fixed while adapters train turn
    # every round between refits 3-8 points lower on the characters: docs/benchmarks.md).
    served, served_round = arrays, 0
    start = 1
    if resumed is not None:
        arrays = resumed["arrays"]
        served, served_round = resumed["served"], resumed["meta"].get("served-round", resumed["round"])
        strategy.load_state_dict(resumed["strategy"])
        checkpoint.restore_rng(resumed["rng"])
        start = resumed["round"] + 1
        results.truncate_after(run_dir, resumed["round"], resumed["meta"].get("row"))
        log(INFO, "Resuming %s after round %d", run_dir, resumed["round"])
    else:
        random.seed(cfg["seed"])
        np.random.seed(cfg["seed"])

    evaluator = ServerEvaluator(model, test_set, cfg["eval-batch-size"])
    sizes = results.model_sizes(model, arrays)
    log(
        INFO,
        "anytime-fl: %s, %d blocks, exits at every block, tiers %s; %d adapter/head parameters (%.1f%% of the model)",
        cfg["backbone"],
        model.num_blocks,
        cfg["tiers"],
        sizes["adapter-params"],
        100 * sizes["adapter-fraction"],
    )
    log(INFO, "Writing results to %s", run_dir)

    num_rounds = cfg["num-server-rounds"]
    send = Exchange(grid, cfg, run_dir)
    server_eval, server_eval_of = None, None
    if resumed is None and head_fit.due(cfg, 0):
        arrays, fit = head_fit.fit_heads(grid, send, arrays, cfg, 0)
        served = arrays
        fit["server"] = server_eval = evaluator(arrays)
        server_eval_of = 0
        head_fit.record(run_dir, fit, cfg)
        log(
            INFO,
            "after the head fit | test acc per exit: %s",
            " ".join(f"{a:.2f}" for a in fit["server"]["accuracy"]),
        )
    for server_round in range(start, num_rounds + 1):
        t0 = time.time()
        record = to_record(arrays)
        preflight.await_round_nodes(grid, cfg["min-nodes"], f"round {server_round} train")
        replies = send(
            strategy.configure_train(server_round, record, ConfigRecord(), grid), f"round {server_round} train"
        )
        replies = in_partition_order(replies)
        new_record, train_metrics = strategy.aggregate_train(server_round, replies)
        stats = strategy.round_stats
        if not stats.clients:
            label = f"round {server_round} train"
            raise nothing_accepted(label, len(replies), stats.dropped_reasons, cfg["round-timeout"])
        if new_record is not None:
            arrays = to_numpy(new_record)
        refit = None
        if head_fit.due(cfg, server_round):
            arrays, refit = head_fit.fit_heads(grid, send, arrays, cfg, server_round, strategy.node_depth)
            head_fit.record(run_dir, refit, cfg)
        if refit is not None or not serves_last_fit(cfg):
            served, served_round = arrays, server_round
        eval_metrics = None
        if cfg["fraction-evaluate"] > 0:
            preflight.await_round_nodes(grid, cfg["min-nodes"], f"round {server_round} evaluate")
            eval_replies = send(
                strategy.configure_evaluate(server_round, to_record(served), ConfigRecord(), grid),
                f"round {server_round} evaluate",
            )
            eval_metrics = strategy.aggregate_evaluate(server_round, list(eval_replies))
        if server_eval is None or server_eval_of != served_round:  # the served model unchanged: its accuracy too
            server_eval, server_eval_of = evaluator(served), served_round
        row = results.round_row(
            server_round,
            seconds=time.time() - t0,
            server_eval=server_eval,
            stats=stats,
            train_metrics=train_metrics,
            eval_metrics=eval_metrics,
            replies=replies,
            sizes=sizes,
            head_fit_bytes_up=refit["bytes-up"] if refit is not None else 0,
            served_round=served_round,
        )
        row["duplicate-partition-ids"] = duplicate_partitions(replies)
        warn_duplicates(f"round {server_round}", row["duplicate-partition-ids"])
        results.append_row(run_dir, row)
        log(INFO, results.format_round(row, num_rounds))
        if server_round % cfg["checkpoint-every"] == 0 or server_round == num_rounds:
            # The round's row goes in too: a crash that cuts its line in results.jsonl loses nothing.
            extra = {"run-dir": str(run_dir), "config": cfg, "row": row, "served-round": served_round}
            checkpoint.save(run_dir, server_round, arrays, strategy.state_dict(), extra, served)

    # the last round always refits: `served` is then `arrays`
    path = results.save_weights(run_dir, served, {"config": cfg, "num-blocks": model.num_blocks})
    log(INFO, "Done: final adapter weights in %s, per-round results in %s", path, run_dir / results.RESULTS)
    # anytime.json, personalisation round (personalization.json), PNG plots
    finish_run(grid, cfg, model, test_set, served, run_dir, send, strategy.node_depth)
    return run_dir


def in_partition_order(replies) -> list:
    """Replies sorted by partition: float sums then do not depend on arrival order, so a
    resumed run ends with the same weights as an uninterrupted one."""

    def key(msg):
        if not msg.has_error():
            pid = metrics_or_empty(msg.content).get("partition-id")
            if isinstance(pid, int):
                return (0, pid)
        return (1, 0)

    return sorted(replies, key=key)
