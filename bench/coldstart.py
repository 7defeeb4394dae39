"""Cold ClientApp message: wall time and peak memory of a fresh process.

A Flower 1.42 SuperNode starts a new `flwr-clientapp` process for every
message, so every train or evaluate message pays the ClientApp's start-up.
This runs bench/coldprobe.py (import the ClientApp, handle one train
message of the default task: partition 0 of 20, depth 3, one local epoch)
in fresh processes and reports, per source tree:

- first: the first message a node handles (its node cache empty);
- later: every later message (the node cache filled by the first);
- wall: from starting `python` to the reply being ready (exit: to the
  process's exit, which comes later);
- cpu: user + system CPU seconds to the reply (what other work on a shared
  machine inflates least);
- peak: the process's peak resident memory (ru_maxrss).

`--before DIR` measures another source tree too (e.g. the commit before the
node cache: `mkdir /tmp/base && git archive c99baa1 | tar -x -C /tmp/base`).
Runs alternate between trees. Nothing else should run on the machine.

    python bench/coldstart.py --before /tmp/base --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchkit import RESULTS, ROOT, Report, table

PROBE = Path(__file__).resolve().parent / "coldprobe.py"
RUN_CONFIG = {"local-epochs": 1}
NODE = {"partition-id": 0, "num-partitions": 20}


def server_arrays(tree: Path, out: Path) -> None:
    """The global adapter state the server sends in round 1, built by `tree`."""
    # Trees from before the layered layout keep these modules in anytime_fl/.
    config, models = (
        ("core.config", "runtime.models") if (tree / "core").is_dir() else ("anytime_fl.config", "anytime_fl.runtime")
    )
    code = (
        f"import sys, numpy as np; from {config} import validate; from {models} import initial_state;"
        f"np.savez(sys.argv[1], **initial_state(validate({RUN_CONFIG!r})))"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(out)], check=True, env=_env(tree, out.parent / "unused-cache"), cwd=tree
    )


def _env(tree: Path, cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # The default cache folder is under XDG_CACHE_HOME: a private one per
    # tree, so neither run sees the other's (or the user's) cache.
    return {**env, "PYTHONPATH": str(tree), "XDG_CACHE_HOME": str(cache), "OMP_NUM_THREADS": "1"}


def probe(tree: Path, arrays: Path, cache: Path, work: Path) -> dict:
    run_file, node_file = work / "run.json", work / "node.json"
    run_file.write_text(json.dumps(RUN_CONFIG))
    node_file.write_text(json.dumps(NODE))
    t0 = time.time()
    out = subprocess.run(
        [sys.executable, str(PROBE), str(arrays), str(run_file), str(node_file)],
        capture_output=True,
        text=True,
        env=_env(tree, cache),
        cwd=tree,
        timeout=600,
    )
    wall = time.time() - t0
    if out.returncode:
        raise SystemExit(f"probe in {tree} failed:\n{out.stderr[-3000:]}")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    # To the reply is what the SuperNode waits for; the process's exit
    # (freeing torch) comes after it.
    row["wall-s"] = round(row.pop("reply-at") - t0, 3)
    row["exit-s"] = round(wall, 3)
    return row


def summarise(rows: list[dict]) -> dict:
    return {
        "runs": len(rows),
        "wall-s-median": round(statistics.median(r["wall-s"] for r in rows), 2),
        "wall-s-max": round(max(r["wall-s"] for r in rows), 2),
        "exit-s-median": round(statistics.median(r["exit-s"] for r in rows), 2),
        "import-s-median": round(statistics.median(r["import-s"] for r in rows), 2),
        "handle-s-median": round(statistics.median(r["handle-s"] for r in rows), 2),
        "cpu-s-median": round(statistics.median(r["cpu-s"] for r in rows), 2),
        "peak-mb-median": round(statistics.median(r["peak-rss-mb"] for r in rows), 1),
        "peak-mb-max": round(max(r["peak-rss-mb"] for r in rows), 1),
        "heavy-modules": sorted({m for r in rows for m in r["heavy-modules"]}),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", help="another source tree to measure (the baseline)")
    ap.add_argument("--repeats", type=int, default=3, help="cold messages per tree and case")
    ap.add_argument("--out", default=str(RESULTS / "coldstart.json"))
    args = ap.parse_args()
    trees = {"after": ROOT}
    if args.before:
        trees = {"before": Path(args.before).resolve(), **trees}
    report = Report("coldstart", args)
    report["setup"] = {"run-config": RUN_CONFIG, "node-config": NODE, "task": "default (digits)", "depth": 3}
    with tempfile.TemporaryDirectory(prefix="coldstart-") as tmp:
        tmp = Path(tmp)
        arrays, runs = {}, {name: {"first": [], "later": []} for name in trees}
        for name, tree in trees.items():
            arrays[name] = tmp / f"{name}-arrays.npz"
            server_arrays(tree, arrays[name])
        for rep in range(args.repeats):
            order = list(trees) if rep % 2 == 0 else list(reversed(trees))
            for name in order:
                cache = tmp / f"{name}-cache-{rep}"  # empty: this node's first message
                runs[name]["first"].append(probe(trees[name], arrays[name], cache, tmp))
                runs[name]["later"].append(probe(trees[name], arrays[name], cache, tmp))
                print(name, rep, runs[name]["first"][-1], runs[name]["later"][-1], flush=True)
    summary = {f"{name} {case}": summarise(rows) for name, cases in runs.items() for case, rows in cases.items()}
    report["summary"] = summary
    report["runs"] = runs
    print(
        table(
            [{"tree / message": k, **v} for k, v in summary.items()],
            [
                "tree / message",
                "wall-s-median",
                "wall-s-max",
                "cpu-s-median",
                "import-s-median",
                "handle-s-median",
                "peak-mb-median",
                "peak-mb-max",
            ],
        )
    )
    report.write(args.out)


if __name__ == "__main__":
    main()
