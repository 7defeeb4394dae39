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
