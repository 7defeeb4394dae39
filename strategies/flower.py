"""Any Flower Message-API strategy, made depth-aware by grouping blocks.

Clients of depth d send blocks 1..d, so replies hold different keys and no
Flower strategy can aggregate them as they come. Within one group of blocks
every sender sends the same keys, so an unmodified Flower strategy can
aggregate that group: this wrapper keeps one inner strategy instance per
group (its own momentum, moments, clipping norm), hands it replies that hold
the group's full weights (global + the client's decoded delta, top-k
decoded first), and merges the groups back into the full state. A group
nobody sent in a round keeps its value and its inner strategy's state.

Groups (`strategy-groups`): `tier` = the blocks between consecutive tier
depths (blocks 1..3, 4..6, ... for tiers 3,6,9,12; the shared adapter goes
with the first), so a robust rule or a DP clip sees as much of an update as
every sender of it holds; `block` = one group per block, which also fits
nodes whose own `max-depth` is not a tier depth. In `tier` mode a client
whose depth ends inside a group is left out of that group (logged).

Sampling, validation of replies (`check_update`), the trimmed downlink and
metrics stay ours (DepthAwareFedAvg). The project keeps its own round loop
rather than Flower's `Strategy.start`; docs/strategies.md says why.
"""

from __future__ import annotations

import contextlib
import gc
import math
import random
from collections.abc import Callable, Iterable
from logging import WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp.strategy import Strategy

from core.naming import param_block, sent_by_clients
from core.records import metrics_of, to_numpy, to_record

from .depth_fedavg import WEIGHT_KEY, DepthAwareFedAvg, Update

STATE_PREFIX = "inner"
_ARRAY_KINDS = ("R", "D", "L", "A")


def strategy_chain(strategy: Strategy) -> list[Strategy]:
    """The strategy and those it wraps (Flower's DP wrappers keep theirs in `.strategy`)."""
    chain = [strategy]
    while isinstance(getattr(chain[-1], "strategy", None), Strategy):
        chain.append(chain[-1].strategy)
    return chain


class _Nodes:
    """A grid for the inner strategies' configure_train: enough node ids for
    their sampling to return at once. Their messages are not sent."""

    def __init__(self, count: int):
        self.ids = list(range(1, count + 1))

    def get_node_ids(self):
        return list(self.ids)


