"""Why the federated adapters stop improving: the same AnytimeViT trained by a
plain FedAvg loop or centrally, one lever changed per run, the closed-form
heads refitted after every round so that each row reads the adapters alone.

No Flower here (gap.py runs the real ServerApp): the loop is the client's own
`train_local`, a weighted mean of the deltas of the blocks each client runs,
and the server's ridge fit on the statistics of every client at its depth, so
that a sweep of levers takes minutes. A row is written to the JSON after
every round, so a run that is stopped keeps what it measured.

    python bench/plateau.py --name base --rounds 8
    python bench/plateau.py --name iid --rounds 8 --iid
    python bench/plateau.py --name central --central --rounds 3 --run-config local-epochs=1

Levers: `--iid` (the clients' training images pooled and dealt out at random:
no typeface per client), `--server-lr` (FedAvg's step on the mean delta),
`--keep-optimizer` (each client keeps its AdamW moments from round to round
instead of a fresh optimiser), `--sample K` (K random clients a round), and
any run-config key (`local-epochs`, `lr`, `token-adapter-width`, ...).
`--central` trains one model on the union of the training splits, a fresh
optimiser and a refit every `local-epochs` passes.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from benchkit import RESULTS, Report, parse_overrides
from torch.utils.data import ConcatDataset, DataLoader, TensorDataset

from adapters.build import build_model
from adapters.head_fit import exit_statistics, projections, solve_heads
from adapters.state import get_state, set_state, trainable_names
from adapters.training import TrainSettings, evaluate, local_optimizer, train_local
from client_app.tiers import tier_of
from core.config import defaults, ensemble_votes, parse_tiers, validate
from core.naming import sent_up_to
from fedtasks.task import load_partition, load_test
from runtime.models import model_and_spec


def pooled(parts, nodes: int, seed: int) -> list:
    """The clients' training images dealt out again at random, as many per client as before."""

    def arrays(ds, j):
        return ds.dataset.tensors[j][torch.as_tensor(ds.indices)] if hasattr(ds, "indices") else ds.tensors[j]

    xs = torch.cat([arrays(tr, 0) for tr, _ in parts])
    ys = torch.cat([arrays(tr, 1) for tr, _ in parts])
    perm = torch.randperm(len(ys), generator=torch.Generator().manual_seed(seed))
    sizes = [len(tr) for tr, _ in parts]
    out, start = [], 0
    for (_, va), n in zip(parts, sizes):
        idx = perm[start : start + n]
        out.append((TensorDataset(xs[idx], ys[idx]), va))
        start += n
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", required=True)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--nodes", type=int, default=20)
    ap.add_argument("--central", action="store_true")
    ap.add_argument("--iid", action="store_true")
    ap.add_argument("--server-lr", type=float, default=1.0)
    ap.add_argument("--keep-optimizer", action="store_true")
    ap.add_argument("--sample", type=int, default=0, help="clients a round (0 = all)")
    ap.add_argument(
        "--train-heads",
        choices=["", "random", "ridge"],
        default="",
        help="clients also train heads that the server averages and keeps from round to round, "
        "started at random or from a ridge fit at --train-heads-lambda; the refit only reads out",
    )
    ap.add_argument("--train-heads-lambda", type=float, default=1e-2)
    ap.add_argument(
        "--train-lambda",
        type=float,
        default=0.0,
        help="the adapters train against heads fitted at this ridge penalty each round (0 = the readout's)",
    )
    ap.add_argument("--run-config", nargs="*", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = validate({**defaults(), **parse_overrides(args.run_config)})
    if args.train_heads:
        cfg["heads"] = "ridge-init"  # so that train_local trains the heads too
    out = args.out or str(RESULTS / f"plateau_{args.name}.json")
    report = Report("plateau", args)
    report["config"] = {
        k: cfg[k]
        for k in ("task", "lr", "local-epochs", "batch-size", "tiers", "token-adapter-width", "heads", "head-features")
    }
    report["rows"] = rows = []

    base, spec = model_and_spec(cfg)
    torch.manual_seed(cfg["seed"])
    model = build_model(cfg, base.num_classes)
    nodes = args.nodes
    parts = [load_partition(cfg, spec, pid, nodes) for pid in range(nodes)]
    if args.iid:
        parts = pooled(parts, nodes, cfg["seed"])
    union = ConcatDataset([tr for tr, _ in parts])
    val = ConcatDataset([va for _, va in parts])
    test = load_test(cfg, spec)
    tiers = parse_tiers(cfg)
    # the nodes' own tier assignment (until 2026-12-07 this took contiguous blocks of partitions per
    # tier, not the run's partition-id modulo tiers); central training runs every block
    depths = [max(tiers) if args.central else tiers[tier_of(pid, nodes, cfg)] for pid in range(nodes)]
    bs = cfg["eval-batch-size"]
    names = trainable_names(model)
    t0 = time.time()

    def refit(lam: float = 0.0) -> None:
        sums, counts = {}, {}
        width = model.heads[0].fc.in_features
        k = cfg["head-features"] if 0 < cfg["head-features"] < width else width
        # the run's own projections (head-features): the current heads' span, then random directions
        proj = projections(get_state(model), max(depths), k, cfg["seed"])
        for pid in range(nodes):
            loader = DataLoader(parts[pid][0], batch_size=bs)
            s, n = exit_statistics(model, loader, depths[pid], proj[: depths[pid]])
            for k, v in s.items():
                sums[k] = sums.get(k, 0) + v.astype(np.float64)
            for i in range(depths[pid]):
                counts[i] = counts.get(i, 0) + n
        set_state(
            model,
            solve_heads(sums, counts, lam or cfg["ridge-lambda"], cfg["ridge-scale"], proj, votes=ensemble_votes(cfg)),
        )

    def record(r: int, when: str) -> None:
        t = np.array(evaluate(model, DataLoader(test, batch_size=bs), max(depths))["accuracy"])
        v = np.array(evaluate(model, DataLoader(val, batch_size=bs), max(depths))["accuracy"])
        rows.append(
            {
                "round": r,
                "heads": when,
                "test-mean": round(float(t.mean()), 4),
                "val-mean": round(float(v.mean()), 4),
                "test-per-exit": t.round(4).tolist(),
                "seconds": round(time.time() - t0, 1),
            }
        )
        print(f"{args.name} round {r} ({when}): test mean {t.mean():.4f}, val mean {v.mean():.4f}", flush=True)
        report.write(out)

    def heads_now() -> dict:
        return {k: v for k, v in get_state(model).items() if k.startswith("heads.")}

    if args.train_heads == "ridge":
        refit(args.train_heads_lambda)
    kept = heads_now()  # the heads clients train, with --train-heads
    refit()
    record(0, "fitted")
    optimisers: dict[int, object] = {}
    train_heads = bool(args.train_heads)
    for r in range(1, args.rounds + 1):
        if train_heads:
            set_state(model, kept)
        elif args.train_lambda:
            refit(args.train_lambda)
        if args.central:
            s = TrainSettings.from_config(cfg, server_round=r)
            gen = torch.Generator().manual_seed(cfg["seed"] + r)
            train_local(
                model, DataLoader(union, batch_size=cfg["batch-size"], shuffle=True, generator=gen), max(depths), s
            )
        else:
            start = get_state(model)
            sums, weights = {}, {}
            chosen = range(nodes)
            if 0 < args.sample < nodes:
                chosen = sorted(np.random.default_rng(1000 + r).choice(nodes, args.sample, replace=False).tolist())
            for pid in chosen:
                set_state(model, start)
                d, (tr, _) = depths[pid], parts[pid]
                s = TrainSettings.from_config(cfg, server_round=r)
                gen = torch.Generator().manual_seed(cfg["seed"] * 1000 + pid * 7 + r)
                loader = DataLoader(tr, batch_size=cfg["batch-size"], shuffle=True, generator=gen)
                opt = None
                if args.keep_optimizer:
                    if pid not in optimisers:
                        optimisers[pid] = local_optimizer(model, set(sent_up_to(names, d, train_heads)), s)[0]
                    opt = optimisers[pid]
                train_local(model, loader, d, s, opt)
                new = get_state(model)
                for k in sent_up_to(names, d, train_heads):
                    sums[k] = sums.get(k, 0) + len(tr) * (new[k].astype(np.float64) - start[k])
                    weights[k] = weights.get(k, 0) + len(tr)
            set_state(
                model,
                {**start, **{k: (start[k] + args.server_lr * sums[k] / weights[k]).astype(np.float32) for k in sums}},
            )
        if train_heads:
            kept = heads_now()
        record(r, "trained" if train_heads else "stale")
        refit()
        record(r, "refitted")
    report.write(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
