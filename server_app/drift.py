"""What may change when a run is resumed, and what may not.

A checkpoint's adapters only mean something for the model and data split
they were trained on: keys that change either refuse the resume. The other
keys (rounds, learning rates, strategy settings, timeouts, ...) may change;
config.json records each change with the first round that used it.
"""

from __future__ import annotations

from typing import Any

from core.config import BEFORE_KEY, KEYS, ConfigError

# Change the model's shape or weights, or which examples a client holds:
# every key of the model and data groups, and which depth each client runs.
FIXED = (*(k.name for k in KEYS if k.group in ("model", "data")), "tiers", "tier-assignment")
# Name the run rather than configure it.
IDENTITY = ("output-dir", "run-name", "resume")


def compare(old: dict[str, Any], new: dict[str, Any], first_round: int) -> list[dict]:
    """The changes a resume may make, as config.json records them; ConfigError naming any fixed key changed."""
    old = {**BEFORE_KEY, **old}
    fixed = [k for k in FIXED if k in old and old[k] != new.get(k)]
    if fixed:
        shown = ", ".join(f"{k} {old[k]!r} -> {new.get(k)!r}" for k in fixed)
        raise ConfigError(
            fixed[0],
            f"cannot resume with a different model or data split ({shown}); set them back or start a new run-name",
        )
    return [
        {"round": first_round, "key": k, "before": old[k], "after": new[k]}
        for k in sorted(new)
        if k in old and k not in IDENTITY and old[k] != new[k]
    ]
