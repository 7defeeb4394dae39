"""Head to head with the heterogeneous-device peers: same clients, rounds, data order and tiers.

The run config's task (the default `chars` now; the figures in docs/benchmarks.md
section 3 are the digits task's, `--run-config "task='digits'"`), N clients spread
over tiers 3/6/9/12 (partition-id modulo tiers, as the run config's
'even' assignment does), the same clients sampled each round
(DepthAwareFedAvg's draw), the same per-client, per-round data order:

- ours / reefl / ours-topk0.1 / ours-topk0.01: the real ServerApp and
  ClientApp in-process with the run config's defaults (reefl:
  `shared-adapter = true`, one accumulator for all blocks; its exit heads
  stay per block; topk: `topk-fraction` 0.1 / 0.01; since 0.1 became the
  default, `ours` is `ours-topk0.1`, and `--run-config topk-fraction=1.0`
  gives the dense rows of the results before it);
- depthfl / depthfl-kd: each client fine-tunes every weight of blocks
  1..d plus a LayerNorm+linear exit head on each block's CLS token;
  depth-aware FedAvg (each weight averaged over the clients that trained
  it); -kd adds DepthFL's mutual self-distillation between the exits;
- headonly: a LayerNorm+linear head per exit on the frozen block's CLS
  token (features computed once), depth-aware FedAvg;
- exclusion: full fine-tuning FedAvg (one head on the final CLS token)
  with only the clients that can run all 12 blocks;
- ceiling: the same with every client at 12 blocks.

Ours predicts at exit k with the mean logits of exits 1..k (`exit-ensemble`,
the default); the multi-exit peers' final accuracy is also reported under
that rule, on the same trained weights (`accuracy-exit-ensemble`).

Baselines use AdamW, a fresh optimiser each round (as the clients do),
with the learning rates given (defaults: what bench/accuracy.py picked on
the clients' validation splits after 4 rounds; each baseline's row has its
final validation accuracy, to choose a rate at the full length by). Columns: test accuracy per exit, mean
over exits, rounds to reach 90 % of the final mean accuracy, bytes a
client sends per round (mean) and in total, local training seconds per
client round by tier. Peak training memory per depth is bench/speed.py's
(a fresh process per configuration; in one process it cannot be
separated).

    python bench/peers.py                                # 15 rounds, 20 clients, every method
    python bench/peers.py --rounds 3 --methods headonly,depthfl --out /tmp/p.json
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F
from accuracy import FinalHead, build_baseline, device_of, sampled_nodes
from benchkit import RESULTS, Report, parse_overrides, table
from flwr.app import MessageType
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, TensorDataset

from adapters.accumulator import ExitHead
from adapters.optim import make_optimizer
from core.codec import payload_bytes
from core.config import parse_tiers, validate
from fedtasks.task import load_partition, load_test
from runtime.models import model_and_spec
from server_app import head_fit, results
from server_app.app import run
from tests.localgrid import LocalGrid

METHODS = (
    "ours",
    "reefl",
    "ours-topk0.1",
    "ours-topk0.01",
    "depthfl",
    "depthfl-kd",
    "exclusion",
    "headonly",
    "ceiling",
)
OURS = {
    "ours": {},
    "reefl": {"shared-adapter": True},
    "ours-topk0.1": {"topk-fraction": 0.1},
    "ours-topk0.01": {"topk-fraction": 0.01},
}
LR = {"depthfl": 1e-3, "depthfl-kd": 1e-3, "exclusion": 1e-3, "ceiling": 1e-3, "headonly": 3e-2}


# -- ours: the real apps, each client's local training timed ----------------


class TimedGrid(LocalGrid):
    """LocalGrid that records each training reply's seconds and depth."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.train_seconds: dict[int, list[float]] = defaultdict(list)

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for msg in messages:
            t = time.perf_counter()
            reply = super().send_and_receive([msg], timeout=timeout)[0]
            if reply.has_content() and "metrics" in reply.content.metric_records:
                m = reply.content.metric_records["metrics"]
                if msg.metadata.message_type == MessageType.TRAIN:
                    self.train_seconds[int(m["depth"])].append(time.perf_counter() - t)
            out.append(reply)
        return out


