"""The ServerApp's run (server_app/app.py): a failed run is an exception Flower marks failed, bad
output folders are one line, a round counts accepted bytes only, replies are read in partition order."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest

from core.config import ConfigError
from server_app.app import RunFailed, in_partition_order, main, run
from server_app.results import format_round, round_row
from strategies.depth_fedavg import RoundStats
from tests.checks import TINY, one_line

NODES = 2


def test_a_failed_run_raises_an_exception_so_flower_marks_it_failed(fake_grid, tmp_path, caplog):
    from flwr.app import Context, RecordDict

    (tmp_path / "afile").write_text("not a folder")
    cfg = {**TINY, "output-dir": str(tmp_path / "afile")}
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=cfg)
    with caplog.at_level(logging.ERROR, logger="flwr"):
        with pytest.raises(RunFailed):  # an Exception: Flower lists a run that raised SystemExit as completed
            main(fake_grid(NODES, cfg), ctx)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    one_line(errors[0], "anytime-fl stopped", "output-dir", str(tmp_path / "afile"))
    assert not hasattr(sys, "tracebacklimit")  # only Flower's own run processes drop the traceback


@pytest.mark.parametrize("output_dir", ["file", "/proc/anytime-fl-13"])
def test_an_odd_or_unwritable_output_dir_is_one_line(fake_grid, tmp_path, output_dir):
    if output_dir == "file":
        output_dir = str(tmp_path / "file")
        Path(output_dir).write_text("x")
    cfg = {**TINY, "output-dir": output_dir}
    with pytest.raises(ConfigError) as err:
        run(fake_grid(NODES, cfg), cfg)
    assert err.value.key == "output-dir"
    one_line(str(err.value), output_dir)


def test_a_round_counts_the_bytes_of_accepted_updates_only():
    stats = RoundStats(depths=[3], bytes_up=100, dropped_reasons=["bad"], dropped_nodes=[7])
    row = round_row(
        1,
        seconds=1.0,
        server_eval={"accuracy": [0.5]},
        stats=stats,
        train_metrics=None,
        eval_metrics=None,
        replies=[],
        sizes={"dense-adapter-bytes": 1, "full-finetune-bytes": 2},
    )
    assert row["bytes-up"] == 100 and row["dropped"] == 1 and row["clients-per-depth"] == {"3": 1}


def test_a_round_line_names_the_served_adapters_and_the_training_loss():
    stats = RoundStats(depths=[3], bytes_up=100, dropped_reasons=[], dropped_nodes=[])
    row = round_row(
        7,
        seconds=1.0,
        server_eval={"accuracy": [0.5, 0.6]},
        stats=stats,
        train_metrics={"train-loss-1": 2.0, "train-loss-2": 3.0, "num-examples": 10},
        eval_metrics=None,
        replies=[],
        sizes={"dense-adapter-bytes": 1, "full-finetune-bytes": 2},
        served_round=5,
    )
    assert row["served-round"] == 5
    line = format_round(row, 15)
    # between head fits the served accuracy stands still: the line says whose it is, and the loss moves
    assert "round 7/15 | test acc per exit (round 5's adapters, the last head fit): 0.50 0.60" in line
    assert "train loss 2.500" in line
    assert "adapters" not in format_round({**row, "served-round": 7}, 15)


def test_aggregation_does_not_depend_on_the_order_replies_arrive():
    from tests.flowerkit import reply

    msgs = []
    for pid in (2, 0, 1):
        m = reply({"heads.0.fc.weight": np.full((2, 2), pid, np.float32)}, 10, 1, node_id=100 + pid)
        m.content.metric_records["metrics"]["partition-id"] = pid
        msgs.append(m)
    assert [m.content.metric_records["metrics"]["partition-id"] for m in in_partition_order(msgs)] == [0, 1, 2]
