"""How much each closed-form head should count in the exit ensemble: the fit before round 1
under the run config's tiers, exit k predicting with the mean of heads 1..k's logits, head i
weighed by (its examples / exit 1's) ** p; p = 0 is every head alike, p = 1 `ensemble-votes =
"examples"`. Chosen on the clients' validation splits; test beside it.

The features of the untouched backbone are computed once; each node's statistics are those of
its depth (`tier-assignment`, as the nodes choose it), summed as the server sums them.

    python bench/votes.py                     # the default task and tiers
    python bench/votes.py --powers 0,1 --run-config "task='digits'"
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from benchkit import RESULTS, Report, parse_overrides
from torch.utils.data import ConcatDataset, DataLoader

from adapters.build import build_model
from adapters.head_fit import exit_statistics, solve_heads
from client_app.tiers import tier_of
from core.config import defaults, parse_tiers, validate
from fedtasks.task import load_partition, load_test
from runtime.models import model_and_spec


def exit_features(model, ds, depth: int, bs: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Each exit's fc input over `ds` (float64) and the labels."""
    feats: dict[int, list] = {i: [] for i in range(depth)}
    hooks = [
        model.heads[i].fc.register_forward_hook(lambda _m, inp, _o, i=i: feats[i].append(inp[0].double()))
        for i in range(depth)
    ]
    ys = []
    with torch.no_grad():
        for x, y in DataLoader(ds, batch_size=bs):
            model(x, depth=depth)
            ys.append(y)
    for h in hooks:
        h.remove()
    return [torch.cat(feats[i]).numpy() for i in range(depth)], torch.cat(ys).numpy()


def ensemble_accuracy(heads: dict, feats: list[np.ndarray], y: np.ndarray, votes: np.ndarray) -> np.ndarray:
    logits = (
        np.stack([f @ heads[f"heads.{i}.fc.weight"].T + heads[f"heads.{i}.fc.bias"] for i, f in enumerate(feats)])
        * votes[:, None, None]
    )
    mean = np.cumsum(logits, axis=0) / np.cumsum(votes)[:, None, None]
    return (mean.argmax(-1) == y).mean(axis=1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=20)
    ap.add_argument("--powers", default="0,0.5,1,2,3")
    ap.add_argument("--run-config", nargs="*", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default=str(RESULTS / "votes_chars.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = validate({**defaults(), **parse_overrides(args.run_config)})
    base, spec = model_and_spec(cfg)
    torch.manual_seed(cfg["seed"])
    model = build_model(cfg, base.num_classes).eval()
    tiers, bs = parse_tiers(cfg), cfg["eval-batch-size"]
    depth = max(tiers)
    parts = [load_partition(cfg, spec, pid, args.nodes) for pid in range(args.nodes)]
    sums, counts = {}, {}
    for pid, (tr, _) in enumerate(parts):
        d = tiers[tier_of(pid, args.nodes, cfg)]
        s, n = exit_statistics(model, DataLoader(tr, batch_size=bs), d)
        for k, v in s.items():
            sums[k] = sums.get(k, 0) + v
        for i in range(d):
            counts[i] = counts.get(i, 0) + n
    heads = solve_heads(sums, counts, cfg["ridge-lambda"], cfg["ridge-scale"])
    examples = np.array([counts[i] for i in range(depth)], dtype=np.float64)
    val = exit_features(model, ConcatDataset([va for _, va in parts]), depth, bs)
    test = exit_features(model, load_test(cfg, spec), depth, bs)
    report = Report("votes", args)
    report["examples-per-exit"] = examples.astype(int).tolist()
    report["rows"] = rows = []
    for p in [float(x) for x in args.powers.split(",")]:
        votes = (examples / examples[0]) ** p
        v, t = ensemble_accuracy(heads, *val, votes), ensemble_accuracy(heads, *test, votes)
        rows.append(
            {
                "power": p,
                "val-mean": round(float(v.mean()), 4),
                "test-mean": round(float(t.mean()), 4),
                "val-per-exit": v.round(4).tolist(),
                "test-per-exit": t.round(4).tolist(),
            }
        )
        at = " ".join(str(d) for d in tiers)
        print(
            f"p {p:g}: val mean {v.mean():.4f} (exits {at}: {' '.join(f'{v[d - 1]:.3f}' for d in tiers)}) | "
            f"test mean {t.mean():.4f} (exits {at}: {' '.join(f'{t[d - 1]:.3f}' for d in tiers)})",
            flush=True,
        )
    report.write(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
