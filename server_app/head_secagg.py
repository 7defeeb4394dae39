"""The server's side of the secure aggregation of the head statistics (`head-secagg`).

Four exchanges through the run's one `send` (server_app/exchange.py), each
a Flower query message with its own action (client_app/secagg.py answers):
keys -> shares -> masked -> unmask. The server relays what the nodes seal
for each other, adds the masked vectors in the ring, rebuilds from Shamir
shares the self-mask seeds of the nodes that sent and the mask keys of
those that did not (so a node that drops after the key stage costs its own
statistics only), and reads one sum per exit: never one node's.

What it costs: the per-node checks, the weight cap and the label screen of
server_app/head_guard.py need each node's statistics, so only the checks
of the sum remain (an exit whose sum fails them keeps its heads), and a
node that sends made-up statistics cannot be told apart or left out.
"""

from __future__ import annotations

import time
from logging import WARNING

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log

from adapters.head_fit import CROSS, GRAM, dp_shift, stat_name
from core import secagg
from core.messages import by_depth, reply_node
from core.records import arrays_of, metrics_or_empty, to_numpy

from . import head_guard

# Flower routes "query.<action>" to the ClientApp's @app.query("<action>") function.
KEYS, SHARES, MASKED, UNMASK = (f"{MessageType.QUERY}.{action}" for action in secagg.STAGES)
STAGES = {KEYS: "keys", SHARES: "shares", MASKED: "masked", UNMASK: "unmask"}


class SecAggFailed(RuntimeError):
    """Too few nodes stayed for the secure aggregation of a head fit; the message names the key."""


class _Fit:
    """One secure fit's bookkeeping: who is left out and why, bytes per stage."""

    def __init__(self, label: str, cfg: dict):
        self.label, self.cfg = label, cfg
        self.left_out: list[dict] = []
        self.bytes = {s: [0, 0] for s in STAGES.values()}
        self.pids: dict[int, int] = {}

    def send(self, send, messages: list[Message], stage: str) -> list[tuple[int, Message]]:
        replies = send(messages, f"{self.label} (secure aggregation: {STAGES[stage]})")
        out = []
        for reply in replies:
            node = reply_node(reply, messages)
            if not reply.has_error():
                m = metrics_or_empty(reply.content)
                self.bytes[STAGES[stage]][0] += int(m.get("bytes-up", 0))
                self.bytes[STAGES[stage]][1] += int(m.get("bytes-down", 0))
                if isinstance(m.get("partition-id"), int):
                    self.pids.setdefault(node, int(m["partition-id"]))
            out.append((node, reply))
        answered = {n for n, _ in out}
        for msg in messages:
            if msg.metadata.dst_node_id not in answered:
                self.leave_out(msg.metadata.dst_node_id, stage, "no reply within round-timeout")
        return out

    def leave_out(self, node: int, stage: str, reason: str) -> None:
        reason = f"{STAGES[stage]}: {reason}"
        self.left_out.append({"node": int(node), "partition-id": self.pids.get(node), "reason": reason[:300]})
        log(WARNING, "%s: node %s left out of the secure aggregation: %s", self.label, node, reason)

    def enough(self, nodes: list, t: int, total: int, what: str) -> None:
        if len(nodes) < t:
            reasons = "; ".join(f"node {x['node']}: {x['reason']}" for x in self.left_out[:3])
            raise SecAggFailed(
                f"{self.label}: secure aggregation needs {t} of the {total} nodes that sent keys "
                f"(head-secagg-threshold={self.cfg['head-secagg-threshold']:g}) but only {len(nodes)} {what}, "
                f"so the heads cannot be unmasked. Lower head-secagg-threshold or see why nodes failed"
                + (f" ({reasons})" if reasons else "")
            )


def _message(kind: str, node: int, config: dict) -> Message:
    return Message(content=RecordDict({"config": ConfigRecord(config)}), message_type=kind, dst_node_id=node)


def _values(reply: Message, want: dict[str, type]) -> dict:
    """The reply's protocol values, each of the type asked for; ValueError says what is wrong."""
    if reply.has_error():
        raise ValueError(reply.error.reason[:200])
    got = reply.content.config_records.get(secagg.RECORD, {})
    for key, kind in want.items():
        if not isinstance(got.get(key), kind):
            raise ValueError(f"'{key}' missing or not a {kind.__name__}")
    return {k: got[k] for k in want}


