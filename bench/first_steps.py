"""What the first steps of local training do to the exits under the fitted heads.

The closed-form heads are fitted on the frozen backbone's features (the fit
before round 1), then the adapters train against them as a client's
`train_local` would, on the union of the clients' training splits; every few
steps the loss and accuracy over a fixed quarter of those training images
are measured under the same fixed heads. The loss a step lowers on its own
batch of 16 can rise on the others: the ridge heads put large weights on
feature directions in which the frozen features vary little, and a step of
AdamW (every parameter moved by about `lr` at first) moves the features
along them.

    python bench/first_steps.py --exp base: --exp "lr1e-4:lr=1e-4" --exp "lam1e-2:ridge-lambda=1e-2"
"""

from __future__ import annotations

import argparse
import time

import torch
from benchkit import RESULTS, Report, parse_overrides
from torch.utils.data import ConcatDataset, DataLoader, Subset

from adapters.build import build_model
from adapters.head_fit import exit_statistics, solve_heads
from adapters.state import set_state, trainable_names
from adapters.training import TrainSettings, exit_losses, local_optimizer
from core.config import defaults, validate
from core.naming import sent_up_to
from fedtasks.task import load_partition
from runtime.models import model_and_spec

CHECKPOINTS = (0, 1, 2, 5, 10, 20, 39, 50, 100, 150, 200, 247)


def run(cfg: dict, nodes: int, steps: int) -> dict:
    t0 = time.time()
    base, spec = model_and_spec(cfg)
    torch.manual_seed(cfg["seed"])
    model = build_model(cfg, base.num_classes)
    train = ConcatDataset([load_partition(cfg, spec, pid, nodes)[0] for pid in range(nodes)])
    sums, n = exit_statistics(model, DataLoader(train, batch_size=cfg["eval-batch-size"]), model.num_blocks)
    set_state(
        model, solve_heads(sums, {i: n for i in range(model.num_blocks)}, cfg["ridge-lambda"], cfg["ridge-scale"])
    )
    norms = [round(float(model.heads[i].fc.weight.detach().norm()), 1) for i in range(model.num_blocks)]
    probe = Subset(train, list(range(0, len(train), 4)))
    xs = torch.stack([probe[i][0] for i in range(len(probe))])
    ys = torch.stack([torch.as_tensor(probe[i][1]) for i in range(len(probe))])
    s = TrainSettings.from_config(cfg, server_round=1)
    opt, _ = local_optimizer(model, set(sent_up_to(trainable_names(model), model.num_blocks, False)), s)
    curve = []

    def measure(step: int) -> None:
        model.eval()
        with torch.no_grad():
            out = model(xs)
            total, _ = exit_losses(out, ys, s)
            acc = [float((o.argmax(1) == ys).float().mean()) for o in out]
        curve.append({"step": step, "loss": round(float(total), 3), "accuracy-per-exit": [round(a, 4) for a in acc]})
        print(f"  step {step}: loss {float(total):.2f}, accuracy exits 1/6/12 {acc[0]:.3f} {acc[5]:.3f} {acc[-1]:.3f}")
        model.train()

    gen = torch.Generator().manual_seed(cfg["seed"])
    loader = DataLoader(train, batch_size=cfg["batch-size"], shuffle=True, generator=gen)
    model.train()
    for step, (x, y) in enumerate(loader):
        if step in CHECKPOINTS:
            measure(step)
        if step >= steps:
            break
        total, _ = exit_losses(model(x), y, s)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
    return {"head-weight-norms": norms, "curve": curve, "seconds": round(time.time() - t0, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exp", action="append", default=[], help="NAME:KEY=VALUE ... (repeatable)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--nodes", type=int, default=20)
    ap.add_argument("--out", default=str(RESULTS / "first_steps.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    report = Report("first_steps", args)
    report["rows"] = rows = []
    for spec in args.exp or ["base:"]:
        name, _, rest = spec.partition(":")
        over = parse_overrides(rest.split())
        cfg = validate({**defaults(), **over})
        print(f"== {name} {over}")
        rows.append({"name": name, "overrides": over, **run(cfg, args.nodes, args.steps)})
        report.write(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
