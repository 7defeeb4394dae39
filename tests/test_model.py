"""The anytime model: depth-limited forward, frozen backbone, state round trip."""

from pathlib import Path

import numpy as np
import pytest
import torch

from adapters.backbone import BackboneError, frozen_state_digest, load_backbone
from adapters.model import AnytimeViT
from adapters.state import get_state, set_state, trainable_names
from adapters.training import TrainSettings, train_local
from core.naming import param_block
from tests.checks import one_line

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return AnytimeViT(load_backbone("vit_micro_patch7_28"), num_classes=5)


def _count_block_calls(model):
    calls = []
    hooks = [b.register_forward_hook(lambda m, i, o, k=k: calls.append(k)) for k, b in enumerate(model.backbone.blocks)]
    return calls, hooks


@pytest.mark.parametrize("depth", [1, 3, 7, 12])
def test_depth_d_forward_runs_exactly_d_blocks(model, depth):
    calls, hooks = _count_block_calls(model)
    try:
        logits = model(torch.randn(2, 1, 28, 28), depth=depth)
    finally:
        for h in hooks:
            h.remove()
    assert calls == list(range(depth))
    assert len(logits) == depth
    assert all(z.shape == (2, 5) for z in logits)


@pytest.mark.parametrize("depth", [0, 13, -1])
def test_depth_outside_the_backbone_is_refused(model, depth):
    with pytest.raises(ValueError, match="depth must be in 1..12"):
        model(torch.randn(1, 1, 28, 28), depth=depth)


def test_training_leaves_backbone_unchanged_and_without_gradient(model):
    before = frozen_state_digest(model.backbone)
    heads_before = get_state(model, 6)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 5, (16,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    train_local(model, loader, depth=6, s=TrainSettings(epochs=1, lr=1e-2))
    assert frozen_state_digest(model.backbone) == before
    assert all(p.grad is None and not p.requires_grad for p in model.backbone.parameters())
    after = get_state(model, 6)
    assert any(not np.array_equal(heads_before[k], after[k]) for k in after), "adapters did not train"
    # a depth-6 client never touches the parameters of blocks 7..12
    assert all(p.grad is None for n, p in model.trainable_named_parameters() if param_block(n) > 6)


def test_fresh_adapters_leave_the_backbone_cls_path_unchanged(model):
    """Zero-initialised up-projections make the modulation the identity."""
    fresh = AnytimeViT(model.backbone, num_classes=5)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        tokens = fresh.embed(x)
        for blk in fresh.backbone.blocks[:4]:
            tokens = blk(tokens)
        calls = []
        h = fresh.backbone.blocks[3].register_forward_hook(lambda m, i, o: calls.append(o[:, 0].clone()))
        fresh(x, depth=4)
        h.remove()
    torch.testing.assert_close(calls[0], tokens[:, 0])


def test_state_round_trip_and_names_by_depth(model):
    names3 = trainable_names(model, 3)
    assert names3 and all(param_block(n) <= 3 for n in names3)
    assert not any(n.startswith("backbone.") for n in trainable_names(model))
    state = {k: np.full_like(v, 0.5) for k, v in get_state(model, 3).items()}
    set_state(model, state)
    assert all(np.all(v == 0.5) for v in get_state(model, 3).values())
    with pytest.raises(KeyError):
        set_state(model, {"backbone.cls_token": np.zeros((1, 1, 96), np.float32)})
    with pytest.raises(ValueError, match="shape"):
        set_state(model, {names3[0]: np.zeros((7, 7), np.float32)})


def test_shared_adapter_is_one_module_for_all_blocks():
    m = AnytimeViT(load_backbone("vit_micro_patch7_28"), num_classes=3, shared_adapter=True)
    names = trainable_names(m, 2)
    assert any(n.startswith("adapter.") for n in names)
    assert not any(n.startswith("adapters.") for n in names)
    assert len(m(torch.randn(1, 1, 28, 28), depth=4)) == 4


def test_unknown_backbone_names_the_key():
    with pytest.raises(BackboneError, match="backbone: unknown timm model"):
        load_backbone("no_such_vit")


def test_missing_weights_file_names_the_key(tmp_path):
    with pytest.raises(BackboneError, match="backbone-weights: no weights file"):
        load_backbone("vit_micro_patch7_28", weights=str(tmp_path / "nope.safetensors"))


def test_a_corrupt_backbone_weights_file_is_one_line(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((ROOT / "anytime_assets" / "vit_micro_patch7_28.fmnist.safetensors").read_bytes()[:100])
    with pytest.raises(BackboneError) as err:
        load_backbone("vit_micro_patch7_28", weights=str(bad))
    one_line(str(err.value), str(bad), "backbone-weights")
