"""The local optimisers give torch.optim's bits without importing torch.optim's compiler."""

import subprocess
import sys

import pytest
import torch

from adapters.optim import SGD, AdamW, make_optimizer


def _train(make, sometimes_idle: bool):
    torch.manual_seed(0)
    params = [
        torch.randn(4, 6, requires_grad=True),
        torch.randn(6, requires_grad=True),
        torch.randn(3, requires_grad=True),
    ]
    opt = make(params)
    gen = torch.Generator().manual_seed(1)
    for step in range(15):
        x = torch.randn(6, generator=gen)
        opt.zero_grad()
        loss = ((params[0] @ x).sum() + params[1].pow(2).sum()) ** 2
        if not sometimes_idle or step % 3 == 0:  # the third parameter gets no gradient in most steps
            loss = loss + params[2].sum()
        loss.backward()
        opt.step()
    return [p.detach() for p in params]


@pytest.mark.parametrize("sometimes_idle", [False, True])
@pytest.mark.parametrize(
    "ours, theirs",
    [
        (lambda p: AdamW(p, lr=3e-3, weight_decay=1e-4), lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=1e-4)),
        (
            lambda p: SGD(p, lr=1e-3, momentum=0.9, weight_decay=1e-4),
            lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.9, weight_decay=1e-4),
        ),
        # the parameters exempt from weight decay: torch.optim's second param group
        (
            lambda p: AdamW(p, lr=3e-3, weight_decay=0.05, no_decay=p[1:]),
            lambda p: torch.optim.AdamW(
                [{"params": p[:1]}, {"params": p[1:], "weight_decay": 0.0}], lr=3e-3, weight_decay=0.05
            ),
        ),
        (
            lambda p: SGD(p, lr=1e-3, momentum=0.9, weight_decay=0.05, no_decay=p[1:]),
            lambda p: torch.optim.SGD(
                [{"params": p[:1]}, {"params": p[1:], "weight_decay": 0.0}], lr=1e-3, momentum=0.9, weight_decay=0.05
            ),
        ),
    ],
    ids=["adamw", "sgd", "adamw-no-decay", "sgd-no-decay"],
)
def test_same_bits_as_torch_optim(ours, theirs, sometimes_idle):
    mine, ref = _train(ours, sometimes_idle), _train(theirs, sometimes_idle)
    assert all(torch.equal(a, b) for a, b in zip(mine, ref))


def test_make_optimizer_by_name():
    p = [torch.zeros(2, requires_grad=True)]
    assert isinstance(make_optimizer(p, "adamw", 1e-3, 0.0), AdamW)
    assert isinstance(make_optimizer(p, "sgd", 1e-3, 0.0), SGD)


def test_a_training_step_does_not_import_the_compiler():
    code = (
        "import sys, torch\n"
        "from adapters.optim import make_optimizer\n"
        "for name in ('adamw', 'sgd'):\n"
        "    p = [torch.randn(3, requires_grad=True)]\n"
        "    opt = make_optimizer(p, name, 1e-3, 1e-4)\n"
        "    p[0].sum().backward(); opt.step()\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
