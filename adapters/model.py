"""AnytimeViT: a frozen ViT with an accumulator adapter and exit at every block."""

from __future__ import annotations

import torch
from torch import nn

from .accumulator import AccumulatorAdapter, ExitHead
from .token_adapter import TokenAdapter


class AnytimeViT(nn.Module):
    """A frozen timm ViT with an accumulator adapter and an exit head after every block.

    `model(x, depth=d)` runs blocks 1..d only and returns the logits of exits
    1..d; only the adapters and heads have trainable parameters.

    Args:
        backbone: a timm VisionTransformer with a CLS token; it is used as
            given (frozen by `adapters.backbone.load_backbone`).
        num_classes: classes of every exit head.
        width: attention width of each adapter (`adapter-width`).
        num_heads: attention heads of each adapter (`adapter-heads`); must divide width.
        mlp_ratio: the adapter MLP's hidden size as a multiple of `width`.
        shared_adapter: one adapter for every block instead of one per block
            (the heads stay one per block).
        ensemble: exit k returns the mean of the logits of heads 1..k instead
            of head k's alone (`exit-ensemble`).
        patch_mean: each exit head also reads its block's mean patch token
            (`exit-patch-mean`).
        token_width: bottleneck width of a token adapter after every block
            (`token-adapter-width`); 0 = none (the paper's accumulator alone).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        *,
        width: int = 32,
        num_heads: int = 2,
        mlp_ratio: float = 2.0,
        shared_adapter: bool = False,
        ensemble: bool = False,
        patch_mean: bool = False,
        token_width: int = 0,
    ):
        super().__init__()
        self.backbone = backbone
        self.num_blocks = len(backbone.blocks)
        dim = backbone.embed_dim
        make = lambda: AccumulatorAdapter(dim, self.num_blocks, width, num_heads, mlp_ratio)  # noqa: E731
        self.shared = shared_adapter
        if shared_adapter:
            self.adapter = make()
        else:
            self.adapters = nn.ModuleList(make() for _ in range(self.num_blocks))
        self.heads = nn.ModuleList(ExitHead(dim, num_classes, patch_mean) for _ in range(self.num_blocks))
        self.token_adapters = (
            nn.ModuleList(TokenAdapter(dim, token_width) for _ in range(self.num_blocks)) if token_width else None
        )
        self.patch_mean = patch_mean
        # the tokens in front of the patches (CLS, and a distillation token in some timm ViTs)
        self.prefix = getattr(backbone, "num_prefix_tokens", 1)
        self.num_classes = num_classes
        self.ensemble = ensemble

    def train(self, mode: bool = True):
        super().train(mode)
        # The backbone is frozen: dropout / drop-path stay off while adapters train.
        self.backbone.eval()
        return self

    def adapter_for(self, block: int) -> AccumulatorAdapter:
        return self.adapter if self.shared else self.adapters[block]

    def block(self, i: int, tokens: torch.Tensor, grad: bool = True) -> torch.Tensor:
        """Frozen block i (0-based), then its token adapter when there is one.

        grad=False runs the block without building a graph; the token adapter
        after it still trains (it feeds exit i directly).
        """
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            tokens = self.backbone.blocks[i](tokens)
        return tokens if self.token_adapters is None else self.token_adapters[i](tokens)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        bb = self.backbone
        x = bb.patch_embed(x)
        x = bb._pos_embed(x)
        x = bb.patch_drop(x)
        return bb.norm_pre(x)

    def forward(self, x: torch.Tensor, depth: int | None = None, block_grad: bool = True) -> list[torch.Tensor]:
        """Run blocks 1..depth only; return the logits of exits 1..depth.

        block_grad=False runs the frozen blocks without building a graph:
        each adapter still modulates the CLS token the next block reads, but
        an exit's gradient stops at the block in front of it, so training
        skips the backward pass through the backbone (adapter l then learns
        from exit l alone; its modulation shares those weights).
        """
        depth = self.num_blocks if depth is None else depth
        if not 1 <= depth <= self.num_blocks:
            raise ValueError(f"depth must be in 1..{self.num_blocks}, got {depth}")
        tokens = self.embed(x)
        history: list[torch.Tensor] = []
        logits = []
        z = None
        for i in range(depth):
            tokens = self.block(i, tokens, block_grad)
            cls = tokens[:, 0]
            history.append(cls)
            summary, new_cls = self.adapter_for(i)(torch.stack(history, dim=1))
            z = self.exit_logits(i, self.head_logits(i, summary, cls, tokens), z)
            logits.append(z)
            if i + 1 < depth:
                tokens = torch.cat([new_cls.unsqueeze(1), tokens[:, 1:]], dim=1)
        return logits

    def head_logits(self, i: int, summary: torch.Tensor, cls: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Head i's own logits (0-based) from the adapter's summary and block i's output tokens."""
        patches = tokens[:, self.prefix :].mean(dim=1) if self.patch_mean else None
        return self.heads[i](summary, cls, patches)

    def exit_logits(self, i: int, own: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
        """Exit i's logits (0-based) from its head's own and exit i-1's returned logits.

        With the ensemble, the running mean of heads 1..i+1: a head costs a
        matrix-vector product and every one of them runs on the way to a deep
        exit anyway, while a deep exit's head, fitted on the few nodes that
        reach it, gains most from the shallow heads fitted on every node.
        """
        if not self.ensemble or previous is None:
            return own
        return previous + (own - previous) / (i + 1)

    def no_weight_decay(self) -> set[str]:
        """Full names of the adapters' learned tokens (timm's `no_weight_decay` convention)."""
        return {
            f"{prefix}.{name}"
            for prefix, module in self.named_modules()
            if isinstance(module, AccumulatorAdapter)
            for name in module.no_weight_decay()
        }

    def trainable_named_parameters(self):
        return [(n, p) for n, p in self.named_parameters() if not n.startswith("backbone.")]
