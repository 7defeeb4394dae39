"""One cold ClientApp message in this fresh process, as a SuperNode's
`flwr-clientapp` process handles it; prints one JSON line.

    python bench/coldprobe.py ARRAYS.npz RUN_CONFIG.json NODE_CONFIG.json

Run by bench/coldstart.py with PYTHONPATH set to the source tree under
test; it imports nothing of this project before the ClientApp itself, so
the import cost measured is the ClientApp's own.
"""

from __future__ import annotations

import json
import resource
import sys
import time

T0 = time.perf_counter()


def main() -> None:
    arrays_file, run_file, node_file = sys.argv[1:4]
    from client_app.app import app  # the module Flower loads for the app

    t_import = time.perf_counter()
    import numpy as np
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    # A real flwr-clientapp process has a task identity; give this one too.
    for attr in ("run_id", "node_id", "task_id"):
        if getattr(TaskIdentity, "_" + attr) is None:
            setattr(TaskIdentity, attr, 1)
    with np.load(arrays_file, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    record = ArrayRecord({k: _array(v) for k, v in arrays.items()})
    content = RecordDict({"arrays": record, "config": ConfigRecord({"server-round": 1})})
    msg = Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)
    ctx = Context(
        run_id=1,
        node_id=1,
        node_config=json.loads(open(node_file).read()),
        state=RecordDict(),
        run_config=json.loads(open(run_file).read()),
    )
    reply = app(msg, ctx)
    if reply.has_error():
        raise SystemExit(f"the ClientApp replied with an error: {reply.error.reason}")
    t_done = time.perf_counter()
    reply_at = time.time()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    heavy = [
        m
        for m in ("torchvision", "timm", "datasets", "flwr_datasets", "sklearn", "matplotlib", "torch._dynamo")
        if m in sys.modules
    ]
    print(
        json.dumps(
            {
                "import-s": round(t_import - T0, 3),
                "handle-s": round(t_done - t_import, 3),
                "in-process-s": round(t_done - T0, 3),
                "reply-at": reply_at,
                "peak-rss-mb": round(usage.ru_maxrss / 1024, 1),
                # CPU seconds to the reply: less sensitive than wall time to other work on the machine.
                "cpu-s": round(usage.ru_utime + usage.ru_stime, 3),
                "heavy-modules": heavy,
                "examples": int(reply.content.metric_records["metrics"]["num-examples"]),
            }
        )
    )


def _array(v):
    from flwr.app import Array

    return Array(v)


if __name__ == "__main__":
    main()
