"""The one way the server builds the messages of an exchange and names the node behind a reply.

A node whose depth is known receives the arrays of its blocks only; every
depth's ArrayRecord is converted once and shared by the messages of that
depth (Flower serialises each message on push, so sharing is safe).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from .naming import up_to_depth
from .records import to_record


def by_depth(
    arrays: dict[str, np.ndarray],
    node_ids: Iterable[int],
    node_depth: dict[int, int] | None,
    config: ConfigRecord,
    message_type: str,
    *,
    arrays_key: str = "arrays",
    config_key: str = "config",
) -> list[Message]:
    """One message per node with the arrays of its blocks (all of them while its depth is unknown)."""
    node_depth = node_depth or {}
    records: dict[int | None, ArrayRecord] = {}
    out = []
    for node in node_ids:
        depth = node_depth.get(node)
        if depth not in records:
            records[depth] = to_record(up_to_depth(arrays, depth))
        content = RecordDict({arrays_key: records[depth], config_key: config})
        out.append(Message(content=content, message_type=message_type, dst_node_id=node))
    return out


def reply_node(reply: Message, sent: Iterable[Message]) -> int:
    """The node a reply answers for. An error reply the SuperLink writes for a node that is gone
    comes from the SuperLink, not from that node: it is matched to the message it answers."""
    if reply.has_error():
        for msg in sent:
            if msg.metadata.message_id and msg.metadata.message_id == reply.metadata.reply_to_message_id:
                return msg.metadata.dst_node_id
    return reply.metadata.src_node_id
