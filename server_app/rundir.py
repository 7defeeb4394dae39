"""Where a run writes, and which earlier run `resume` continues."""

from __future__ import annotations

import json
import time
from pathlib import Path

from core.config import ConfigError
from core.run_files import CONFIG

from . import checkpoint, drift, lock, results


def open_run_dir(cfg: dict) -> tuple[Path, dict | None]:
    """(run directory, checkpoint to resume from or None), locked for this run.

    Nothing in the folder is written before every check has passed.
    """
    root = Path(cfg["output-dir"]).expanduser().resolve()
    if root.exists() and not root.is_dir():
        raise ConfigError("output-dir", f"{root} is a file, not a folder")
    if cfg["resume"]:
        run_dir = root / cfg["run-name"] if cfg["run-name"] else _newest_with_checkpoint(root)
        if run_dir is None or not run_dir.is_dir():
            raise ConfigError("resume", f"no checkpoint to resume from under {run_dir or root}")
        lock.acquire(run_dir)
        try:
            state = checkpoint.load(run_dir)
        except checkpoint.CheckpointError as err:
            raise ConfigError("resume", str(err)) from None
        if state is None:
            raise ConfigError("resume", f"no checkpoint to resume from under {run_dir}")
        try:
            results.rows_to_resume(run_dir, state["round"], state["meta"].get("row"))
        except results.RowsLost as err:
            raise ConfigError("resume", str(err)) from None
        old = state["meta"].get("config") or _read_config(run_dir)
        changes = drift.compare(old, cfg, state["round"] + 1) if old else []
        history = _read_config(run_dir).get("changes", [])
        _write_config(run_dir, {**cfg, "changes": history + changes})
        return run_dir, state
    run_dir = root / (cfg["run-name"] or time.strftime("%Y%m%d-%H%M%S"))
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError("output-dir", f"cannot create the run folder {run_dir}: {err.strerror or err}") from None
    _check_writable(run_dir)
    lock.acquire(run_dir)
    if (run_dir / checkpoint.NAME).exists():
        raise ConfigError(
            "run-name", f"{run_dir} already holds a run; set resume=true to continue it or pick another run-name"
        )
    _write_config(run_dir, cfg)
    return run_dir, None


def _check_writable(run_dir: Path) -> None:
    probe = run_dir / ".write-test"
    try:
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError("output-dir", f"cannot write in {run_dir}: {err.strerror or err}") from None


def _read_config(run_dir: Path) -> dict:
    try:
        data = json.loads((run_dir / CONFIG).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_config(run_dir: Path, data: dict) -> None:
    try:
        (run_dir / CONFIG).write_text(json.dumps(data, indent=2, sort_keys=True))
    except OSError as err:
        raise ConfigError("output-dir", f"cannot write {run_dir / CONFIG}: {err.strerror or err}") from None


def _newest_with_checkpoint(root: Path) -> Path | None:
    runs = sorted((p for p in root.glob(f"*/{checkpoint.NAME}")), key=lambda p: p.stat().st_mtime)
    return runs[-1].parent if runs else None
