"""How much each closed-form head should count in the exit ensemble: the fit before round 1
under the run config's tiers, exit k predicting with the mean of heads 1..k's logits, head i
weighed by (its examples / exit 1's) ** p; p = 0 is every head alike, p = 1 `ensemble-votes =
"examples"`. Chosen on the clients' validation splits; test beside it.

Each head's own logits on the untouched backbone are computed once; each node's statistics are those of
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
from adapters.state import set_state
from client_app.tiers import tier_of
from core.config import defaults, parse_tiers, validate
from fedtasks.task import load_partition, load_test
from runtime.models import model_and_spec


def own_logits(model, ds, depth: int, bs: int) -> tuple[np.ndarray, np.ndarray]:
    """Each head's own logits over `ds` (the model built without the ensemble), (exits, n, classes),
    and the labels."""
    logits, ys = [], []
    with torch.no_grad():
        for x, y in DataLoader(ds, batch_size=bs):
            logits.append(torch.stack(model(x, depth=depth)).double())
            ys.append(y)
    return torch.cat(logits, dim=1).numpy(), torch.cat(ys).numpy()


def ensemble_accuracy(logits: np.ndarray, y: np.ndarray, votes: np.ndarray) -> np.ndarray:
    """Accuracy per exit of the votes-weighted running mean of the heads' logits."""
    mean = np.cumsum(logits * votes[:, None, None], axis=0) / np.cumsum(votes)[:, None, None]
    return (mean.argmax(-1) == y).mean(axis=1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=20)
    ap.add_argument("--powers", default="0,0.5,1,2,3")
    ap.add_argument("--run-config", nargs="*", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default=str(RESULTS / "votes_chars.json"))
    args = ap.parse_args(argv)
    report = Report("votes", args)  # from here: its seconds are the whole measurement's
    torch.set_num_threads(1)
    cfg = validate({**defaults(), **parse_overrides(args.run_config)})
    base, spec = model_and_spec(cfg)
    torch.manual_seed(cfg["seed"])
    # each head's own logits: the weighted means are taken here
    model = build_model({**cfg, "exit-ensemble": False}, base.num_classes).eval()
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
    set_state(model, solve_heads(sums, counts, cfg["ridge-lambda"], cfg["ridge-scale"]))
    examples = np.array([counts[i] for i in range(depth)], dtype=np.float64)
    val = own_logits(model, ConcatDataset([va for _, va in parts]), depth, bs)
    test = own_logits(model, load_test(cfg, spec), depth, bs)
    report["examples-per-exit"] = examples.astype(int).tolist()
    report["rows"] = rows = []
    for p in [float(x) for x in args.powers.split(",")]:
        votes = (examples / examples.max()) ** p  # as solve_heads scales them at p = 1
        v, t = ensemble_accuracy(*val, votes), ensemble_accuracy(*test, votes)
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