def run_ours(cfg: dict, nodes: int, rounds: int) -> dict:
    run_cfg = {**cfg, "num-server-rounds": rounds}
    grid = TimedGrid(nodes, run_cfg)
    with tempfile.TemporaryDirectory() as tmp:
        run_cfg.update({"output-dir": tmp, "run-name": "peers"})
        run_dir = run(grid, run_cfg)
        rows = results.read_rows(run_dir)
        fits = head_fit.fits(run_dir)
    per_client = [c["bytes-up"] for r in rows for c in r["per-client"]]
    return {
        "curve": [r["server"]["accuracy"] for r in rows],
        # the closed-form head fits' statistics are bytes sent too
        "bytes-up-total": sum(r["bytes-up"] for r in rows) + sum(f["bytes-up"] for f in fits),
        "head-fit-bytes-up-total": sum(f["bytes-up"] for f in fits),
        "head-fit-accuracy": fits[0]["server"]["accuracy"] if fits and "server" in fits[0] else None,
        "bytes-per-client-round": float(np.mean(per_client)),
        "sampled": [sorted(c["partition-id"] for c in r["per-client"]) for r in rows],
        "train-seconds-by-depth": {d: float(np.mean(v)) for d, v in sorted(grid.train_seconds.items())},
    }


# -- the peers: one depth-aware FedAvg loop ---------------------------------


class PeerHead(ExitHead):
    """Ours' exit head without an adapter: it reads the block's CLS token and, with `patch_mean`,
    the mean patch token, as ours' exits do (`exit-patch-mean`), so the comparison separates the
    method from what its heads read. Input: (B, D) or, with `patch_mean`, (B, 2D) = [cls, patch mean]."""

    def forward(self, f):
        if self.patch_norm is None:
            return self.read(f)
        cls, patches = f.chunk(2, dim=-1)
        return self.read(cls, patches)


def block_features(t: torch.Tensor, patch_mean: bool) -> torch.Tensor:
    """What a peer's exit reads from a block's tokens: the CLS token, [cls, patch mean] with `patch_mean`."""
    return torch.cat([t[:, 0], t[:, 1:].mean(1)], dim=-1) if patch_mean else t[:, 0]


class MultiExit(nn.Module):
    """The timm ViT with a LayerNorm+linear exit head on every block."""

    def __init__(self, backbone: nn.Module, num_classes: int, patch_mean: bool = False):
        super().__init__()
        self.backbone = backbone
        self.patch_mean = patch_mean
        self.heads = nn.ModuleList(PeerHead(backbone.embed_dim, num_classes, patch_mean) for _ in backbone.blocks)

    def forward(self, x, depth: int):
        bb = self.backbone
        t = bb.norm_pre(bb.patch_drop(bb._pos_embed(bb.patch_embed(x))))
        out = []
        for i in range(depth):
            t = bb.blocks[i](t)
            out.append(self.heads[i](block_features(t, self.patch_mean)))
        return out


class FeatureHeads(nn.Module):
    """Head-only: the same heads on precomputed frozen features (B, L, D or 2D)."""

    def __init__(self, heads: nn.ModuleList):
        super().__init__()
        self.heads = heads

    def forward(self, f, depth: int):
        return [self.heads[i](f[:, i]) for i in range(depth)]


_BLOCK = re.compile(r"(?:backbone\.blocks|heads)\.(\d+)\.")


def needed(name: str, depth: int) -> bool:
    """A weight a depth-d client trains: shared stem, blocks and heads 1..d (the final norm is unused)."""
    m = _BLOCK.match(name)
    if m:
        return int(m.group(1)) < depth
    return not name.startswith("backbone.norm.") and not name.startswith("backbone.head")


@torch.no_grad()
def cls_features(backbone: nn.Module, ds, batch: int, patch_mean: bool = False) -> TensorDataset:
    """Each block's frozen CLS token (N, L, D); with `patch_mean`, [cls, patch mean] (N, L, 2D)."""
    backbone.eval()
    xs, ys = [], []
    dev = device_of(backbone)
    for x, y in DataLoader(ds, batch_size=batch):
        t = backbone.norm_pre(backbone.patch_drop(backbone._pos_embed(backbone.patch_embed(x.to(dev)))))
        cls = []
        for blk in backbone.blocks:
            t = blk(t)
            cls.append(block_features(t, patch_mean))
        xs.append(torch.stack(cls, 1).cpu())
        ys.append(y)
    return TensorDataset(torch.cat(xs), torch.cat(ys))


def mutual_kd(logits: list[torch.Tensor]) -> torch.Tensor:
    """DepthFL's self-distillation: every exit learns from each other exit's (detached) softmax."""
    if len(logits) < 2:
        return logits[0].sum() * 0
    logp = [F.log_softmax(z, -1) for z in logits]
    p = [lp.exp().detach() for lp in logp]
    terms = [
        F.kl_div(logp[i], p[j], reduction="batchmean") for i in range(len(logits)) for j in range(len(logits)) if i != j
    ]
    return torch.stack(terms).sum() / (len(logits) - 1)


