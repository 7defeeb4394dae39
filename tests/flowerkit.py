"""Hand-built Flower messages and contexts for calling the apps directly."""

from __future__ import annotations

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from core.records import to_record
from tests.localgrid import ensure_task_identity

ensure_task_identity()

TINY = {"task": "digits", "backbone-weights": "", "local-epochs": 1, "batch-size": 16}
# Dense updates: a reply then holds every parameter under its own name (top-k packs them).
DENSE = {"topk-fraction": 1.0}


def context(node_config: dict, run_config: dict, node_id: int = 1) -> Context:
    return Context(
        run_id=1, node_id=node_id, node_config=dict(node_config), state=RecordDict(), run_config=dict(run_config)
    )


def train_message(arrays: dict[str, np.ndarray], server_round: int = 1, node_id: int = 1, **config) -> Message:
    content = RecordDict(
        {"arrays": to_record(arrays), "config": ConfigRecord({"server-round": server_round, **config})}
    )
    return Message(content=content, dst_node_id=node_id, message_type=MessageType.TRAIN)


def reply(arrays: dict[str, np.ndarray], num_examples: int, depth: int, node_id: int) -> Message:
    """A client's train reply as the strategy receives it."""
    content = RecordDict(
        {"arrays": to_record(arrays), "metrics": MetricRecord({"num-examples": num_examples, "depth": depth})}
    )
    msg = Message(content=content, dst_node_id=0, message_type=MessageType.TRAIN)
    # Replies come from the node; Flower's Metadata has no public setter.
    msg.metadata.__dict__["_src_node_id"] = node_id
    return msg
