"""The `anytime-fl` command line: check-config, and one-line errors of its subcommands."""

from __future__ import annotations

from pathlib import Path

import pytest

from anytime_fl import predict, pretrain
from anytime_fl.cli import main as cli
from tests.checks import one_line
from tests.test_pretrain import fake_fmnist  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]


def test_check_config_gives_the_projects_message_and_merges_presets_with_overrides(tmp_path, capsys):
    assert cli(["check-config", "--run-config", "num-server-round=3"]) == 2
    one_line(capsys.readouterr().err, "num-server-round", "did you mean 'num-server-rounds'")
    merged = tmp_path / "m.toml"
    # The README's offline recipe: a preset plus an override, later wins.
    assert (
        cli(
            [
                "check-config",
                "--run-config",
                str(ROOT / "presets/cifar100.toml"),
                "--run-config",
                "data-dir='/data/cifar100' num-server-rounds=2",
                "--write",
                str(merged),
            ]
        )
        == 0
    )
    from flwr.common.config import parse_config_args

    got = parse_config_args([str(merged)])
    assert got["task"] == "cifar100" and got["data-dir"] == "/data/cifar100" and got["num-server-rounds"] == 2
    assert got["pretrained"] is True and got["fraction-train"] == 0.1
    assert cli(["check-config", "--run-config", "seed=1", "--write", str(tmp_path / "no" / "such" / "m.toml")]) == 2
    one_line(capsys.readouterr().err, "--write", str(tmp_path / "no" / "such"))


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--threshold", "-1"], "--threshold"),
        (["--threshold", "nan"], "--threshold"),
        (["--threshold", "1.5"], "--threshold"),
        (["--max-depth", "0"], "--max-depth"),
    ],
)
def test_predict_refuses_bad_threshold_and_depth(tmp_path, capsys, args, needle):
    assert predict.main([str(tmp_path), str(tmp_path / "x.png"), *args]) == 2
    one_line(capsys.readouterr().err, needle)


def test_pretrain_exits_0_and_never_overwrites_without_force(tmp_path, capsys):
    out = tmp_path / "w.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(SystemExit) as exc:
        pretrain.main(["--out", str(out), "--epochs", "1"])
    assert exc.value.code == 2 and out.read_bytes() == b"keep me"
    one_line(capsys.readouterr().err, str(out), "--force")
    with pytest.raises(SystemExit) as exc:
        pretrain.main(["--epochs", "1"])  # the default --out is the shipped backbone
    assert exc.value.code == 2
    one_line(capsys.readouterr().err, "shipped")


def test_pretrain_cli_returns_0_on_success(tmp_path, fake_fmnist):
    out = tmp_path / "w.safetensors"
    args = ["--out", str(out), "--epochs", "1", "--batch-size", "32", "--train-limit", "64"]
    args += ["--data-dir", str(fake_fmnist)]
    assert cli(["pretrain", *args]) == 0 and out.is_file()
    assert cli(["pretrain", *args, "--force"]) == 0


def test_partitions_too_many_or_unwritable_out_is_one_line(tmp_path, capsys):
    assert cli(["partitions", "--num-partitions", "5000", "--out", str(tmp_path / "s")]) == 2
    one_line(capsys.readouterr().err, "--num-partitions", "5000")
    assert not (tmp_path / "s.json").exists()
    assert cli(["partitions", "--num-partitions", "2", "--out", "/proc/anytime-fl-13/s"]) == 2
    one_line(capsys.readouterr().err, "--out", "/proc/anytime-fl-13")
