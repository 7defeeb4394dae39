"""Local training speed and peak memory: our adapters at each depth vs full fine-tuning.

One client's training step on random data of the backbone's input size,
same batch size for every configuration:

- ours, depth d: the project's own `adapters.training.train_local` on an
  AnytimeViT with the run config's defaults (frozen backbone; adapters 1..d
  train; the closed-form heads, which read the CLS and mean patch token,
  do not);
- full fine-tuning: the same timm backbone with every weight trainable and
  one linear head at the end, AdamW, cross-entropy.

Every configuration runs in a fresh subprocess, so its peak memory is its
own: peak resident memory (`resource.getrusage` ru_maxrss) minus the
resident memory measured once model and data are built (so the figure is
what training adds: activations, gradients, optimiser state; on CUDA,
`torch.cuda.max_memory_allocated`). Configurations are interleaved
(A B C .. C B A ..) over repeats so drift in a shared machine's load hits
all alike; speed ratios are taken within a repeat, then the median.

    python bench/speed.py                         # ViT-micro 28x28 and ViT-Tiny 32x32/patch 4, CPU; ~4 min on 2 cores
    python bench/speed.py --large --device cuda   # ViT-B/16 at 224x224 on a GPU
    python bench/speed.py --variants plain,bf16,compile --depths 12   # the speed-ups tried
    python bench/speed.py --variants plain,grad-stop --depths 12 --models vit_micro_patch7_28@28/7 --threads 1 \
        --out bench/results/speed_gradstop.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from benchkit import RESULTS, ROOT, Report, table

DEFAULT_MODELS = "vit_micro_patch7_28@28/7,vit_tiny_patch16_224@32/4"
LARGE_MODELS = "vit_base_patch16_224@224/16"
VARIANTS = ("plain", "bf16", "compile", "channels-last", "cache-prefix", "grad-stop")


def parse_models(spec: str) -> list[dict]:
    """'name@img/patch,...' -> [{'model', 'img', 'patch'}]."""
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, size = item.partition("@")
        img, _, patch = size.partition("/")
        try:
            out.append({"model": name, "img": int(img) if img else 0, "patch": int(patch) if patch else 0})
        except ValueError:
            raise SystemExit(f"--models: expected name@img/patch, got {item!r}") from None
    return out


# -- worker: one configuration in its own process ---------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def worker(job: dict) -> dict:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from adapters.backbone import load_backbone
    from adapters.build import with_adapters
    from adapters.compat import import_timm
    from adapters.optim import make_optimizer
    from adapters.training import TrainSettings, train_local
    from core.config import clients_train_heads, validate

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    device = torch.device(job["device"])
    torch.manual_seed(0)
    cfg = validate({})  # ours with the run config's defaults
    size = {k: v for k, v in (("img_size", job["img"]), ("patch_size", job["patch"])) if v}
    if job["method"] == "full":
        timm = import_timm()
        import adapters.backbone  # noqa: F401  (registers vit_micro_patch7_28)

        model = timm.create_model(job["model"], pretrained=False, num_classes=job["classes"], **size)
    else:
        # the run config's model and head defaults (exit-patch-mean, exit-ensemble, closed-form heads)
        backbone = load_backbone(job["model"], img_size=job["img"] or None, patch_size=job["patch"] or None)
        model = with_adapters(backbone, job["classes"], cfg)
    model.to(device)
    if job["variant"] == "channels-last":
        model.to(memory_format=torch.channels_last)
    pe = model.patch_embed if job["method"] == "full" else model.backbone.patch_embed
    c, h, w = pe.proj.in_channels, *pe.img_size
    n = job["batch"] * (job["warmup"] + job["steps"])
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, c, h, w, generator=gen).to(device)
    if job["variant"] == "channels-last":
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, job["classes"], (n,), generator=gen).to(device)
    prefix_s = 0.0
    if job["variant"] == "cache-prefix" and job["method"] == "ours":
        # Patch embedding + block 1 see no trainable input: a client could
        # compute their output once per dataset and train from block 2 on.
        # Measured here by feeding that output through identity stand-ins,
        # the same arithmetic as the model's own forward pass.
        t = time.perf_counter()
        with torch.no_grad():
            x = torch.cat([model.backbone.blocks[0](model.embed(xb)) for xb in x.split(256)])
        prefix_s = time.perf_counter() - t
        model.embed = lambda tokens: tokens
        model.backbone.blocks[0] = torch.nn.Identity()
    loader = DataLoader(TensorDataset(x, y), batch_size=job["batch"], shuffle=False)
    cuda = device.type == "cuda"

    stamps: list[float] = []
    cpu_stamps: list[float] = []

    def timed(batches):
        for batch in batches:
            if cuda:
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            cpu_stamps.append(time.process_time())
            yield batch

    net = torch.compile(model) if job["variant"] == "compile" else model
    bf16 = job["variant"] == "bf16"
    # ours: the run config's `autocast = "bf16"` as the client applies it
    # grad-stop: the run config's `grad-through-blocks = false`
    settings = TrainSettings(
        epochs=1,
        lr=job["lr"],
        weight_decay=1e-4,
        autocast="bf16" if bf16 else "none",
        block_grad=job["variant"] != "grad-stop",
        clients_train_heads=clients_train_heads(cfg),
    )
    rss0, maxrss0 = _rss_bytes(), _maxrss_bytes()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    t_start = time.perf_counter()
    if job["method"] == "full":
        model.train()
        # the optimiser the clients use (multi-tensor AdamW), so only the trained weights differ
        opt = make_optimizer(list(model.parameters()), "adamw", settings.lr, settings.weight_decay)
        for xb, yb in timed(loader):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = torch.nn.functional.cross_entropy(net(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    else:
        # The client's own training loop; a compiled wrapper forwards
        # trainable_named_parameters / train to the module it wraps.
        train_local(
            net if job["variant"] != "compile" else _Compiled(model, net), timed(loader), job["depth"], settings
        )
    if cuda:
        torch.cuda.synchronize()
    t_end, cpu_end = time.perf_counter(), time.process_time()
    # The median step: a step that another process on the machine stalled
    # does not drag the figure down the way a mean would.
    steps = [b - a for a, b in zip(stamps, stamps[1:] + [t_end])][job["warmup"] :]
    cpu = cpu_end - cpu_stamps[job["warmup"]]
    out = {
        "examples-per-s": job["batch"] / statistics.median(steps),
        "examples-per-s-mean": job["batch"] * len(steps) / sum(steps),
        # CPU time (all threads) of the timed steps: robust to waiting for a
        # busy core, but it counts threads spinning in sync too
        "examples-per-cpu-s": job["batch"] * len(steps) / max(cpu, 1e-9),
        "first-steps-s": stamps[job["warmup"]] - t_start,  # warm-up (compilation included)
        "prefix-cache-s": prefix_s,  # one pass over the data; paid once per dataset
        "peak-train-mb": max(0, _maxrss_bytes() - rss0) / 2**20,
        "peak-rss-mb": _maxrss_bytes() / 2**20,
        "rss-before-train-mb": rss0 / 2**20,
        "maxrss-before-train-mb": maxrss0 / 2**20,
        "threads": torch.get_num_threads(),
        "trainable-params": _trained_params(model, job, cfg),
    }
    if cuda:
        out["peak-train-mb"] = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
        out["memory-measure"] = "torch.cuda.max_memory_allocated"
    else:
        out["memory-measure"] = "ru_maxrss - RSS before training (fresh process)"
    return out


def _trained_params(model, job: dict, cfg: dict) -> int:
    if job["method"] == "full":
        return int(sum(p.numel() for p in model.parameters() if p.requires_grad))
    from adapters.state import trainable_names
    from core.config import clients_train_heads
    from core.naming import sent_up_to

    named = dict(model.trainable_named_parameters())
    trained = sent_up_to(trainable_names(model), job["depth"], clients_train_heads(cfg))
    return int(sum(named[n].numel() for n in trained))


class _Compiled:
    """train_local's view of a compiled AnytimeViT: calls go to the compiled graph."""

    def __init__(self, module, compiled):
        self.module, self.compiled = module, compiled

    def __call__(self, *a, **k):
        return self.compiled(*a, **k)

    def __getattr__(self, name):
        return getattr(self.module, name)


