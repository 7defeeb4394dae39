"""Shipped pre-trained backbone vs a randomly initialised frozen one, same federation.

Runs the default federated task twice through the real ServerApp round loop
and ClientApp code (in-process, no Ray, so the figures are the method's, not
the engine's) and prints test accuracy per exit. If the pre-trained backbone
does not win clearly, the pre-training / federated data pairing is wrong.

    python bench/pretrained_vs_random.py            # default run's size (25 rounds, 20 clients), ~9 min on 2 cores
    python bench/pretrained_vs_random.py --rounds 30 --nodes 50 --run-config "task='cifar100' ..."
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchkit import parse_overrides  # noqa: E402

from server_app import results  # noqa: E402
from server_app.app import run  # noqa: E402
from tests.localgrid import LocalGrid  # noqa: E402


def federate(cfg: dict, nodes: int) -> dict:
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = {**cfg, "output-dir": tmp, "run-name": "bench"}
        run_dir = run(LocalGrid(nodes, cfg), cfg)
        rows = results.read_rows(run_dir)
    last = rows[-1]
    return {
        "accuracy": last["server"]["accuracy"],
        "rounds": len(rows),
        "seconds": round(time.time() - t0, 1),
        "bytes-up-total": sum(r["bytes-up"] for r in rows),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--nodes", type=int, default=20)
    ap.add_argument("--run-config", nargs="*", default=[], metavar="OVERRIDES", help="extra run-config overrides")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "pretrained_vs_random.json"))
    args = ap.parse_args(argv)
    # Only the global model's test accuracy is compared: no federated
    # evaluation or personalisation round.
    base = {
        "num-server-rounds": args.rounds,
        "fraction-evaluate": 0.0,
        "personalize-epochs": 0,
        **parse_overrides(args.run_config),
    }
    report = {"config": base, "nodes": args.nodes}
    for label, weights in (("pretrained", base.get("backbone-weights", "shipped")), ("random", "")):
        print(f"== {label} backbone ==", flush=True)
        report[label] = federate({**base, "backbone-weights": weights}, args.nodes)
    width = len(report["pretrained"]["accuracy"])
    print("\nexit      " + " ".join(f"{i:>5d}" for i in range(1, width + 1)))
    for label in ("pretrained", "random"):
        print(f"{label:<10}" + " ".join(f"{a:5.2f}" for a in report[label]["accuracy"]))
    gain = [p - r for p, r in zip(report["pretrained"]["accuracy"], report["random"]["accuracy"])]
    print(f"{'gain':<10}" + " ".join(f"{g:+5.2f}" for g in gain))
    report["gain"] = gain
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
