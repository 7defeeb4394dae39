"""`flwr run` with a Flower strategy by class name: Krum keeps a noisy attacker out.

Runs the app as a user does (`flwr run <project> --stream`) on a local
SuperLink of its own (private FLWR_HOME, free ports), which it stops after.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from core.config import validate
from runtime.models import initial_state
from server_app import results
from tests.private_flower import private_flower

pytestmark = pytest.mark.e2e  # `flwr run` on a local SuperLink (minutes)

ROOT = Path(__file__).resolve().parents[1]


def test_krum_through_flwr_run_keeps_the_attackers_noise_out(tmp_path):
    flwr = Path(sys.executable).parent / "flwr"
    flwr = str(flwr) if flwr.exists() else shutil.which("flwr")
    assert flwr, "the flwr command is not installed"
    out = tmp_path / "out"
    # heads trained by the clients: Krum guards updates, not the closed-form fit's statistics
    shared = {"tiers": "1,2", "local-epochs": 1, "batch-size": 32, "heads": "trained"}
    overrides = (
        f"num-server-rounds=1 fraction-evaluate=0.0 personalize-epochs=0 tiers='1,2' local-epochs=1 batch-size=32 "
        f"heads='trained' "
        f"strategy='flwr:Krum' strategy-args='num_malicious_nodes=1' attack-partitions='0' "
        f"output-dir='{out}' run-name='krum'"
    )
    with private_flower(tmp_path / "flwr-home") as env:
        proc = subprocess.run(
            [
                flwr,
                "run",
                str(ROOT),
                "--stream",
                "--run-config",
                overrides,
                "--federation-config",
                "num_supernodes=4 client_resources_num_cpus=1 client_resources_num_gpus=0.0 init_args_num_cpus=2",
            ],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=900,
        )
    log = proc.stdout[-3000:] + proc.stderr[-2000:]
    rows = results.read_rows(out / "krum") if (out / "krum").exists() else []
    assert proc.returncode == 0 and len(rows) == 1, log
    assert rows[0]["clients"] == 4 and rows[0]["dropped"] == 0, log
    initial = initial_state(validate(shared))
    final = load_file(str(out / "krum" / results.WEIGHTS))
    moved = max(float(np.abs(final[k] - initial[k]).max()) for k in initial)
    # the attacker (partition 0, depth 1) sends N(0, 10^2) noise for block 1;
    # honest steps of one local epoch are far below 1
    assert 0 < moved < 1.0, moved
