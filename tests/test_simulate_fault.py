"""The fault test, end to end with Flower's local SuperLink: Ctrl-C on scripts/simulate.sh in
round 2 stops the run; resuming it gives rows 1..N exactly once and the final weights of an
uninterrupted run.

It uses a local SuperLink of its own (private FLWR_HOME and free ports, tests/private_flower.py),
which it stops after: a SuperLink the user left running on Flower's default ports is neither
waited for nor touched."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from server_app import checkpoint, results
from server_app.app import run
from tests.ctrl_c import default_sigint
from tests.private_flower import private_flower

pytestmark = pytest.mark.e2e  # scripts/simulate.sh and Flower's local SuperLink (minutes)

ROOT = Path(__file__).resolve().parents[1]
NODES = 2
# The shipped backbone: a random one (backbone-weights="") would differ between processes.
CFG = {
    "num-server-rounds": 3,
    "local-epochs": 1,
    "batch-size": 32,
    "tiers": "1,2",
    "fraction-evaluate": 0.0,
    "personalize-epochs": 0,
    "run-name": "cut",
    # dense updates: top-k's error-feedback residuals stay on the nodes, so only a dense run
    # resumes to the uninterrupted run's weights bit for bit (docs/running.md)
    "topk-fraction": 1.0,
}


def _overrides(cfg: dict) -> str:
    return " ".join(
        f"{k}='{v}'" if isinstance(v, str) else f"{k}={str(v).lower() if isinstance(v, bool) else v}"
        for k, v in cfg.items()
    )


class Simulation:
    """scripts/simulate.sh in its own process group, its output collected line by line."""

    def __init__(self, env: dict, cfg: dict):
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            ["bash", str(ROOT / "scripts" / "simulate.sh"), "--run-config", _overrides(cfg)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            preexec_fn=default_sigint,  # Ctrl-C works even if this test run ignores SIGINT
        )
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    def wait_for(self, text: str, seconds: float) -> None:
        deadline = time.time() + seconds
        while not any(text in line for line in self.lines):
            assert self.proc.poll() is None and time.time() < deadline, "".join(self.lines[-30:])
            time.sleep(0.2)

    def finish(self, seconds: float) -> int:
        rc = self.proc.wait(timeout=seconds)
        self.reader.join(timeout=10)
        return rc


def test_ctrl_c_in_round_2_then_resume_gives_each_row_once_and_the_uninterrupted_weights(tmp_path, fake_grid):
    cfg = {**CFG, "output-dir": str(tmp_path / "outputs")}
    with private_flower(tmp_path / "flwr-home") as flower_env:
        env = {**flower_env, "PYTHONPATH": str(ROOT), "NUM_SUPERNODES": str(NODES)}
        sim = Simulation(env, cfg)
        sim.wait_for("round 1/3", 400)
        os.killpg(sim.proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the foreground process group
        assert sim.finish(200) == 130, "".join(sim.lines[-30:])
        run_dir = tmp_path / "outputs" / "cut"
        cut_at = checkpoint.load(run_dir)["round"]
        assert cut_at < 3
        assert [r["round"] for r in results.read_rows(run_dir)] == list(range(1, cut_at + 1))
        assert not (run_dir / results.WEIGHTS).exists()
        kept = (run_dir / results.RESULTS).read_text().splitlines()

        again = Simulation(env, {**cfg, "resume": True})
        assert again.finish(500) == 0, "".join(again.lines[-30:])
    assert [r["round"] for r in results.read_rows(run_dir)] == [1, 2, 3]
    assert (run_dir / results.RESULTS).read_text().splitlines()[:cut_at] == kept  # rows before the cut untouched

    # The same run, never interrupted, in this process.
    full_dir = run(fake_grid(NODES, cfg), {**cfg, "run-name": "full"})
    full, resumed = load_file(str(full_dir / results.WEIGHTS)), load_file(str(run_dir / results.WEIGHTS))
    assert set(full) == set(resumed)
    for k in full:
        np.testing.assert_allclose(resumed[k], full[k], rtol=0, atol=1e-6, err_msg=k)
