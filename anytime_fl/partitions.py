"""`anytime-fl partitions`: how a task is split over the clients, before training.

    anytime-fl partitions --run-config presets/cifar100.toml --num-partitions 100
    anytime-fl partitions --run-config "task='femnist' data-dir='/data/femnist'" --num-partitions 20

prints examples and classes per partition and writes them to
`<out>.json` and `<out>.csv`. `--run-config` takes what `flwr run` takes:
a TOML file and/or "key=value ..." overrides (strings in quotes), applied in
the order given on top of the defaults.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from core.config import ConfigError, parse_run_config, validate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="anytime-fl partitions", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--run-config",
        action="append",
        default=[],
        metavar="TOML_OR_OVERRIDES",
        help='a TOML preset and/or "key=value ..." overrides (repeatable)',
    )
    parser.add_argument(
        "--num-partitions",
        type=int,
        required=True,
        help="number of clients (in simulation: the federation's number of supernodes)",
    )
    parser.add_argument(
        "--out",
        default="partition-stats",
        help="path prefix of the JSON and CSV files written (default: ./partition-stats)",
    )
    args = parser.parse_args(argv)

    # Imported here: `anytime-fl --help` stays fast without torch and datasets.
    from fedtasks.base import DataError
    from fedtasks.stats import document, table, write_csv, write_json

    try:
        if args.num_partitions < 1:
            raise ConfigError("--num-partitions", f"must be >= 1, got {args.num_partitions}")
        cfg = validate(parse_run_config(args.run_config))
        try:
            doc = document(cfg, args.num_partitions)
        except ValueError as err:  # the partitioner's own complaint, e.g. more partitions than it can fill
            if isinstance(err, (ConfigError, DataError)):
                raise
            raise ConfigError(
                "--num-partitions", f"cannot split task {cfg['task']!r} into {args.num_partitions} partitions: {err}"
            ) from None
        out = Path(args.out).expanduser()
        paths = [out.with_name(out.name + ".json"), out.with_name(out.name + ".csv")]
        try:
            write_json(doc, paths[0])
            write_csv(doc, paths[1])
        except OSError as err:
            raise ConfigError("--out", f"cannot write {err.filename or out}: {err.strerror or err}") from None
    except (ConfigError, DataError) as err:
        print(f"anytime-fl partitions: {err}", file=sys.stderr)
        return 2
    print(table(doc))
    print("wrote " + " and ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
