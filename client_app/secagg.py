"""A node's side of the secure aggregation of its head statistics (`head-secagg`).

Four query messages, after Bonawitz et al. (core/secagg.py has the
arithmetic, server_app/head_secagg.py the server's side):

1. keys: the node computes its statistics (with privacy noise when
   `head-dp-epsilon` is set) and keeps them, as ring elements, in
   `context.state`; it answers with two fresh public keys, one to seal
   shares with, one to agree pairwise masks with, and its depth.
2. shares: given every node's keys and depth, it draws a self-mask seed per
   band of exits it sends and Shamir-shares them and its mask key among
   all, each node's shares sealed for that node.
3. masked: given the shares sealed for it, it sends its statistics plus its
   self-masks plus a pairwise mask with every node that shared, and forgets
   the statistics and seeds.
4. unmask: told who sent masked statistics, it reveals its shares of their
   self-mask seeds (of the bands at least two of them send) and of the
   mask keys of those who did not; never both for one node.

In a deployment each message runs in a fresh process, so everything a later
stage needs lives in `context.state` (kept per run on the node).
"""

from __future__ import annotations

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from adapters.head_fit import CROSS, GRAM, stat_name
from core import secagg
from core.codec import payload_bytes
from core.records import to_numpy, to_record

STATE = "head-secagg"
STATS = "head-secagg-stats"


def _config(msg: Message) -> ConfigRecord:
    return msg.content.config_records["config"]


def _state(context: Context, stage: str, server_round: int) -> dict:
    """The protocol's state, which must be at `stage` of the fit after `server_round`."""
    st = context.state.config_records.get(STATE)
    if st is None or st.get("stage") != stage or st.get("round") != server_round:
        got = "none" if st is None else f"stage {st.get('stage')!r} of round {st.get('round')}"
        raise secagg.SecAggError(f"secure aggregation expected stage {stage!r} of round {server_round}, node has {got}")
    return dict(st)


def _save(context: Context, state: dict) -> None:
    context.state.config_records[STATE] = ConfigRecord(state)


def _reply(msg: Message, values: dict, depth: int, pid: int, received: int, arrays: dict | None = None) -> Message:
    sent = secagg.config_bytes(values) + (payload_bytes(arrays) if arrays else 0)
    metrics = MetricRecord({"depth": depth, "partition-id": pid, "bytes-up": sent, "bytes-down": received})
    content = RecordDict({"metrics": metrics})
    if values:
        content.config_records[secagg.RECORD] = ConfigRecord(values)
    if arrays:
        content.array_records["arrays"] = to_record(arrays)
    return Message(content=content, reply_to=msg)


def flatten(sums: dict[str, np.ndarray], depth: int) -> tuple[np.ndarray, int]:
    """Exits 1..depth's G (upper triangle) and R one after the other, and the size of one exit."""
    parts = [
        np.concatenate([sums[stat_name(i, GRAM)].ravel(), sums[stat_name(i, CROSS)].ravel()]) for i in range(depth)
    ]
    return np.concatenate(parts), len(parts[0])


def keys(
    msg: Message,
    context: Context,
    sums: dict[str, np.ndarray],
    count: int,
    depth: int,
    pid: int,
    bound: float,
    noise_std: float,
    received: int,
) -> Message:
    """Stage 1: keep the statistics as ring elements, answer with fresh public keys."""
    config = _config(msg)
    bits = int(config["secagg-bits"])
    flat, size = flatten(sums, depth)
    # The ring holds no node's count: the bound is this node's own, the clip never binds on honest sums.
    q = secagg.quantize(flat, bits, secagg.entry_bound(count, bound, noise_std))
    enc_sk, enc_pk = secagg.key_pair()
    mask_sk, mask_pk = secagg.key_pair()
    context.state.array_records[STATS] = to_record({"x": q})
    state = {
        "stage": "keys",
        "round": int(config["server-round"]),
        "depth": depth,
        "pid": pid,
        "size": size,
        "enc-sk": enc_sk,
        "enc-pk": enc_pk,
        "mask-sk": mask_sk,
        "mask-pk": mask_pk,
    }
    _save(context, state)
    return _reply(msg, {"enc-pk": enc_pk, "mask-pk": mask_pk}, depth, pid, received)


def shares(msg: Message, context: Context) -> Message:
    """Stage 2: a self-mask seed per band, and Shamir shares of them and of the mask key, sealed per node."""
    config = _config(msg)
    st = _state(context, "keys", int(config["server-round"]))
    me = msg.metadata.dst_node_id
    ids = [int(n) for n in config["ids"]]
    depths, enc_pks, mask_pks = list(config["depths"]), list(config["enc-pks"]), list(config["mask-pks"])
    t = int(config["threshold"])
    if len(set(ids)) != len(ids) or not len(ids) == len(depths) == len(enc_pks) == len(mask_pks):
        raise secagg.SecAggError("the key list repeats a node or its columns differ in length")
    if me not in ids:
        raise secagg.SecAggError(f"node {me} is not in the key list it was sent")
    at = ids.index(me)
    if (enc_pks[at], mask_pks[at], depths[at]) != (st["enc-pk"], st["mask-pk"], st["depth"]):
        raise secagg.SecAggError("the key list holds other keys or another depth for this node")
    if len(set(enc_pks) | set(mask_pks)) != 2 * len(ids):
        raise secagg.SecAggError("some public keys repeat")
    if not 2 <= secagg.threshold(len(ids), 0.5) <= t <= len(ids):
        raise secagg.SecAggError(f"threshold {t} is not more than half of the {len(ids)} nodes")
    top = secagg.shared_exits(depths)
    mine = min(st["depth"], top)
    seeds = [secagg.new_seed() for lo, hi in secagg.bands([min(d, top) for d in depths]) if hi <= mine]
    seed_shares = [secagg.split(s, t, len(ids)) for s in seeds]
    key_shares = secagg.split(secagg.key_secret(st["mask-sk"]), t, len(ids))
    to, sealed = [], []
    for j, node in enumerate(ids):
        mine_j = [s[j] for s in seed_shares]
        if node == me:
            own = (b"".join(mine_j), key_shares[j])
            continue
        key = secagg.shared_key(st["enc-sk"], enc_pks[j])
        to.append(node)
        sealed.append(secagg.seal(key, me, node, mine_j, key_shares[j]))
    st.update(
        {
            "stage": "shares",
            "ids": ids,
            "depths": [int(d) for d in depths],
            "enc-pks": enc_pks,
            "mask-pks": mask_pks,
            "threshold": t,
            "seeds": seeds,
            "from": [me],
            "seed-shares": [own[0]],
            "key-shares": [own[1]],
        }
    )
    _save(context, st)
    return _reply(msg, {"to": to, "ciphertexts": sealed}, st["depth"], st["pid"], secagg.config_bytes(dict(config)))


