"""One round through Flower's simulation engine with the real ClientApp and ServerApp code."""

import numpy as np
import pytest
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation
from safetensors.numpy import load_file

from client_app.app import app as client_app
from core.config import validate
from runtime.models import initial_state
from server_app import results
from server_app.app import run

pytestmark = pytest.mark.e2e  # Flower's Ray simulation engine


def test_one_simulated_round_changes_the_adapter_weights(tmp_path):
    # run_simulation hands the apps an empty run config, so both sides use the
    # defaults (shipped backbone, digits); the server only shortens the run.
    overrides = {
        "num-server-rounds": 1,
        "fraction-train": 1.0,
        "fraction-evaluate": 0.0,
        "personalize-epochs": 0,
        "output-dir": str(tmp_path),
        "run-name": "sim",
    }
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        run(grid, overrides)

    run_simulation(
        server_app=server,
        client_app=client_app,
        num_supernodes=4,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}},
    )

    run_dir = tmp_path / "sim"
    rows = results.read_rows(run_dir)
    assert [r["round"] for r in rows] == [1]
    assert rows[0]["clients"] == 4 and rows[0]["dropped"] == 0
    assert set(rows[0]["clients-per-depth"]) == {"3", "6", "9", "12"}
    final = load_file(str(run_dir / results.WEIGHTS))
    # The server ran in this process and its cached model now holds the
    # trained weights; the seeded starting point is kept apart.
    initial = initial_state(validate({}))
    assert set(final) == set(initial)
    changed = [k for k in initial if not np.array_equal(final[k], initial[k])]
    # every block was trained by the depth-12 client, so every block moved
    assert {k.split(".")[1] for k in changed if k.startswith("heads.")} == {str(i) for i in range(12)}
