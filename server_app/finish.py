"""End of a run: anytime evaluation, personalisation round, plots.

Called once after the final weights are saved, so nothing here can lose
the results already written; plotting failures are logged, not raised.
"""

from __future__ import annotations

import json
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
from flwr.common.logger import log
from flwr.serverapp import Grid
from torch.utils.data import DataLoader

from adapters.anytime import anytime_report
from adapters.model import AnytimeViT
from adapters.state import set_state
from core.run_files import ANYTIME

from .personalization import personalization_round


def write_anytime(run_dir: Path, model: AnytimeViT, test_set, arrays: dict[str, np.ndarray], batch_size: int) -> dict:
    """Accuracy and FLOPs per exit, and confidence-based exiting over thresholds, on the test set."""
    set_state(model, arrays)
    report = anytime_report(model, DataLoader(test_set, batch_size=batch_size))
    (Path(run_dir) / ANYTIME).write_text(json.dumps(report, indent=2))
    last = report["exits"][-1]
    pick = early_exit_pick(report)
    log(
        INFO,
        "anytime: exit 1 acc %.3f at %.2f MFLOPs, exit %d acc %.3f at %.2f MFLOPs; confidence >= %.3g: "
        "acc %.3f at %.2f MFLOPs (%.1f blocks) on average",
        report["exits"][0]["accuracy"],
        report["exits"][0]["flops"] / 1e6,
        last["exit"],
        last["accuracy"],
        last["flops"] / 1e6,
        pick["threshold"],
        pick["accuracy"],
        pick["mean-flops"] / 1e6,
        pick["mean-blocks"],
    )
    return report


def early_exit_pick(report: dict) -> dict:
    """The cheapest threshold within a point of the best fixed exit (what early exit buys);
    when none gets that close, the cheapest of the most accurate thresholds."""
    target = max(e["accuracy"] for e in report["exits"]) - 0.01
    target = min(target, max(r["accuracy"] for r in report["dynamic"]))
    good = [r for r in report["dynamic"] if r["accuracy"] >= target]
    return min(good, key=lambda r: (r["mean-flops"], -r["accuracy"]))


def draw_plots(run_dir: Path) -> list[Path]:
    try:
        from .plots import draw

        paths = draw(run_dir)
        log(INFO, "Plots: %s", ", ".join(p.name for p in paths))
        return paths
    except Exception as err:  # noqa: BLE001  (a plot must never cost the run its results)
        log(WARNING, "Plotting failed (results are safe in %s): %s: %s", run_dir, type(err).__name__, err)
        return []


def finish_run(
    grid: Grid,
    cfg: dict,
    model: AnytimeViT,
    test_set,
    arrays: dict[str, np.ndarray],
    run_dir: Path,
    send,
    node_depth: dict[int, int] | None = None,
) -> None:
    write_anytime(run_dir, model, test_set, arrays, cfg["eval-batch-size"])
    if cfg["personalize-epochs"] > 0:
        personalization_round(grid, send, arrays, cfg, run_dir, cfg["num-server-rounds"] + 1, node_depth)
    draw_plots(run_dir)
