"""attack-partitions: the named clients send N(0, std^2) noise instead of their update."""

import numpy as np
from flwr.app import Message, MessageType

from adapters.state import get_state
from client_app.app import head_statistics, train
from core.config import validate
from core.records import to_numpy
from runtime.models import model_and_spec
from tests.flowerkit import DENSE, TINY, context, train_message


def _sent_by_honest_0_and_attacker_1(handler, message_type: str, server_round: int) -> dict[int, dict[str, np.ndarray]]:
    """What partitions 0 (honest) and 1 (attacker, noise std 10) reply to the same message."""
    cfg = {**TINY, **DENSE, "attack-partitions": "1", "attack-noise-std": 10.0}
    msg = train_message(get_state(model_and_spec(validate(cfg))[0]), server_round=server_round)
    msg = Message(content=msg.content, dst_node_id=1, message_type=message_type)
    sent = {}
    for pid in (0, 1):
        ctx = context({"partition-id": pid, "num-partitions": 4, "max-depth": 2}, cfg)
        sent[pid] = to_numpy(handler(msg, ctx).content.array_records["arrays"])
    return sent


def test_an_attacker_sends_noise_of_the_given_std_and_the_others_their_update():
    sent = {
        pid: np.concatenate([v.ravel() for v in a.values()])
        for pid, a in _sent_by_honest_0_and_attacker_1(train, MessageType.TRAIN, 1).items()
    }
    assert 9.5 < sent[1].std() < 10.5 and abs(sent[1].mean()) < 0.5
    assert np.abs(sent[0]).max() < 1.0  # one local epoch of an honest client moves weights little


def test_an_attacker_poisons_its_head_statistics_too():
    sent = {
        pid: a["heads.0.fc.cross"]
        for pid, a in _sent_by_honest_0_and_attacker_1(head_statistics, MessageType.QUERY, 0).items()
    }
    # honest: the constant row counts its examples per class (non-negative integers)
    assert np.all(sent[0][-1] >= 0) and np.allclose(sent[0][-1], np.round(sent[0][-1]))
    assert 5 < sent[1].std() < 15  # noise of std 10 instead
