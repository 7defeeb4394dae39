"""Local training options: gradient stop at the frozen blocks, logit adjustment, optimiser and schedule."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset, TensorDataset

from adapters.backbone import load_backbone
from adapters.model import AnytimeViT
from adapters.training import TrainSettings, exit_losses, label_counts, logit_prior, no_decay, train_local
from core.config import ConfigError, validate
from core.naming import param_block


@pytest.fixture()
def model():
    torch.manual_seed(0)
    return AnytimeViT(load_backbone("vit_micro_patch7_28"), num_classes=4)


def _backward_calls(model, block_grad: bool) -> tuple[list[int], list[bool]]:
    """Blocks whose backward ran, and whether each block's output is in the graph."""
    calls, in_graph = [], []
    hooks = []
    for k, b in enumerate(model.backbone.blocks):
        hooks.append(b.register_full_backward_hook(lambda m, gi, go, k=k: calls.append(k)))
        hooks.append(b.register_forward_hook(lambda m, i, o: in_graph.append(o.requires_grad)))
    try:
        model.train()
        logits = model(torch.randn(3, 1, 28, 28), depth=12, block_grad=block_grad)
        sum(z.sum() for z in logits).backward()
    finally:
        for h in hooks:
            h.remove()
    return calls, in_graph


def test_grad_stop_runs_no_backward_through_the_blocks(model):
    calls, in_graph = _backward_calls(model, block_grad=False)
    assert calls == []
    assert in_graph == [False] * 12
    # every adapter and head still gets a gradient from its own exit
    for name, p in model.trainable_named_parameters():
        if name.endswith((".up.weight", ".fc.weight")):
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_default_mode_backpropagates_through_blocks_2_to_12(model):
    calls, in_graph = _backward_calls(model, block_grad=True)
    # block 1 reads no trainable input; blocks 2..12 read an adapter's CLS token
    assert sorted(calls) == list(range(1, 12))
    assert in_graph[1:] == [True] * 11


def test_grad_stop_training_changes_every_adapter_and_head(model):
    before = {n: p.detach().clone() for n, p in model.trainable_named_parameters()}
    gen = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(32, 1, 28, 28, generator=gen), torch.randint(0, 4, (32,), generator=gen))
    train_local(model, DataLoader(ds, batch_size=8), 12, TrainSettings(epochs=2, lr=1e-2, block_grad=False))
    after = dict(model.trainable_named_parameters())
    for i in range(12):
        for part in ("query", "down.weight", "attn.in_proj_weight", "mlp.0.weight", "up.weight"):
            name = f"adapters.{i}.{part}"
            assert not torch.equal(before[name], after[name]), f"{name} did not change"
        assert not torch.equal(before[f"heads.{i}.fc.weight"], after[f"heads.{i}.fc.weight"])
    # the frozen backbone stays frozen
    assert all(not p.requires_grad for p in model.backbone.parameters())


def test_grad_stop_does_not_change_the_forward_pass(model):
    x = torch.randn(2, 1, 28, 28)
    model.eval()
    with torch.no_grad():
        a = model(x)
    b = model(x, block_grad=False)
    assert all(torch.allclose(u, v.detach()) for u, v in zip(a, b))


def test_label_counts_of_a_subset_and_the_prior():
    ds = Subset(TensorDataset(torch.zeros(6, 1), torch.tensor([0, 0, 1, 2, 2, 2])), [0, 1, 3, 4])
    counts = label_counts(ds, 4)
    assert counts.tolist() == [2.0, 0.0, 2.0, 0.0]
    prior = logit_prior(counts, 1.0)
    assert torch.isfinite(prior).all()
    # classes the client never saw are pushed down; tau scales the prior
    assert prior[1] < prior[0] and prior[3] < prior[2]
    assert torch.allclose(logit_prior(counts, 0.5), 0.5 * prior)


