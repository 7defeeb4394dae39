"""Run-config schema: defaults in step with pyproject and README, validation names the key."""

import math
import sys
from pathlib import Path

import pytest

from core.config import (
    GROUPS,
    KEYS,
    ConfigError,
    check_depths,
    comma_list,
    defaults,
    keys_in,
    markdown_table,
    parse_attackers,
    parse_tier_names,
    parse_tiers,
    round_lr,
    tier_fractions,
    validate,
)
from tests.checks import one_line

ROOT = Path(__file__).resolve().parents[1]

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def test_pyproject_defaults_match_the_schema():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["flwr"]["app"]["config"] == defaults()


def test_every_key_is_documented_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    missing = [k.name for k in KEYS if f"`{k.name}`" not in readme]
    assert not missing, f"README lacks: {missing}"


def test_readme_holds_the_generated_run_config_table():
    # `python -m core.config` prints it; paste it into the README's "Run config".
    assert markdown_table() in (ROOT / "README.md").read_text()


def test_every_key_has_a_group_and_the_caches_follow_the_groups():
    assert all(k.group in GROUPS for k in KEYS)
    assert {"backbone", "adapter-width", "task", "seed", "device"} <= set(keys_in("model"))
    assert {"task", "data-dir", "dirichlet-alpha", "val-fraction", "seed"} <= set(keys_in("data"))
    assert "lr" not in keys_in("model") and "lr" not in keys_in("data")


def test_train_settings_come_from_the_training_keys():
    from adapters.training import TrainSettings

    cfg = validate(
        {"lr": 0.05, "local-epochs": 2, "personalize-epochs": 4, "personalize-lr": 0.002, "exit-loss": "mean"}
    )
    fed = TrainSettings.from_config(cfg, prox_mu=0.1)
    assert (fed.epochs, fed.lr, fed.exit_loss, fed.prox_mu) == (2, 0.05, "mean", 0.1)
    own = TrainSettings.from_config(cfg, personalize=True)
    assert (own.epochs, own.lr, own.exit_loss, own.prox_mu) == (4, 0.002, "mean", 0.0)
    # every key that names a setting names a real field
    fields = set(TrainSettings.__dataclass_fields__)
    assert {k.setting for k in KEYS if k.setting} <= fields


def test_defaults_validate():
    assert validate({}) == defaults()


@pytest.mark.parametrize(
    "override, key",
    [
        ({"num-server-rounds": 0}, "num-server-rounds"),
        ({"fraction-train": 1.5}, "fraction-train"),
        ({"tiers": "3,x"}, "tiers"),
        ({"tiers": "0,6"}, "tiers"),
        ({"tier-assignment": "0.5,0.2"}, "tier-assignment"),
        ({"exit-loss": "max"}, "exit-loss"),
        ({"lr": "fast"}, "lr"),
        ({"topk-fraction": 0}, "topk-fraction"),
        ({"num-server-round": 3}, "num-server-round"),
        ({"device": "tpu"}, "device"),
        ({"tiers": "3,,6"}, "tiers"),
        ({"attack-partitions": "1,x"}, "attack-partitions"),
        ({"tier-names": "phone,server"}, "tier-names"),  # 2 names, 4 tiers
        ({"tier-names": "a,,b,c"}, "tier-names"),
        ({"adapter-heads": 3}, "adapter-heads"),  # 32 wide
    ],
)
def test_bad_values_name_their_key(override, key):
    with pytest.raises(ConfigError) as err:
        validate(override)
    assert err.value.key == key
    assert f"'{key}'" in str(err.value)


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match="did you mean 'num-server-rounds'"):
        validate({"num-server-round": 3})


def test_ints_are_accepted_for_floats_but_not_bools_for_ints():
    assert validate({"lr": 1})["lr"] == 1.0
    with pytest.raises(ConfigError):
        validate({"local-epochs": True})


def test_depth_beyond_the_backbone_names_tiers():
    with pytest.raises(ConfigError, match="'tiers'.*outside 1..12"):
        check_depths(validate({"tiers": "3,6,13"}), 12)


def test_a_gpu_asked_for_on_a_machine_without_one_names_device():
    import torch

    from adapters.backbone import BackboneError
    from adapters.build import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(BackboneError, match="device: 'cuda:1' asked for"):
            resolve_device("cuda:1")


def test_every_list_key_goes_through_one_parser():
    assert comma_list(" 3, 6 ,9", int) == [3, 6, 9] and comma_list("") == [] and comma_list(" ") == []
    cfg = validate({"tiers": "3, 12", "tier-assignment": "0.75, 0.25", "tier-names": "phone, server"})
    assert parse_tiers(cfg) == [3, 12] and tier_fractions(cfg) == [0.75, 0.25]
    assert parse_tier_names(cfg) == ["phone", "server"] and tier_fractions(validate({})) is None
    assert parse_attackers(validate({"attack-partitions": "0, 3"})) == {0, 3}
    source = (ROOT / "core" / "config.py").read_text() + (ROOT / "client_app" / "tiers.py").read_text()
    assert source.count('split(",")') == 1


def test_cosine_round_lr():
    def lr(schedule, server_round, rounds):
        return round_lr(validate({"lr": 0.1, "lr-schedule": schedule, "num-server-rounds": rounds}), server_round)

    assert lr("constant", 7, 10) == 0.1
    lrs = [lr("cosine", r, 10) for r in range(1, 11)]
    assert lrs[0] == pytest.approx(0.1) and lrs[-1] == pytest.approx(0.005)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert lr("cosine", 5, 1) == 0.1  # one round: nothing to decay
    assert math.isfinite(lr("cosine", 12, 10))  # a personalisation round after the last
    cfg = validate({"lr": 0.1, "lr-schedule": "cosine", "num-server-rounds": 10})
    assert round_lr(cfg, 4, num_rounds=4) == pytest.approx(0.005)  # another horizon (central training's epochs)
    from adapters.training import TrainSettings

    assert TrainSettings.from_config(cfg, server_round=10).lr == pytest.approx(0.005)


@pytest.mark.parametrize(
    "user, key",
    [
        ({"tier-assignment": "0.5,0.5"}, "tier-assignment"),  # 2 fractions, 4 tiers
        ({"val-fraction": 1.0}, "val-fraction"),
        ({"num-server-round": 3}, "num-server-round"),
    ],
)
def test_config_mistakes_name_the_key(user, key):
    with pytest.raises(ConfigError) as err:
        validate(user)
    assert err.value.key == key
    one_line(str(err.value), key)
