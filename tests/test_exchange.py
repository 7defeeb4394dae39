"""The round's send/receive against a SuperLink that fails: retried, logged, resumable."""

from __future__ import annotations

import pytest
from flwr.app import Error, Message, RecordDict

from server_app import checkpoint, exchange, results
from server_app.app import run
from server_app.exchange import SuperLinkUnavailable, duplicate_partitions
from tests.flowerkit import TINY
from tests.localgrid import LocalGrid


class PushPullGrid(LocalGrid):
    """A Grid with Flower's push/pull calls; `failing(call_no)` says which pulls raise."""

    def __init__(self, *args, failing=lambda n: False, **kwargs):
        super().__init__(*args, **kwargs)
        self.failing = failing
        self.pulls = 0
        self.stored: dict[str, Message] = {}

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            mid = f"m{len(self.stored)}"
            self.stored[mid] = msg
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        self.pulls += 1
        if self.failing(self.pulls):
            raise RuntimeError("500 Internal Server Error for url /v1/runtime/pull-messages")
        out = []
        for mid in message_ids:
            if mid in self.stored:
                out.extend(self.send_and_receive([self.stored.pop(mid)]))
        return out


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(exchange, "_clock", fake)
    monkeypatch.setattr(exchange, "_sleep", fake.sleep)
    return fake


def _cfg(tmp_path, **extra):
    return {
        **TINY,
        "num-server-rounds": 2,
        "fraction-evaluate": 0.0,
        "personalize-epochs": 0,
        "min-nodes": 3,
        "output-dir": str(tmp_path),
        "run-name": "r",
        "superlink-patience": 60,
        "tiers": "1,2",  # what is exchanged matters here, not how deep the clients train
        **extra,
    }


def test_transient_pull_errors_are_retried_and_no_update_is_lost(tmp_path, clock, flwr_log):
    cfg = _cfg(tmp_path)
    grid = PushPullGrid(3, cfg, failing=lambda n: n in (2, 3, 4, 8))  # mid-round, in both rounds
    run_dir = run(grid, cfg)
    rows = results.read_rows(run_dir)
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["clients"] == 3 and r["dropped"] == 0 for r in rows)
    assert any("retrying in" in line for line in flwr_log)
    assert any("works again" in line for line in flwr_log)


def test_replies_are_logged_as_they_arrive_naming_the_nodes_still_awaited(tmp_path, clock, flwr_log):
    cfg = _cfg(tmp_path)
    run(PushPullGrid(3, cfg), cfg)
    lines = [line for line in flwr_log if line.startswith("round 2 train:")]
    # From round 2 on, the nodes' partitions are known from their replies.
    assert any(
        "1/3 replies" in line and line.count("(partition") == 3 and "waiting for node" in line for line in lines
    ), lines
    assert any("3/3 replies" in line for line in lines)


def test_a_superlink_that_stays_down_ends_the_run_resumable(tmp_path, clock, flwr_log):
    cfg = _cfg(tmp_path)
    down_from = {}

    def failing(n):
        # Down for good once round 2 has started (its first pull).
        return bool(down_from) and n >= down_from["pull"]

    grid = PushPullGrid(3, cfg, failing=failing)
    original = grid.push_messages

    def push(messages):
        messages = list(messages)
        if messages[0].content.config_records["config"]["server-round"] == 2:
            down_from["pull"] = grid.pulls + 2  # one reply of round 2 comes back first
        return original(messages)

    grid.push_messages = push
    with pytest.raises(SuperLinkUnavailable, match="resume=true") as err:
        run(grid, cfg)
    assert "Rounds 1-1 are checkpointed" in str(err.value)
    assert clock.now >= cfg["superlink-patience"]
    run_dir = tmp_path / "r"
    assert checkpoint.load(run_dir)["round"] == 1
    assert [r["round"] for r in results.read_rows(run_dir)] == [1]

    # The SuperLink is back: the run goes on from round 2, as the message says.
    resumed = {**cfg, "resume": True}
    run(PushPullGrid(3, resumed), resumed)
    rows = results.read_rows(run_dir)
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["clients"] == 3 for r in rows)


def test_server_app_main_turns_the_failure_into_one_line_and_a_nonzero_exit(tmp_path, clock, flwr_log, monkeypatch):
    from flwr.app import Context, RecordDict

    from server_app import app as server_app

    cfg = _cfg(tmp_path, **{"num-server-rounds": 1})
    grid = PushPullGrid(3, cfg, failing=lambda n: True)
    # RunFailed, not SystemExit: Flower marks only a raised Exception as a failed run.
    with pytest.raises(server_app.RunFailed, match="nothing to resume"):
        server_app.main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=cfg))
    assert any(line.startswith("anytime-fl stopped:") and "nothing to resume" in line for line in flwr_log)


