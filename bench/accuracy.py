"""Accuracy and bytes sent: our tiered adapters vs full fine-tuning vs head-only, same federation.

The run config's default task (`chars` now; the figures in bench/README.md are the
digits task's, the default then), shipped Fashion-MNIST backbone, the same
partitions, rounds, sampled clients, local epochs, batch size and
data order for every method:

- ours: the real ServerApp round loop and ClientApp code in-process
  (`server_app.app.run(LocalGrid(...))`), four tiers 3/6/9/12, test
  accuracy at every exit;
- full fine-tuning FedAvg: a plain FedAvg loop here; every client trains
  the whole ViT plus a linear head on the final CLS token (so every client
  must afford all 12 blocks);
- head-only FedAvg: the same loop training only that linear head on the
  frozen backbone's final CLS features (computed once; the backbone never
  changes).

Learning rates: a tiny sweep per method (AdamW, constant lr, a fresh
optimiser every round as the clients do), picked by accuracy on the
clients' own validation splits (never the test set): mean over exits for
ours, the single exit for the baselines. Bytes: what a client sends per
round, float32 dense (`core.codec.payload_bytes`: .npy data with
headers plus names), summed over the run.

    python bench/accuracy.py                                 # 15 rounds, 20 clients; ~8 min on 2 cores
    python bench/accuracy.py --rounds 50 --nodes 100 \
        --run-config "device='cuda' backbone='vit_tiny_patch16_224' img-size=32 patch-size=4"
    python bench/accuracy.py --methods ours12 --out bench/results/accuracy_ours12.json   # ours, no tiers
    python bench/accuracy.py --no-sweep --lr-full 1e-4       # fixed learning rates
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from benchkit import RESULTS, Report, parse_overrides, table
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, TensorDataset

from adapters.backbone import BackboneError, load_backbone
from adapters.build import resolve_device, resolve_weights
from adapters.state import set_state
from adapters.training import evaluate
from core.codec import payload_bytes
from core.config import ConfigError, validate
from fedtasks.base import DataError
from fedtasks.task import get_task, load_partition, load_test
from runtime.models import model_and_spec
from server_app import head_fit, results
from server_app.app import run
from tests.localgrid import LocalGrid

# Each grid is centred where a first sweep found the best (it sat at the edge of a lower grid).
SWEEPS = {"ours": "3e-3,1e-2,3e-2", "full": "3e-4,1e-3,3e-3", "head": "3e-3,1e-2,3e-2,1e-1", "ours12": "3e-3,1e-2,3e-2"}


# -- the baselines: a plain FedAvg loop -------------------------------------


class FinalHead(nn.Module):
    """timm ViT (num_classes=0 gives the final CLS feature) + one linear head."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.embed_dim, num_classes)

    def forward(self, x):
        return self.head(self.backbone(x))


def build_baseline(cfg: dict, method: str, num_classes: int) -> FinalHead:
    weights = resolve_weights(cfg["backbone-weights"]) if cfg["backbone-weights"] else ""
    backbone = load_backbone(
        cfg["backbone"],
        weights=weights,
        pretrained=cfg["pretrained"],
        img_size=cfg["img-size"] or None,
        patch_size=cfg["patch-size"] or None,
    )
    with torch.random.fork_rng():
        torch.manual_seed(cfg["seed"])
        model = FinalHead(backbone, num_classes)
    if method == "full":
        for p in backbone.parameters():
            p.requires_grad_(True)
    return model.to(resolve_device(cfg["device"]))


def device_of(net: nn.Module) -> torch.device:
    return next(net.parameters()).device


@torch.no_grad()
def features(backbone: nn.Module, ds, batch: int) -> TensorDataset:
    backbone.eval()
    dev = device_of(backbone)
    xs, ys = [], []
    for x, y in DataLoader(ds, batch_size=batch):
        xs.append(backbone(x.to(dev)).cpu())
        ys.append(y)
    return TensorDataset(torch.cat(xs), torch.cat(ys))


@torch.no_grad()
def accuracy(net: nn.Module, ds, batch: int) -> float:
    net.eval()
    dev = device_of(net)
    correct = n = 0
    for x, y in DataLoader(ds, batch_size=batch):
        correct += int((net(x.to(dev)).argmax(-1).cpu() == y).sum())
        n += len(y)
    return correct / max(n, 1)


def sampled_nodes(cfg: dict, nodes: int, rounds: int) -> list[list[int]]:
    """The partitions the server samples each round, drawn as DepthAwareFedAvg draws them."""
    random.seed(cfg["seed"])
    k = max(int(nodes * cfg["fraction-train"]), cfg["min-nodes"])
    return [[nid - 1 for nid in random.sample(range(1, nodes + 1), k)] for _ in range(rounds)]


