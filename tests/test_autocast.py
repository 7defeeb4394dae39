"""The `autocast` run-config key: bf16 local training still learns and keeps float32 weights."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from adapters.backbone import load_backbone
from adapters.model import AnytimeViT
from adapters.state import get_state
from adapters.training import TrainSettings, train_local
from core.config import ConfigError, validate


def test_bf16_training_lowers_the_loss_and_keeps_float32_parameters():
    torch.manual_seed(0)
    model = AnytimeViT(load_backbone("vit_micro_patch7_28"), num_classes=3)
    x = torch.randn(24, 1, 28, 28)
    y = torch.arange(24) % 3
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    before = get_state(model, 2)
    first = train_local(model, loader, 2, TrainSettings(epochs=1, lr=1e-2, autocast="bf16"))["loss"]
    later = train_local(model, loader, 2, TrainSettings(epochs=5, lr=1e-2, autocast="bf16"))["loss"]
    after = get_state(model, 2)
    assert all(a.dtype.name == "float32" for a in after.values())
    assert any((after[k] != before[k]).any() for k in before)
    assert later[-1] < first[-1]


def test_unknown_autocast_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match="autocast"):
        validate({"autocast": "fp8"})
