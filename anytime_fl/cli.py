"""`anytime-fl` command line: one entry point, a subcommand per tool."""

from __future__ import annotations

import importlib
import sys

# subcommand -> module whose main(argv) implements it
COMMANDS = {
    "pretrain": ("anytime_fl.pretrain", "pre-train the offline backbone on Fashion-MNIST"),
    "predict": ("anytime_fl.predict", "predict for images/audio at an exit or with a confidence threshold"),
    "plot": ("server_app.plots", "draw PNG plots of a run directory"),
    "partitions": ("anytime_fl.partitions", "print and save examples and classes per client of a task"),
    "deploy-run": ("anytime_fl.deployrun", "flwr run on a deployment, resumed by itself after a SuperLink restart"),
    "check-config": ("anytime_fl.checkconfig", "check a run config (TOML presets + key=value overrides) before a run"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"anytime-fl: unknown command {argv[0]!r}", file=sys.stderr)
        print("usage: anytime-fl <command> [options]\n\ncommands:")
        for name, (_, doc) in COMMANDS.items():
            print(f"  {name:<12} {doc}")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