def masked(msg: Message, context: Context) -> Message:
    """Stage 3: the statistics plus self-masks plus a pairwise mask with every node that shared."""
    config = _config(msg)
    st = _state(context, "shares", int(config["server-round"]))
    me, ids = msg.metadata.dst_node_id, st["ids"]
    srcs = [int(n) for n in config["from"]]
    if len(set(srcs)) != len(srcs) or me in srcs or not set(srcs) <= set(ids):
        raise secagg.SecAggError("the relayed shares come from unknown or repeated nodes")
    if len(srcs) + 1 < st["threshold"]:
        raise secagg.SecAggError(f"only {len(srcs) + 1} nodes shared keys, fewer than the threshold {st['threshold']}")
    top = secagg.shared_exits(st["depths"])
    sent = {n: min(d, top) for n, d in zip(ids, st["depths"])}
    edges = secagg.bands(list(sent.values()))
    for src, ct in zip(srcs, config["ciphertexts"]):
        j = ids.index(src)
        key = secagg.shared_key(st["enc-sk"], st["enc-pks"][j])
        seed_shares, key_share = secagg.unseal(key, ct, src, me, sum(hi <= sent[src] for _, hi in edges))
        st["from"].append(src)
        st["seed-shares"].append(b"".join(seed_shares))
        st["key-shares"].append(key_share)
    size, mine = st["size"], sent[me]
    y = to_numpy(context.state.array_records[STATS])["x"][: mine * size].copy()
    for (lo, hi), seed in zip(edges, st["seeds"]):
        secagg.apply_mask(y, secagg.mask_stream(seed, (hi - lo) * size), 1, lo * size)
    for src in srcs:
        j = ids.index(src)
        stream = secagg.mask_stream(secagg.pair_seed(st["mask-sk"], st["mask-pks"][j]), min(mine, sent[src]) * size)
        secagg.apply_mask(y, stream, secagg.pair_sign(me, src))
    # What a later stage must not be able to reveal: the statistics, the seeds, the mask key.
    del context.state.array_records[STATS]
    for k in ("seeds", "mask-sk", "enc-sk"):
        st.pop(k)
    st.update({"stage": "masked", "masked-with": sorted([me, *srcs])})
    _save(context, st)
    received = secagg.config_bytes(dict(config))
    return _reply(msg, {}, st["depth"], st["pid"], received, {"masked": y})


def unmask(msg: Message, context: Context) -> Message:
    """Stage 4: shares of the survivors' self-mask seeds and of the dropped nodes' mask keys."""
    config = _config(msg)
    st = _state(context, "masked", int(config["server-round"]))
    survivors = sorted(int(n) for n in config["survivors"])
    group = st["masked-with"]
    if len(set(survivors)) != len(survivors) or not set(survivors) <= set(group):
        raise secagg.SecAggError("the survivors are not among the nodes this node masked with")
    if len(survivors) < st["threshold"]:
        raise secagg.SecAggError(f"{len(survivors)} survivors, fewer than the threshold {st['threshold']}")
    top = secagg.shared_exits(st["depths"])
    sent = {n: min(d, top) for n, d in zip(st["ids"], st["depths"])}
    edges = secagg.bands(list(sent.values()))
    held = dict(zip(st["from"], zip(st["seed-shares"], st["key-shares"])))
    seed_node, seed_band, seed_share, key_node, key_share = [], [], [], [], []
    for node in survivors:
        mine = [b for b, (_, hi) in enumerate(edges) if hi <= sent[node]]
        parts = secagg.split_joined(held[node][0], len(mine))
        for b, share in zip(mine, parts):
            # a band fewer than two survivors send stays masked: its sum would be one node's
            if secagg.covered(sent, survivors, edges[b][1]) >= 2:
                seed_node.append(node)
                seed_band.append(b)
                seed_share.append(share)
    for node in sorted(set(group) - set(survivors)):
        key_node.append(node)
        key_share.append(held[node][1])
    # Done: a second unmask request (other survivors) finds no state and is refused.
    del context.state.config_records[STATE]
    values = {
        "seed-node": seed_node,
        "seed-band": seed_band,
        "seed-share": seed_share,
        "key-node": key_node,
        "key-share": key_share,
    }
    return _reply(msg, values, st["depth"], st["pid"], secagg.config_bytes(dict(config)))
