"""Does a task need adaptation? The cheapest baseline against the ceiling, on the same images.

- probe: the closed-form exit heads on the untouched frozen backbone (what
  the federation has before round 1), fitted on the union of the clients'
  training splits, every exit;
- full: every weight of the backbone fine-tuned centrally on the same
  images, with a LayerNorm + linear head on the last block's [CLS, mean
  patch token] (what the exits read), AdamW with a warm-up/cosine schedule,
  for as many passes as the default run makes (rounds x local epochs);
  the learning rate is chosen on the clients' validation splits pooled,
  at the full length, and only the chosen one's test accuracy is reported.

A task shows what the adapters are for only where `full` is well above
`probe`; the federated runs are placed between the two (docs/benchmarks.md).

    python bench/headroom.py                               # the default task, 20 clients
    python bench/headroom.py --run-config "task='digits'" --lrs 1e-3
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from accuracy import build_baseline
from benchkit import RESULTS, Report, parse_overrides
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader

from adapters.build import build_model
from adapters.head_fit import exit_statistics, solve_heads
from adapters.state import set_state
from adapters.training import evaluate
from core.config import validate
from fedtasks.task import load_partition, load_test
from runtime.models import model_and_spec


def probe(cfg: dict, train, val, test) -> dict:
    model, _ = model_and_spec(cfg)
    model = build_model(cfg, model.num_classes)
    depth = model.num_blocks
    sums, n = exit_statistics(model, DataLoader(train, batch_size=cfg["eval-batch-size"]), depth)
    set_state(model, solve_heads(sums, dict.fromkeys(range(depth), n), cfg["ridge-lambda"], cfg["ridge-scale"]))
    bs = cfg["eval-batch-size"]
    return {
        "val-accuracy-per-exit": evaluate(model, DataLoader(val, batch_size=bs))["accuracy"],
        "accuracy": evaluate(model, DataLoader(test, batch_size=bs))["accuracy"],
    }


class PatchMeanHead(nn.Module):
    """The backbone's last block read as the exits read theirs: [CLS, mean patch token]."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        dim = backbone.embed_dim
        self.norm = nn.LayerNorm(2 * dim)
        self.fc = nn.Linear(2 * dim, num_classes)
        self.prefix = getattr(backbone, "num_prefix_tokens", 1)

    def forward(self, x):
        t = self.backbone.forward_features(x)
        return self.fc(self.norm(torch.cat([t[:, 0], t[:, self.prefix :].mean(1)], dim=1)))


@torch.no_grad()
def accuracy(net: nn.Module, ds, batch: int) -> float:
    net.eval()
    hits = sum((net(x).argmax(-1) == y).sum().item() for x, y in DataLoader(ds, batch_size=batch))
    return hits / max(len(ds), 1)


def full_finetune(cfg: dict, num_classes: int, train, val, test, lr: float, passes: int) -> dict:
    t0 = time.time()
    base = build_baseline(cfg, "full", num_classes)
    with torch.random.fork_rng():
        torch.manual_seed(cfg["seed"])
        net = PatchMeanHead(base.backbone, num_classes)
    gen = torch.Generator().manual_seed(cfg["seed"])
    loader = DataLoader(train, batch_size=cfg["batch-size"] * 4, shuffle=True, generator=gen)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=passes * len(loader), pct_start=0.1)
    curve = []
    for epoch in range(passes):
        net.train()
        for x, y in loader:
            loss = nn.functional.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        curve.append(round(accuracy(net, val, cfg["eval-batch-size"]), 4))
        print(f"  full lr={lr:g} pass {epoch + 1}/{passes}: val {curve[-1]:.3f}", flush=True)
    return {
        "lr": lr,
        "val-accuracy": curve[-1],
        "val-curve": curve,
        "accuracy": accuracy(net, test, cfg["eval-batch-size"]),
        "seconds": round(time.time() - t0, 1),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=20)
    ap.add_argument("--run-config", nargs="*", default=[], metavar="KEY=VALUE")
    ap.add_argument("--passes", type=int, default=0, help="0 = num-server-rounds x local-epochs")
    ap.add_argument("--lrs", default="3e-4,1e-3,3e-3", help="full fine-tuning rates, chosen on validation")
    ap.add_argument("--out", default=str(RESULTS / "headroom.json"))
    args = ap.parse_args(argv)
    cfg = validate(parse_overrides(args.run_config))
    torch.set_num_threads(cfg["client-threads"])
    _, spec = model_and_spec(cfg)
    parts = [load_partition(cfg, spec, pid, args.nodes) for pid in range(args.nodes)]
    train, val = ConcatDataset([tr for tr, _ in parts]), ConcatDataset([va for _, va in parts])
    test = load_test(cfg, spec)
    passes = args.passes or cfg["num-server-rounds"] * cfg["local-epochs"]
    report = Report("headroom", args)
    report["task"] = {"task": cfg["task"], "train": len(train), "validation": len(val), "test": len(test)}
    report["probe"] = p = probe(cfg, train, val, test)
    print(f"probe: test mean over exits {np.mean(p['accuracy']):.3f}, exit 12 {p['accuracy'][-1]:.3f}", flush=True)
    report.write(args.out)
    runs = []
    for lr in [float(v) for v in args.lrs.split(",")]:
        runs.append(full_finetune(cfg, model_and_spec(cfg)[0].num_classes, train, val, test, lr, passes))
        report["full-runs"] = [{k: v for k, v in r.items() if k != "accuracy"} for r in runs]
        report.write(args.out)
    best = max(runs, key=lambda r: r["val-accuracy"])
    report["full"] = best
    gap = best["accuracy"] - float(np.mean(p["accuracy"]))
    report["gap-points"] = round(100 * gap, 1)
    report.write(args.out)
    print(
        f"full fine-tuning (lr {best['lr']:g}, chosen on validation): test {best['accuracy']:.3f}; "
        f"probe mean over exits {np.mean(p['accuracy']):.3f}: {100 * gap:.1f} points of headroom",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