def fedavg(cfg: dict, method: str, lr: float, nodes: int, rounds: int, val_only: bool = False) -> dict:
    """FedAvg of the whole model ('full') or of the head alone ('head')."""
    t0 = time.time()
    model, spec = model_and_spec(cfg)
    net = build_baseline(cfg, method, model.num_classes)
    parts = [load_partition(cfg, spec, pid, nodes) for pid in range(nodes)]
    test = load_test(cfg, spec)
    bs = cfg["eval-batch-size"]
    if method == "head":
        # The frozen backbone's features never change: compute them once.
        parts = [(features(net.backbone, tr, bs), features(net.backbone, va, bs)) for tr, va in parts]
        test = features(net.backbone, test, bs)
        trained, evaluated = net.head, net.head
    else:
        trained, evaluated = net, net
    names = [n for n, p in trained.named_parameters() if p.requires_grad]
    per_client_bytes = payload_bytes(
        {n: p.detach().cpu().numpy().astype(np.float32) for n, p in trained.named_parameters() if p.requires_grad}
    )
    global_state = {n: p.detach().clone() for n, p in trained.named_parameters() if p.requires_grad}
    params = dict(trained.named_parameters())
    dev = device_of(trained)
    sent = 0
    for server_round, pids in enumerate(sampled_nodes(cfg, nodes, rounds), start=1):
        new = {n: torch.zeros_like(v) for n, v in global_state.items()}
        total = 0
        for pid in pids:
            train_ds = parts[pid][0]
            with torch.no_grad():
                for n in names:
                    params[n].copy_(global_state[n])
            opt = torch.optim.AdamW([params[n] for n in names], lr=lr, weight_decay=cfg["weight-decay"])
            # the same data order a ClientApp of this partition sees in this round
            gen = torch.Generator().manual_seed(cfg["seed"] * 100_003 + pid * 1_009 + server_round)
            loader = DataLoader(train_ds, batch_size=cfg["batch-size"], shuffle=True, generator=gen)
            trained.train()
            if method == "full":
                net.backbone.train()
            for _ in range(cfg["local-epochs"]):
                for x, y in loader:
                    x, y = x.to(dev), y.to(dev)
                    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg["autocast"] == "bf16"):
                        loss = F.cross_entropy(trained(x), y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            w = len(train_ds)
            with torch.no_grad():
                for n in names:
                    new[n] += w * params[n]
            total += w
            sent += per_client_bytes
        global_state = {n: v / total for n, v in new.items()}
    with torch.no_grad():
        for n in names:
            params[n].copy_(global_state[n])
    out = {"val-accuracy": accuracy(evaluated, ConcatDataset([va for _, va in parts]), bs)}
    if not val_only:
        out.update(
            {
                "accuracy": [accuracy(evaluated, test, bs)],
                "bytes-up-total": sent,
                "bytes-per-client-round": per_client_bytes,
                "trained-params": int(sum(global_state[n].numel() for n in names)),
            }
        )
    out["seconds"] = round(time.time() - t0, 1)
    return out


# -- ours: the real apps ----------------------------------------------------


def ours(cfg: dict, lr: float, nodes: int, rounds: int, val_only: bool = False) -> dict:
    t0 = time.time()
    run_cfg = {**cfg, "lr": lr, "num-server-rounds": rounds}
    with tempfile.TemporaryDirectory() as tmp:
        run_cfg.update({"output-dir": tmp, "run-name": "bench"})
        run_dir = run(LocalGrid(nodes, run_cfg), run_cfg)
        rows = results.read_rows(run_dir)
        fits = head_fit.fits(run_dir)
        from safetensors.numpy import load_file

        arrays = load_file(str(run_dir / results.WEIGHTS))
    model, spec = model_and_spec(validate(run_cfg))
    set_state(model, arrays)
    val = ConcatDataset([load_partition(cfg, spec, pid, nodes)[1] for pid in range(nodes)])
    val_acc = evaluate(model, DataLoader(val, batch_size=cfg["eval-batch-size"]))["accuracy"]
    out = {"val-accuracy": float(np.mean(val_acc)), "val-accuracy-per-exit": val_acc}
    if not val_only:
        sampled = [sorted(c["partition-id"] for c in r["per-client"]) for r in rows]
        per_client = [c["bytes-up"] for r in rows for c in r["per-client"]]
        out.update(
            {
                "accuracy": rows[-1]["server"]["accuracy"],
                "curve": [r["server"]["accuracy"] for r in rows],
                # the closed-form head fits' statistics count as bytes sent too
                "bytes-up-total": sum(r["bytes-up"] for r in rows) + sum(f["bytes-up"] for f in fits),
                "head-fit-bytes-up-total": sum(f["bytes-up"] for f in fits),
                "bytes-per-client-round": float(np.mean(per_client)),
                "sampled": sampled,
                "trained-params": int(sum(a.size for a in arrays.values())),
            }
        )
    out["seconds"] = round(time.time() - t0, 1)
    return out


def train_method(method: str, cfg: dict, lr: float, nodes: int, rounds: int, val_only: bool = False) -> dict:
    if method == "ours":
        return ours(cfg, lr, nodes, rounds, val_only)
    if method == "ours12":
        return ours({**cfg, "tiers": "12"}, lr, nodes, rounds, val_only)
    return fedavg(cfg, method, lr, nodes, rounds, val_only)


LABELS = {
    "ours": "ours (tiers 3/6/9/12)",
    "full": "full fine-tuning FedAvg",
    "head": "head-only FedAvg",
    "ours12": "ours, every client 12 blocks",
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--nodes", type=int, default=20)
    ap.add_argument(
        "--methods",
        default="ours,full,head",
        help="of ours, full, head, ours12 (ours with every client running all 12 blocks, "
        "as full fine-tuning's clients do)",
    )
    for m in SWEEPS:
        ap.add_argument(f"--lr-{m}", default=SWEEPS[m], help=f"learning rate(s) of {m}, comma-separated (swept)")
    ap.add_argument("--sweep-rounds", type=int, default=4, help="rounds of each learning-rate trial")
    ap.add_argument("--no-sweep", action="store_true", help="use the first learning rate of each list")
    ap.add_argument(
        "--run-config", nargs="*", default=[], metavar="OVERRIDES", help="run-config overrides for every method"
    )
    ap.add_argument("--out", default=str(RESULTS / "accuracy.json"))
    args = ap.parse_args(argv)
    user = {"fraction-evaluate": 0.0, "personalize-epochs": 0, **parse_overrides(args.run_config)}
    try:
        cfg = validate(user)
        model, _ = model_and_spec(cfg)
        get_task(cfg)
    except (ConfigError, BackboneError, DataError) as err:
        raise SystemExit(f"accuracy bench: {err}")
    # every method trains with the threads a client gets (the ClientApp sets the same)
    torch.set_num_threads(cfg["client-threads"])
    report = Report("accuracy", args)
    report["config"] = {
        k: cfg[k]
        for k in (
            "task",
            "backbone",
            "backbone-weights",
            "tiers",
            "local-epochs",
            "batch-size",
            "fraction-train",
            "weight-decay",
            "seed",
            "dirichlet-alpha",
        )
    }
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    sweeps, rows = {}, []
    for method in methods:
        lrs = [float(x) for x in getattr(args, f"lr_{method}").split(",")]
        if args.no_sweep or len(lrs) == 1:
            best = lrs[0]
        else:
            trials = []
            for lr in lrs:
                res = train_method(method, cfg, lr, args.nodes, args.sweep_rounds, val_only=True)
                trials.append({"lr": lr, **res})
                print(
                    f"  sweep {method:<5} lr {lr:g}: "
                    f"validation accuracy {res['val-accuracy']:.3f} ({res['seconds']} s)",
                    flush=True,
                )
            best = max(trials, key=lambda t: t["val-accuracy"])["lr"]
            sweeps[method] = trials
        res = train_method(method, cfg, best, args.nodes, args.rounds)
        row = {"method": LABELS[method], "key": method, "lr": best, **res}
        print(
            f"== {LABELS[method]}, lr {best:g}: "
            f"test accuracy per exit {' '.join(f'{a:.3f}' for a in res['accuracy'])}, "
            f"{res['bytes-up-total'] / 1e6:.2f} MB up in total ({res['seconds']} s)",
            flush=True,
        )
        rows.append(row)
    ours_row = next((r for r in rows if r["key"] == "ours"), None)
    if ours_row is not None:
        # The baselines draw clients as the server does; check they are the same.
        same = ours_row["sampled"] == [sorted(p) for p in sampled_nodes(cfg, args.nodes, args.rounds)]
        report["same-clients-every-round"] = same
        if not same:
            print("warning: the baselines sampled other clients than the server did", flush=True)
    full = next((r for r in rows if r["key"] == "full"), None)
    for r in rows:
        r["final-exit-accuracy"] = r["accuracy"][-1]
        r["best-exit-accuracy"] = max(r["accuracy"])
        r["mean-exit-accuracy"] = float(np.mean(r["accuracy"]))
        r["MB-up-total"] = r["bytes-up-total"] / 1e6
        if full is not None:
            r["bytes-vs-full"] = r["bytes-up-total"] / full["bytes-up-total"]
    print(
        f"\n{cfg['task']}, {args.nodes} clients, {args.rounds} rounds, "
        f"backbone {cfg['backbone']} ({cfg['backbone-weights'] or 'random'}):"
    )
    print(
        table(
            rows,
            ["method", "lr", "final-exit-accuracy", "mean-exit-accuracy", "MB-up-total", "bytes-vs-full", "seconds"],
        )
    )
    if ours_row:
        print("ours, test accuracy per exit: " + " ".join(f"{a:.3f}" for a in ours_row["accuracy"]))
    report["sweeps"] = sweeps
    report["rows"] = rows
    report.write(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
