"""Import guards for the CPU build of torch.

PyPI's torchvision 0.28 is linked against CUDA; beside a CPU torch its C++
operators never register, and importing it (which timm does) fails on the
fake-kernel registrations for `torchvision::nms`. Defining those operator
schemas first lets the pure-Python parts (transforms, feature extraction)
import. The guard only acts when the plain import fails, so a working
torchvision is left alone.
"""

from __future__ import annotations

import sys

import torch

_TORCHVISION_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
# Kept alive for the life of the process: dropping the Library object would
# unregister the schemas.
_torchvision_stub_lib: torch.library.Library | None = None


def _drop_modules(prefix: str) -> None:
    for name in [m for m in sys.modules if m == prefix or m.startswith(prefix + ".")]:
        del sys.modules[name]


def ensure_torchvision() -> bool:
    """Make `import torchvision` work; return True when the guard was needed."""
    global _torchvision_stub_lib
    try:
        import torchvision  # noqa: F401

        return _torchvision_stub_lib is not None
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise
    _drop_modules("torchvision")
    _torchvision_stub_lib = torch.library.Library("torchvision", "DEF")
    for schema in _TORCHVISION_SCHEMAS:
        _torchvision_stub_lib.define(schema)
    import torchvision  # noqa: F401

    return True


def import_timm():
    """Return the timm module, importable on a CPU torch."""
    ensure_torchvision()
    import timm

    return timm
