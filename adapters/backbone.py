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
    except Exception as err:  # noqa: BLE001 - the file reader, torch and the hub client raise many kinds
        # One line naming the key and what to do, not the loader's traceback.
        raise _load_error(err, name, weights, pretrained) from None
    if weights or pretrained:
        _check_finite(model, "backbone-weights" if weights else "pretrained", weights or f"{name!r} hub weights")
    if not isinstance(model, VisionTransformer):
        raise BackboneError("backbone", f"{name!r} is not a plain ViT/DeiT (got {type(model).__name__})")
    if getattr(model, "cls_token", None) is None:
        raise BackboneError("backbone", f"{name!r} has no CLS token; the accumulator adapter needs one")
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


# Words of torch's and timm's complaints about a readable file made for another model.
_MISMATCH = ("size mismatch", "missing key", "unexpected key", "inconsistent with", "shape")


def _load_error(err: Exception, name: str, weights: str, pretrained: bool) -> BackboneError:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    # torch's "Error(s) in loading state_dict for X:" says what on its next line
    gist = (lines[1] if len(lines) > 1 and lines[0].endswith(":") else lines[0]) if lines else ""
    detail = f"{type(err).__name__}: {gist[:300]}"
    if weights:
        readable = not isinstance(err, (SafetensorError, UnpicklingError, EOFError, OSError))
        if readable and any(word in str(err).lower() for word in _MISMATCH):
            return BackboneError(
                "backbone-weights",
                f"{weights}: does not match backbone {name!r} ({detail}); set backbone to the model the file was "
                f"saved from, or backbone-weights to a file for {name!r}",
            )
        return BackboneError("backbone-weights", f"{weights}: not a readable weights file ({detail})")
    if pretrained:
        return BackboneError(
            "pretrained",
            f"could not fetch timm's pretrained weights of {name!r} ({detail}); without a network set "
            "backbone-weights to a local weights file (e.g. backbone-weights='/path/model.safetensors')",
        )
    return BackboneError("backbone", f"could not build {name!r} ({detail})")


@torch.no_grad()
def _check_finite(model: nn.Module, key: str, source: str) -> None:
    """A NaN or infinite weight would make every client's update non-finite, each dropped in turn:
    refuse it here, before round 1."""
    for tensor_name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise BackboneError(key, f"{source}: tensor {tensor_name!r} holds NaN or infinite values (a damaged file)")


@torch.no_grad()
def frozen_state_digest(model: nn.Module) -> float:
    """A scalar that changes when any backbone weight changes (tests, sanity checks)."""
    return float(sum(p.double().abs().sum() for p in model.parameters()))
