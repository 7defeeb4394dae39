"""A plain ViT in torch alone, for loading a cached backbone without timm.

Importing timm costs seconds (it imports every model family and, through
torchvision, torch's compiler stack), and a SuperNode pays that on every
message. The common case, timm's `VisionTransformer` with a class token,
learned position embedding, pre-norm blocks, fused-qkv attention and a GELU
MLP, is rebuilt here with the same parameter names. `plain_spec` decides
from a built timm model whether it is that case; the backbone cache then
also checks that both compute the same features before it keeps a copy.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"input is {tuple(x.shape[-2:])} pixels, the backbone takes {self.img_size}")
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, proj_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, hidden: int, eps: float, qkv_bias: bool, proj_bias: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias, proj_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PlainViT(nn.Module):
    """The attributes AnytimeViT uses of a timm ViT, with timm's parameter names."""

    def __init__(self, spec: dict[str, Any]):
        super().__init__()
        dim = spec["embed_dim"]
        self.embed_dim = self.num_features = dim
        self.num_prefix_tokens = 1
        self.patch_embed = PatchEmbed(spec["img_size"], spec["patch_size"], spec["in_chans"], dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, dim))
        self.patch_drop = nn.Identity()
        self.norm_pre = nn.Identity()
        self.blocks = nn.ModuleList(
            Block(dim, spec["num_heads"], spec["mlp_hidden"], spec["eps"], spec["qkv_bias"], spec["proj_bias"])
            for _ in range(spec["depth"])
        )
        self.norm = nn.LayerNorm(dim, eps=spec["eps"])
        self.pretrained_cfg = {"mean": tuple(spec["mean"]), "std": tuple(spec["std"])}

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        # The class token has its own position embedding: concatenate, then add.
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._pos_embed(self.patch_embed(x))
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def _is(module: nn.Module | None, *names: str) -> bool:
    return module is not None and type(module).__name__ in names


def plain_spec(model: nn.Module) -> dict[str, Any] | None:
    """The PlainViT spec of a built timm ViT, or None when it is not the plain case."""
    identity = ("Identity", "Dropout")
    pe = getattr(model, "patch_embed", None)
    if not (
        _is(model, "VisionTransformer")
        and getattr(model, "cls_token", None) is not None
        and getattr(model, "reg_token", None) is None
        and getattr(model, "pos_embed", None) is not None
        and not getattr(model, "no_embed_class", True)
        and not getattr(model, "dynamic_img_size", True)
        and _is(pe, "PatchEmbed")
        and getattr(pe, "flatten", False)
        and not getattr(pe, "dynamic_img_pad", True)
        and _is(getattr(pe, "norm", None), *identity)
        and pe.img_size[0] == pe.img_size[1]
        and pe.patch_size[0] == pe.patch_size[1]
        and pe.proj.padding == (0, 0)
        and all(_is(getattr(model, a, None), *identity) for a in ("patch_drop", "norm_pre", "pos_drop"))
        and _is(getattr(model, "norm", None), "LayerNorm")
    ):
        return None
    blocks = list(model.blocks)
    for b in blocks:
        attn, mlp = getattr(b, "attn", None), getattr(b, "mlp", None)
        if not (
            _is(b, "Block")
            and _is(attn, "Attention")
            and _is(mlp, "Mlp")
            and _is(b.norm1, "LayerNorm")
            and _is(b.norm2, "LayerNorm")
            and all(_is(getattr(b, a, None), *identity) for a in ("ls1", "ls2", "drop_path1", "drop_path2"))
            and all(_is(getattr(attn, a, None), *identity) for a in ("q_norm", "k_norm", "norm"))
            and getattr(attn, "gate", None) is None
            and attn.qkv.out_features == 3 * model.embed_dim
            and _is(mlp.act, "GELU")
            and getattr(mlp.act, "approximate", "") == "none"
            and _is(getattr(mlp, "norm", None), *identity)
            and getattr(mlp, "fc1", None) is not None
        ):
            return None
    first = blocks[0]
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    return {
        "img_size": int(pe.img_size[0]),
        "patch_size": int(pe.patch_size[0]),
        "in_chans": int(pe.proj.in_channels),
        "embed_dim": int(model.embed_dim),
        "depth": len(blocks),
        "num_heads": int(first.attn.num_heads),
        "mlp_hidden": int(first.mlp.fc1.out_features),
        "eps": float(first.norm1.eps),
        "qkv_bias": first.attn.qkv.bias is not None,
        "proj_bias": first.attn.proj.bias is not None,
        "mean": [float(v) for v in cfg.get("mean", (0.5,))],
        "std": [float(v) for v in cfg.get("std", (0.5,))],
    }


@torch.no_grad()
def same_features(a: nn.Module, b: nn.Module, spec: dict[str, Any]) -> bool:
    """Whether two backbones give the same tokens after every block."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, spec["in_chans"], spec["img_size"], spec["img_size"], generator=gen)
    ta, tb = a._pos_embed(a.patch_embed(x)), b._pos_embed(b.patch_embed(x))
    for block_a, block_b in zip(a.blocks, b.blocks):
        ta, tb = block_a(ta), block_b(tb)
        if not torch.allclose(ta, tb, rtol=0, atol=1e-6):
            return False
    return True
