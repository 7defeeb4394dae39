"""Pulling one reply from the SuperLink without letting a dead node or a silent SuperLink hold the round.

Flower 1.42's `HttpGrid.pull_messages` returns a reply's header as soon as
the node has announced it, then pulls the reply's objects (its arrays)
and, while they are missing, retries for up to two hours (`PULL_MAX_TIME`)
until the SuperLink's object-push session expires (180 s). A node stopped
mid-upload thus held the ServerApp for 210 s with nothing logged. Its HTTP
client also retries a SuperLink that does not answer forever, inside the
call.

- `pull_reply` is `pull_messages` for one message id, built from the same
  Flower pieces, except that the objects are given up once none of them
  has arrived for `stall_s` seconds; the reply then comes back as Flower's
  own "reply message objects are unavailable" error reply, which the
  strategy counts as dropped.
- `watched` runs a SuperLink call in a thread and calls `note()` every
  `every` seconds while it runs, so the round's progress line keeps coming;
  a call that has not returned after `patience` seconds raises
  `SuperLinkSilent`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

from flwr.app import Message

T = TypeVar("T")


class SuperLinkSilent(RuntimeError):
    """A SuperLink call did not return within the run's patience."""


def watched(fn: Callable[[], T], *, every: float, note: Callable[[float], None], patience: float) -> T:
    """fn(), run in a daemon thread; note(seconds waited) every `every` s until it returns."""
    out: dict = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            out["error"] = err

    worker = threading.Thread(target=target, name="anytime-fl-superlink-call", daemon=True)
    start = time.monotonic()
    worker.start()
    while True:
        worker.join(every)
        if not worker.is_alive():
            break
        waited = time.monotonic() - start
        if waited >= patience:
            # The thread is left behind (a daemon: it cannot keep the process alive).
            raise SuperLinkSilent(f"no answer from the SuperLink for {waited:.0f} s")
        note(waited)
    if "error" in out:
        raise out["error"]
    return out["value"]


def pull_reply(grid, message_id: str, stall_s: float) -> list[Message]:
    """The reply to `message_id` ([] while there is none); see the module's docstring."""
    from flwr.superlink.grid import HttpGrid

    if not isinstance(grid, HttpGrid):  # in-process grids hold whole messages
        return list(grid.pull_messages([message_id]))
    return _pull_http(grid, message_id, stall_s)


def _pull_http(grid, message_id: str, stall_s: float) -> list[Message]:
    # Mirrors HttpGrid.pull_messages (flwr 1.42) for one id; only the object wait differs.
    from flwr.app import Metadata
    from flwr.app.error import Error
    from flwr.app.message import make_message
    from flwr.common.constant import ErrorCode
    from flwr.proto.message_pb2 import ConfirmMessageReceivedRequest
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest
    from flwr.supercore.constant import SYSTEM_MESSAGE_TYPE
    from flwr.supercore.date import now
    from flwr.supercore.inflatable.inflatable_object import iterate_object_tree
    from flwr.supercore.inflatable.inflatable_protobuf_utils import make_pull_object_fn_protobuf
    from flwr.supercore.inflatable.inflatable_utils import ObjectPullError, inflate_object_from_contents

    client = grid._runtime_client  # noqa: SLF001 - Flower's own runtime code uses it the same way
    run_id = grid.run.run_id
    res = client.PullMessages(PullAppMessagesRequest(message_ids=[message_id]))
    out: list[Message] = []
    for msg_proto, tree in zip(res.messages_list, res.message_object_trees, strict=True):
        msg_id = msg_proto.metadata.message_id
        fetch = make_pull_object_fn_protobuf(pull_object_protobuf=client.PullObject, node=grid.node, run_id=run_id)
        try:
            contents = pull_objects_while_arriving(
                [t.object_id for t in iterate_object_tree(tree)], fetch, stall_s=stall_s
            )
        except ObjectPullError as err:
            out.append(
                make_message(
                    metadata=Metadata(
                        run_id=run_id,
                        message_id="",
                        src_node_id=grid.node.node_id,
                        dst_node_id=grid.node.node_id,
                        message_type=SYSTEM_MESSAGE_TYPE,
                        group_id="",
                        ttl=0,
                        reply_to_message_id=msg_proto.metadata.reply_to_message_id,
                        created_at=now().timestamp(),
                    ),
                    error=Error(
                        code=ErrorCode.MESSAGE_UNAVAILABLE,
                        reason=f"the reply's upload stopped (node stopped mid-upload?): {err}",
                    ),
                )
            )
            continue
        client.ConfirmMessageReceived(
            ConfirmMessageReceivedRequest(node=grid.node, run_id=run_id, message_object_id=msg_id)
        )
        message = inflate_object_from_contents(msg_id, contents)
        message.metadata.__dict__["_message_id"] = msg_id
        out.append(message)
    return out


def pull_objects_while_arriving(object_ids: list[str], fetch: Callable[[str], bytes], *, stall_s: float) -> dict:
    """Flower's pull_objects, given up (ObjectPullError) once no object has arrived for `stall_s` s."""
    from flwr.supercore.inflatable.inflatable_utils import ObjectPullError, ObjectUnavailableError, pull_objects

    last = [time.monotonic()]
    lock = threading.Lock()

    def fetch_one(object_id: str) -> bytes:
        try:
            content = fetch(object_id)
        except ObjectUnavailableError:
            with lock:
                quiet = time.monotonic() - last[0]
            if quiet >= stall_s:
                raise ObjectPullError(object_id, f"no part of the reply arrived for {quiet:.0f} s") from None
            raise
        with lock:
            last[0] = time.monotonic()
        return content

    # Short backoffs: the stall is noticed within ~2 s of `stall_s`.
    return pull_objects(object_ids, fetch_one, max_time=None, max_tries_per_object=None, backoff_cap=2.0)
