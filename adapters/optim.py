"""The local optimisers (AdamW, SGD with momentum), without torch.optim.

torch.optim imports torch._dynamo (the compiler) on an optimizer's first
step: about as long as importing torch itself on a small CPU, and a deployed
client pays it on every message, each one a fresh process. These are the
multi-tensor (`foreach`) updates of `torch.optim.AdamW` and `torch.optim.SGD`
with their defaults, operation for operation, so one `torch._foreach_*` call
updates all ~200 small adapter tensors at once; tests hold them to
torch.optim's bits.
"""

from __future__ import annotations

import torch


class _Foreach:
    """What both optimisers share: the parameters, zero_grad, and which of
    them have a gradient this step (torch.optim skips the others)."""

    def __init__(self, params, lr: float, no_decay=()):
        self.params = list(params)
        self.lr = float(lr)
        exempt = {id(p) for p in no_decay}
        # torch.optim's second param group {"params": no_decay, "weight_decay": 0.0}
        self.decays = [id(p) not in exempt for p in self.params]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def _live(self) -> tuple[list[int], list[torch.Tensor], list[torch.Tensor]]:
        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        params = [self.params[i] for i in live]
        return live, params, [p.grad for p in params]

    def _decayed(self, live: list[int]) -> list[int]:
        """Positions in `live` of the parameters that take weight decay."""
        return [j for j, i in enumerate(live) if self.decays[i]]


class AdamW(_Foreach):
    """torch.optim.AdamW(params, lr, weight_decay=..., foreach=True), no amsgrad."""

    def __init__(
        self, params, lr: float, weight_decay: float = 1e-2, betas=(0.9, 0.999), eps: float = 1e-8, no_decay=()
    ):
        super().__init__(params, lr, no_decay)
        self.weight_decay, self.eps = float(weight_decay), float(eps)
        self.beta1, self.beta2 = (float(b) for b in betas)
        self.steps = [0] * len(self.params)  # per parameter: one without a gradient does not step
        self.exp_avg = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]

    @torch.no_grad()
    def step(self) -> None:
        live, params, grads = self._live()
        if not live:
            return
        m = [self.exp_avg[i] for i in live]
        v = [self.exp_avg_sq[i] for i in live]
        for i in live:
            self.steps[i] += 1
        steps = [float(self.steps[i]) for i in live]
        decayed = [params[j] for j in self._decayed(live)]
        if self.weight_decay != 0 and decayed:
            torch._foreach_mul_(decayed, 1 - self.lr * self.weight_decay)
        torch._foreach_lerp_(m, grads, 1 - self.beta1)
        torch._foreach_mul_(v, self.beta2)
        torch._foreach_addcmul_(v, grads, grads, 1 - self.beta2)
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, [(1 - self.beta2**s) ** 0.5 for s in steps])
        torch._foreach_add_(denom, self.eps)
        torch._foreach_addcdiv_(params, m, denom, [-self.lr / (1 - self.beta1**s) for s in steps])


class SGD(_Foreach):
    """torch.optim.SGD(params, lr, momentum=..., weight_decay=..., foreach=True)."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, no_decay=()):
        super().__init__(params, lr, no_decay)
        self.momentum, self.weight_decay = float(momentum), float(weight_decay)
        self.buffers: list[torch.Tensor | None] = [None] * len(self.params)

    @torch.no_grad()
    def step(self) -> None:
        live, params, grads = self._live()
        if not live:
            return
        decayed = self._decayed(live)
        if self.weight_decay != 0 and decayed:
            grads = list(grads)
            sums = torch._foreach_add(
                [grads[j] for j in decayed], [params[j] for j in decayed], alpha=self.weight_decay
            )
            for j, g in zip(decayed, sums):
                grads[j] = g
        if self.momentum != 0:
            if any(self.buffers[i] is None for i in live):
                for i, g in zip(live, grads):
                    if self.buffers[i] is None:
                        self.buffers[i] = torch.clone(g).detach()
                    else:
                        self.buffers[i].mul_(self.momentum).add_(g)
            else:
                bufs = [self.buffers[i] for i in live]
                torch._foreach_mul_(bufs, self.momentum)
                torch._foreach_add_(bufs, grads)
            grads = [self.buffers[i] for i in live]
        torch._foreach_add_(params, grads, alpha=-self.lr)


def make_optimizer(params: list, name: str, lr: float, weight_decay: float, no_decay=()):
    """'adamw' or 'sgd' (momentum 0.9), as the run config's `optimizer` names it; the
    parameters in `no_decay` (by identity) take no weight decay."""
    if name == "sgd":
        return SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay, no_decay=no_decay)
    return AdamW(params, lr=lr, weight_decay=weight_decay, no_decay=no_decay)
