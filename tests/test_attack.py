"""attack-partitions: the named clients send N(0, std^2) noise instead of their update."""

import numpy as np

from adapters.state import get_state
from client_app.app import train
from core.config import validate
from core.records import to_numpy
from runtime.models import model_and_spec
from tests.flowerkit import TINY, context, train_message


def test_an_attacker_sends_noise_of_the_given_std_and_the_others_their_update():
    cfg = {**TINY, "attack-partitions": "1", "attack-noise-std": 10.0}
    state = get_state(model_and_spec(validate(cfg))[0])
    sent = {}
    for pid in (0, 1):
        ctx = context({"partition-id": pid, "num-partitions": 4, "max-depth": 2}, cfg)
        sent[pid] = np.concatenate(
            [v.ravel() for v in to_numpy(train(train_message(state), ctx).content.array_records["arrays"]).values()]
        )
    assert 9.5 < sent[1].std() < 10.5 and abs(sent[1].mean()) < 0.5
    assert np.abs(sent[0]).max() < 1.0  # one local epoch of an honest client moves weights little


def test_an_attacker_poisons_its_head_statistics_too():
    from flwr.app import Message, MessageType

    from client_app.app import head_statistics

    cfg = {**TINY, "attack-partitions": "1", "attack-noise-std": 10.0}
    state = get_state(model_and_spec(validate(cfg))[0])
    sent = {}
    for pid in (0, 1):
        ctx = context({"partition-id": pid, "num-partitions": 4, "max-depth": 2}, cfg)
        query = train_message(state, server_round=0)
        query = Message(content=query.content, dst_node_id=1, message_type=MessageType.QUERY)
        stats = to_numpy(head_statistics(query, ctx).content.array_records["arrays"])
        sent[pid] = stats["heads.0.fc.cross"]
    # honest: the constant row counts its examples per class (non-negative integers)
    assert np.all(sent[0][-1] >= 0) and np.allclose(sent[0][-1], np.round(sent[0][-1]))
    assert 5 < sent[1].std() < 15  # noise of std 10 instead
