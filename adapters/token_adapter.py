"""The token adapter: a bottleneck MLP on every token a block puts out.

The accumulator adapter reads and changes the CLS token only; on a backbone
whose CLS token carries little of the input, one modulated token among all
the patch tokens barely moves what the frozen blocks compute, and the exit
heads, which read the patch tokens too, see the pre-trained features
unchanged. A residual bottleneck on every token (Houlsby et al. 2019's
adapter, placed after the block as in AdaptFormer's serial form) changes the
patch features themselves: what full fine-tuning changes, at a fraction of
its parameters (docs/benchmarks.md, section 0, measures it).
"""

from __future__ import annotations

import torch
from torch import nn


class TokenAdapter(nn.Module):
    """x + up(GELU(down(LayerNorm(x)))) on every token, `width` wide in the middle.

    The zero up-projection makes a fresh adapter the identity, so training
    starts from the unmodified pre-trained backbone.
    """

    def __init__(self, embed_dim: int, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(embed_dim)
        self.down = nn.Linear(embed_dim, width)
        self.up = nn.Linear(width, embed_dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens + self.up(nn.functional.gelu(self.down(self.norm(tokens))))
