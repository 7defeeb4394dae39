"""An in-process stand-in for Flower's Grid: the real ClientApp handlers, no Ray.

Benchmarks and tests use it to run the real ServerApp round loop against
the real ClientApp code in one process, sequentially, and to measure what
Flower's simulation engine adds on top.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Context, Error, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity


def ensure_task_identity() -> None:
    """Flower stamps messages with the running task's identity, which only a
    real SuperLink/SuperNode process sets; give an in-process run one."""
    for attr in ("run_id", "node_id", "task_id"):
        if getattr(TaskIdentity, "_" + attr) is None:
            setattr(TaskIdentity, attr, 1)


class LocalGrid:
    def __init__(self, num_nodes: int, run_config: dict, node_configs: list[dict] | None = None):
        from client_app.app import (
            evaluate_exits,
            head_statistics,
            personalize_exits,
            secagg_keys,
            secagg_masked,
            secagg_shares,
            secagg_unmask,
            train,
        )
        from server_app.head_secagg import KEYS, MASKED, SHARES, UNMASK
        from server_app.personalization import PERSONALIZE

        self.handlers = {
            MessageType.TRAIN: train,
            MessageType.EVALUATE: evaluate_exits,
            MessageType.QUERY: head_statistics,
            PERSONALIZE: personalize_exits,
            KEYS: secagg_keys,
            SHARES: secagg_shares,
            MASKED: secagg_masked,
            UNMASK: secagg_unmask,
        }
        self.node_ids = list(range(1, num_nodes + 1))
        node_configs = node_configs or [{"partition-id": i, "num-partitions": num_nodes} for i in range(num_nodes)]
        self.contexts = {
            nid: Context(run_id=1, node_id=nid, node_config=dict(nc), state=RecordDict(), run_config=dict(run_config))
            for nid, nc in zip(self.node_ids, node_configs)
        }
        ensure_task_identity()
        self.messages_handled = 0

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            handler = self.handlers[msg.metadata.message_type]
            try:
                reply = handler(msg, self.contexts[node])
            except Exception as err:  # a failing client becomes an error reply, as in Flower
                reply = Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = node
            replies.append(reply)
            self.messages_handled += 1
        return replies