@torch.no_grad()
def exit_accuracy(net, ds, depth: int, batch: int, ensemble: bool = False) -> list[float]:
    """Test accuracy per exit; with `ensemble`, exit k predicts the mean logits of exits 1..k
    (what ours does with `exit-ensemble`)."""
    net.eval()
    dev = device_of(net)
    correct, n = torch.zeros(depth), 0
    for x, y in DataLoader(ds, batch_size=batch):
        logits = net(x.to(dev), depth)
        if ensemble:
            logits = torch.stack(logits).cumsum(0).unbind(0)
        for i, z in enumerate(logits):
            correct[i] += (z.argmax(-1).cpu() == y).sum()
        n += len(y)
    return (correct / max(n, 1)).tolist()


def run_peer(cfg: dict, method: str, nodes: int, rounds: int, lr: float) -> dict:
    model, spec = model_and_spec(cfg)
    tiers = parse_tiers(cfg)
    depth_of = {pid: tiers[pid % len(tiers)] for pid in range(nodes)}
    parts = [load_partition(cfg, spec, pid, nodes) for pid in range(nodes)]
    test = load_test(cfg, spec)
    bs = cfg["eval-batch-size"]
    if method in ("exclusion", "ceiling"):
        base = build_baseline(cfg, "full", model.num_classes)

        class Final(nn.Module):  # the FinalHead with the multi-exit call signature: one exit
            def __init__(self, m: FinalHead):
                super().__init__()
                self.m = m

            def forward(self, x, depth):
                return [self.m(x)]

        net, top = Final(base), 1
        if method == "ceiling":
            depth_of = {pid: model.num_blocks for pid in range(nodes)}
        train_depth = {pid: 1 for pid in range(nodes)}  # every weight, one exit
        names_for = lambda d: [n for n, p in net.named_parameters()]  # noqa: E731
    else:
        backbone = build_baseline(cfg, "full" if method.startswith("depthfl") else "head", model.num_classes).backbone
        with torch.random.fork_rng():
            torch.manual_seed(cfg["seed"])
            multi = MultiExit(backbone, model.num_classes, cfg["exit-patch-mean"]).to(device_of(backbone))
        if method == "headonly":
            net = FeatureHeads(multi.heads)
            feats = lambda ds: cls_features(backbone, ds, bs, cfg["exit-patch-mean"])  # noqa: E731
            parts = [(feats(tr), feats(va)) for tr, va in parts]
            test = feats(test)
        else:
            net = multi
        top = max(tiers)
        train_depth = depth_of
        names_for = lambda d: [n for n, p in net.named_parameters() if p.requires_grad and needed(n, d)]  # noqa: E731
    params = dict(net.named_parameters())
    global_state = {n: p.detach().clone() for n, p in params.items() if p.requires_grad}
    sent, per_round_bytes, curve = 0, [], []
    seconds = defaultdict(list)
    for server_round, pids in enumerate(sampled_nodes(cfg, nodes, rounds), start=1):
        if method == "exclusion":
            pids = [p for p in pids if depth_of[p] == model.num_blocks]
        acc = {n: torch.zeros_like(v) for n, v in global_state.items()}
        weight = {n: 0.0 for n in global_state}
        for pid in pids:
            d = train_depth[pid]
            names = names_for(d)
            with torch.no_grad():
                for n in global_state:
                    params[n].copy_(global_state[n])
            train_ds = parts[pid][0]
            opt = make_optimizer([params[n] for n in names], "adamw", lr, cfg["weight-decay"])
            gen = torch.Generator().manual_seed(cfg["seed"] * 100_003 + pid * 1_009 + server_round)
            loader = DataLoader(train_ds, batch_size=cfg["batch-size"], shuffle=True, generator=gen)
            net.train()
            t0 = time.perf_counter()
            for _ in range(cfg["local-epochs"]):
                for x, y in loader:
                    logits = net(x, d)
                    loss = sum(F.cross_entropy(z, y) for z in logits)
                    if method == "depthfl-kd":
                        loss = loss + mutual_kd(logits)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            seconds[depth_of[pid]].append(time.perf_counter() - t0)
            w = float(len(train_ds))
            with torch.no_grad():
                for n in names:
                    acc[n] += w * params[n]
                    weight[n] += w
            b = payload_bytes({n: params[n].detach().cpu().numpy().astype(np.float32) for n in names})
            sent += b
            per_round_bytes.append(b)
        global_state = {n: (acc[n] / weight[n] if weight[n] else global_state[n]) for n in global_state}
        with torch.no_grad():
            for n in global_state:
                params[n].copy_(global_state[n])
        curve.append(exit_accuracy(net, test, top, bs))
        print(f"  {method} round {server_round}: mean exit accuracy {np.mean(curve[-1]):.3f}", flush=True)
    # the clients' validation splits pooled: what a learning rate is chosen by (`--lr-<method>`)
    val = exit_accuracy(net, ConcatDataset([va for _, va in parts]), top, bs)
    out = {"curve": curve, "val-accuracy": float(np.mean(val)), "val-accuracy-per-exit": val}
    if top > 1:
        # the same trained peer with ours' inference rule, so the comparison separates method from rule
        out["accuracy-exit-ensemble"] = exit_accuracy(net, test, top, bs, ensemble=True)
    return {
        **out,
        "bytes-up-total": sent,
        "bytes-per-client-round": float(np.mean(per_round_bytes)) if per_round_bytes else 0.0,
        "train-seconds-by-depth": {d: float(np.mean(v)) for d, v in sorted(seconds.items())},
    }


