"""Errors of the model package, importable without timm."""

from __future__ import annotations


class BackboneError(ValueError):
    """A backbone setting that cannot be honoured; `key` names the config key."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key
