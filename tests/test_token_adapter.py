"""Token adapters: identity when fresh, named by their block, trained by a depth-d client up to d,
and read by early exit exactly as by the full forward pass."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from adapters.anytime import early_exit
from adapters.backbone import load_backbone
from adapters.model import AnytimeViT
from adapters.state import trainable_names
from adapters.training import TrainSettings, train_local
from core.config import ConfigError, defaults, validate
from core.naming import param_block, sent_up_to


def _model(token_width: int) -> AnytimeViT:
    torch.manual_seed(0)
    return AnytimeViT(load_backbone("vit_micro_patch7_28"), num_classes=5, patch_mean=True, token_width=token_width)


@pytest.fixture(scope="module")
def x():
    return torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(3))


def test_fresh_token_adapters_are_the_identity(x):
    plain, tokens = _model(0).eval(), _model(8).eval()
    with torch.no_grad():
        for a, b in zip(plain(x), tokens(x)):
            torch.testing.assert_close(a, b)


def test_token_adapters_belong_to_their_block_and_travel_up_to_a_clients_depth():
    names = trainable_names(_model(8))
    mine = [n for n in names if n.startswith("token_adapters.")]
    assert {param_block(n) for n in mine} == set(range(1, 13))
    sent = sent_up_to(names, 3, clients_train_heads=False)
    assert {param_block(n) for n in sent if n.startswith("token_adapters.")} == {1, 2, 3}
    assert not any(n.startswith("heads.") for n in sent)


def test_early_exit_reads_trained_token_adapters_as_the_forward_pass_does(x):
    model = _model(8).eval()
    with torch.no_grad():
        for adapter in model.token_adapters:
            adapter.up.weight.normal_(0, 0.5)
    full = model(x)
    assert not torch.allclose(full[-1], _model(0).eval()(x)[-1])
    out = early_exit(model, x, 1.0001)
    torch.testing.assert_close(out.logits, full[-1].detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("block_grad", [True, False])
def test_local_training_moves_the_token_adapters_up_to_the_clients_depth(block_grad):
    model = _model(8)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("token_adapters.")}
    data = TensorDataset(torch.randn(16, 1, 28, 28), torch.randint(0, 5, (16,)))
    settings = TrainSettings(epochs=1, lr=1e-2, block_grad=block_grad)
    train_local(model, DataLoader(data, batch_size=8), depth=4, s=settings)
    moved = {param_block(n) for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])}
    assert moved == {1, 2, 3, 4}


def test_a_negative_token_adapter_width_names_the_key():
    with pytest.raises(ConfigError, match="token-adapter-width"):
        validate({**defaults(), "token-adapter-width": -1})
