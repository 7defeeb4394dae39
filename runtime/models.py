"""Per-process cache of the model and input spec a run config describes.

Simulation workers and SuperNodes handle many messages; building the
backbone (and reading its weights) once per process keeps rounds fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adapters.build import build_model, input_spec_fields, resolve_device
from adapters.model import AnytimeViT
from adapters.state import get_state
from core.config import keys_in
from fedtasks.base import InputSpec

_MODEL_KEYS = keys_in("model")
_models: dict[tuple, tuple[AnytimeViT, InputSpec]] = {}
_initial: dict[tuple, dict] = {}


def _key(cfg: dict[str, Any], num_classes: int) -> tuple:
    # The head size comes from the task's settings (e.g. speech-classes), so
    # it is part of the key along with every key that shapes the model.
    return (*(cfg[k] for k in _MODEL_KEYS), num_classes)


def _num_classes(cfg: dict[str, Any]) -> int:
    # Imported here: the task registry pulls in the data libraries, which a
    # client whose data is cached on its disk does not need.
    from fedtasks.task import get_task

    return get_task(cfg).num_classes


def model_and_spec(
    cfg: dict[str, Any], num_classes: int | None = None, cache_dir: Path | None = None
) -> tuple[AnytimeViT, InputSpec]:
    """`num_classes` as the task says when None; `cache_dir`: the node's backbone cache."""
    num_classes = _num_classes(cfg) if num_classes is None else num_classes
    key = _key(cfg, num_classes)
    if key not in _models:
        model = build_model(cfg, num_classes, cache_dir=cache_dir).to(resolve_device(cfg["device"]))
        _models[key] = (model, InputSpec(**input_spec_fields(model)))
        _initial[key] = get_state(model)
    return _models[key]


def initial_state(cfg: dict[str, Any]) -> dict:
    """The seeded adapters as first built: the cached model is later loaded
    with trained weights, and a second run in the same process must not
    start from those."""
    model_and_spec(cfg)
    return {k: v.copy() for k, v in _initial[_key(cfg, _num_classes(cfg))].items()}
