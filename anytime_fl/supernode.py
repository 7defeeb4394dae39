"""`flower-supernode` that lets go of a message whose run ended while it arrived.

A SuperNode in Flower 1.42 receives a message in two steps: it creates the
message's task (the node's SuperExec starts a `flwr-clientapp` for it at
once) and then pulls the message's content from the SuperLink. When the run
ends in between (a SuperLink restart fails every run it had), the pull is
refused with "Run is finished" and the SuperNode only logs "Run ID ... is
not in `RUNNING` status. Ignoring message": the task stays open, so the
ClientApp, which has no app code loaded yet, waits for content that never
comes (Flower's pull gives up after 500 tries or 2 h) and its heartbeat keeps
being accepted. Such processes were alive for the whole of a deployment test
after its SuperLink restart.

Started as

    python -m anytime_fl.supernode <flower-supernode arguments>

the SuperNode treats that refusal like any other failed pull: it drops the
message and finishes the task as failed, which ends the waiting ClientApp
within seconds (its next pull finds nothing). Everything else is Flower's
own `flower-supernode`.
"""

from __future__ import annotations

import functools
import inspect
import sys

# The callables `_pull_and_store_message` is given to fetch the message's content.
PULL_STEPS = ("pull_object", "confirm_message_received")


class RunEnded(RuntimeError):
    """The run ended while the node was receiving one of its messages."""


def _as_error(fn, stopped):
    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except stopped as err:  # a BaseException in Flower: its generic clean-up skips it
            raise RunEnded("the run is no longer running") from err

    return call


def patch_message_cleanup() -> bool:
    """Make a refused message-content pull fail like other pull errors, so Flower's own
    clean-up (drop the message, finish its task) runs; False when this Flower release
    receives messages differently (then nothing changes)."""
    try:
        from flwr.supercore.run import RunNotRunningException
        from flwr.supernode import start_client_internal as sci
    except ImportError:
        return False
    original = getattr(sci, "_pull_and_store_message", None)
    if original is None:
        return False
    if getattr(original, "anytime_patched", False):
        return True
    signature = inspect.signature(original)
    if not set(PULL_STEPS) <= set(signature.parameters):
        return False

    @functools.wraps(original)
    def pull_and_store_message(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        for name in PULL_STEPS:
            bound.arguments[name] = _as_error(bound.arguments[name], RunNotRunningException)
        return original(*bound.args, **bound.kwargs)

    pull_and_store_message.anytime_patched = True
    sci._pull_and_store_message = pull_and_store_message
    return True


def main() -> None:
    if not patch_message_cleanup():
        print(
            "anytime_fl.supernode: this Flower release receives messages differently; "
            "starting flower-supernode unchanged",
            file=sys.stderr,
        )
    from flwr.supernode.cli import flower_supernode

    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
