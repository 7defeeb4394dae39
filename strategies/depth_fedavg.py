"""Depth-aware FedAvg and the base every strategy here builds on.

Clients of depth d send deltas for the adapter/head parameters of blocks
1..d only. Flower's FedAvg requires identical keys in every reply, so
aggregation is per parameter over the clients that sent it; a parameter no
client sent keeps its global value. Subclasses change how deltas are
combined (`reduce`) or applied (`server_update`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from adapters.naming import param_block
from anytime_fl.codec import CodecError, decode, payload_bytes
from anytime_fl.records import to_numpy, to_record

WEIGHT_KEY = "num-examples"


class DepthAwareFedAvg(FedAvg):
    """Per-parameter weighted average over the clients that trained it."""

    def __init__(self, *, fraction_train=0.5, fraction_evaluate=0.5, min_nodes=2, **kwargs):
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_nodes,
            min_evaluate_nodes=min_nodes if fraction_evaluate > 0 else 0,
            min_available_nodes=min_nodes,
            weighted_by_key=WEIGHT_KEY,
            **kwargs,
        )
        self.global_arrays: dict[str, np.ndarray] = {}
        self.node_depth: dict[int, int] = {}  # learnt from replies; trims the downlink
        self.last_round: dict = {}

    # -- hooks for subclasses -------------------------------------------------
    def reduce(self, name: str, deltas: list[np.ndarray], weights: list[float]) -> np.ndarray:
        w = np.asarray(weights, dtype=np.float64)
        return (np.tensordot(w / w.sum(), np.stack(deltas).astype(np.float64), axes=1)).astype(np.float32)

    def server_update(self, name: str, current: np.ndarray, delta: np.ndarray) -> np.ndarray:
        return current + delta

    def extra_train_config(self) -> dict:
        """Keys added to every train message's config (e.g. FedProx's mu)."""
        return {}

    def state_dict(self) -> dict[str, np.ndarray]:
        """Server-side optimiser state to checkpoint (none for FedAvg)."""
        return {}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        pass

    # -- Flower Strategy API --------------------------------------------------
    def _messages(self, arrays: ArrayRecord, config: ConfigRecord, node_ids, message_type) -> list[Message]:
        full = to_numpy(arrays)
        out = []
        for node in node_ids:
            depth = self.node_depth.get(node)
            # A node whose depth is known only receives what it runs.
            sent = full if depth is None else {k: v for k, v in full.items() if param_block(k) <= depth}
            record = RecordDict({self.arrayrecord_key: to_record(sent), self.configrecord_key: config})
            out.append(Message(content=record, message_type=message_type, dst_node_id=node))
        return out

    def _sample(self, grid: Grid, fraction: float, minimum: int) -> list[int]:
        n = int(len(list(grid.get_node_ids())) * fraction)
        nodes, _ = sample_nodes(grid, self.min_available_nodes, max(n, minimum))
        return nodes

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        self.global_arrays = to_numpy(arrays)
        if self.fraction_train == 0.0:
            return []
        nodes = self._sample(grid, self.fraction_train, self.min_train_nodes)
        config = ConfigRecord({**dict(config), **self.extra_train_config(), "server-round": server_round})
        log(INFO, "configure_train: sampled %d nodes", len(nodes))
        return self._messages(arrays, config, nodes, MessageType.TRAIN)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        if self.fraction_evaluate == 0.0:
            return []
        nodes = self._sample(grid, self.fraction_evaluate, self.min_evaluate_nodes)
        config = ConfigRecord({**dict(config), "server-round": server_round})
        return self._messages(arrays, config, nodes, MessageType.EVALUATE)

    def check_update(self, content: RecordDict) -> tuple[dict[str, np.ndarray], float, int]:
        """Decode and validate one reply; raises ValueError with the reason."""
        metrics = content.metric_records.get("metrics")
        if metrics is None or WEIGHT_KEY not in metrics:
            raise ValueError(f"no '{WEIGHT_KEY}' metric")
        weight = float(metrics[WEIGHT_KEY])
        if not weight > 0:
            raise ValueError(f"'{WEIGHT_KEY}' must be > 0, got {weight}")
        depth = int(metrics.get("depth", 0))
        if "arrays" not in content.array_records:
            raise ValueError("no 'arrays' record")
        shapes = {k: v.shape for k, v in self.global_arrays.items()}
        try:
            deltas = decode(to_numpy(content.array_records["arrays"]), shapes)
        except CodecError as err:
            raise ValueError(str(err)) from err
        for name, d in deltas.items():
            if param_block(name) > depth:
                raise ValueError(f"{name} belongs to block {param_block(name)}, beyond the client's depth {depth}")
            if not np.all(np.isfinite(d)):
                raise ValueError(f"{name} has non-finite values")
        return deltas, weight, depth

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        per_name: dict[str, list[tuple[np.ndarray, float]]] = defaultdict(list)
        depths, bytes_up, dropped = [], 0, []
        good = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                dropped.append((node, f"error reply: {msg.error.reason}"))
                continue
            try:
                deltas, weight, depth = self.check_update(msg.content)
            except ValueError as err:
                dropped.append((node, str(err)))
                continue
            self.node_depth[node] = depth
            bytes_up += payload_bytes(to_numpy(msg.content.array_records["arrays"]))
            depths.append(depth)
            good.append(msg.content)
            for name, d in deltas.items():
                per_name[name].append((d, weight))
        for node, reason in dropped:
            log(WARNING, "round %d: dropped the update of node %d: %s", server_round, node, reason)
        self.last_round = {"clients": len(good), "dropped": len(dropped), "depths": depths, "bytes-up": bytes_up}
        if not good:
            return None, None
        new = dict(self.global_arrays)
        for name, items in per_name.items():
            delta = self.reduce(name, [d for d, _ in items], [w for _, w in items])
            new[name] = self.server_update(name, self.global_arrays[name], delta).astype(np.float32)
        return to_record(new), aggregate_partial_metrics(good)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        good = [m.content for m in replies if not m.has_error()]
        return aggregate_partial_metrics(good) if good else None


def aggregate_partial_metrics(contents: list[RecordDict]) -> MetricRecord:
    """Weighted mean of each scalar metric over the replies that hold it.

    Clients of different depth report different exits (`accuracy-7` exists
    only for depth >= 7), which Flower's aggregation would reject.
    """
    sums: dict[str, float] = defaultdict(float)
    weights: dict[str, float] = defaultdict(float)
    for content in contents:
        m = content.metric_records["metrics"]
        w = float(m[WEIGHT_KEY])
        for key, value in m.items():
            if key in (WEIGHT_KEY, "depth") or not isinstance(value, (int, float)):
                continue
            sums[key] += w * float(value)
            weights[key] += w
    out = {k: sums[k] / weights[k] for k in sorted(sums) if weights[k] > 0}
    out[WEIGHT_KEY] = sum(float(c.metric_records["metrics"][WEIGHT_KEY]) for c in contents)
    return MetricRecord(out)
