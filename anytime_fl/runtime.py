"""Per-process cache of the model and input spec a run config describes.

Simulation workers and SuperNodes handle many messages; building the
backbone (and reading its weights) once per process keeps rounds fast.
"""

from __future__ import annotations

from typing import Any

from adapters.build import build_model, input_spec_fields
from adapters.model import AnytimeViT
from fedtasks.base import InputSpec
from fedtasks.task import get_task

_MODEL_KEYS = (
    "backbone", "backbone-weights", "pretrained", "img-size", "patch-size", "adapter-width",
    "adapter-heads", "adapter-mlp-ratio", "shared-adapter", "task", "seed",
)
_models: dict[tuple, tuple[AnytimeViT, InputSpec]] = {}


def model_and_spec(cfg: dict[str, Any]) -> tuple[AnytimeViT, InputSpec]:
    key = tuple(cfg[k] for k in _MODEL_KEYS)
    if key not in _models:
        task = get_task(cfg)
        model = build_model(cfg, task.num_classes)
        _models[key] = (model, InputSpec(**input_spec_fields(model)))
    return _models[key]
