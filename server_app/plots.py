"""PNG plots of a run directory.

    anytime-fl plot RUN_DIR [--out DIR]

Reads what the server writes (results.jsonl, anytime.json,
personalization.json) and draws, for each input present:

- accuracy_per_exit.png: test accuracy of every exit over the rounds;
- accuracy_vs_cost.png: accuracy against FLOPs per input, for each fixed
  exit and for confidence-based early exit over thresholds;
- bytes_per_round.png: bytes sent up and down each round, against what
  the same clients would move fine-tuning the whole model (log scale);
- personalization_gain.png: accuracy gain of local fine-tuning per exit,
  mean with std bars and min/max marks over clients.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from core.run_files import ANYTIME, PERSONALIZATION
from server_app.results import RESULTS, read_rows


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: works with no display, on servers and in CI
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _exit_colors(plt, n: int):
    cmap = plt.get_cmap("viridis")
    return [cmap(i / max(n - 1, 1)) for i in range(n)]


def _integer_rounds(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_accuracy_per_exit(rows: list[dict], path: Path) -> Path | None:
    rows = [r for r in rows if r.get("server", {}).get("accuracy")]
    if not rows:
        return None
    plt = _pyplot()
    rounds = [r["round"] for r in rows]
    num_exits = max(len(r["server"]["accuracy"]) for r in rows)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, color in enumerate(_exit_colors(plt, num_exits)):
        acc = [r["server"]["accuracy"][i] if i < len(r["server"]["accuracy"]) else None for r in rows]
        ax.plot(rounds, acc, marker="o", ms=3, color=color, label=f"exit {i + 1}")
    ax.set(xlabel="round", ylabel="test accuracy", title="Global model: accuracy per exit", ylim=(0, 1))
    _integer_rounds(ax)
    ax.legend(ncol=2, fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_accuracy_vs_cost(anytime: dict, path: Path) -> Path | None:
    if not anytime.get("exits"):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    exits = anytime["exits"]
    ax.plot([e["flops"] / 1e6 for e in exits], [e["accuracy"] for e in exits], "o-", label="fixed exit")
    for e in exits:
        ax.annotate(
            str(e["exit"]), (e["flops"] / 1e6, e["accuracy"]), textcoords="offset points", xytext=(0, 5), fontsize=7
        )
    dyn = sorted(anytime.get("dynamic", []), key=lambda r: r["mean-flops"])
    if dyn:
        ax.plot(
            [r["mean-flops"] / 1e6 for r in dyn],
            [r["accuracy"] for r in dyn],
            "s--",
            ms=4,
            label="confidence-based early exit",
        )
    ax.set(xlabel="MFLOPs per input", ylabel="test accuracy", title="Anytime inference: accuracy vs cost")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_bytes(rows: list[dict], path: Path) -> Path | None:
    rows = [r for r in rows if "bytes-up" in r]
    if not rows:
        return None
    plt = _pyplot()
    rounds = [r["round"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(rounds, [max(r["bytes-up"], 1) for r in rows], "o-", label="up (clients to server)")
    ax.plot(rounds, [max(r.get("bytes-down", 0), 1) for r in rows], "s-", label="down (server to clients)")
    if any("full-finetune-bytes" in r for r in rows):
        full = [r.get("full-finetune-bytes", 0) * max(r.get("clients", 0), 1) for r in rows]
        ax.plot(rounds, full, "k--", label="full fine-tuning, each way")
    ax.set_yscale("log")
    ax.set(xlabel="round", ylabel="bytes per round", title="Communication per round")
    _integer_rounds(ax)
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)


def plot_personalization(pers: dict, path: Path) -> Path | None:
    exits = pers.get("exits") or []
    if not exits:
        return None
    plt = _pyplot()
    x = [e["exit"] for e in exits]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.bar(x, [e["gain-mean"] for e in exits], yerr=[e["gain-std"] for e in exits], capsize=3, label="mean ± std")
    ax.scatter(x, [e["gain-min"] for e in exits], marker="v", color="k", s=14, label="min / max")
    ax.scatter(x, [e["gain-max"] for e in exits], marker="^", color="k", s=14)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(
        xlabel="exit",
        ylabel="accuracy after - before",
        xticks=x,
        title=f"Personalisation gain over {pers.get('clients', '?')} clients (local epochs: {pers.get('epochs', '?')})",
    )
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def draw(run_dir: str | Path, out: str | Path | None = None) -> list[Path]:
    """Every plot the run directory has data for; returns the PNG paths written."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    out = Path(out) if out else run_dir
    out.mkdir(parents=True, exist_ok=True)
    try:
        rows = read_rows(run_dir)
    except json.JSONDecodeError as err:
        raise ValueError(f"{run_dir / RESULTS}: a line is not valid JSON ({err})") from err
    anytime = _read_json(run_dir / ANYTIME)
    pers = _read_json(run_dir / PERSONALIZATION)
    if not (rows or anytime or pers):
        raise FileNotFoundError(f"{run_dir}: none of {RESULTS}, {ANYTIME}, {PERSONALIZATION} to plot")
    written = [
        plot_accuracy_per_exit(rows, out / "accuracy_per_exit.png"),
        plot_accuracy_vs_cost(anytime, out / "accuracy_vs_cost.png"),
        plot_bytes(rows, out / "bytes_per_round.png"),
        plot_personalization(pers, out / "personalization_gain.png"),
    ]
    return [p for p in written if p is not None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="anytime-fl plot", description="Draw PNG plots of a run directory.")
    parser.add_argument("run_dir", help="a run directory (holds results.jsonl, anytime.json, personalization.json)")
    parser.add_argument("--out", default=None, help="folder for the PNG files (default: the run directory)")
    args = parser.parse_args(argv)
    try:
        paths = draw(args.run_dir, args.out)
    except (FileNotFoundError, ValueError) as err:
        print(f"anytime-fl plot: {err}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