def test_duplicate_partition_ids_are_named_in_results_and_log(tmp_path, clock, flwr_log):
    cfg = _cfg(tmp_path, **{"num-server-rounds": 1})
    nodes = [
        {"partition-id": 0, "num-partitions": 3},
        {"partition-id": 0, "num-partitions": 3},
        {"partition-id": 2, "num-partitions": 3},
    ]
    run_dir = run(PushPullGrid(3, cfg, node_configs=nodes), cfg)
    assert results.read_rows(run_dir)[0]["duplicate-partition-ids"] == {"0": [1, 2]}
    assert any("nodes 1, 2 all report partition-id 0" in line for line in flwr_log)


def test_error_replies_are_not_counted_as_partitions():
    from flwr.app import MetricRecord, RecordDict

    from tests.localgrid import ensure_task_identity

    ensure_task_identity()
    sent = Message(RecordDict(), dst_node_id=1, message_type="train")
    ok = Message(RecordDict({"metrics": MetricRecord({"partition-id": 0})}), reply_to=sent)
    err = Message(Error(code=0, reason="boom"), reply_to=sent)
    assert duplicate_partitions([ok, err]) == {}


def test_a_long_list_of_awaited_nodes_is_cut_to_one_short_line():
    from server_app import exchange

    line = exchange._whom(range(1, 21))
    assert line.count("node ") == exchange.SHOWN_WAITING and line.endswith("and 15 more")
    assert exchange._whom([7]) == "node 7"


def test_a_round_waiting_for_nodes_logs_when_the_count_changes_or_every_30_s(flwr_log):
    from server_app import preflight

    clock = FakeClock()
    counts = iter([1] * 5 + [2] * 60 + [3])

    class Nodes:
        def get_node_ids(self):
            return range(next(counts))

    assert preflight.await_round_nodes(Nodes(), 3, "round 4 train", clock=clock, sleep=clock.sleep) == 3
    lines = [line for line in flwr_log if line.startswith("round 4 train: waiting for nodes")]
    # 65 s of waiting: the 1, the change to 2 (at 5 s), 2 again at 35 s (Flower: 65 lines)
    assert len(lines) == 3, lines
    assert "1 connected (min-nodes 3)" in lines[0] and "2 connected" in lines[1]


def test_a_simulation_logs_no_line_per_reply_but_still_one_while_a_round_waits(clock, flwr_log, monkeypatch):
    from flwr.superlink.grid import InMemoryGrid

    from tests.flowerkit import train_message

    assert exchange.in_simulation(object.__new__(InMemoryGrid))  # what Flower's simulation engine hands the app
    assert not exchange.in_simulation(PushPullGrid(2, dict(TINY)))
    grid = PushPullGrid(20, dict(TINY))
    slow = grid.pull_messages
    grid.pull_messages = lambda ids: [] if clock.now < 40 else slow(ids)  # every reply waits 40 s
    grid.handlers = {k: (lambda msg, ctx: Message(RecordDict(), reply_to=msg)) for k in grid.handlers}
    msgs = [train_message({}, node_id=n) for n in grid.get_node_ids()]
    replies = exchange.exchange(grid, msgs, timeout=600, label="round 1 train", patience=60, per_reply=False)
    assert len(replies) == 20
    lines = [line for line in flwr_log if line.startswith("round 1 train")]
    assert len(lines) == 1 and "0/20 replies after 30 s" in lines[0], lines


def test_the_personalisation_round_is_retried_like_a_training_round(tmp_path, clock, flwr_log):
    from server_app.personalization import FILE, PERSONALIZE

    class FlakyAtPersonalisation(PushPullGrid):
        def push_messages(self, messages):
            messages = list(messages)
            if messages and messages[0].metadata.message_type == PERSONALIZE:
                self.failing = lambda n, first=self.pulls: first < n <= first + 2
            return super().push_messages(messages)

    cfg = _cfg(tmp_path, **{"num-server-rounds": 1, "personalize-epochs": 1})
    run_dir = run(FlakyAtPersonalisation(3, cfg), cfg)
    assert any(line.startswith("personalisation: pulling") and "retrying in" in line for line in flwr_log)
    assert (run_dir / FILE).is_file()
    import json

    summary = json.loads((run_dir / FILE).read_text())
    assert summary["clients"] == 3 and summary["failed"] == 0


def test_byte_counts_are_flowers_own():
    import numpy as np

    from core.codec import payload_bytes, topk_encode
    from core.records import to_record

    rng = np.random.default_rng(0)
    dense = {"adapters.0.w": rng.normal(size=(7, 5)).astype(np.float32), "heads.3.b": np.zeros(11, np.float32)}
    packed, _ = topk_encode(dense, 0.2, None)
    for arrays in (dense, packed):
        assert payload_bytes(arrays) == to_record(arrays).count_bytes()