def secure_sums(
    grid,
    send,
    arrays: dict[str, np.ndarray],
    node_depth: dict[int, int] | None,
    config: dict,
    label: str,
    cfg: dict,
    dim: int,
    bounds: list[float],
    noise,
) -> tuple[dict, dict, dict, dict]:
    """Per exit, the sum of the nodes' statistics (G's upper triangle and R, as solve_heads reads
    them), read through the four stages; the examples behind each exit (G's corner of the sum);
    the diagonal shift of DP noise; and the fit's record: who took part and dropped, bytes.
    SecAggFailed when fewer nodes than the threshold stay."""
    t0 = time.time()
    fit = _Fit(label, cfg)
    classes = arrays["heads.0.fc.weight"].shape[0]
    size = dim * (dim + 1) // 2 + dim * classes  # one exit's G triangle and R, as a node flattens them
    bits = secagg.scale_bits(max(bounds), noise(len(bounds)))
    at = config["server-round"]

    stage1 = by_depth(arrays, grid.get_node_ids(), node_depth, ConfigRecord({**config, "secagg-bits": bits}), KEYS)
    joined = _keys(fit, send, stage1, len(bounds))
    ids = sorted(joined)
    if len(ids) < 2:
        raise SecAggFailed(
            f"{label}: secure aggregation (head-secagg) needs at least 2 nodes, {len(ids)} sent keys: "
            "the sum of one node's statistics would be that node's"
        )
    t = secagg.threshold(len(ids), cfg["head-secagg-threshold"])
    top = secagg.shared_exits([joined[n][0] for n in ids])
    sent = {n: min(joined[n][0], top) for n in ids}  # exits each node sends: those two or more nodes run

    sealed = _shares(fit, send, joined, t, at)
    fit.enough(sorted(sealed), t, len(ids), "shared their keys")
    masked = _masked(fit, send, sealed, {n: sent[n] * size for n in ids}, at)
    survivors = sorted(masked)
    fit.enough(survivors, t, len(ids), "sent masked statistics")
    dropped = [n for n in sorted(sealed) if n not in masked]
    seed_shares, key_shares = _unmask(fit, send, survivors, t, len(ids), at)

    fitted = secagg.shared_exits([sent[n] for n in survivors])  # exits two or more survivors sent
    try:
        total = _unmasked_sum(masked, sent, fitted, size, t, seed_shares, key_shares, dropped, joined)
    except secagg.SecAggError as err:
        raise SecAggFailed(f"{label}: secure aggregation could not unmask the sum (head-secagg): {err}") from None
    sums, counts, shifts, refused = {}, {}, {}, []
    for i in range(fitted):
        vec = secagg.dequantize(total[i * size : (i + 1) * size], bits)
        gram, cross = vec[: size - dim * classes], vec[size - dim * classes :].reshape(dim, classes)
        stds = [noise(joined[n][0]) for n in survivors if sent[n] > i]
        try:
            n_i = head_guard.check_sum(gram, cross, bounds[i], float(np.sqrt(sum(s * s for s in stds))))
        except ValueError as err:
            refused.append({"exit": i + 1, "reason": str(err)[:300]})
            log(WARNING, "%s: the sum of exit %d is refused, its heads stay: %s", label, i + 1, err)
            continue
        sums[stat_name(i, GRAM)], sums[stat_name(i, CROSS)], counts[i] = gram, cross, n_i
        if cfg["head-dp-epsilon"] > 0:
            shifts[i] = dp_shift(stds, dim)
    record = {
        "left-out": fit.left_out,
        "bytes-up": sum(b[0] for b in fit.bytes.values()),
        "bytes-down": sum(b[1] for b in fit.bytes.values()),
        "secure-aggregation": {
            "nodes": len(ids),
            "threshold": t,
            "survivors": len(survivors),
            "dropped": [{"node": int(d), "partition-id": fit.pids.get(d)} for d in dropped],
            "exits-sent": top,
            "exits-unmasked": fitted,
            "exits-refused": refused,
            "scale-bits": bits,
            "ring-bits": secagg.RING_BITS,
            "message-rounds": len(STAGES),
            "bytes-up-per-stage": {s: b[0] for s, b in fit.bytes.items()},
            "seconds": round(time.time() - t0, 3),
        },
    }
    return sums, counts, shifts, record


def _keys(fit: _Fit, send, messages: list[Message], exits: int) -> dict[int, tuple[int, bytes, bytes]]:
    """Stage 1 (the nodes compute and keep their statistics): node -> (depth, sealing key, mask key)."""
    joined = {}
    for node, reply in fit.send(send, messages, KEYS):
        try:
            v = _values(reply, {"enc-pk": bytes, "mask-pk": bytes})
            depth = metrics_or_empty(reply.content).get("depth")
            if not isinstance(depth, int) or not 1 <= depth <= exits:
                raise ValueError(f"'depth' must be an integer in 1..{exits}, got {depth!r}")
        except ValueError as err:
            fit.leave_out(node, KEYS, str(err))
            continue
        joined[node] = (depth, v["enc-pk"], v["mask-pk"])
    return joined


