"""Depth-aware FedAvg and the base every strategy here builds on.

Clients of depth d send deltas for the adapter/head parameters of blocks
1..d only. Flower's FedAvg requires identical keys in every reply, so
aggregation is per parameter over the clients that sent it; a parameter no
client sent keeps its global value (and any optimiser state of it stays as
it was). Subclasses change how deltas are combined (`reduce`) or applied
(`server_update`), keep per-parameter state in `self.slots`, and read their
hyper-parameters from the run config in `config_kwargs`.

What is reused from Flower: FedAvg's constructor and message keys, and
node sampling. What is not: FedAvg's `aggregate_train` and the aggregation
of Flower's FedAvgM/FedAdam/FedYogi/FedProx/FedMedian/FedTrimmedAvg, which
all start from `aggregate_arrayrecords` and so reject replies whose keys
differ; their rules are a few lines each on one parameter's deltas,
restated in the subclasses. The round loop is the ServerApp's own
(server_app/app.py), not `Strategy.start`.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from core.codec import CodecError, decode, is_packed
from core.config import clients_train_heads, parse_tier_names, parse_tiers
from core.messages import by_depth, reply_node
from core.naming import param_block, sent_up_to
from core.records import arrays_of, metrics_of, metrics_or_empty, to_numpy, to_record

WEIGHT_KEY = "num-examples"


@dataclass
class Update:
    """One accepted client update, decoded to dense deltas."""

    node: int
    deltas: dict[str, np.ndarray]
    weight: float
    depth: int
    nbytes: int
    content: RecordDict


@dataclass
class RoundStats:
    """What a strategy accepted in its last training round; the ServerApp's round row reads it."""

    depths: list[int] = field(default_factory=list)  # of the accepted updates
    bytes_up: int = 0  # of the accepted updates: a dropped reply's bytes trained nothing
    clients_per_tier: dict[str, int] = field(default_factory=dict)
    dropped_reasons: list[str] = field(default_factory=list)
    dropped_nodes: list[int] = field(default_factory=list)

    @property
    def clients(self) -> int:
        return len(self.depths)

    @property
    def dropped(self) -> int:
        return len(self.dropped_reasons)

    def clients_per_depth(self) -> dict[str, int]:
        counts = Counter(self.depths)
        return {str(d): counts[d] for d in sorted(counts)}


