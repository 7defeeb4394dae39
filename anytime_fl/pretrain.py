"""Offline pre-training of the shipped backbone on Fashion-MNIST.

    python -m anytime_fl.pretrain

trains `vit_micro_patch7_28` centrally on the local Fashion-MNIST train set and
writes fp16 safetensors plus a JSON card (`<out>.json`) saying how it was made.
The federated runs then freeze this backbone, so the default run needs no
network and no model hub.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from adapters import backbone as _backbone  # noqa: F401  (registers vit_micro_patch7_28)
from adapters.compat import import_timm
from anytime_fl.fashion_mnist import load_fashion_mnist

timm = import_timm()

MODEL = "vit_micro_patch7_28"
DEFAULT_OUT = str(Path(__file__).resolve().parents[1] / "anytime_assets" / f"{MODEL}.fmnist.safetensors")
MEAN, STD = 0.5, 0.5
PAD = 2  # crop padding in pixels: small shifts, garments stay whole


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).unsqueeze(1).float().div_(255.0)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding and horizontal flip, on [0,1] pixels.

    Zero padding matches the black Fashion-MNIST background, so it has to be
    done before normalisation.
    """
    n, _, h, w = x.shape
    padded = F.pad(x, (PAD, PAD, PAD, PAD))
    dy = torch.randint(0, 2 * PAD + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * PAD + 1, (n,), generator=gen)
    # One gather for the whole batch instead of a Python loop per image.
    rows = (dy[:, None] + torch.arange(h))[:, :, None].expand(n, h, w)
    cols = (dx[:, None] + torch.arange(w))[:, None, :].expand(n, h, w)
    out = padded[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - MEAN) / STD


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += (model(_normalise(x[i : i + batch_size])).argmax(1) == y[i : i + batch_size]).sum().item()
    return correct / max(len(x), 1)


def remake_command(out: str, epochs: int, batch_size: int, lr: float, train_limit: int | None, seed: int) -> str:
    args = [
        "python",
        "-m",
        "anytime_fl.pretrain",
        "--out",
        out,
        "--epochs",
        str(epochs),
        "--batch-size",
        str(batch_size),
        "--lr",
        str(lr),
        "--seed",
        str(seed),
    ]
    if train_limit:
        args += ["--train-limit", str(train_limit)]
    return shlex.join(args + ["--force"])


def pretrain(
    out_path: str = DEFAULT_OUT,
    epochs: int = 8,
    batch_size: int = 128,
    lr: float = 2e-3,
    data_dir: str | None = None,
    train_limit: int | None = None,
    seed: int = 0,
    log=print,
) -> dict:
    """Train the backbone, write `out_path` and its card; return the card."""
    if epochs < 1 or batch_size < 1 or not lr > 0 or (train_limit is not None and train_limit < 1):
        raise ValueError("epochs, batch_size, lr and train_limit must be positive")
    start = time.time()
    # Other processes may pin us to fewer cores than the machine has.
    torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)

    train_x, train_y = load_fashion_mnist("train", data_dir)
    test_x, test_y = load_fashion_mnist("test", data_dir)
    if train_limit:
        train_x, train_y = train_x[:train_limit], train_y[:train_limit]
    x, y = _to_tensor(train_x), torch.from_numpy(train_y)
    tx, ty = _to_tensor(test_x), torch.from_numpy(test_y)

    model = timm.create_model(MODEL, num_classes=10)
    # Decay only matrices: norms, biases and embeddings are kept free, as in DeiT.
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "pos_embed" not in n and "cls_token" not in n]
    no_decay = [
        p for n, p in model.named_parameters() if not (p.ndim >= 2 and "pos_embed" not in n and "cls_token" not in n)
    ]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    steps_per_epoch = math.ceil(len(x) / batch_size)
    total = epochs * steps_per_epoch
    warmup = max(1, min(200, total // 10))
    # Linear warm-up then cosine to zero: a from-scratch ViT diverges without the warm-up.
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup)))
        ),
    )
    log(
        f"pretrain {MODEL}: {len(x)} train / {len(tx)} test images, {epochs} epochs x {steps_per_epoch} steps, "
        f"batch {batch_size}, lr {lr}, {torch.get_num_threads()} threads"
    )

    step = 0
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        t0, seen, loss_sum, correct = time.time(), 0, 0.0, 0
        for i in range(0, len(x), batch_size):
            idx = order[i : i + batch_size]
            xb, yb = _normalise(_augment(x[idx], gen)), y[idx]
            logits = model(xb)
            loss = F.cross_entropy(logits, yb, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            seen += len(idx)
            loss_sum += loss.item() * len(idx)
            correct += (logits.argmax(1) == yb).sum().item()
            if step % 50 == 0 or seen == len(x):
                log(
                    f"epoch {epoch}/{epochs} step {step}/{total} loss {loss_sum / seen:.4f} "
                    f"train_acc {correct / seen:.4f} {seen / (time.time() - t0):.0f} img/s"
                )
    test_acc = evaluate(model, tx, ty)
    seconds = time.time() - start
    log(f"test accuracy {test_acc:.4f} on {len(tx)} images; {seconds:.0f} s in all")

    out = Path(out_path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    # fp16 halves the shipped file; the head stays so the card's accuracy can be checked.
    save_file(
        {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}, str(out), metadata={"format": "pt"}
    )
    cfg = model.patch_embed
    card = {
        "backbone": MODEL,
        "img_size": list(cfg.img_size)[0],
        "patch_size": list(cfg.patch_size)[0],
        "in_chans": cfg.proj.in_channels,
        "embed_dim": model.embed_dim,
        "depth": len(model.blocks),
        "data": f"Fashion-MNIST train, {len(x)} images",
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "test_accuracy": round(test_acc, 4),
        "seconds": round(seconds, 1),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "command": remake_command(str(out_path), epochs, batch_size, lr, train_limit, seed),
    }
    Path(str(out) + ".json").write_text(json.dumps(card, indent=2) + "\n")
    log(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB) and {out}.json")
    return card


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m anytime_fl.pretrain", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help="weights file to write (default: %(default)s)")
    parser.add_argument("--epochs", type=_positive(int), default=8)
    parser.add_argument("--batch-size", type=_positive(int), default=128)
    parser.add_argument("--lr", type=_positive(float), default=2e-3)
    parser.add_argument("--data-dir", default=None, help="folder with the four Fashion-MNIST IDX .gz files")
    parser.add_argument("--train-limit", type=_positive(int), default=None, help="use only the first N train images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--force",
        action="store_true",
        help="overwrite an existing --out file (the default --out is the shipped backbone)",
    )
    args = parser.parse_args(argv)
    out = Path(args.out).expanduser()
    if out.exists() and not args.force:
        shipped = " (the shipped backbone every default run uses)" if out.resolve() == Path(DEFAULT_OUT) else ""
        parser.exit(
            2, f"{parser.prog}: error: {out} exists{shipped}; pass --out NEW_FILE, or --force to overwrite it\n"
        )
    try:
        pretrain(
            args.out,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            data_dir=args.data_dir,
            train_limit=args.train_limit,
            seed=args.seed,
        )
    except (FileNotFoundError, ValueError, OSError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
