"""AdamW for local training, without torch.optim.

torch's optimizers import torch._dynamo (the compiler, over a second on a
small CPU) on their first step, and a deployed client pays that on every
message, each one a fresh process. This is the same update as
`torch.optim.AdamW` with its defaults (single-tensor path, no amsgrad),
operation for operation, so results do not change; a test holds the two
to the same bits.
"""

from __future__ import annotations

import torch


class AdamW:
    def __init__(self, params, lr: float, weight_decay: float = 1e-2, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params = [p for p in params]
        self.lr, self.weight_decay, self.eps = float(lr), float(weight_decay), float(eps)
        self.beta1, self.beta2 = (float(b) for b in betas)
        self.steps = 0
        self.exp_avg = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        bias1 = 1 - self.beta1 ** float(self.steps)
        bias2_sqrt = (1 - self.beta2 ** float(self.steps)) ** 0.5
        step_size = self.lr / bias1
        for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq):
            if p.grad is None:
                continue
            g = p.grad
            if self.weight_decay != 0:
                p.mul_(1 - self.lr * self.weight_decay)
            m.lerp_(g, 1 - self.beta1)
            v.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
            p.addcdiv_(m, (v.sqrt() / bias2_sqrt).add_(self.eps), value=-step_size)
