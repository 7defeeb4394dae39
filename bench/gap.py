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
    python bench/gap.py --rounds 15 --exp "central:central" \
        --exp "central-sgd:central optimizer=sgd lr=0.05 lr-schedule=cosine"

An experiment is NAME:OVERRIDES, OVERRIDES being space-separated
KEY=VALUE run-config keys; the word `central` makes it central training,
the word `heads` trains only the 12 exit heads on the frozen blocks' CLS
features (a cheap proxy of the heads' share of the gap). Central training
fits the heads in closed form before and after training as the federation
does (and trains only the adapters with `heads=ridge`), unless the
experiment sets `heads=trained`.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from accuracy import ours
from benchkit import RESULTS, Report, parse_overrides
from torch.utils.data import ConcatDataset, DataLoader

from adapters.build import build_model
from adapters.head_fit import exit_statistics, solve_heads
from adapters.state import set_state
from adapters.training import TrainSettings, evaluate, exit_losses, label_counts, local_optimizer, logit_prior
from core.config import clients_train_heads, parse_tiers, round_lr, validate
from core.naming import sent_by_clients
from fedtasks.task import load_partition, load_test
from runtime.models import model_and_spec

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
    depth = max(parse_tiers(cfg))
    # the clients' settings, the epochs standing in for rounds in the learning-rate schedule
    s = TrainSettings.from_config(cfg, server_round=1, num_rounds=passes)
    trained = {n for n, _ in model.trainable_named_parameters() if sent_by_clients(n, clients_train_heads(cfg))}
    opt, _ = local_optimizer(model, trained, s)
    prior = None
    if cfg["logit-adjust"] > 0:
        prior = logit_prior(sum(label_counts(tr, model.num_classes) for tr, _ in parts), cfg["logit-adjust"])
    gen = torch.Generator().manual_seed(cfg["seed"])
    loader = DataLoader(train, batch_size=cfg["batch-size"], shuffle=True, generator=gen)
    if cfg["heads"] != "trained":
        ridge_heads(model, train, depth, cfg)
    model.train()
    for epoch in range(1, passes + 1):
        opt.lr = round_lr(cfg, epoch, passes)
        for x, y in loader:
            total, _ = exit_losses(model(x, depth=depth, block_grad=s.block_grad), y, s, prior)
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
    if cfg["heads"] != "trained" and cfg["head-refit-every"] > 0:
        ridge_heads(model, train, depth, cfg)
    bs = cfg["eval-batch-size"]
    val_acc = evaluate(model, DataLoader(val, batch_size=bs), depth)["accuracy"]
    test_acc = evaluate(model, DataLoader(load_test(cfg, spec), batch_size=bs), depth)["accuracy"]
    return {
        "val-accuracy": float(np.mean(val_acc)),
        "val-accuracy-per-exit": val_acc,
        "accuracy": test_acc,
        "seconds": round(time.time() - t0, 1),
    }


def ridge_heads(model, train, depth: int, cfg: dict) -> None:
    """The closed-form heads of the run config, fitted on the whole training set (central)."""
    sums, n = exit_statistics(model, DataLoader(train, batch_size=cfg["eval-batch-size"]), depth)
    set_state(model, solve_heads(sums, {i: n for i in range(depth)}, cfg["ridge-lambda"], cfg["ridge-scale"]))


def heads_proxy(cfg: dict, nodes: int, rounds: int, central_run: bool = False) -> dict:
    """The exit heads alone on the frozen blocks' CLS features: a cheap stand-in
    for the heads' share of the gap (label skew, optimiser), seconds per run.

    Every client trains all 12 LayerNorm+linear heads (FedAvg); central
    training runs the same for rounds x local-epochs epochs on the union.
    """
    from accuracy import build_baseline, sampled_nodes
    from peers import MultiExit, cls_features, exit_accuracy

    t0 = time.time()
    _, spec = model_and_spec(cfg)
    ncls = _num_classes(cfg)
    backbone = build_baseline(cfg, "head", ncls).backbone
    key = ("feat", nodes)
    if key not in _FEATS:
        parts = [load_partition(cfg, spec, pid, nodes) for pid in range(nodes)]
        bs = cfg["eval-batch-size"]
        _FEATS[key] = (
            [(cls_features(backbone, tr, bs), cls_features(backbone, va, bs)) for tr, va in parts],
            cls_features(backbone, load_test(cfg, spec), bs),
        )
    parts, test = _FEATS[key]
    with torch.random.fork_rng():
        torch.manual_seed(cfg["seed"])
        heads = MultiExit(backbone, ncls).heads
    from peers import FeatureHeads

    net = FeatureHeads(heads)
    params = list(net.parameters())
    s = TrainSettings.from_config(cfg)

    def make_opt(lr):
        if cfg["optimizer"] == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=cfg["weight-decay"])
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg["weight-decay"])

    def local(ds, opt, epochs, gen, prior):
        net.train()
        for _ in range(epochs):
            for x, y in DataLoader(ds, batch_size=cfg["batch-size"], shuffle=True, generator=gen):
                total, _ = exit_losses(net(x, 12), y, s, prior)
                opt.zero_grad(set_to_none=True)
                total.backward()
                opt.step()

    def prior_of(counts):
        return logit_prior(counts, cfg["logit-adjust"]) if cfg["logit-adjust"] > 0 else None

    if central_run:
        train = ConcatDataset([tr for tr, _ in parts])
        opt = make_opt(cfg["lr"])
        gen = torch.Generator().manual_seed(cfg["seed"])
        passes = rounds * cfg["local-epochs"]
        counts = sum(label_counts(tr, ncls) for tr, _ in parts)
        for epoch in range(1, passes + 1):
            for g in opt.param_groups:
                g["lr"] = round_lr(cfg, epoch, passes)
            local(train, opt, 1, gen, prior_of(counts))
    else:
        state = [p.detach().clone() for p in params]
        for server_round, pids in enumerate(sampled_nodes(cfg, nodes, rounds), start=1):
            new, total = [torch.zeros_like(p) for p in params], 0.0
            for pid in pids:
                with torch.no_grad():
                    for p, v in zip(params, state):
                        p.copy_(v)
                tr = parts[pid][0]
                gen = torch.Generator().manual_seed(cfg["seed"] * 100_003 + pid * 1_009 + server_round)
                opt = make_opt(round_lr(cfg, server_round, rounds))
                local(tr, opt, cfg["local-epochs"], gen, prior_of(label_counts(tr, ncls)))
                with torch.no_grad():
                    for a, p in zip(new, params):
                        a += len(tr) * p
                total += len(tr)
            state = [a / total for a in new]
        with torch.no_grad():
            for p, v in zip(params, state):
                p.copy_(v)
    bs = cfg["eval-batch-size"]
    val_acc = exit_accuracy(net, ConcatDataset([va for _, va in parts]), 12, bs)
    return {
        "val-accuracy": float(np.mean(val_acc)),
        "val-accuracy-per-exit": val_acc,
        "accuracy": exit_accuracy(net, test, 12, bs),
        "seconds": round(time.time() - t0, 1),
    }


