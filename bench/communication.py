"""Bytes one client sends per round: full fine-tuning vs head-only vs our adapters.

For each backbone shape (random weights; only shapes matter) one real
local step (AdamW on a random batch) makes a real delta, which the
project's own codec encodes (`core.codec.topk_encode`) and counts
(`payload_bytes`: .npy data with headers plus names, what Flower
serialises). Rows:

- full fine-tuning with FedAvg: every backbone weight plus the classifier,
  float32 dense (and, for reference, the same delta top-k 1% encoded);
- head-only: the linear classifier on the final CLS token;
- ours at each tier (blocks 1..d): what a depth-d client sends, dense and
  top-k at 10% and 1%: its adapters, and its exit heads only when the
  clients train them (`heads` "trained" or "ridge-init");
- with closed-form heads (`heads` other than "trained", the default
  "ridge"): the statistics a depth-d node sends per head fit
  (adapters/head_codec.py), as sent now (`head-bits` fixed point, every
  feature by default, `head-features`), projected to the width that fits
  one dense adapter update at those bits, and as sent before (float32,
  then float64, every feature).

Downlink (what the server sends a client of that tier) is the dense
float32 state of the same parameters.

    python bench/communication.py                       # ViT-Tiny, DeiT-Small, ViT-Base; ~1-2 min on 2 cores
    python bench/communication.py --models vit_large_patch16_224 --tiers 6,12,18,24
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from benchkit import RESULTS, Report, human_bytes, parse_overrides, table

from adapters.backbone import load_backbone
from adapters.build import with_adapters
from adapters.compat import import_timm
from adapters.head_codec import encode
from adapters.head_fit import CROSS, GRAM, stat_name
from adapters.state import get_state, trainable_names
from core.codec import payload_bytes, topk_encode
from core.config import ConfigError, clients_train_heads, validate
from core.naming import sent_up_to
from server_app.head_fit import fitting_features, plan

DEFAULT_MODELS = "vit_tiny_patch16_224,deit_small_patch16_224,vit_base_patch16_224"


def one_step_delta(
    model: torch.nn.Module, params: dict[str, torch.nn.Parameter], forward, batch: int, seed: int
) -> dict[str, np.ndarray]:
    """The change one AdamW step makes to `params` on a random batch."""
    torch.manual_seed(seed)
    before = {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.AdamW(params.values(), lr=1e-3)
    loss = forward()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    with torch.no_grad():
        return {n: (p - before[n]).numpy().copy() for n, p in params.items()}


def encoded(delta: dict[str, np.ndarray], fraction: float) -> int:
    payload, _ = topk_encode(delta, fraction)
    return payload_bytes(payload)


def statistics_shapes(depth: int, dim: int, classes: int, bits) -> dict[str, np.ndarray]:
    """What a depth-`depth` node sends as head statistics of `dim` features at `bits` (0 = float32,
    "float64" = before float32); values do not change the encoded size."""
    out = {}
    for i in range(depth):
        out[stat_name(i, GRAM)] = np.zeros((dim + 1) * (dim + 2) // 2)
        out[stat_name(i, CROSS)] = np.zeros((dim + 1, classes))
    return out if bits == "float64" else encode(out, depth, bits)


def measure(name: str, num_classes: int, tiers: list[int], fractions: list[float], cfg: dict, batch: int) -> list[dict]:
    timm = import_timm()
    rows = []
    torch.manual_seed(0)
    full = timm.create_model(name, pretrained=False, num_classes=num_classes)
    c, h, w = full.patch_embed.proj.in_channels, *full.patch_embed.img_size
    x = torch.randn(batch, c, h, w)
    y = torch.randint(0, num_classes, (batch,))
    full_params = dict(full.named_parameters())
    model = full  # a name the lambda can close over; `full` itself is deleted below
    delta = one_step_delta(full, full_params, lambda: torch.nn.functional.cross_entropy(model(x), y), batch, 0)
    full_bytes = encoded(delta, 1.0)
    n_full = int(sum(a.size for a in delta.values()))
    rows.append({"method": "full fine-tuning (FedAvg)", "params": n_full, "up": full_bytes, "down": full_bytes})
    rows.append(
        {"method": "full fine-tuning, top-k 0.01", "params": n_full, "up": encoded(delta, 0.01), "down": full_bytes}
    )
    head = {k: v for k, v in delta.items() if k.startswith("head.")}
    head_bytes = payload_bytes({k: v.astype(np.float32) for k, v in head.items()})
    rows.append(
        {
            "method": "head-only (FedAvg)",
            "params": int(sum(a.size for a in head.values())),
            "up": head_bytes,
            "down": head_bytes,
        }
    )
    del full, model, full_params, delta

    backbone = load_backbone(name)
    model = with_adapters(backbone, num_classes, cfg)
    for depth in tiers:
        # what a client of that depth sends: with closed-form heads (the default), not the heads
        names = sent_up_to(trainable_names(model, depth), depth, clients_train_heads(cfg))
        named = dict(model.trainable_named_parameters())
        params = {n: named[n] for n in names}
        loss = lambda: sum(torch.nn.functional.cross_entropy(z, y) for z in model(x, depth=depth))  # noqa: E731
        model.train()
        d = one_step_delta(model, params, loss, batch, depth)
        down = payload_bytes(get_state(model, depth))
        n = int(sum(a.size for a in d.values()))
        rows.append(
            {"method": f"ours, depth {depth} (dense)", "depth": depth, "params": n, "up": encoded(d, 1.0), "down": down}
        )
        if cfg["heads"] != "trained":
            state = get_state(model)
            k, width = plan(state, cfg)
            fit = fitting_features(state, cfg)
            bits = cfg["head-bits"]
            for label, dim, how in (
                (f" ({bits} bits)" if bits else " (float32)", k, bits),
                (f", head-features={fit} (fits one dense update at {bits or 'float32'} bits)", fit, bits),
                (", float32, every feature (before head-bits)", width, 0),
                (", float64, every feature (before float32)", width, "float64"),
            ):
                stats = statistics_shapes(depth, dim, num_classes, how)
                rows.append(
                    {
                        "method": f"head statistics, depth {depth}{label}",
                        "depth": depth,
                        "params": depth * ((dim + 1) * (dim + 2) // 2 + (dim + 1) * num_classes),  # numbers
                        "up": payload_bytes(stats),
                        "down": down,  # the query carries the adapters of its blocks
                        "features": f"{dim} of {width}",
                    }
                )
        for f in fractions:
            rows.append(
                {
                    "method": f"ours, depth {depth}, top-k {f:g}",
                    "depth": depth,
                    "params": n,
                    "up": encoded(d, f),
                    "down": down,
                }
            )
    for r in rows:
        r["model"] = name
        r["up-vs-full"] = r["up"] / full_bytes
        r["full/up"] = full_bytes / r["up"]
        r["up (human)"] = human_bytes(r["up"])
        r["backbone-params"] = int(sum(p.numel() for p in backbone.parameters()))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated timm model names (random weights)")
    ap.add_argument("--num-classes", type=int, default=100)
    ap.add_argument("--tiers", default="3,6,9,12", help="depths of the tiers (must fit every model)")
    ap.add_argument("--topk", default="0.1,0.01", help="top-k fractions to encode our adapters' deltas with")
    ap.add_argument("--batch", type=int, default=2, help="images in the one local step that makes the delta")
    ap.add_argument(
        "--run-config",
        nargs="*",
        default=[],
        metavar="OVERRIDES",
        help="adapter run-config keys (adapter-width, adapter-heads, ...)",
    )
    ap.add_argument("--out", default=str(RESULTS / "communication.json"))
    args = ap.parse_args(argv)
    try:
        cfg = validate(parse_overrides(args.run_config))
    except ConfigError as err:
        raise SystemExit(str(err))
    tiers = [int(t) for t in args.tiers.split(",")]
    fractions = [float(f) for f in args.topk.split(",") if f]
    report = Report("communication", args)
    report["adapter-config"] = {
        k: cfg[k] for k in ("adapter-width", "adapter-heads", "adapter-mlp-ratio", "shared-adapter")
    }
    rows = []
    for name in args.models.split(","):
        print(f"== {name} ==", flush=True)
        part = measure(name.strip(), args.num_classes, tiers, fractions, cfg, args.batch)
        print(table(part, ["method", "params", "up (human)", "up-vs-full", "full/up"]), flush=True)
        rows += part
    report["rows"] = rows
    report.write(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