# -- parent: interleave configurations over repeats -------------------------


def run_job(job: dict, timeout: float) -> dict:
    """One configuration in a fresh process; a failure or timeout is recorded, not raised."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(job)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(lines[-1])


def label(job: dict) -> str:
    what = "full fine-tuning" if job["method"] == "full" else f"ours d{job['depth']}"
    return what + ("" if job["variant"] == "plain" else f" [{job['variant']}]")


def paired_ratio(runs: dict, i: int, j: int | None, key: str) -> float | None:
    """Median over repeats of run i / run j (same repeat: same moment, same load)."""
    if j is None or any("error" in r for r in runs[i] + runs[j]):
        return None
    return statistics.median(a[key] / max(b[key], 1e-9) for a, b in zip(runs[i], runs[j]))


def summarize(m: dict, jobs: list[dict], runs: dict) -> list[dict]:
    def find(**want):
        return next((k for k, j in enumerate(jobs) if all(j[a] == v for a, v in want.items())), None)

    rows = []
    for i, job in enumerate(jobs):
        row = {"model": m["model"], "img": m["img"], "patch": m["patch"], "config": label(job), **job, "runs": runs[i]}
        errors = [r["error"] for r in runs[i] if "error" in r]
        if errors:
            rows.append({**row, "error": errors[0]})
            continue
        rs = runs[i]
        for key in ("examples-per-s", "examples-per-cpu-s", "peak-train-mb", "peak-rss-mb", "first-steps-s"):
            row[key] = statistics.median(r[key] for r in rs)
        row["trainable-params"] = rs[0]["trainable-params"]
        full = find(method="full", variant="plain", threads=job["threads"])
        plain = find(method=job["method"], depth=job["depth"], variant="plain", threads=job["threads"])
        for name, value in (
            ("speed-vs-full", paired_ratio(runs, i, full, "examples-per-s")),
            ("cpu-speed-vs-full", paired_ratio(runs, i, full, "examples-per-cpu-s")),
            ("memory-vs-full", paired_ratio(runs, i, full, "peak-train-mb")),
            ("speed-vs-plain", paired_ratio(runs, i, plain, "examples-per-s") if job["variant"] != "plain" else None),
        ):
            if value is not None:
                row[name] = value
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=DEFAULT_MODELS, help="name@img/patch, comma-separated")
    ap.add_argument("--large", action="store_true", help=f"use {LARGE_MODELS} (ViT-B at 224; meant for --device cuda)")
    ap.add_argument("--depths", default="3,6,9,12", help="depths of our adapters to time")
    ap.add_argument("--no-full", action="store_true", help="leave out full fine-tuning")
    ap.add_argument("--variants", default="plain", help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument(
        "--batch", type=int, default=0, help="batch size of every configuration (0 = the run config's batch-size)"
    )
    ap.add_argument("--steps", type=int, default=8, help="timed training steps per configuration")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved repeats of every configuration")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument(
        "--threads",
        default="1,2",
        help="torch thread counts to time, comma-separated (1 = a client of the default simulation, "
        "client-threads=1; 0 = torch's default)",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--timeout", type=float, default=600, help="seconds one configuration may take")
    ap.add_argument("--out", default="")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise SystemExit(f"--variants: unknown {bad}; known: {', '.join(VARIANTS)}")
    threads = [int(t) for t in args.threads.split(",") if t.strip()]
    if not args.batch:
        from core.config import defaults

        args.batch = defaults()["batch-size"]
    out = args.out or str(RESULTS / ("speed.json" if variants == ["plain"] else "speed_variants.json"))
    models = parse_models(LARGE_MODELS if args.large else args.models)
    depths = [int(d) for d in args.depths.split(",") if d]
    report = Report("speed", args)
    common = {
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "classes": args.classes,
        "lr": args.lr,
        "device": args.device,
    }
    rows = []
    for m in models:
        jobs = []
        for t in threads:
            jobs += [
                {**common, **m, "threads": t, "method": "ours", "depth": d, "variant": v}
                for v in variants
                for d in depths
            ]
            if not args.no_full:
                # caching the frozen prefix and stopping gradients at the frozen
                # blocks are ours only: full fine-tuning trains every block
                jobs += [
                    {**common, **m, "threads": t, "method": "full", "depth": 0, "variant": v}
                    for v in variants
                    if v not in ("cache-prefix", "grad-stop")
                ]
        runs: dict[int, list[dict]] = {i: [] for i in range(len(jobs))}
        for rep in range(args.repeats):
            order = list(range(len(jobs)))
            for i in order if rep % 2 == 0 else order[::-1]:
                res = run_job(jobs[i], args.timeout)
                res["repeat"], res["load"] = rep, round(os.getloadavg()[0], 2)
                runs[i].append(res)
                head = f"  {m['model']}@{m['img']} {jobs[i]['threads']}t {label(jobs[i]):<28} rep {rep}:"
                if "error" in res:
                    print(f"{head} FAILED: {res['error']}", flush=True)
                else:
                    print(
                        f"{head} {res['examples-per-s']:7.1f} ex/s, {res['examples-per-cpu-s']:7.1f} ex/cpu-s, "
                        f"+{res['peak-train-mb']:.0f} MB, load {res['load']:.1f}",
                        flush=True,
                    )
        part = summarize(m, jobs, runs)
        rows += part
        cols = [
            "threads",
            "config",
            "trainable-params",
            "examples-per-s",
            "speed-vs-full",
            "cpu-speed-vs-full",
            "speed-vs-plain",
            "peak-train-mb",
            "memory-vs-full",
            "first-steps-s",
            "error",
        ]
        cols = [c for c in cols if any(c in r for r in part)]
        print(f"\n{m['model']} at {m['img']}x{m['img']}, patch {m['patch']}, batch {args.batch}, {args.device}:")
        print(table(part, cols), flush=True)
    report["memory-measure"] = next((r["runs"][0]["memory-measure"] for r in rows if "error" not in r), "")
    report["rows"] = rows
    report.write(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
