"""The federation gap on the exit heads alone, lever by lever, in seconds.

The 12 LayerNorm+linear exit heads on the frozen blocks' CLS features (the
digits task, the default until issue 21, 20 clients, Dirichlet 0.5): a convex problem that
loses as much to federation as the whole AnytimeViT does (docs/benchmarks.md).
Features are computed once; each experiment is then seconds of CPU, so
every lever the literature offers can be tried at the full run length:

    python bench/heads_levers.py                      # every lever, 15 rounds x 3 local epochs

Experiments (the `--exp` names): central training on the union; FedAvg with
AdamW or SGD (momentum) at several rates; fewer/more local epochs; server
momentum; SCAFFOLD's control variates; restricted softmax (a client's
absent classes left out of its loss); near-IID clients (the same images
dealt at random); and the closed form: ridge regression from summed
statistics, the same for any split of the data, also with tiers 3/6/9/12
(a deep exit fitted on the deep clients alone) and read with the exit
ensemble (exit k = mean logits of exits 1..k). `--patch-mean` gives every
head the block's mean patch token beside its CLS token (`exit-patch-mean`).
Validation (the clients' pooled validation splits) chooses; test is
reported beside it.

    python bench/heads_levers.py --exp ridge-1e-6-tiers --exp ridge-1e-6-tiers-ensemble \
        --out bench/results/heads_levers_tiers.json
    python bench/heads_levers.py --patch-mean --exp ridge-1e-6 --exp ridge-1e-6-ensemble \
        --exp ridge-1e-6-tiers --exp ridge-1e-6-tiers-ensemble --out bench/results/heads_levers_patch.json
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from benchkit import RESULTS, Report, table

from adapters.head_fit import CROSS, GRAM, solve_heads, stat_name
from core.config import validate
from fedtasks.task import load_partition, load_test
from runtime.models import model_and_spec

EXITS, CLASSES = 12, 10
SCALES = (1, 2, 4, 8, 12, 16, 24, 32)


def features(nodes: int, patch_mean: bool = False):
    """Per client (train, val) and the test set, as (CLS features (N, 12, D), labels).

    With `patch_mean`, [LayerNorm(cls), LayerNorm(mean patch token)] (N, 12, 2D), what the
    exits read with `exit-patch-mean`: the halves already normalised, the heads' LayerNorm
    over the whole vector leaves them as they are.
    """
    from accuracy import build_baseline
    from peers import cls_features

    cfg = validate({"tiers": "12", "task": "digits"})  # the measurements of docs/benchmarks.md sections 1-2c
    model, spec = model_and_spec(cfg)
    backbone = build_baseline(cfg, "head", model.num_classes).backbone

    def feats(ds):
        x, y = cls_features(backbone, ds, 256, patch_mean).tensors
        if patch_mean:
            x = torch.cat([F.layer_norm(h, (h.shape[-1],)) for h in x.chunk(2, dim=-1)], dim=-1)
        return x, y

    parts = []
    for pid in range(nodes):
        tr, va = load_partition(cfg, spec, pid, nodes)
        parts.append((feats(tr), feats(va)))
    return parts, feats(load_test(cfg, spec))


def init_heads(dim: int, seed: int) -> dict[str, torch.Tensor]:
    """nn.Linear's initialisation, for all 12 heads at once (LayerNorm affine at 1/0)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.empty(EXITS, CLASSES, dim)
    for i in range(EXITS):
        torch.nn.init.kaiming_uniform_(w[i], a=math.sqrt(5), generator=g)
    return {
        "g": torch.ones(EXITS, dim),
        "b0": torch.zeros(EXITS, dim),
        "W": w.transpose(1, 2),
        "b": torch.zeros(EXITS, CLASSES),
    }


def logits(p, f):
    h = F.layer_norm(f, (f.shape[-1],)) * p["g"] + p["b0"]
    return torch.einsum("bld,ldc->blc", h, p["W"]) + p["b"]


def accuracy(p, data, ensemble: bool = False) -> list[float]:
    """Per exit; with `ensemble`, exit k predicts the mean logits of exits 1..k (`exit-ensemble`)."""
    x, y = data
    with torch.no_grad():
        z = logits(p, x)
        if ensemble:
            z = z.cumsum(1)
        return (z.argmax(-1) == y[:, None]).float().mean(0).tolist()


