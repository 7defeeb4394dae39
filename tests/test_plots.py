"""`anytime-fl plot RUN_DIR`: PNG files from a small hand-made results directory."""

import json

import pytest

from server_app import plots, results
from server_app.finish import draw_plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ALL = {"accuracy_per_exit.png", "accuracy_vs_cost.png", "bytes_per_round.png", "personalization_gain.png"}


def _row(r):
    return {
        "round": r,
        "server": {"accuracy": [0.2 + 0.1 * r, 0.3 + 0.1 * r, 0.35 + 0.1 * r], "loss": [1.0, 0.9, 0.8]},
        "clients": 2,
        "bytes-up": 1000 * r,
        "bytes-down": 3000,
        "full-finetune-bytes": 10**6,
    }


@pytest.fixture
def run_dir(tmp_path):
    for r in (1, 2, 3):
        results.append_row(tmp_path, _row(r))
    anytime = {
        "exits": [
            {"exit": i, "blocks": i, "accuracy": a, "flops": 10**6 * i} for i, a in ((1, 0.5), (2, 0.6), (3, 0.65))
        ],
        "dynamic": [
            {"threshold": t, "accuracy": a, "mean-flops": f, "mean-blocks": f / 1e6, "exit-counts": [1, 1, 1]}
            for t, a, f in ((0.0, 0.5, 1e6), (0.9, 0.62, 1.5e6), (1.0, 0.65, 3e6))
        ],
    }
    (tmp_path / plots.ANYTIME).write_text(json.dumps(anytime))
    pers = {
        "clients": 2,
        "epochs": 1,
        "exits": [
            {"exit": i, "clients": 2, "gain-mean": g, "gain-std": 0.02, "gain-min": g - 0.03, "gain-max": g + 0.03}
            for i, g in ((1, 0.1), (2, 0.05), (3, -0.01))
        ],
    }
    (tmp_path / plots.PERSONALIZATION).write_text(json.dumps(pers))
    return tmp_path


def _assert_pngs(paths, names):
    assert {p.name for p in paths} == names
    for p in paths:
        data = p.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000, p


def test_plot_command_writes_every_plot_as_a_non_empty_png(run_dir, capsys):
    assert plots.main([str(run_dir)]) == 0
    printed = capsys.readouterr().out.split()
    _assert_pngs([run_dir / name for name in ALL], ALL)
    assert sorted(printed) == sorted(str(run_dir / name) for name in ALL)


def test_plots_cover_only_what_the_run_directory_holds(run_dir, tmp_path):
    (run_dir / plots.PERSONALIZATION).unlink()
    (run_dir / plots.ANYTIME).unlink()
    out = tmp_path / "figures"
    _assert_pngs(plots.draw(run_dir, out), {"accuracy_per_exit.png", "bytes_per_round.png"})


def test_plot_command_names_a_directory_without_results(tmp_path, capsys):
    assert plots.main([str(tmp_path)]) == 2
    assert str(tmp_path) in capsys.readouterr().err
    (tmp_path / results.RESULTS).write_text("{not json\n")
    assert plots.main([str(tmp_path)]) == 2
    assert "results.jsonl" in capsys.readouterr().err


def test_a_failing_plot_costs_the_server_no_results(run_dir, monkeypatch):
    before = (run_dir / results.RESULTS).read_text()

    def broken(*_):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(plots, "draw", broken)
    assert draw_plots(run_dir) == []
    assert (run_dir / results.RESULTS).read_text() == before
