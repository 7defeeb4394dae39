"""The accumulator adapter of arXiv 2212.04084.

After block l the CLS tokens seen so far, [c_1 .. c_l], are read by a small
pre-norm attention module together with a learned query token q. Its first
output token feeds the exit head (early prediction); its last output token
becomes the CLS token that enters block l+1 (modulation).
"""

from __future__ import annotations

import torch
from torch import nn


class AccumulatorAdapter(nn.Module):
    """One attention layer of width `width` over [q; c_1 .. c_l].

    Args:
        embed_dim: the backbone's token width (the CLS tokens it reads).
        max_len: the most CLS tokens it will read (the backbone's blocks),
            which sizes its position embedding.
        width: attention width after the down-projection (`adapter-width`).
        num_heads: attention heads (`adapter-heads`); must divide `width`.
        mlp_ratio: the MLP's hidden size as a multiple of `width`.
    """

    def __init__(self, embed_dim: int, max_len: int, width: int = 32, num_heads: int = 2, mlp_ratio: float = 2.0):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"adapter-width ({width}) must be divisible by adapter-heads ({num_heads})")
        self.query = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # position 0 is the query, 1..max_len the blocks
        self.pos = nn.Parameter(torch.zeros(1, max_len + 1, width))
        self.norm_in = nn.LayerNorm(embed_dim)
        self.down = nn.Linear(embed_dim, width)
        self.norm1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, num_heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        hidden = max(1, int(width * mlp_ratio))
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.up = nn.Linear(width, embed_dim)
        nn.init.trunc_normal_(self.query, std=0.02)
        nn.init.trunc_normal_(self.pos, std=0.02)
        # A zero up-projection makes a fresh adapter the identity on the CLS
        # token, so training starts from the unmodified pre-trained backbone.
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def no_weight_decay(self) -> set[str]:
        """The learned tokens, kept from weight decay as timm's ViT keeps its CLS token and position embedding."""
        return {"query", "pos"}

    def forward(self, history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """history: (B, l, D) CLS tokens of blocks 1..l.

        Returns (summary, new_cls): the query's output token and the last
        output token, both (B, D).
        """
        b, n, _ = history.shape
        x = torch.cat([self.query.expand(b, -1, -1), history], dim=1)
        h = self.down(self.norm_in(x)) + self.pos[:, : n + 1]
        y = self.norm1(h)
        h = h + self.attn(y, y, y, need_weights=False)[0]
        h = h + self.mlp(self.norm2(h))
        out = x + self.up(h)
        return out[:, 0], out[:, -1]


class ExitHead(nn.Module):
    """logits_l = Linear(LayerNorm(m_0 + c_l)), or with `patch_mean`
    Linear([LayerNorm(m_0 + c_l), LayerNorm(mean of block l's patch tokens)]).

    A shallow block's CLS token has read little of the image yet while its
    patch tokens hold it (docs/benchmarks.md, section 2c, measures the gain).

    Args:
        embed_dim: the backbone's token width.
        num_classes: the task's classes.
        patch_mean: also read the block's mean patch token (`exit-patch-mean`).
    """

    def __init__(self, embed_dim: int, num_classes: int, patch_mean: bool = False):
        super().__init__()
        self.norm = nn.LayerNorm(embed_dim)
        self.patch_norm = nn.LayerNorm(embed_dim) if patch_mean else None
        self.fc = nn.Linear(embed_dim * (2 if patch_mean else 1), num_classes)

    def forward(self, summary: torch.Tensor, cls: torch.Tensor, patches: torch.Tensor | None = None) -> torch.Tensor:
        """patches: (B, D) the block's mean patch token; read only with `patch_mean`."""
        return self.read(summary + cls, patches)

    def read(self, token: torch.Tensor, patches: torch.Tensor | None = None) -> torch.Tensor:
        """Logits from the token the exit reads (m_0 + c_l) and, with `patch_mean`, the mean patch token."""
        h = self.norm(token)
        if self.patch_norm is not None:
            h = torch.cat([h, self.patch_norm(patches)], dim=-1)
        return self.fc(h)
