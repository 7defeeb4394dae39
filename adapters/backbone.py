"""Frozen timm Vision Transformer backbones.

Any timm ViT/DeiT with `patch_embed`, `cls_token`, `blocks` and `norm` works.
One small model is registered here, `vit_micro_patch7_28`: the 12-block,
96-wide ViT whose Fashion-MNIST pre-trained weights ship with the project so
the default run works with no network.
"""

from __future__ import annotations

from pathlib import Path
from pickle import UnpicklingError  # the exception only: nothing here unpickles

import torch
from safetensors import SafetensorError
from torch import nn

from .compat import import_timm
from .errors import BackboneError

timm = import_timm()
from timm.models import register_model  # noqa: E402
from timm.models._registry import generate_default_cfgs  # noqa: E402
from timm.models.vision_transformer import (  # noqa: E402
    VisionTransformer,
    _create_vision_transformer,
)

# timm's registry reads pretrained configs from the module that registers the
# model; the shipped weights are attached with `pretrained_cfg_overlay`.
default_cfgs = generate_default_cfgs(
    {
        "vit_micro_patch7_28.fmnist": {
            "url": "",
            "num_classes": 10,
            "input_size": (1, 28, 28),
            "mean": (0.5,),
            "std": (0.5,),
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        }
    }
)


@register_model
def vit_micro_patch7_28(pretrained: bool = False, **kwargs) -> VisionTransformer:
    args = dict(img_size=28, patch_size=7, in_chans=1, embed_dim=96, depth=12, num_heads=3, mlp_ratio=4.0)
    return _create_vision_transformer("vit_micro_patch7_28", pretrained=pretrained, **dict(args, **kwargs))


def load_backbone(
    name: str,
    *,
    weights: str = "",
    pretrained: bool = False,
    img_size: int | None = None,
    patch_size: int | None = None,
    in_chans: int | None = None,
) -> VisionTransformer:
    """Create a timm ViT, load its weights, freeze it and put it in eval mode.

    `weights` is a local .safetensors/.pth file (no network); `pretrained`
    fetches timm's hub weights. Size arguments left as None keep the model's
    own; when given, timm resamples the position and patch embeddings.
    """
    if not timm.is_model(name):
        raise BackboneError("backbone", f"unknown timm model {name!r}")
    kwargs: dict = {"num_classes": 0}
    for key, value in (("img_size", img_size), ("patch_size", patch_size), ("in_chans", in_chans)):
        if value:
            kwargs[key] = value
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise BackboneError("backbone-weights", f"no weights file at {path}")
        # The file's own classifier is dropped by timm because the config's
        # num_classes differs from ours (0): hub files and ours load alike.
        kwargs["pretrained_cfg_overlay"] = {"file": str(path)}
    try:
        model = timm.create_model(name, pretrained=bool(weights) or pretrained, **kwargs)
    except (RuntimeError, OSError, SafetensorError, UnpicklingError, EOFError) as err:
        # A damaged weights file: one line naming it, not the loader's traceback.
        key = "backbone-weights" if weights else "pretrained" if pretrained else "backbone"
        what = f"{weights}: not a readable weights file" if weights else f"could not build {name!r}"
        raise BackboneError(
            key, f"{what} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from None
    if not isinstance(model, VisionTransformer):
        raise BackboneError("backbone", f"{name!r} is not a plain ViT/DeiT (got {type(model).__name__})")
    if getattr(model, "cls_token", None) is None:
        raise BackboneError("backbone", f"{name!r} has no CLS token; the accumulator adapter needs one")
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


@torch.no_grad()
def frozen_state_digest(model: nn.Module) -> float:
    """A scalar that changes when any backbone weight changes (tests, sanity checks)."""
    return float(sum(p.double().abs().sum() for p in model.parameters()))
