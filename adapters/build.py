"""Build the AnytimeViT a run config describes (plain dict in, torch model out)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .errors import BackboneError
from .model import AnytimeViT

SHIPPED = "shipped"
SHIPPED_FILE = "vit_micro_patch7_28.fmnist.safetensors"


def resolve_weights(value: str) -> str:
    """'shipped' -> the file in the installed anytime_assets package."""
    if value != SHIPPED:
        return value
    try:
        path = resources.files("anytime_assets") / SHIPPED_FILE
    except ModuleNotFoundError:
        path = None
    if path is None or not Path(str(path)).is_file():
        raise BackboneError(
            "backbone-weights",
            f"'shipped' weights ({SHIPPED_FILE}) not found; install the project (pip install -e .) "
            "or set backbone-weights to a file path",
        )
    return str(path)


def build_model(
    cfg: dict[str, Any], num_classes: int, seed: int | None = None, cache_dir: Path | None = None
) -> AnytimeViT:
    """Backbone (frozen) + adapters + heads; adapters initialised from `seed`.

    With `cache_dir`, the backbone comes from (and goes to) that disk cache.
    """
    weights = resolve_weights(cfg["backbone-weights"]) if cfg["backbone-weights"] else ""
    args = dict(
        name=cfg["backbone"],
        weights=weights,
        pretrained=cfg["pretrained"],
        img_size=cfg["img-size"] or None,
        patch_size=cfg["patch-size"] or None,
    )
    if cache_dir is None:
        backbone = _load_backbone(**args)
    else:
        from .backbone_cache import cached_backbone

        backbone = cached_backbone(cache_dir, _load_backbone, **args)
    # The same seed on server and clients gives identical fresh adapters, but
    # clients always load the server's weights anyway; the seed matters for
    # the server's initial state and reproducibility.
    with torch.random.fork_rng():
        torch.manual_seed(cfg["seed"] if seed is None else seed)
        return with_adapters(backbone, num_classes, cfg)


def with_adapters(backbone, num_classes: int, cfg: dict[str, Any]) -> AnytimeViT:
    """The AnytimeViT of a backbone with the run config's adapter settings."""
    return AnytimeViT(
        backbone,
        num_classes,
        width=cfg["adapter-width"],
        num_heads=cfg["adapter-heads"],
        mlp_ratio=cfg["adapter-mlp-ratio"],
        shared_adapter=cfg["shared-adapter"],
        ensemble=cfg["exit-ensemble"],
        patch_mean=cfg["exit-patch-mean"],
        token_width=cfg["token-adapter-width"],
    )


def _load_backbone(name: str, **kwargs):
    # timm is imported only when a backbone is really built through it.
    from .backbone import load_backbone

    return load_backbone(name, **kwargs)


def num_blocks(model) -> int:
    return len(model.blocks)


def backbone_input(model) -> tuple[int, int, int]:
    """(channels, height, width) the backbone's patch embedding expects."""
    pe = model.patch_embed
    h, w = pe.img_size
    return pe.proj.in_channels, h, w


def resolve_device(name: str) -> torch.device:
    """'auto' -> the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BackboneError(
            "device", f"{name!r} asked for, but this torch sees no CUDA GPU (torch {torch.__version__})"
        )
    return torch.device(name)


def input_spec_fields(model: AnytimeViT) -> dict:
    """in_chans, img_size, mean, std of the backbone, for the data pipeline."""
    bb = model.backbone
    in_chans, img_size, _ = backbone_input(bb)
    cfg = getattr(bb, "pretrained_cfg", {}) or {}
    return {
        "in_chans": in_chans,
        "img_size": img_size,
        "mean": tuple(cfg.get("mean", (0.5,))),
        "std": tuple(cfg.get("std", (0.5,))),
    }


__all__ = ["build_model", "resolve_device", "resolve_weights", "input_spec_fields", "num_blocks", "SHIPPED"]