def rounds_to(curve: list[list[float]], share: float = 0.9) -> int:
    means = [float(np.mean(a)) for a in curve]
    return next(i for i, m in enumerate(means, start=1) if m >= share * means[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--nodes", type=int, default=20)
    ap.add_argument("--methods", default=",".join(METHODS))
    for m in LR:
        ap.add_argument(f"--lr-{m}", type=float, default=LR[m])
    ap.add_argument(
        "--run-config", nargs="*", default=[], metavar="KEY=VALUE", help="run-config overrides for every method"
    )
    ap.add_argument("--out", default=str(RESULTS / "peers.json"))
    args = ap.parse_args(argv)
    cfg = validate({"fraction-evaluate": 0.0, "personalize-epochs": 0, **parse_overrides(args.run_config)})
    torch.set_num_threads(cfg["client-threads"])
    report = Report("peers", args)
    report["config"] = {
        k: cfg[k]
        for k in (
            "task",
            "tiers",
            "local-epochs",
            "batch-size",
            "lr",
            "optimizer",
            "lr-schedule",
            "logit-adjust",
            "grad-through-blocks",
            "heads",
            "head-refit-every",
            "ridge-lambda",
            "ridge-scale",
            "exit-ensemble",
            "exit-patch-mean",
            "dirichlet-alpha",
            "seed",
        )
    }
    report["rows"] = rows = []
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        if method not in METHODS:
            raise SystemExit(f"--methods: unknown {method!r}; known: {', '.join(METHODS)}")
        t0 = time.time()
        if method in OURS:
            res = run_ours(validate({**cfg, **OURS[method]}), args.nodes, args.rounds)
            res["same-clients"] = res.pop("sampled") == [sorted(p) for p in sampled_nodes(cfg, args.nodes, args.rounds)]
            lr = cfg["lr"]
        else:
            lr = getattr(args, "lr_" + method.replace("-", "_"))
            res = run_peer(cfg, method, args.nodes, args.rounds, lr)
        final = res["curve"][-1]
        row = {
            "method": method,
            "lr": lr,
            "accuracy": final,
            "mean-exit-accuracy": float(np.mean(final)),
            "rounds-to-90%": rounds_to(res["curve"]),
            "MB-per-client-round": res["bytes-per-client-round"] / 1e6,
            "MB-total": res["bytes-up-total"] / 1e6,
            "seconds": round(time.time() - t0, 1),
            **res,
        }
        if "accuracy-exit-ensemble" in res:
            row["mean-exit-accuracy-ensemble"] = float(np.mean(res["accuracy-exit-ensemble"]))
        rows.append(row)
        ens = row.get("mean-exit-accuracy-ensemble")
        print(
            f"== {method}: per exit {' '.join(f'{a:.3f}' for a in final)}; mean {row['mean-exit-accuracy']:.3f}"
            + (f" (with the exit ensemble {ens:.3f})" if ens is not None else "")
            + f"; {row['MB-total']:.1f} MB; {row['seconds']} s",
            flush=True,
        )
        report.write(args.out)
    print(
        table(
            rows, ["method", "lr", "mean-exit-accuracy", "rounds-to-90%", "MB-per-client-round", "MB-total", "seconds"]
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
