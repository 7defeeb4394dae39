"""Where a run writes, and which earlier run `resume` continues."""

from __future__ import annotations

import json
import time
from pathlib import Path

from core.config import ConfigError

from . import checkpoint


def open_run_dir(cfg: dict) -> tuple[Path, dict | None]:
    """(run directory, checkpoint to resume from or None)."""
    root = Path(cfg["output-dir"]).expanduser().resolve()
    if cfg["resume"]:
        run_dir = root / cfg["run-name"] if cfg["run-name"] else _newest_with_checkpoint(root)
        state = checkpoint.load(run_dir) if run_dir else None
        if state is None:
            raise ConfigError("resume", f"no checkpoint to resume from under {run_dir or root}")
        return run_dir, state
    run_dir = root / (cfg["run-name"] or time.strftime("%Y%m%d-%H%M%S"))
    if (run_dir / checkpoint.NAME).exists():
        raise ConfigError("run-name", f"{run_dir} already holds a run; set resume=true to continue it or pick another run-name")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return run_dir, None


def _newest_with_checkpoint(root: Path) -> Path | None:
    runs = sorted((p for p in root.glob(f"*/{checkpoint.NAME}")), key=lambda p: p.stat().st_mtime)
    return runs[-1].parent if runs else None
