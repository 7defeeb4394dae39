"""Flower strategies end to end through Flower's simulation engine.

One `run_simulation` (one Ray start) runs the real ServerApp round loop once
per strategy, one round each, against the real ClientApp code on clients of
two depths. The strategies are those whose path differs past aggregation:
a wrapper (DP), a selection rule (Krum), a config entry the clients read
(FedProx), a metric the clients report (QFedAvg's loss) and a server
optimiser that remembers the current arrays (FedAdagrad). Every array
strategy's aggregation of mixed-depth replies is in test_flower_strategies.py;
all of them ran this way once (docs/strategies.md), at ~30 s each on a busy
2-core machine, too slow to repeat in every test run.
"""

import numpy as np
import pytest
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation
from safetensors.numpy import load_file

from client_app.app import evaluate_exits, train
from core.config import validate
from runtime.models import initial_state
from server_app import results
from server_app.app import run
from tests.test_flower_strategies import ARRAY_STRATEGIES

pytestmark = pytest.mark.e2e  # Flower's Ray simulation engine

# Four clients: Krum/Bulyan are told of no attacker, as Bulyan needs
# 4f + 3 senders; with one depth-2 group of two senders it leaves that group be.
SMALL_FEDERATION = {
    "Krum": "num_malicious_nodes=0",
    "MultiKrum": "num_malicious_nodes=0 num_nodes_to_select=2",
    "Bulyan": "num_malicious_nodes=0",
}
# heads trained by the clients: the strategies aggregate the clients' updates, and the
# closed-form heads' statistics bypass them (a DP strategy refuses them)
SHARED = {"tiers": "1,2", "local-epochs": 1, "batch-size": 32, "heads": "trained"}
END_TO_END = ["DifferentialPrivacyServerSideFixedClipping", "FedAdagrad", "FedProx", "Krum", "QFedAvg"]


def test_flower_strategies_run_a_round_through_flower(tmp_path):
    # run_simulation hands the apps an empty run config: both sides get the
    # same few overrides here.
    client = ClientApp()

    def shared(context: Context) -> Context:
        # Flower freezes run_config; the node's state object carries over.
        return Context(
            run_id=context.run_id,
            node_id=context.node_id,
            node_config=dict(context.node_config),
            state=context.state,
            run_config={**context.run_config, **SHARED},
        )

    @client.train()
    def _train(msg: Message, context: Context) -> Message:
        return train(msg, shared(context))

    @client.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return evaluate_exits(msg, shared(context))

    failures: dict[str, str] = {}
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        for name in END_TO_END:
            cfg = {
                **SHARED,
                "num-server-rounds": 1,
                "fraction-evaluate": 0.0,
                "personalize-epochs": 0,
                "strategy": f"flwr:{name}",
                "strategy-args": SMALL_FEDERATION.get(name, ARRAY_STRATEGIES[name]),
                "output-dir": str(tmp_path),
                "run-name": name,
            }
            try:
                run(grid, cfg)
            except Exception as err:  # noqa: BLE001  (collected, so one failure names every strategy that failed)
                failures[name] = f"{type(err).__name__}: {err}"

    run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=4,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}},
    )

    assert not failures, failures
    initial = initial_state(validate(SHARED))
    for name in END_TO_END:
        rows = results.read_rows(tmp_path / name)
        assert [(r["round"], r["clients"], r["dropped"]) for r in rows] == [(1, 4, 0)], name
        final = load_file(str(tmp_path / name / results.WEIGHTS))
        moved = {
            k.split(".")[1] for k in initial if k.startswith("heads.") and not np.array_equal(final[k], initial[k])
        }
        # block 1 has all four senders; nothing past block 2 is trained
        assert "0" in moved and moved <= {"0", "1"}, (name, moved)