def test_logit_adjusted_loss_is_cross_entropy_of_shifted_logits():
    torch.manual_seed(0)
    z, y = [torch.randn(5, 4), torch.randn(5, 4)], torch.tensor([0, 1, 2, 3, 0])
    prior = logit_prior(torch.tensor([10.0, 1.0, 1.0, 4.0]), 1.0)
    total, per_exit = exit_losses(z, y, TrainSettings(), prior)
    assert torch.allclose(per_exit[0], F.cross_entropy(z[0] + prior, y))
    plain, _ = exit_losses(z, y, TrainSettings())
    assert not torch.allclose(total, plain)


def test_logit_adjustment_unbiases_a_skewed_client(model):
    """A client that sees mostly class 0: its heads' bias towards class 0 is smaller with the correction."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(40, 1, 28, 28, generator=gen)
    y = torch.tensor([0] * 34 + [1, 1, 2, 2, 3, 3])
    ds = TensorDataset(x, y)
    start = {n: p.detach().clone() for n, p in model.trainable_named_parameters()}
    share = {}
    for tau in (0.0, 1.0):
        with torch.no_grad():
            for n, p in model.trainable_named_parameters():
                p.copy_(start[n])
        s = TrainSettings(epochs=3, lr=3e-3, logit_adjust=tau, class_counts=label_counts(ds, 4))
        train_local(model, DataLoader(ds, batch_size=8, shuffle=False), 3, s)
        model.eval()
        with torch.no_grad():
            share[tau] = (model(torch.randn(64, 1, 28, 28, generator=gen), depth=3)[-1].argmax(-1) == 0).float().mean()
    assert share[1.0] < share[0.0]


def test_sgd_optimizer_trains(model):
    before = model.heads[0].fc.weight.detach().clone()
    ds = TensorDataset(torch.randn(8, 1, 28, 28), torch.randint(0, 4, (8,)))
    train_local(model, DataLoader(ds, batch_size=4), 2, TrainSettings(lr=0.05, optimizer="sgd"))
    assert not torch.equal(before, model.heads[0].fc.weight)


@pytest.mark.parametrize(
    "key,value",
    [("optimizer", "adam"), ("lr-schedule", "step"), ("logit-adjust", -1.0), ("grad-through-blocks", "maybe")],
)
def test_new_keys_are_validated_by_name(key, value):
    with pytest.raises(ConfigError, match=key):
        validate({key: value})


def test_new_keys_accept_their_values():
    cfg = validate({"optimizer": "sgd", "lr-schedule": "cosine", "logit-adjust": 1, "grad-through-blocks": "false"})
    assert cfg["optimizer"] == "sgd" and cfg["lr-schedule"] == "cosine"
    assert cfg["logit-adjust"] == 1.0 and cfg["grad-through-blocks"] is False


def test_fedprox_leaves_the_parameters_beyond_a_clients_depth_alone():
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from adapters.state import get_state
    from adapters.training import TrainSettings, train_local
    from runtime.models import model_and_spec

    model, spec = model_and_spec(validate({"backbone-weights": ""}))
    before = get_state(model)
    data = TensorDataset(torch.randn(8, spec.in_chans, spec.img_size, spec.img_size), torch.randint(0, 10, (8,)))
    try:
        train_local(model, DataLoader(data, batch_size=4), 2, TrainSettings(epochs=1, prox_mu=0.1, weight_decay=0.1))
        after = get_state(model)
        moved = [k for k in before if not np.array_equal(before[k], after[k])]
        assert moved and all(param_block(k) <= 2 for k in moved), moved
    finally:
        from adapters.state import set_state

        set_state(model, before)  # the model is cached process-wide


def test_layernorms_biases_and_the_adapters_tokens_take_no_weight_decay(model):
    named = model.trainable_named_parameters()
    exempt = {id(p) for p in no_decay(model, named)}
    free = {n for n, p in named if id(p) in exempt}
    assert {"adapters.0.query", "adapters.0.pos", "adapters.0.norm1.weight", "adapters.0.down.bias"} <= free
    assert {"heads.0.norm.weight", "heads.0.fc.bias"} <= free
    decayed = {n for n, p in named if id(p) not in exempt}
    # what decays: the weight matrices of the linear layers and the attention
    assert decayed == {n for n, p in named if p.ndim == 2 and not n.endswith((".query", ".pos"))}
    assert "adapters.0.attn.in_proj_weight" in decayed and "heads.0.fc.weight" in decayed
