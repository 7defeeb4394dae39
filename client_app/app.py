"""anytime-fl ClientApp: train and evaluate the exits this device can run."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch.utils.data import DataLoader

from adapters.state import get_state, set_state, trainable_names
from adapters.training import TrainSettings, evaluate, label_counts, train_local
from core.codec import payload_bytes, topk_encode
from core.config import clients_train_heads, parse_attackers, validate
from core.naming import sent_up_to
from core.records import arrays_of, to_numpy, to_record
from core.secagg import STAGES
from runtime.models import model_and_spec

from . import secagg, watchdog
from .personalize import personalize
from .tiers import client_depth, node_cache_dir, node_run_config, partition_of

# The watchdog ends a deployment's flwr-clientapp process that its SuperNode or its reply outlived.
app = ClientApp(mods=[watchdog.mod])

RESIDUAL = "topk-residual"
SECAGG_KEYS, SECAGG_SHARES, SECAGG_MASKED, SECAGG_UNMASK = STAGES


def _setup(msg: Message, context: Context):
    cfg = node_run_config(validate(dict(context.run_config)), dict(context.node_config))
    torch.set_num_threads(cfg["client-threads"])
    pid, n = partition_of(dict(context.node_config))
    cache = node_cache_dir(dict(context.node_config))
    if cache is None:
        from fedtasks.task import load_partition

        model, spec = model_and_spec(cfg)
        datasets = lambda: load_partition(cfg, spec, pid, n)  # noqa: E731
    else:
        # Every message is a fresh process in a deployment: the node's disk
        # cache spares it the data libraries and timm (fedtasks.nodecache).
        from fedtasks.nodecache import client_datasets, partition_arrays

        num_classes = partition_arrays(cfg, pid, n, cache)[3]
        model, spec = model_and_spec(cfg, num_classes, cache)
        datasets = lambda: client_datasets(cfg, spec, pid, n, cache)  # noqa: E731
    depth = client_depth(dict(context.node_config), cfg, model.num_blocks)
    received = to_numpy(arrays_of(msg.content))
    names = trainable_names(model, depth)
    missing = [k for k in names if k not in received]
    if missing:
        raise ValueError(f"server sent no weights for {len(missing)} parameters of depth {depth}, e.g. {missing[0]}")
    set_state(model, {k: received[k] for k in names})
    return cfg, model, datasets, depth, pid, received


def attack_noise(cfg: dict, partition_id: int, server_round: int, arrays: dict[str, np.ndarray]) -> dict:
    """What an attacking client sends instead of `arrays`: N(0, attack-noise-std^2), same shapes and dtypes."""
    rng = np.random.default_rng([cfg["seed"], partition_id, server_round])
    return {k: rng.normal(0.0, cfg["attack-noise-std"], v.shape).astype(v.dtype) for k, v in arrays.items()}


def client_seed(cfg: dict, partition_id: int, server_round: int) -> int:
    """Each client and round shuffles its data its own way, the same in every run."""
    return cfg["seed"] * 100_003 + partition_id * 1_009 + server_round


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, model, datasets, depth, pid, received = _setup(msg, context)
    train_ds, _ = datasets()
    if len(train_ds) == 0:
        raise ValueError(f"partition {pid} has no training examples")
    config = msg.content.config_records["config"]
    server_round = int(config.get("server-round", 0))
    # The proximal weight travels in the message: it is the strategy's to set.
    settings = TrainSettings.from_config(
        cfg,
        prox_mu=float(config.get("proximal-mu", 0.0)),
        server_round=server_round,
        class_counts=label_counts(train_ds, model.num_classes) if cfg["logit-adjust"] > 0 else None,
    )
    gen = torch.Generator().manual_seed(client_seed(cfg, pid, server_round))
    loader = DataLoader(train_ds, batch_size=cfg["batch-size"], shuffle=True, generator=gen)
    stats = train_local(model, loader, depth, settings)

    new = get_state(model, depth)
    # closed-form heads are the server's: their deltas are zero and stay home
    delta = {k: new[k] - received[k] for k in sent_up_to(new, depth, clients_train_heads(cfg))}
    if pid in parse_attackers(cfg):
        # Robustness benchmarks (attack-partitions): noise instead of the update.
        delta = attack_noise(cfg, pid, server_round, delta)
    residual = None
    if RESIDUAL in context.state.array_records:
        residual = to_numpy(context.state.array_records[RESIDUAL])
    payload, residual = topk_encode(delta, cfg["topk-fraction"], residual)
    if cfg["topk-fraction"] < 1.0:
        # Error feedback: what was not sent this round is added to the next.
        context.state.array_records[RESIDUAL] = to_record(residual)

    metrics = {
        "num-examples": len(train_ds),
        "depth": depth,
        "partition-id": pid,
        "bytes-up": payload_bytes(payload),
        "bytes-down": payload_bytes(received),
        "dense-bytes": payload_bytes(delta),
    }
    for i, loss in enumerate(stats["loss"], start=1):
        metrics[f"train-loss-{i}"] = float(loss)
    content = RecordDict({"arrays": to_record(payload), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


def _head_sums(msg: Message, context: Context):
    """This node's head statistics over its training split (noisy with `head-dp-epsilon`, poisoned
    by an attacking partition), with what the reply and secure aggregation need beside them."""
    from adapters.head_fit import add_dp_noise, exit_statistics, feature_bound, noise_std, projections

    from .head_attacks import poison

    cfg, model, datasets, depth, pid, received = _setup(msg, context)
    train_ds, _ = datasets()
    if len(train_ds) == 0:
        raise ValueError(f"partition {pid} has no training examples")
    config = msg.content.config_records["config"]
    width = model.heads[0].fc.in_features
    # the server says how many features the statistics keep (head-features) and the projection's seed;
    # the projections span the heads both sides hold (received), then random directions
    k = int(config.get("stat-dim", width))
    proj = projections(received, depth, k, int(config.get("stat-seed", cfg["seed"])))
    loader = DataLoader(train_ds, batch_size=cfg["eval-batch-size"])
    sums, seen = exit_statistics(model, loader, depth, proj)
    bounds = [feature_bound(received, i) for i in range(depth)]
    std = noise_std(cfg, bounds)
    if std > 0:
        # Fresh entropy, not the run's seed: noise the server could redraw would protect nothing.
        sums = add_dp_noise(sums, std, np.random.default_rng())
    if pid in parse_attackers(cfg):
        # Robustness benchmarks: the server's checks and screen must stop these (server_app/head_guard.py).
        server_round = int(config.get("server-round", 0))
        sums, seen = poison(cfg["attack-heads"], sums, seen, lambda s: attack_noise(cfg, pid, server_round, s))
    return sums, seen, depth, pid, received, max(bounds), std


@app.query()
def head_statistics(msg: Message, context: Context) -> Message:
    """The sums a ridge-regression fit of exit heads 1..depth needs, over this node's training split.

    Asked for before round 1 and every `head-refit-every` rounds unless `heads` is "trained"
    (server_app/head_fit.py).
    """
    from adapters.head_codec import encode

    sums, seen, depth, pid, received, _, _ = _head_sums(msg, context)
    # fixed point around the node's mean (head-bits): the server says how many bits, as it says the features
    sums = encode(sums, depth, int(msg.content.config_records["config"].get("stat-bits", 0)))
    metrics = {
        "num-examples": seen,
        "depth": depth,
        "partition-id": pid,
        "bytes-up": payload_bytes(sums),
        "bytes-down": payload_bytes(received),
    }
    content = RecordDict({"arrays": to_record(sums), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


# With `head-secagg` the statistics go through secure aggregation's four stages instead
# (client_app/secagg.py): the first computes them, the others only exchange keys and masks.
@app.query(SECAGG_KEYS)
def secagg_keys(msg: Message, context: Context) -> Message:
    sums, seen, depth, pid, received, bound, std = _head_sums(msg, context)
    return secagg.keys(msg, context, sums, seen, depth, pid, bound, std, payload_bytes(received))


@app.query(SECAGG_SHARES)
def secagg_shares(msg: Message, context: Context) -> Message:
    return secagg.shares(msg, context)


@app.query(SECAGG_MASKED)
def secagg_masked(msg: Message, context: Context) -> Message:
    return secagg.masked(msg, context)


@app.query(SECAGG_UNMASK)
def secagg_unmask(msg: Message, context: Context) -> Message:
    return secagg.unmask(msg, context)


@app.evaluate("personalize")
def personalize_exits(msg: Message, context: Context) -> Message:
    """The personalisation round (`evaluate.personalize`, server_app/personalization.py): fine-tunes
    the final global adapters locally and replies metrics only; personal weights stay here."""
    cfg, model, datasets, depth, pid, _ = _setup(msg, context)
    train_ds, val_ds = datasets()
    counts = msg.content.config_records.get("config", {}).get("label-counts")
    metrics = personalize(
        model,
        depth,
        train_ds,
        val_ds,
        cfg,
        seed=client_seed(cfg, pid, cfg["num-server-rounds"] + 1),
        federation_labels=list(counts) if counts else None,
    )
    metrics["partition-id"] = pid
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


@app.evaluate()
def evaluate_exits(msg: Message, context: Context) -> Message:
    cfg, model, datasets, depth, pid, _ = _setup(msg, context)
    _, val_ds = datasets()
    metrics: dict = {"num-examples": len(val_ds), "depth": depth}
    if len(val_ds):
        res = evaluate(model, DataLoader(val_ds, batch_size=cfg["eval-batch-size"]), depth)
        for i, (acc, loss) in enumerate(zip(res["accuracy"], res["loss"]), start=1):
            metrics[f"accuracy-{i}"] = acc
            metrics[f"loss-{i}"] = loss
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
