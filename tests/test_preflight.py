"""Checks before round 1 (server_app/preflight.py): enough nodes, enough examples."""

from __future__ import annotations

import pytest

from core.config import ConfigError, validate
from fedtasks.base import DataError
from server_app import preflight
from tests.checks import one_line


class Nodes:
    def __init__(self, n):
        self.n = n

    def get_node_ids(self):
        return list(range(1, self.n + 1))


def test_min_nodes_stops_after_the_timeout_saying_how_many_came():
    now = [0.0]
    with pytest.raises(ConfigError) as err:
        preflight.wait_for_nodes(
            Nodes(4),
            validate({"min-nodes": 10, "min-nodes-timeout": 30}),
            clock=lambda: now[0],
            sleep=lambda s: now.__setitem__(0, now[0] + s),
        )
    one_line(str(err.value), "min-nodes", "only 4 of the 10", "30s")
    assert now[0] == pytest.approx(30, abs=1.5)
    assert preflight.wait_for_nodes(Nodes(4), validate({"min-nodes": 3})) == 4


def test_a_federation_with_more_nodes_than_examples_stops_before_round_1():
    with pytest.raises(DataError) as err:
        preflight.partition_document(validate({"task": "digits"}), 5000)
    one_line(str(err.value), "digits", "5000")
