"""`anytime-fl check-config`: validate a run config before Flower sees it.

    anytime-fl check-config --run-config presets/cifar100.toml --run-config "data-dir='/data/cifar100'"
    anytime-fl check-config --run-config "num-server-rounds=3" --write merged.toml

Reads TOML presets and "key=value ..." overrides in the order given (later
ones win), checks them as the ServerApp would and prints the project's own
message for a mistake (Flower's is a bare "Invalid run configuration").
`--write FILE` saves the merged keys as one TOML file: `flwr run` refuses a
TOML file next to key=value overrides, so scripts/simulate.sh passes this one.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from core.config import ConfigError, check_attackers, check_heads_privacy, secagg_note, validate
from strategies.registry import build_strategy


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError("--run-config", f"{value!r} cannot be written as a run-config value")
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a TOML basic string


def to_toml(user: dict) -> str:
    return "".join(f"{key} = {toml_value(value)}\n" for key, value in user.items())


def main(argv: list[str] | None = None) -> int:
    from core.config import parse_run_config

    parser = argparse.ArgumentParser(prog="anytime-fl check-config", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--run-config",
        "-c",
        action="append",
        default=[],
        metavar="TOML_OR_OVERRIDES",
        help='a TOML preset and/or "key=value ..." overrides (repeatable, later ones win)',
    )
    parser.add_argument(
        "--write", metavar="FILE", help="save the merged keys as one TOML file for `flwr run --run-config FILE`"
    )
    parser.add_argument(
        "--num-nodes",
        type=int,
        default=None,
        help="the federation's size when known (simulation: num-supernodes): min-nodes must not exceed it",
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="print nothing when the config is good")
    args = parser.parse_args(argv)
    try:
        user = parse_run_config(args.run_config)
        cfg = validate(user)
        # Built as the ServerApp builds it: a bad class or argument is named here, before Flower starts.
        build_strategy(cfg["strategy"], cfg)
        check_heads_privacy(cfg)
        if args.num_nodes is not None and cfg["min-nodes"] > args.num_nodes:
            raise ConfigError(
                "min-nodes",
                f"is {cfg['min-nodes']} but the federation has {args.num_nodes} nodes "
                "(NUM_SUPERNODES / num-supernodes); the run would wait for nodes that never come",
            )
        if args.num_nodes is not None:
            check_attackers(cfg, args.num_nodes)
        text = to_toml(user)
        if args.write:
            try:
                Path(args.write).expanduser().write_text(text)
            except OSError as err:
                raise ConfigError("--write", f"cannot write {args.write}: {err.strerror or err}") from None
    except ConfigError as err:
        print(f"anytime-fl check-config: {err}", file=sys.stderr)
        return 2
    note = secagg_note(cfg)
    if note:  # a warning, so even --quiet says it
        print(f"anytime-fl check-config: warning: {note}", file=sys.stderr)
    if not args.quiet:
        print(f"run config OK ({len(user)} keys set, the others at their defaults)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
