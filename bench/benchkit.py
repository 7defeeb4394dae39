"""What every benchmark script shares: the machine it ran on, tables, JSON output.

Timings on a shared machine are noisy, so every report records the load
average at its start and end; compare ratios measured in one run, not
absolute times across runs.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    for line in out.splitlines():
        if line.lower().startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine() -> dict:
    import torch

    info = {
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "torch-threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def load() -> list[float]:
    """1, 5 and 15 minute load averages: above the core count, timings are shared."""
    return [round(x, 2) for x in os.getloadavg()]


class Report:
    """A benchmark's JSON report: machine, load at start and end, wall time."""

    def __init__(self, name: str, args) -> None:
        self.name = name
        self.t0 = time.time()
        self.data: dict = {
            "benchmark": name,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "args": {k: v for k, v in vars(args).items() if k != "out"},
            "machine": machine(),
            "load-start": load(),
        }

    def __setitem__(self, key, value) -> None:
        self.data[key] = value

    def write(self, out: str | Path) -> Path:
        self.data["load-end"] = load()
        self.data["wall-seconds"] = round(time.time() - self.t0, 1)
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.data, indent=2) + "\n")
        print(
            f"load average (1/5/15 min): start {self.data['load-start']}, end {self.data['load-end']}; "
            f"{self.data['wall-seconds']} s; written {path}"
        )
        return path


def table(rows: list[dict], columns: list[str]) -> str:
    """A markdown table (prints readably and pastes into the README)."""
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    line = lambda xs: "| " + " | ".join(x.ljust(w) for x, w in zip(xs, widths)) + " |"  # noqa: E731
    return "\n".join([line(columns), "| " + " | ".join("-" * w for w in widths) + " |", *map(line, cells)])


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


# key=word (an unquoted word) as key='word': benchmark command lines, unlike
# `flwr run`, take bare strings such as optimizer=sgd.
_BARE = re.compile(r"(?<![\w'\"])([\w-]+)=([A-Za-z_][^\s'\"]*)")


def parse_overrides(items: list[str]) -> dict:
    """--run-config values as `flwr run` reads them (TOML files and/or "key=value ..."), bare words as strings."""
    from core.config import ConfigError, parse_run_config

    quoted = [
        i if i.endswith(".toml") else _BARE.sub(lambda m: m[0] if m[2] in ("true", "false") else f"{m[1]}='{m[2]}'", i)
        for i in items
    ]
    try:
        return parse_run_config(quoted)
    except ConfigError as err:
        raise SystemExit(str(err)) from None
