"""Flower ArrayRecord <-> dict of numpy arrays, the one conversion point, and
the one place a message's records are looked up."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict


def _only(records, kind: str):
    # As Flower's own strategies read replies: one record of each kind,
    # whatever its name (a strategy's `arrayrecord_key` names what it sends).
    if len(records) != 1:
        found = ", ".join(repr(k) for k in records) or "none"
        raise ValueError(f"expected one {kind} record, found {len(records)} ({found})")
    return next(iter(records.values()))


def arrays_of(content: RecordDict) -> ArrayRecord:
    """The message's one ArrayRecord; ValueError when it holds none or several."""
    return _only(content.array_records, "array")


def metrics_of(content: RecordDict) -> MetricRecord:
    """The message's one MetricRecord; ValueError when it holds none or several."""
    return _only(content.metric_records, "metric")


def metrics_or_empty(content: RecordDict) -> MetricRecord | dict:
    """The one MetricRecord, or {} for a message that holds none (or several)."""
    try:
        return metrics_of(content)
    except ValueError:
        return {}


def to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
