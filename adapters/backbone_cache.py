"""The built, frozen backbone kept on a node's disk between messages.

A Flower SuperNode handles every message in a fresh process; building the
backbone through timm there costs seconds of imports alone. The first
message builds it with timm and, when it is a plain ViT (`adapters.vit`)
that computes the same features, stores its spec (JSON) and weights
(safetensors) under a key made of everything that shapes the backbone: the
config values, the weights file's size and modification time, the timm
version and this code's source. Later messages load that without timm. A
changed key is a new entry; nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

import torch
from torch import nn

from .vit import PlainViT, plain_spec, same_features

log = logging.getLogger(__name__)
SPEC, WEIGHTS = "spec.json", "backbone.safetensors"
_SOURCES = ("vit.py", "backbone.py", "backbone_cache.py")


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return ""


def backbone_key(name: str, weights: str, pretrained: bool, img_size: int | None, patch_size: int | None) -> str:
    parts: dict = {
        "name": name,
        "pretrained": bool(pretrained) and not weights,
        "img_size": img_size or 0,
        "patch_size": patch_size or 0,
        "timm": _version("timm"),
        "torch": torch.__version__,
    }
    if weights:
        st = Path(weights).expanduser().stat()
        parts["weights"] = [str(Path(weights).expanduser().resolve()), st.st_size, st.st_mtime_ns]
    here = Path(__file__).resolve().parent
    parts["code"] = hashlib.sha256(b"".join((here / f).read_bytes() for f in _SOURCES)).hexdigest()
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def load_cached(folder: Path) -> nn.Module | None:
    """The backbone stored in `folder`, or None when there is none (or it is unreadable)."""
    if not (folder / SPEC).is_file():
        return None
    from safetensors.torch import load_file

    try:
        spec = json.loads((folder / SPEC).read_text())
        with torch.device("meta"):
            model = PlainViT(spec)
        model.load_state_dict(load_file(str(folder / WEIGHTS)), strict=True, assign=True)
    except Exception as err:  # noqa: BLE001 - a damaged entry of any kind is rebuilt, not fatal
        log.warning("removing the unreadable backbone cache in %s (%s); rebuilding it", folder, err)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def store(model: nn.Module, folder: Path) -> bool:
    """Keep `model` in `folder` when PlainViT can stand in for it; True when stored."""
    spec = plain_spec(model)
    if spec is None:
        return False
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with torch.device("meta"):
        plain = PlainViT(spec)
    try:
        plain.load_state_dict(state, strict=True, assign=True)
    except RuntimeError:  # names or shapes differ from the plain case
        return False
    if not same_features(model, plain.eval(), spec):
        return False
    from safetensors.torch import save_file

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
    try:
        save_file(state, str(tmp / WEIGHTS))
        (tmp / SPEC).write_text(json.dumps(spec, indent=1))
        # Readers see a whole entry or none; another process may have won the race.
        os.rename(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / SPEC).is_file():
            raise
    return True


def cached_backbone(cache_dir: Path, build, **args) -> nn.Module:
    """The backbone `build(**args)` makes, from `cache_dir` when it holds it."""
    try:
        folder = Path(cache_dir) / "backbone" / backbone_key(**args)
    except OSError:  # e.g. no weights file: building says so, naming the key
        return build(**args)
    model = load_cached(folder)
    if model is not None:
        return model
    model = build(**args)
    try:
        store(model, folder)
    except OSError as err:
        log.warning("could not write the backbone cache in %s (%s); each message builds it again", folder, err)
    return model
