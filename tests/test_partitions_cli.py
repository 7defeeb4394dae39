"""`anytime-fl partitions`, the ServerApp's partition-stats.json, and the task presets."""

import csv
import json
from pathlib import Path

import pytest

from anytime_fl.cli import main as cli
from core.config import parse_run_config, validate
from core.run_files import PARTITION_STATS as FILE
from fedtasks.registry import TASKS
from server_app.results import write_partition_stats
from tests.task_fixtures import cfg, hf_cache, make_femnist_parquet  # noqa: F401 - fixture

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("hf_cache")


@pytest.fixture(scope="module")
def femnist_dir(tmp_path_factory, hf_cache):
    return make_femnist_parquet(tmp_path_factory.mktemp("femnist-cli"), writers=5)


def test_prints_a_table_and_writes_json_and_csv(femnist_dir, tmp_path, capsys):
    preset = tmp_path / "p.toml"
    preset.write_text('task = "femnist"\nseed = 1\n')
    out = tmp_path / "stats" / "fem"
    rc = cli(
        [
            "partitions",
            "--run-config",
            str(preset),
            "--run-config",
            f"data-dir='{femnist_dir}' seed=2",
            "--num-partitions",
            "4",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "femnist: 4 partitions" in printed and "writer_id" in printed
    doc = json.loads(out.with_suffix(".json").read_text())
    assert doc["settings"]["seed"] == 2  # the override wins over the preset
    assert [r["partition-id"] for r in doc["partitions"]] == [0, 1, 2, 3]
    assert all(sum(r["label-counts"]) == r["examples"] for r in doc["partitions"])
    assert len({r["writer_id"] for r in doc["partitions"]}) == 4
    rows = list(csv.DictReader(out.with_suffix(".csv").open()))
    assert len(rows) == 4 and "label-61" in rows[0]
    assert [int(r["examples"]) for r in rows] == [r["examples"] for r in doc["partitions"]]


def test_bad_input_is_one_line_naming_what(tmp_path, capsys):
    assert (
        cli(
            [
                "partitions",
                "--run-config",
                f"task='cifar100' data-dir='{tmp_path / 'gone'}'",
                "--num-partitions",
                "2",
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert str(tmp_path / "gone") in capsys.readouterr().err
    assert cli(["partitions", "--run-config", "tsk='femnist'", "--num-partitions", "2"]) == 2
    assert "'tsk'" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_server_hook_writes_into_the_run_dir(femnist_dir, tmp_path):
    path = write_partition_stats(cfg("femnist", femnist_dir), tmp_path, 3)
    assert path == tmp_path / FILE
    assert json.loads(path.read_text())["num-partitions"] == 3
    assert write_partition_stats(cfg("femnist", femnist_dir), tmp_path / "none", 0) is None


@pytest.mark.parametrize("name", ["cifar100", "femnist", "speechcommands"])
def test_presets_validate_and_name_their_task(name):
    c = validate(parse_run_config([str(ROOT / "presets" / f"{name}.toml")]))
    assert c["task"] == name and name in TASKS
    assert c["pretrained"] and c["backbone-weights"] == ""  # hub weights, not the shipped Fashion-MNIST ones