def _shares(fit: _Fit, send, joined: dict, t: int, at: int) -> dict[int, dict[int, bytes]]:
    """Stage 2: every node's key list out; per node, the shares it sealed for each other node."""
    ids = sorted(joined)
    keylist = {
        "server-round": at,
        "ids": ids,
        "depths": [joined[n][0] for n in ids],
        "enc-pks": [joined[n][1] for n in ids],
        "mask-pks": [joined[n][2] for n in ids],
        "threshold": t,
    }
    sealed = {}
    for node, reply in fit.send(send, [_message(SHARES, n, keylist) for n in ids], SHARES):
        try:
            v = _values(reply, {"to": list, "ciphertexts": list})
            if sorted(v["to"]) != [n for n in ids if n != node] or len(v["ciphertexts"]) != len(v["to"]):
                raise ValueError("its shares are not addressed to every other node once")
        except ValueError as err:
            fit.leave_out(node, SHARES, str(err))
            continue
        sealed[node] = dict(zip(v["to"], v["ciphertexts"]))
    return sealed


def _masked(fit: _Fit, send, sealed: dict, lengths: dict[int, int], at: int) -> dict[int, np.ndarray]:
    """Stage 3: each node gets the shares sealed for it; node -> its masked statistics."""
    shared = sorted(sealed)
    relay = [
        _message(
            MASKED,
            n,
            {
                "server-round": at,
                "from": [u for u in shared if u != n],
                "ciphertexts": [sealed[u][n] for u in shared if u != n],
            },
        )
        for n in shared
    ]
    masked = {}
    for node, reply in fit.send(send, relay, MASKED):
        try:
            if reply.has_error():
                raise ValueError(reply.error.reason[:200])
            y = to_numpy(arrays_of(reply.content)).get("masked")
            if y is None or y.dtype != np.uint64 or y.shape != (lengths[node],):
                raise ValueError(f"expected {lengths[node]} ring elements, got {None if y is None else y.shape}")
        except ValueError as err:
            fit.leave_out(node, MASKED, str(err))
            continue
        masked[node] = y
    return masked


def _unmask(fit: _Fit, send, survivors: list[int], t: int, total: int, at: int) -> tuple[dict, dict]:
    """Stage 4: shares of the survivors' self-mask seeds per (node, band), of the dropped nodes'
    mask keys per node."""
    seed_shares: dict[tuple[int, int], list[bytes]] = {}
    key_shares: dict[int, list[bytes]] = {}
    helpers = []
    ask = {"server-round": at, "survivors": survivors}
    for node, reply in fit.send(send, [_message(UNMASK, n, ask) for n in survivors], UNMASK):
        try:
            v = _values(reply, {k: list for k in ("seed-node", "seed-band", "seed-share", "key-node", "key-share")})
        except ValueError as err:
            fit.leave_out(node, UNMASK, str(err))
            continue
        helpers.append(node)
        for owner, band, share in zip(v["seed-node"], v["seed-band"], v["seed-share"]):
            seed_shares.setdefault((int(owner), int(band)), []).append(share)
        for owner, share in zip(v["key-node"], v["key-share"]):
            key_shares.setdefault(int(owner), []).append(share)
    fit.enough(helpers, t, total, "helped unmask")
    return seed_shares, key_shares


def _unmasked_sum(masked, sent, fitted, size, t, seed_shares, key_shares, dropped, joined) -> np.ndarray:
    """The ring sum of exits 1..fitted over the survivors: their masked vectors, less their
    self-masks (seeds rebuilt from shares), less their pairwise masks with the dropped nodes
    (mask keys rebuilt from shares); the masks between survivors cancel."""
    edges = secagg.bands(list(sent.values()))
    total = np.zeros(fitted * size, dtype=np.uint64)
    for n, y in masked.items():
        part = y[: min(sent[n], fitted) * size]
        np.add(total[: len(part)], part, out=total[: len(part)])
        for b, (lo, hi) in enumerate(edges):
            if hi <= min(sent[n], fitted):
                seed = secagg.rebuild(seed_shares.get((n, b), []), t)
                secagg.apply_mask(total, secagg.mask_stream(seed, (hi - lo) * size), -1, lo * size)
    for d in dropped:
        key = secagg.key_from_secret(secagg.rebuild(key_shares.get(d, []), t))
        for n in masked:
            stream = secagg.mask_stream(secagg.pair_seed(key, joined[n][2]), min(sent[n], sent[d], fitted) * size)
            secagg.apply_mask(total, stream, -secagg.pair_sign(n, d))
    return total
