"""A client's depth budget from node config or tiers."""

import pytest

from client_app.tiers import client_depth, tier_of
from core.config import ConfigError, validate


def test_even_tiers_cycle_over_partitions():
    cfg = validate({"tiers": "3,6,9,12"})
    depths = [client_depth({"partition-id": i, "num-partitions": 8}, cfg, 12) for i in range(8)]
    assert depths == [3, 6, 9, 12, 3, 6, 9, 12]


def test_fractions_give_contiguous_tiers_of_the_asked_sizes():
    cfg = validate({"tiers": "3,12", "tier-assignment": "0.75,0.25"})
    tiers = [tier_of(i, 8, cfg) for i in range(8)]
    assert tiers == [0] * 6 + [1] * 2


def test_node_max_depth_wins_over_tiers():
    cfg = validate({"tiers": "3"})
    assert client_depth({"max-depth": 7, "partition-id": 0, "num-partitions": 2}, cfg, 12) == 7


@pytest.mark.parametrize("depth", [0, 13, "deep"])
def test_bad_max_depth_names_the_node_config_key(depth):
    with pytest.raises(ConfigError, match="max-depth"):
        client_depth({"max-depth": depth}, validate({}), 12)


def test_missing_partition_names_the_node_config_key():
    with pytest.raises(ConfigError, match="partition-id"):
        client_depth({}, validate({}), 12)
