"""A node's disk cache: same model and data as without it, never a stale entry."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from adapters.backbone_cache import cached_backbone, load_cached
from adapters.build import _load_backbone, build_model
from adapters.vit import PlainViT
from client_app.tiers import node_cache_dir
from core.config import ConfigError, validate
from fedtasks.nodecache import client_datasets, partition_arrays
from fedtasks.task import load_partition
from tests.flowerkit import TINY, context, train_message

ROOT = Path(__file__).resolve().parents[1]


def _tokens(model, x):
    t = model._pos_embed(model.patch_embed(x))
    for block in model.blocks:
        t = block(t)
    return t


def test_cached_backbone_is_a_plain_vit_with_the_same_features(tmp_path):
    cfg = validate({})
    first = build_model(cfg, 10, cache_dir=tmp_path).backbone
    assert type(first).__name__ == "VisionTransformer"  # built through timm, then stored
    entries = list((tmp_path / "backbone").iterdir())
    assert len(entries) == 1 and (entries[0] / "spec.json").is_file()
    second = build_model(cfg, 10, cache_dir=tmp_path).backbone
    assert isinstance(second, PlainViT)
    assert not any(p.requires_grad for p in second.parameters())
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(_tokens(first, x), _tokens(second, x))
    assert second.pretrained_cfg["mean"] == first.pretrained_cfg["mean"]


def test_a_changed_backbone_setting_or_weights_file_is_a_new_entry(tmp_path):
    args = dict(name="vit_micro_patch7_28", weights="", pretrained=False, img_size=None, patch_size=None)
    cached_backbone(tmp_path, _load_backbone, **args)
    cached_backbone(tmp_path, _load_backbone, **{**args, "img_size": 56})
    weights = tmp_path / "w.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in _load_backbone(**args).state_dict().items()}, str(weights))
    cached_backbone(tmp_path, _load_backbone, **{**args, "weights": str(weights)})
    os.utime(weights, ns=(1, 1))  # the file replaced: the old entry must not be used
    cached_backbone(tmp_path, _load_backbone, **{**args, "weights": str(weights)})
    assert len(list((tmp_path / "backbone").iterdir())) == 4


def test_an_unreadable_entry_is_rebuilt_not_fatal(tmp_path):
    cfg = validate({})
    build_model(cfg, 10, cache_dir=tmp_path)
    entry = next((tmp_path / "backbone").iterdir())
    (entry / "backbone.safetensors").write_bytes(b"not a safetensors file")
    assert load_cached(entry) is None
    assert build_model(cfg, 10, cache_dir=tmp_path).num_blocks == 12
    assert isinstance(load_cached(entry), PlainViT)  # written again


def test_cached_partition_holds_the_data_of_the_uncached_path(tmp_path):
    from fedtasks import nodecache

    # Forget what earlier tests of this process read: this one must write the entry.
    nodecache._arrays.clear()
    nodecache._splits.clear()
    cfg = validate(TINY)
    from runtime.models import model_and_spec

    _, spec = model_and_spec(cfg)
    want_train, want_val = load_partition(cfg, spec, 1, 4)
    for _ in range(2):  # the first call writes the entry, the second reads it
        got_train, got_val = client_datasets(cfg, spec, 1, 4, tmp_path)
    assert len(list((tmp_path / "partition").iterdir())) == 1
    for want, got in ((want_train, got_train), (want_val, got_val)):
        assert want.indices == got.indices
        assert torch.equal(want.dataset.tensors[0], got.dataset.tensors[0])
        assert torch.equal(want.dataset.tensors[1], got.dataset.tensors[1])
    assert partition_arrays(cfg, 1, 4, tmp_path)[3] == 10


def test_changed_data_settings_or_files_are_a_new_entry(tmp_path):
    cfg = validate(TINY)
    keys = {
        partition_arrays(cfg, 0, 4, tmp_path)[0],
        partition_arrays({**cfg, "seed": 7}, 0, 4, tmp_path)[0],
        partition_arrays(cfg, 1, 4, tmp_path)[0],
        partition_arrays(cfg, 0, 5, tmp_path)[0],
    }
    assert len(keys) == 4
    from fedtasks.nodecache import partition_key

    data = tmp_path / "data"
    data.mkdir()
    (data / "train.parquet").write_bytes(b"x")
    before = partition_key({**cfg, "data-dir": str(data)}, 0, 4)
    (data / "train.parquet").write_bytes(b"xy")
    assert partition_key({**cfg, "data-dir": str(data)}, 0, 4) != before


def test_cache_dir_node_config(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert node_cache_dir({}) == tmp_path / "anytime-fl"
    assert node_cache_dir({"cache-dir": "off"}) is None
    assert node_cache_dir({"cache-dir": str(tmp_path / "c")}) == tmp_path / "c"
    with pytest.raises(ConfigError, match="node-config cache-dir"):
        node_cache_dir({"cache-dir": 3})


def test_cache_off_and_on_give_the_same_reply(tmp_path):
    from adapters.state import get_state
    from client_app.app import train
    from core.records import to_numpy
    from runtime.models import model_and_spec

    state = get_state(model_and_spec(validate(TINY))[0])
    replies = []
    for cache in ("off", str(tmp_path), str(tmp_path)):
        ctx = context({"partition-id": 2, "num-partitions": 4, "max-depth": 2, "cache-dir": cache}, TINY)
        replies.append(to_numpy(train(train_message(state), ctx).content.array_records["arrays"]))
    for other in replies[1:]:
        assert all(np.array_equal(replies[0][k], other[k]) for k in replies[0])


def test_a_message_on_a_filled_cache_imports_no_data_library_nor_timm(tmp_path):
    """What makes a deployed client's message fast: a fresh process that
    finds its cache filled imports torch and flwr, not timm, torchvision,
    the data libraries or torch's compiler."""
    from adapters.state import get_state
    from runtime.models import model_and_spec

    arrays = tmp_path / "arrays.npz"
    np.savez(arrays, **get_state(model_and_spec(validate({}))[0]))
    (tmp_path / "run.json").write_text(json.dumps({"local-epochs": 1}))
    (tmp_path / "node.json").write_text(
        json.dumps({"partition-id": 0, "num-partitions": 20, "cache-dir": str(tmp_path / "cache")})
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        str(ROOT / "bench/coldprobe.py"),
        str(arrays),
        str(tmp_path / "run.json"),
        str(tmp_path / "node.json"),
    ]
    rows = []
    for _ in range(2):
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert "timm" in rows[0]["heavy-modules"]  # the first message builds the cache
    assert rows[1]["heavy-modules"] == []