class DepthAwareFedAvg(FedAvg):
    """Per-parameter weighted average over the clients that trained it.

    Args:
        fraction_train: share of the connected nodes sampled to train each round.
        fraction_evaluate: share sampled for federated evaluation (0 = none).
        min_nodes: the fewest nodes a round samples and waits for.
        server_lr: step size on the combined delta; 0 or None = the class's
            `default_server_lr` (1 for the averaging rules).
        tier_names: depth -> tier name, for the per-tier counts in logs and results.
        clients_train_heads: whether clients train and send the exit heads
            (`core.config.clients_train_heads`); when not (`heads = "ridge"`)
            they leave `heads.*` out of their updates, dense or sparse.
        **kwargs: passed on to Flower's `FedAvg` (e.g. `arrayrecord_key`).
    """

    default_server_lr = 1.0
    slots: tuple[str, ...] = ()  # names of per-parameter optimiser state

    def __init__(
        self,
        *,
        fraction_train: float = 0.5,
        fraction_evaluate: float = 0.5,
        min_nodes: int = 2,
        server_lr: float | None = None,
        tier_names: dict[int, str] | None = None,
        clients_train_heads: bool = True,
        **kwargs,
    ):
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_nodes,
            min_evaluate_nodes=min_nodes if fraction_evaluate > 0 else 0,
            min_available_nodes=min_nodes,
            weighted_by_key=WEIGHT_KEY,
            **kwargs,
        )
        self.server_lr = float(server_lr) if server_lr else self.default_server_lr
        self.tier_names = dict(tier_names or {})
        self.clients_train_heads = clients_train_heads
        self.global_arrays: dict[str, np.ndarray] = {}
        self.node_depth: dict[int, int] = {}  # learnt from replies; trims the downlink
        self.sent: list[Message] = []  # the last messages sent, see `sender`
        self.round_stats = RoundStats()
        self.state: dict[str, dict[str, np.ndarray]] = {slot: {} for slot in self.slots}

    # -- construction from the run config ------------------------------------
    @classmethod
    def config_kwargs(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        """Constructor arguments from a validated run config; subclasses add theirs."""
        depths = parse_tiers(cfg)
        names = parse_tier_names(cfg) or [f"depth-{d}" for d in depths]
        return {
            "fraction_train": cfg["fraction-train"],
            "fraction_evaluate": cfg["fraction-evaluate"],
            "min_nodes": cfg["min-nodes"],
            "server_lr": cfg["server-lr"],
            "tier_names": dict(zip(depths, names)),
            "clients_train_heads": clients_train_heads(cfg),
        }

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "DepthAwareFedAvg":
        return cls(**cls.config_kwargs(cfg))

    # -- hooks for subclasses -------------------------------------------------
    def reduce(self, name: str, deltas: list[np.ndarray], weights: list[float]) -> np.ndarray:
        """One parameter's combined delta from those of its senders."""
        w = np.asarray(weights, dtype=np.float64)
        return np.tensordot(w / w.sum(), np.stack(deltas).astype(np.float64), axes=1).astype(np.float32)

    def server_update(self, name: str, current: np.ndarray, delta: np.ndarray) -> np.ndarray:
        """The parameter's new global value; only called for parameters someone sent."""
        return current + self.server_lr * delta

    def extra_train_config(self) -> dict:
        """Keys added to every train message's config (e.g. FedProx's mu)."""
        return {}

    def state_dict(self) -> dict[str, np.ndarray]:
        """Server-side optimiser state to checkpoint: `<slot>/<parameter>` -> array."""
        return {f"{slot}/{name}": np.asarray(v) for slot in self.slots for name, v in self.state[slot].items()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.state = {slot: {} for slot in self.slots}
        foreign = []
        for key, value in state.items():
            slot, _, name = key.partition("/")
            if slot in self.state and name:
                self.state[slot][name] = np.array(value)
            else:
                foreign.append(key)
        if foreign:
            # A checkpoint of another strategy: its state means nothing here.
            log(
                WARNING,
                "%s ignores %d checkpointed state arrays it does not keep, e.g. %s",
                type(self).__name__,
                len(foreign),
                foreign[0],
            )

    # -- Flower Strategy API --------------------------------------------------
    def _messages(self, arrays: dict[str, np.ndarray], config: ConfigRecord, node_ids, message_type) -> list[Message]:
        # Kept to name the node behind an error reply (core.messages.reply_node).
        self.sent = by_depth(
            arrays,
            node_ids,
            self.node_depth,
            config,
            message_type,
            arrays_key=self.arrayrecord_key,
            config_key=self.configrecord_key,
        )
        return self.sent

    def sender(self, reply: Message) -> int:
        """The node a reply answers for, also when the SuperLink wrote it."""
        return reply_node(reply, self.sent)

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
        return self._messages(self.global_arrays, config, nodes, MessageType.TRAIN)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        if self.fraction_evaluate == 0.0:
            return []
        nodes = self._sample(grid, self.fraction_evaluate, self.min_evaluate_nodes)
        config = ConfigRecord({**dict(config), "server-round": server_round})
        return self._messages(to_numpy(arrays), config, nodes, MessageType.EVALUATE)

    def max_depth(self) -> int:
        return max((param_block(k) for k in self.global_arrays), default=0)

    def check_update(self, content: RecordDict) -> tuple[dict[str, np.ndarray], float, int]:
        """Decode and validate one reply; raises ValueError with the reason."""
        metrics = metrics_of(content)
        if WEIGHT_KEY not in metrics:
            raise ValueError(f"no '{WEIGHT_KEY}' metric")
        weight = metrics[WEIGHT_KEY]
        if not isinstance(weight, (int, float)) or not np.isfinite(weight) or not weight > 0:
            raise ValueError(f"'{WEIGHT_KEY}' must be a finite number > 0, got {weight!r}")
        depth = metrics.get("depth")
        limit = self.max_depth()
        if (
            not isinstance(depth, (int, float))
            or not np.isfinite(depth)
            or depth != int(depth)
            or not 1 <= depth <= limit
        ):
            raise ValueError(f"'depth' must be an integer in 1..{limit}, got {depth!r}")
        depth = int(depth)
        record = arrays_of(content)
        try:
            payload = to_numpy(record)
        except (TypeError, ValueError) as err:
            raise ValueError(f"unreadable arrays: {err}") from err
        shapes = {k: v.shape for k, v in self.global_arrays.items()}
        # A sparse update covers exactly what the client trains of blocks 1..depth.
        layout = sent_up_to(shapes, depth, self.clients_train_heads) if is_packed(payload) else None
        try:
            deltas = decode(payload, shapes, layout)
        except CodecError as err:
            raise ValueError(str(err)) from err
        for name, d in deltas.items():
            if param_block(name) > depth:
                raise ValueError(f"{name} belongs to block {param_block(name)}, beyond the client's depth {depth}")
            if not np.all(np.isfinite(d)):
                raise ValueError(f"{name} has non-finite values")
        return deltas, float(weight), depth

    def accept(self, server_round: int, replies: Iterable[Message]) -> list[Update]:
        """The replies that pass `check_update`; the others are logged and dropped."""
        good, dropped = [], []
        for msg in replies:
            node = self.sender(msg)
            if msg.has_error():
                dropped.append((node, f"error reply: {msg.error.reason}"))
                # Its depth budget may have grown (it then lacks weights it
                # needs): send it everything again until it replies.
                self.node_depth.pop(node, None)
                continue
            try:
                deltas, weight, depth = self.check_update(msg.content)
            except ValueError as err:
                dropped.append((node, str(err)))
                continue
            good.append(Update(node, deltas, weight, depth, arrays_of(msg.content).count_bytes(), msg.content))
        for node, reason in dropped:
            log(WARNING, "round %d: dropped the update of node %d: %s", server_round, node, reason)
        self.round_stats = RoundStats(dropped_reasons=[r for _, r in dropped], dropped_nodes=[n for n, _ in dropped])
        return good

    def tier_label(self, depth: int) -> str:
        return self.tier_names.get(depth, f"depth-{depth}")

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        updates = self.accept(server_round, replies)
        for u in updates:
            self.node_depth[u.node] = u.depth
        per_tier = Counter(self.tier_label(u.depth) for u in updates)
        tiers = {self.tier_label(d): per_tier.get(self.tier_label(d), 0) for d in sorted(self.tier_names)}
        tiers.update(sorted(per_tier.items()))  # depths outside the tiers (node max-depth)
        stats = self.round_stats
        stats.depths, stats.clients_per_tier = [u.depth for u in updates], tiers
        stats.bytes_up = sum(u.nbytes for u in updates)
        log(
            INFO,
            "round %d: %d updates, per tier: %s",
            server_round,
            len(updates),
            ", ".join(f"{k} {v}" for k, v in tiers.items()) or "none",
        )
        if not updates:
            return None, None
        return to_record(self.apply(updates)), aggregate_partial_metrics([u.content for u in updates])

    def apply(self, updates: list[Update]) -> dict[str, np.ndarray]:
        """The new global arrays: every parameter someone sent moves, the rest stay."""
        per_name: dict[str, list[tuple[np.ndarray, float]]] = defaultdict(list)
        for u in updates:
            for name, d in u.deltas.items():
                per_name[name].append((d, u.weight))
        new = dict(self.global_arrays)
        for name, items in per_name.items():
            delta = self.reduce(name, [d for d, _ in items], [w for _, w in items])
            new[name] = np.asarray(self.server_update(name, self.global_arrays[name], delta), dtype=np.float32)
        return new

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        good = []
        for m in replies:
            if m.has_error():
                continue
            w = metrics_or_empty(m.content).get(WEIGHT_KEY)
            if isinstance(w, (int, float)) and np.isfinite(w) and w >= 0:
                good.append(m.content)
        return aggregate_partial_metrics(good) if good else None


def aggregate_partial_metrics(contents: list[RecordDict]) -> MetricRecord:
    """Weighted mean of each scalar metric over the replies that hold it.

    Clients of different depth report different exits (`accuracy-7` exists
    only for depth >= 7), which Flower's aggregation would reject.
    """
    sums: dict[str, float] = defaultdict(float)
    weights: dict[str, float] = defaultdict(float)
    for content in contents:
        m = metrics_of(content)
        w = float(m[WEIGHT_KEY])
        for key, value in m.items():
            if key in (WEIGHT_KEY, "depth") or not isinstance(value, (int, float)):
                continue
            sums[key] += w * float(value)
            weights[key] += w
    out = {k: sums[k] / weights[k] for k in sorted(sums) if weights[k] > 0}
    out[WEIGHT_KEY] = sum(float(metrics_of(c)[WEIGHT_KEY]) for c in contents)
    return MetricRecord(out)
