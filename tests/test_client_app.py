"""The ClientApp's train reply: only the adapters/heads of blocks 1..d."""

import numpy as np
import pytest

from adapters.state import get_state
from client_app.app import evaluate_exits, train
from core.config import validate
from core.naming import param_block
from core.records import to_numpy
from runtime.models import model_and_spec
from tests.flowerkit import DENSE, TINY, context, train_message


@pytest.fixture(scope="module")
def global_state():
    model, _ = model_and_spec(validate(TINY))
    return get_state(model)


@pytest.mark.parametrize("depth,heads", [(3, "ridge"), (9, "ridge"), (3, "trained")])
def test_reply_holds_exactly_what_the_client_trains_of_blocks_up_to_depth(global_state, depth, heads):
    ctx = context({"partition-id": 1, "num-partitions": 4, "max-depth": depth}, {**TINY, "heads": heads, **DENSE})
    out = train(train_message(global_state), ctx)
    sent = to_numpy(out.content.array_records["arrays"])
    # closed-form heads (the default) are fitted by the server: their zero deltas stay home
    expected = {k for k in global_state if param_block(k) <= depth and (heads != "ridge" or not k.startswith("heads."))}
    assert set(sent) == expected
    assert not any(k.startswith("backbone") for k in sent)
    metrics = out.content.metric_records["metrics"]
    assert metrics["depth"] == depth and metrics["num-examples"] > 0
    assert [k for k in metrics if k.startswith("train-loss-")] == [f"train-loss-{i}" for i in range(1, depth + 1)]
    # what is sent is the change of the weights, and it is not all zero
    assert any(np.abs(v).max() > 0 for v in sent.values())


def test_topk_reply_sends_packed_entries_not_dense_zeros(global_state):
    cfg = {**TINY, "topk-fraction": 0.1}
    ctx = context({"partition-id": 0, "num-partitions": 4, "max-depth": 3}, cfg)
    out = train(train_message(global_state), ctx)
    sent = to_numpy(out.content.array_records["arrays"])
    assert set(sent) <= {"@mask", "@gaps", "@values"} and "@values" in sent
    trained = [v.size for k, v in global_state.items() if param_block(k) <= 3 and not k.startswith("heads.")]
    assert sent["@values"].size <= 0.1 * sum(trained) + len(trained)  # ceil per tensor
    m = out.content.metric_records["metrics"]
    assert m["bytes-up"] <= 0.1 * m["dense-bytes"]
    assert "topk-residual" in ctx.state.array_records  # error feedback kept for next round


def test_evaluate_reports_every_exit_of_the_client(global_state):
    ctx = context({"partition-id": 2, "num-partitions": 4, "max-depth": 6}, TINY)
    msg = train_message(global_state)
    out = evaluate_exits(msg, ctx)
    m = out.content.metric_records["metrics"]
    assert {f"accuracy-{i}" for i in range(1, 7)} <= set(m)
    assert "accuracy-7" not in m
    assert all(0.0 <= m[f"accuracy-{i}"] <= 1.0 for i in range(1, 7))


def test_the_received_arrays_are_found_under_the_name_the_strategy_gave_them(global_state):
    # A strategy's `arrayrecord_key` names what it sends; the client takes the one ArrayRecord.
    msg = train_message(global_state)
    msg.content["weights"] = msg.content.array_records["arrays"]
    del msg.content["arrays"]
    ctx = context({"partition-id": 1, "num-partitions": 4, "max-depth": 3}, {**TINY, **DENSE})
    sent = to_numpy(train(msg, ctx).content.array_records["arrays"])
    assert set(sent) == {k for k in global_state if param_block(k) <= 3 and not k.startswith("heads.")}