def local(p, x, y, *, opt, lr, epochs, bs, seed, correction=None, restrict=False):
    """Local training of all heads; returns the new heads and the steps taken."""
    q = {k: v.clone().requires_grad_(True) for k, v in p.items()}
    params = list(q.values())
    if opt == "adamw":
        o = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    else:
        o = torch.optim.SGD(params, lr=lr, momentum=0.9 if opt == "sgdm" else 0.0, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    present = torch.bincount(y, minlength=CLASSES) > 0
    steps = 0
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), bs):
            idx = perm[i : i + bs]
            z = logits(q, x[idx])
            if restrict:
                z = z.masked_fill(~present, -1e4)
            loss = F.cross_entropy(z.reshape(-1, CLASSES), y[idx].repeat_interleave(EXITS)) * EXITS
            o.zero_grad()
            loss.backward()
            if correction is not None:
                for k in q:
                    q[k].grad += correction[k]
            o.step()
            steps += 1
    return {k: v.detach() for k, v in q.items()}, steps


def fedavg(parts, *, rounds, opt, lr, epochs, bs, seed, server="avg", scaffold=False, restrict=False):
    p = init_heads(parts[0][0][0].shape[-1], seed)
    zeros = lambda: {k: torch.zeros_like(v) for k, v in p.items()}  # noqa: E731
    c, ci, momentum = zeros(), [zeros() for _ in parts], zeros()
    for r in range(1, rounds + 1):
        total, n, dc = zeros(), 0, zeros()
        for i, ((x, y), _) in enumerate(parts):
            corr = {k: c[k] - ci[i][k] for k in p} if scaffold else None
            q, steps = local(
                p,
                x,
                y,
                opt=opt,
                lr=lr,
                epochs=epochs,
                bs=bs,
                seed=seed * 1000 + i * 31 + r,
                correction=corr,
                restrict=restrict,
            )
            if scaffold:  # SCAFFOLD option II
                for k in p:
                    new = ci[i][k] - c[k] + (p[k] - q[k]) / (steps * lr)
                    dc[k] += (new - ci[i][k]) / len(parts)
                    ci[i][k] = new
            for k in p:
                total[k] += len(y) * q[k]
            n += len(y)
        delta = {k: total[k] / n - p[k] for k in p}
        if scaffold:
            for k in p:
                c[k] += dc[k]
        if server == "avgm":
            for k in p:
                momentum[k] = 0.9 * momentum[k] + delta[k]
            delta = momentum
        p = {k: p[k] + delta[k] for k in p}
    return p


def central(parts, *, rounds, opt, lr, epochs, bs, seed, **_):
    x = torch.cat([tr[0] for tr, _ in parts])
    y = torch.cat([tr[1] for tr, _ in parts])
    p = init_heads(x.shape[-1], seed)
    return local(p, x, y, opt=opt, lr=lr, epochs=rounds * epochs, bs=bs, seed=seed)[0]


def ridge(parts, *, lam, tiers=None, **_):
    """Closed form from per-client sums (adapters/head_fit.py's statistics on these features and its solver).

    With `tiers`, client i contributes to exits 1..tiers[i % len(tiers)] only, as with the
    run config's 'even' tier assignment: a deep exit is fitted on the deep clients alone.
    """
    dim = parts[0][0][0].shape[-1] + 1
    upper = np.triu_indices(dim)
    sums, counts = {}, {}
    for pid, ((x, y), _) in enumerate(parts):
        h = F.layer_norm(x, (x.shape[-1],)).double()
        h = torch.cat([h, torch.ones(*h.shape[:-1], 1, dtype=torch.float64)], -1).transpose(0, 1)
        gram = (h.transpose(1, 2) @ h).numpy()
        cross = (h.transpose(1, 2) @ F.one_hot(y, CLASSES).double()).numpy()
        for i in range(tiers[pid % len(tiers)] if tiers else EXITS):
            for name, v in ((stat_name(i, GRAM), gram[i][upper]), (stat_name(i, CROSS), cross[i])):
                sums[name] = sums.get(name, 0) + v
            counts[i] = counts.get(i, 0) + len(y)
    # the deep exits' prior shift is in logits: solve at the run config's scale, then return
    # to 0..1 scores so that val-nll-by-scale can choose the scale
    scale = validate({})["ridge-scale"]
    heads = solve_heads(sums, counts, lam, scale)
    p = init_heads(dim - 1, 0)
    for i in counts:
        p["W"][i] = torch.from_numpy(heads[f"heads.{i}.fc.weight"]).T / scale
        p["b"][i] = torch.from_numpy(heads[f"heads.{i}.fc.bias"]) / scale
    return p


def iid(parts, seed: int):
    """The same training images dealt to the clients at random, in the same sizes."""
    x = torch.cat([tr[0] for tr, _ in parts])
    y = torch.cat([tr[1] for tr, _ in parts])
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    out, at = [], 0
    for tr, va in parts:
        idx = perm[at : at + len(tr[1])]
        at += len(idx)
        out.append(((x[idx], y[idx]), va))
    return out


