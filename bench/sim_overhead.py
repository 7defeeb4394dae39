"""What Flower's simulation engine adds: `flwr run` vs the same rounds in a plain loop.

Both sides run the project's real ServerApp round loop and ClientApp code on
the same run config (default task, `fraction-evaluate = 0`, no
personalisation round, so the work is exactly the R training rounds plus
the server's evaluation):

- flower: `flwr run . --stream` in a subprocess with its own `FLWR_HOME`
  (a temporary folder), `FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`,
  its own local SuperLink on free ports (so a SuperLink another user left
  running is not reused), N simulated supernodes, Ray backend, 1 CPU per
  client, so as many clients train at once as there are cores; the
  SuperLink it starts is stopped afterwards;
- flower-serial: the same with Ray given one CPU: one client at a time,
  as in the plain loop, so the difference is the engine's overhead alone;
- plain loop: `server_app.app.run(LocalGrid(N, cfg), cfg)` in a fresh
  subprocess: the same handlers called one after another, no Ray, no
  SuperLink, no serialisation.

Every client uses `client-threads` torch threads (1 by default) on every
side. Reported: wall time of each (process start to finish), the sum of
the per-round times the server logged (round loop only, start-up
excluded), the same without round 1 (in which Ray starts its workers),
and their ratios to the plain loop, taken within a repeat. Sides are
interleaved (A B C, C B A, ...).

    python bench/sim_overhead.py                          # 20 nodes, 3 rounds; ~4 min on 2 cores
    python bench/sim_overhead.py --nodes 100 --rounds 10 --cpus-per-client 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchkit import RESULTS, ROOT, Report, parse_overrides, table

from tests.private_flower import private_flower


def toml_value(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, str):
        return "'" + v.replace("'", "") + "'"
    return repr(v)


def round_seconds(run_dir: Path) -> list[float]:
    from server_app import results

    return [r["seconds"] for r in results.read_rows(run_dir)]


def run_flower(cfg: dict, nodes: int, cpus: int, out_dir: Path, timeout: float, ray_cpus: int = 0) -> dict:
    run_cfg = {**cfg, "output-dir": str(out_dir), "run-name": "flower"}
    overrides = " ".join(f"{k}={toml_value(v)}" for k, v in run_cfg.items())
    federation = f"num_supernodes={nodes} client_resources_num_cpus={cpus} client_resources_num_gpus=0.0"
    if ray_cpus:
        federation += f" init_args_num_cpus={ray_cpus}"
    cmd = ["flwr", "run", str(ROOT), "--stream", "--run-config", overrides, "--federation-config", federation]
    home = Path(tempfile.mkdtemp(prefix="bench-flwr-home-"))
    t0 = time.perf_counter()
    try:
        with private_flower(home) as env:
            proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        wall = time.perf_counter() - t0
    finally:
        shutil.rmtree(home, ignore_errors=True)
    rounds = round_seconds(out_dir / "flower")
    if proc.returncode or len(rounds) != cfg["num-server-rounds"]:
        raise RuntimeError(
            f"flwr run failed (rc {proc.returncode}, {len(rounds)} rounds written):\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}"
        )
    return {"wall-s": wall, "round-s": rounds}


def run_loop(cfg: dict, nodes: int, out_dir: Path, timeout: float) -> dict:
    job = {"cfg": {**cfg, "output-dir": str(out_dir), "run-name": "loop"}, "nodes": nodes}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(job)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    wall = time.perf_counter() - t0
    rounds = round_seconds(out_dir / "loop")
    if proc.returncode or len(rounds) != cfg["num-server-rounds"]:
        raise RuntimeError(f"plain loop failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return {"wall-s": wall, "round-s": rounds}


def worker(job: dict) -> None:
    from server_app.app import run
    from tests.localgrid import LocalGrid

    run(LocalGrid(job["nodes"], job["cfg"]), job["cfg"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=20, help="simulated clients (supernodes)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2, help="runs of each, interleaved")
    ap.add_argument("--cpus-per-client", type=int, default=1, help="Ray client resources (num-cpus)")
    ap.add_argument(
        "--run-config", nargs="*", default=[], metavar="OVERRIDES", help="run-config overrides for both sides"
    )
    ap.add_argument("--timeout", type=float, default=900, help="seconds one run may take")
    ap.add_argument("--out", default=str(RESULTS / "sim_overhead.json"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    from core.config import ConfigError, validate

    cfg = {
        "num-server-rounds": args.rounds,
        "fraction-evaluate": 0.0,
        "personalize-epochs": 0,
        **parse_overrides(args.run_config),
    }
    try:
        validate(cfg)
    except ConfigError as err:
        raise SystemExit(str(err))
    if shutil.which("flwr") is None:
        raise SystemExit("the `flwr` command is not on PATH: install the project (pip install -e .)")
    report = Report("sim_overhead", args)
    report["config"] = cfg
    sides = {
        "loop": (
            "plain loop (LocalGrid, one client at a time)",
            lambda out: run_loop(cfg, args.nodes, out, args.timeout),
        ),
        "flower-serial": (
            "flwr run, Ray with 1 CPU (one client at a time)",
            lambda out: run_flower(cfg, args.nodes, args.cpus_per_client, out, args.timeout, ray_cpus=1),
        ),
        "flower": (
            f"flwr run, Ray with all {os.cpu_count()} CPUs ({args.cpus_per_client} per client)",
            lambda out: run_flower(cfg, args.nodes, args.cpus_per_client, out, args.timeout),
        ),
    }
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    with tempfile.TemporaryDirectory(prefix="bench-sim-") as tmp:
        for rep in range(args.repeats):
            for side in list(sides) if rep % 2 == 0 else list(sides)[::-1]:
                out_dir = Path(tmp) / f"{side}-{rep}"
                load = os.getloadavg()[0]
                res = sides[side][1](out_dir)
                res.update(repeat=rep, **{"load-before": round(load, 2), "load-after": round(os.getloadavg()[0], 2)})
                runs[side].append(res)
                print(
                    f"  {side:<13} rep {rep}: wall {res['wall-s']:.1f} s, rounds {sum(res['round-s']):.1f} s "
                    f"({', '.join(f'{s:.1f}' for s in res['round-s'])}), load {load:.1f}",
                    flush=True,
                )
    picks = {
        "wall": lambda r: r["wall-s"],
        "rounds": lambda r: sum(r["round-s"]),
        # round 1 includes Ray starting its worker processes; later rounds are steady state
        "later-rounds": lambda r: sum(r["round-s"][1:]),
    }
    rows, ratios = [], {}
    for side, (label, _) in sides.items():
        row = {"side": label, "key": side}
        for key, pick in picks.items():
            row[f"{key}-s"] = statistics.median(pick(r) for r in runs[side])
            row[f"{key}-ratio"] = statistics.median(
                pick(a) / pick(b) if pick(b) > 0 else float("nan") for a, b in zip(runs[side], runs["loop"])
            )
        ratios[side] = {k: row[f"{k}-ratio"] for k in picks}
        rows.append(row)
    print(f"\n{args.nodes} nodes, {args.rounds} rounds, fraction-train {validate(cfg)['fraction-train']}:")
    print(
        table(
            rows, ["side", "wall-s", "wall-ratio", "rounds-s", "rounds-ratio", "later-rounds-s", "later-rounds-ratio"]
        )
    )
    print("(ratio: the side's time / the plain loop's, same repeat)")
    report["runs"] = runs
    report["rows"] = rows
    report["ratios-to-loop"] = ratios
    report.write(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
