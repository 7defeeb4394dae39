"""Why federated adapters trail central training, one suspect at a time.

Every experiment is ours (the real ServerApp/ClientApp in-process, every
client at the depth `tiers` gives, 12 by default) with one run-config
change against the baseline, or the same AnytimeViT trained centrally on
the union of the clients' training splits for as many passes as the
federation makes (rounds x local-epochs). Each experiment records the
validation accuracy per exit (the clients' validation splits pooled: what
settings are chosen by) and the test accuracy per exit (reported only for
the chosen settings). Results are appended to the JSON after every
experiment, so an interrupted sweep keeps what it measured.

    python bench/gap.py --rounds 10 --exp base --exp "logit1:logit-adjust=1.0"
    python bench/gap.py --rounds 15 --exp "central:central" --exp "central-sgd:central optimizer=sgd lr=0.05 lr-schedule=cosine"

An experiment is NAME:OVERRIDES, OVERRIDES being space-separated
KEY=VALUE run-config keys; the word `central` makes it central training.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader

from benchkit import RESULTS, Report, parse_overrides

from accuracy import ours
from adapters.build import build_model
from adapters.training import TrainSettings, evaluate, exit_losses, label_counts, logit_prior, round_lr
from anytime_fl.config import validate
from anytime_fl.runtime import model_and_spec
from fedtasks.task import load_partition, load_test

BASE = {"tiers": "12", "lr": 1e-2, "fraction-evaluate": 0.0, "personalize-epochs": 0}


def central(cfg: dict, nodes: int, passes: int) -> dict:
    """The AnytimeViT trained in one process on every client's training split.

    One optimiser for the whole run (central training has no rounds); the
    cosine schedule, when set, decays per epoch over `passes` epochs.
    """
    t0 = time.time()
    _, spec = model_and_spec(cfg)
    model = build_model(cfg, _num_classes(cfg))
    parts = [load_partition(cfg, spec, pid, nodes) for pid in range(nodes)]
    train = ConcatDataset([tr for tr, _ in parts])
    val = ConcatDataset([va for _, va in parts])
    depth = max(int(s) for s in str(cfg["tiers"]).split(","))
    s = TrainSettings(exit_loss=cfg["exit-loss"], distill_weight=cfg["distill-weight"],
                      logit_adjust=cfg["logit-adjust"], block_grad=cfg["grad-through-blocks"])
    params = [p for _, p in model.trainable_named_parameters()]
    if cfg["optimizer"] == "sgd":
        opt = torch.optim.SGD(params, lr=cfg["lr"], momentum=0.9, weight_decay=cfg["weight-decay"])
    else:
        opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight-decay"])
    prior = None
    if cfg["logit-adjust"] > 0:
        prior = logit_prior(sum(label_counts(tr, model.num_classes) for tr, _ in parts), cfg["logit-adjust"])
    gen = torch.Generator().manual_seed(cfg["seed"])
    loader = DataLoader(train, batch_size=cfg["batch-size"], shuffle=True, generator=gen)
    model.train()
    for epoch in range(1, passes + 1):
        for g in opt.param_groups:
            g["lr"] = round_lr(cfg["lr"], cfg["lr-schedule"], epoch, passes)
        for x, y in loader:
            total, _ = exit_losses(model(x, depth=depth, block_grad=s.block_grad), y, s, prior)
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
    bs = cfg["eval-batch-size"]
    val_acc = evaluate(model, DataLoader(val, batch_size=bs), depth)["accuracy"]
    test_acc = evaluate(model, DataLoader(load_test(cfg, spec), batch_size=bs), depth)["accuracy"]
    return {"val-accuracy": float(np.mean(val_acc)), "val-accuracy-per-exit": val_acc, "accuracy": test_acc,
            "seconds": round(time.time() - t0, 1)}


def _num_classes(cfg: dict) -> int:
    return model_and_spec(cfg)[0].num_classes


def parse_exp(spec: str) -> tuple[str, bool, dict]:
    name, _, rest = spec.partition(":")
    words = rest.split()
    is_central = "central" in words
    return name.strip(), is_central, parse_overrides([w for w in words if w != "central"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--nodes", type=int, default=20)
    ap.add_argument("--exp", action="append", default=[], help="NAME:KEY=VALUE ... (repeatable); 'base' alone = the baseline")
    ap.add_argument("--base", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of the baseline itself")
    ap.add_argument("--out", default=str(RESULTS / "gap.json"))
    args = ap.parse_args(argv)
    base = {**BASE, **parse_overrides(args.base)}
    torch.set_num_threads(validate(base)["client-threads"])
    report = Report("gap", args)
    report["baseline"] = base
    report["rows"] = rows = []
    for spec in args.exp or ["base"]:
        name, is_central, over = parse_exp(spec)
        cfg = validate({**base, **over, "num-server-rounds": args.rounds})
        if is_central:
            res = central(cfg, args.nodes, args.rounds * cfg["local-epochs"])
        else:
            res = ours(cfg, cfg["lr"], args.nodes, args.rounds)
            res.pop("sampled", None)
        row = {"name": name, "central": is_central, "overrides": over, "rounds": args.rounds, **res}
        rows.append(row)
        print(f"== {name}: val mean {res['val-accuracy']:.3f} last {res['val-accuracy-per-exit'][-1]:.3f}; "
              f"test last {res['accuracy'][-1]:.3f} mean {np.mean(res['accuracy']):.3f} ({res['seconds']} s)", flush=True)
        report.write(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