_FEATS: dict = {}


def _num_classes(cfg: dict) -> int:
    return model_and_spec(cfg)[0].num_classes


def parse_exp(spec: str) -> tuple[str, bool, dict]:
    name, _, rest = spec.partition(":")
    words = rest.split()
    return name.strip(), words, parse_overrides([w for w in words if w not in ("central", "heads")])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--nodes", type=int, default=20)
    ap.add_argument(
        "--exp", action="append", default=[], help="NAME:KEY=VALUE ... (repeatable); 'base' alone = the baseline"
    )
    ap.add_argument("--base", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of the baseline itself")
    ap.add_argument("--out", default=str(RESULTS / "gap.json"))
    args = ap.parse_args(argv)
    base = {**BASE, **parse_overrides(args.base)}
    torch.set_num_threads(validate(base)["client-threads"])
    report = Report("gap", args)
    report["baseline"] = base
    report["rows"] = rows = []
    for spec in args.exp or ["base"]:
        name, words, over = parse_exp(spec)
        is_central = "central" in words
        cfg = validate({**base, **over, "num-server-rounds": args.rounds})
        if "heads" in words:
            res = heads_proxy(cfg, args.nodes, args.rounds, is_central)
        elif is_central:
            res = central(cfg, args.nodes, args.rounds * cfg["local-epochs"])
        else:
            res = ours(cfg, cfg["lr"], args.nodes, args.rounds)
            res.pop("sampled", None)
        row = {
            "name": name,
            "central": is_central,
            "heads-only": "heads" in words,
            "overrides": over,
            "rounds": args.rounds,
            **res,
        }
        rows.append(row)
        print(
            f"== {name}: val mean {res['val-accuracy']:.3f} last {res['val-accuracy-per-exit'][-1]:.3f}; "
            f"test last {res['accuracy'][-1]:.3f} mean {np.mean(res['accuracy']):.3f} ({res['seconds']} s)",
            flush=True,
        )
        report.write(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