class FlowerGroups(DepthAwareFedAvg):
    """Runs one instance of a Flower strategy per group of blocks."""

    def __init__(
        self,
        *,
        factory: Callable[[], Strategy],
        label: str,
        groups: str = "tier",
        tiers: Iterable[int] = (),
        client_lr: Callable[[int], float] | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.factory = factory
        self.client_lr = client_lr  # the clients' learning rate in a round (core.config.round_lr)
        self.label = label
        self.group_mode = groups
        self.tiers = sorted(set(int(t) for t in tiers))
        self.inner: dict[str, Strategy] = {}
        self._pending: dict[str, list[tuple[str, str, str, np.ndarray]]] = {}
        self._inner_config: dict[str, Any] = {}
        self._round = 0
        self._warned_partial: set[tuple[int, str]] = set()

    # -- groups -----------------------------------------------------------------
    def group_of(self, block: int) -> str:
        if self.group_mode == "block":
            return f"b{block}"
        lo = 1
        for t in self.tiers:
            if block <= t:
                return f"b{lo}-{t}" if lo < t else f"b{t}"
            lo = t + 1
        return f"b{lo}-"  # blocks no tier runs: never sent, kept as they are

    def groups(self) -> dict[str, list[str]]:
        """Group label -> the parameter names it holds, in block order."""
        out: dict[str, list[str]] = {}
        sent = [n for n in self.global_arrays if sent_by_clients(n, self.clients_train_heads)]
        for name in sorted(sent, key=lambda n: (param_block(n), n)):
            out.setdefault(self.group_of(param_block(name)), []).append(name)
        return out

    def sendable_groups(self) -> int:
        """Groups a client can send: what one client's whole update is split into."""
        top = max(self.tiers, default=0)
        return sum(1 for names in self.groups().values() if param_block(names[0]) <= top) or 1

    def inner_for(self, group: str) -> Strategy:
        if group not in self.inner:
            strategy = self.factory()
            self._split_dp_budget(strategy)
            for path, kind, sub, value in self._pending.pop(group, []):
                _restore(strategy, path, kind, sub, value)
            self.inner[group] = strategy
        return self.inner[group]

    def _split_dp_budget(self, strategy: Strategy) -> None:
        # A client's update is clipped group by group: clipping each of G
        # groups at C/sqrt(G) bounds the whole update's norm by C, and noise
        # multiplier z*sqrt(G) on that clip gives each group noise of
        # std z*C/n, so (z, C) account as one Gaussian mechanism per round.
        g = self.sendable_groups()
        for s in strategy_chain(strategy):
            if hasattr(s, "clipping_norm") and hasattr(s, "noise_multiplier"):
                s.clipping_norm = float(s.clipping_norm) / math.sqrt(g)
                s.noise_multiplier = float(s.noise_multiplier) * math.sqrt(g)

    # -- Flower Strategy API ------------------------------------------------------
    def extra_train_config(self) -> dict:
        return dict(self._inner_config)

    def configure_train(self, server_round, arrays, config, grid):
        self.global_arrays = to_numpy(arrays)
        self._inner_config = {}
        # Inner strategies sample nodes too; their draws must not move ours.
        rng = random.getstate()
        try:
            for group, names in self.groups().items():
                inner = self.inner_for(group)
                count = max(
                    [1]
                    + [
                        int(getattr(s, a, 0) or 0)
                        for s in strategy_chain(inner)
                        for a in ("min_available_nodes", "min_train_nodes")
                    ]
                )
                sub = to_record({n: self.global_arrays[n] for n in names})
                msgs = list(inner.configure_train(server_round, sub, ConfigRecord(), _Nodes(count)) or [])
                for msg in msgs[:1]:
                    for record in msg.content.config_records.values():
                        for key, value in record.items():
                            # e.g. FedProx's proximal-mu, which our clients read
                            if key != "server-round":
                                self._inner_config.setdefault(key, value)
        finally:
            random.setstate(rng)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        self._round = server_round
        return super().aggregate_train(server_round, replies)

    def apply(self, updates: list[Update]) -> dict[str, np.ndarray]:
        new = dict(self.global_arrays)
        for group, names in self.groups().items():
            senders = [u for u in updates if all(n in u.deltas for n in names)]
            partial = [
                u for u in updates if any(n in u.deltas for n in names) and not all(n in u.deltas for n in names)
            ]
            for u in partial:
                if (u.node, group) not in self._warned_partial:
                    self._warned_partial.add((u.node, group))
                    log(
                        WARNING,
                        "node %d (depth %d) holds only part of blocks %s and is left out of that group; "
                        "strategy-groups='block' uses every block it sends",
                        u.node,
                        u.depth,
                        group[1:],
                    )
            if not senders:
                continue
            inner = self.inner_for(group)
            for s in strategy_chain(inner):
                if hasattr(s, "num_sampled_clients"):
                    # DP noise is calibrated to the mean over this group's senders.
                    s.num_sampled_clients = len(senders)
                if hasattr(s, "client_learning_rate") and self.client_lr is not None:
                    # QFedAvg's Lipschitz estimate 1/lr follows the rate the clients trained with.
                    s.client_learning_rate = self.client_lr(self._round)
            loss_key = next(
                (s.train_loss_key for s in strategy_chain(inner) if hasattr(s, "train_loss_key")), "train_loss"
            )
            msgs = [self._group_reply(u, names, loss_key) for u in senders]
            with _heap_frozen():
                arrays, _ = inner.aggregate_train(self._round, msgs)
            if arrays is None:
                log(
                    WARNING,
                    "round %d: %s left blocks %s as they were (%d senders)",
                    self._round,
                    self.label,
                    group[1:],
                    len(senders),
                )
                continue
            out = to_numpy(arrays)
            if set(out) != set(names):
                raise ValueError(
                    f"{self.label} returned arrays {sorted(out)[:3]}... for blocks {group[1:]}, expected {names[:3]}..."
                )
            for n in names:
                new[n] = np.asarray(out[n], dtype=np.float32).reshape(self.global_arrays[n].shape)
        return new

    def _group_reply(self, u: Update, names: list[str], loss_key: str) -> Message:
        weights = {n: self.global_arrays[n] + u.deltas[n] for n in names}
        metrics = {WEIGHT_KEY: u.weight}
        m = metrics_of(u.content)
        losses = [float(v) for k, v in m.items() if k.startswith("train-loss-") and isinstance(v, (int, float))]
        if losses:
            # QFedAvg weighs clients by loss: the mean over the exits the client trained.
            metrics[loss_key] = float(np.mean(losses))
        content = RecordDict({self.arrayrecord_key: to_record(weights), "metrics": MetricRecord(metrics)})
        return Message(content=content, dst_node_id=0, message_type=MessageType.TRAIN)

    # -- checkpoints -----------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """Every inner strategy's arrays and changed numbers, by group and attribute."""
        out: dict[str, np.ndarray] = {}
        for group, strategy in self.inner.items():
            _capture(strategy, self.factory(), f"{STATE_PREFIX}/{group}", [], out)
        return out

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.inner, self._pending = {}, {}
        foreign = []
        for key, value in state.items():
            parts = key.split("/", 4)
            if len(parts) != 5 or parts[0] != STATE_PREFIX:
                foreign.append(key)
                continue
            _, group, path, kind, sub = parts
            self._pending.setdefault(group, []).append((path, kind, sub, np.array(value)))
        if foreign:
            log(
                WARNING,
                "%s ignores %d checkpointed state arrays it does not keep, e.g. %s",
                self.label,
                len(foreign),
                foreign[0],
            )


@contextlib.contextmanager
def _heap_frozen():
    """Flower's QFedAvg and Bulyan run a full gc.collect() for every reply they read
    (`ArrayRecord.to_numpy_ndarrays(keep_input=False)`): in a server that has imported
    torch each one walks every object of the process. Frozen, the objects that existed
    before aggregation are left out, so a collection scans only its own."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _capture(obj, fresh, prefix: str, path: list[str], out: dict) -> None:
    for attr, value in vars(obj).items():
        at = ".".join(path + [attr])
        if isinstance(value, Strategy):
            _capture(value, getattr(fresh, attr, None), prefix, path + [attr], out)
        elif isinstance(value, ArrayRecord):
            out.update({f"{prefix}/{at}/R/{k}": v.numpy() for k, v in value.items()})
        elif isinstance(value, dict) and value and all(isinstance(v, np.ndarray) for v in value.values()):
            out.update({f"{prefix}/{at}/D/{k}": np.asarray(v) for k, v in value.items()})
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, np.ndarray) for v in value):
            out.update({f"{prefix}/{at}/L/{i}": np.asarray(v) for i, v in enumerate(value)})
        elif isinstance(value, np.ndarray):
            out[f"{prefix}/{at}/A/"] = value
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            # Only numbers the strategy moved itself (an adaptive clipping norm).
            if getattr(fresh, attr, None) != value:
                out[f"{prefix}/{at}/F/"] = np.asarray(value)


def _restore(strategy, path: str, kind: str, sub: str, value: np.ndarray) -> None:
    *owners, attr = path.split(".")
    obj = strategy
    for name in owners:
        obj = getattr(obj, name)
    if kind == "R":
        record = getattr(obj, attr, None)
        if not isinstance(record, ArrayRecord):
            record = ArrayRecord()
            setattr(obj, attr, record)
        record[sub] = Array(np.ascontiguousarray(value))
    elif kind == "D":
        current = getattr(obj, attr, None)
        if not isinstance(current, dict):
            current = {}
            setattr(obj, attr, current)
        current[sub] = value
    elif kind == "L":
        current = getattr(obj, attr, None)
        if not isinstance(current, list):
            current = []
            setattr(obj, attr, current)
        index = int(sub)
        current.extend([None] * (index + 1 - len(current)))
        current[index] = value
    elif kind == "A":
        setattr(obj, attr, value)
    elif kind == "F":
        setattr(obj, attr, value.item())