# name: (trainer, options); every option not given takes --rounds/--epochs and these defaults
EXPERIMENTS = {
    "central-adamw-.03": (central, dict(opt="adamw", lr=0.03)),
    "fedavg-adamw-.01": (fedavg, dict(opt="adamw", lr=0.01)),
    "fedavg-adamw-.03": (fedavg, dict(opt="adamw", lr=0.03)),
    "fedavg-adamw-.1": (fedavg, dict(opt="adamw", lr=0.1)),
    "fedavg-adamw-.03-1epoch": (fedavg, dict(opt="adamw", lr=0.03, epochs=1)),
    "fedavg-adamw-.03-10epochs": (fedavg, dict(opt="adamw", lr=0.03, epochs=10)),
    "fedavg-sgdm-.1": (fedavg, dict(opt="sgdm", lr=0.1)),
    "fedavg-sgdm-.3": (fedavg, dict(opt="sgdm", lr=0.3)),
    "fedavg-sgdm-.1-10epochs": (fedavg, dict(opt="sgdm", lr=0.1, epochs=10)),
    "fedavgm-adamw-.01": (fedavg, dict(opt="adamw", lr=0.01, server="avgm")),
    "scaffold-sgd-.3": (fedavg, dict(opt="sgd", lr=0.3, scaffold=True)),
    "restricted-softmax-adamw-.03": (fedavg, dict(opt="adamw", lr=0.03, restrict=True)),
    "iid-fedavg-adamw-.03": (fedavg, dict(opt="adamw", lr=0.03, iid=True)),
    "ridge-1e-4": (ridge, dict(lam=1e-4)),
    "ridge-1e-5": (ridge, dict(lam=1e-5)),
    "ridge-1e-6": (ridge, dict(lam=1e-6)),
    "ridge-1e-6-ensemble": (ridge, dict(lam=1e-6, ensemble=True)),
    "ridge-1e-6-tiers": (ridge, dict(lam=1e-6, tiers=(3, 6, 9, 12))),
    "ridge-1e-4-tiers": (ridge, dict(lam=1e-4, tiers=(3, 6, 9, 12))),
    "ridge-1e-6-tiers-ensemble": (ridge, dict(lam=1e-6, tiers=(3, 6, 9, 12), ensemble=True)),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--epochs", type=int, default=3, help="local epochs per round")
    ap.add_argument("--nodes", type=int, default=20)
    ap.add_argument("--exp", action="append", choices=sorted(EXPERIMENTS), help="repeatable; default: all")
    ap.add_argument("--patch-mean", action="store_true", help="heads read [cls, mean patch token] (`exit-patch-mean`)")
    ap.add_argument("--out", default=str(RESULTS / "heads_levers.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    report = Report("heads-levers", args)
    parts, test = features(args.nodes, args.patch_mean)
    val = (torch.cat([va[0] for _, va in parts]), torch.cat([va[1] for _, va in parts]))
    report["rows"] = rows = []
    for name in args.exp or list(EXPERIMENTS):
        trainer, opts = EXPERIMENTS[name]
        opts = {"rounds": args.rounds, "epochs": args.epochs, "bs": 16, "seed": 0, **opts}
        data = iid(parts, 0) if opts.pop("iid", False) else parts
        ensemble = opts.pop("ensemble", False)
        t0 = time.time()
        heads = trainer(data, **opts)
        v, t = accuracy(heads, val, ensemble), accuracy(heads, test, ensemble)
        extra = {}
        if trainer is ridge:
            # ridge-scale: the logit scale whose softmax fits the validation labels best
            with torch.no_grad():
                z = logits(heads, val[0])
                extra["val-nll-by-scale"] = {
                    str(sc): round(
                        float(F.cross_entropy((sc * z).reshape(-1, CLASSES), val[1].repeat_interleave(EXITS))), 4
                    )
                    for sc in SCALES
                }
        rows.append(
            {
                "experiment": name,
                "val-mean": round(float(np.mean(v)), 4),
                "val-exit-12": round(v[-1], 4),
                "test-mean": round(float(np.mean(t)), 4),
                "test-exit-12": round(t[-1], 4),
                "seconds": round(time.time() - t0, 1),
                "val": v,
                "test": t,
                **extra,
            }
        )
        print(f"== {name}: val mean {np.mean(v):.3f}, test mean {np.mean(t):.3f}", flush=True)
        report.write(args.out)
    print(table(rows, ["experiment", "val-mean", "val-exit-12", "test-mean", "test-exit-12", "seconds"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
