"""Secure aggregation's ring arithmetic and cryptography (`head-secagg`), without torch.

Pairwise masking after Bonawitz et al., "Practical Secure Aggregation for
Privacy-Preserving Machine Learning" (CCS 2017), the protocol behind
Flower's SecAgg+, built from Flower's own building blocks: its key pairs
(SECP384R1), ECDH + HKDF shared keys and Fernet encryption, Shamir's
secret sharing and its share-packing helpers. client_app/secagg.py runs a
node's side, server_app/head_secagg.py the server's.

Flower's `secaggplus_mod` is not reused: it wraps train messages of the
legacy fit/evaluate workflow, masks one flat parameter list with a single
self-mask, and quantises by clipping to a range with stochastic rounding
into 32 bits. Nor is its `pseudo_rand_gen`: it folds the 32-byte seed into
a 32-bit seed for numpy's Mersenne twister, so every mask is one of 2^32
streams a server could try. The masks here are AES-256-CTR keystreams of
the full 32-byte seed.

Values live in the ring of integers mod 2^64 (numpy uint64 wraps on its
own): a statistic x travels as round(x 2^bits), masked by uniform ring
elements that cancel in the sum. `scale_bits` picks the largest scale at
which no sum of honest statistics can wrap around.
"""

from __future__ import annotations

import base64
import math
import os

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

# The four stages, each the action of a Flower query message ("query.<action>"), and the
# config record a node's protocol values travel in.
STAGES = ("secagg_keys", "secagg_shares", "secagg_masked", "secagg_unmask")
RECORD = "secagg"

RING_BITS = 64
# Public caps the scale is chosen for: a federation of at most this many training examples
# and nodes cannot wrap the ring around, whatever each node holds.
MAX_EXAMPLES = 2**32
MAX_NODES = 2**16
# DP noise beyond this many standard deviations is clipped (never met in practice; post-processing).
NOISE_CLIP = 64.0
SEED_BYTES = 32
_CURVE = ec.SECP384R1()
_SCALAR_BYTES = 48


class SecAggError(ValueError):
    """A protocol message that an honest party would not send, or too few parties left."""


# -- the ring ---------------------------------------------------------------------------------


def entry_bound(count: float, feature_bound: float, noise_std: float = 0.0) -> float:
    """The largest |entry| of the statistics of `count` examples: phi = [h, 1] with |h| <= B has
    |phi|^2 <= B^2 + 1, so |G_ab| <= sum |phi_a phi_b| <= count (B^2 + 1) and |R_ac| <= count
    sqrt(B^2 + 1) is smaller; differential-privacy noise adds at most NOISE_CLIP stds."""
    return count * (feature_bound**2 + 1.0) + NOISE_CLIP * noise_std


def scale_bits(feature_bound: float, noise_std: float = 0.0) -> int:
    """The fixed-point scale 2^bits at which MAX_NODES nodes' statistics of MAX_EXAMPLES examples
    in all, each entry within `entry_bound`, sum to less than 2^62 in magnitude: the signed
    range of the ring with a bit to spare."""
    total = MAX_EXAMPLES * (feature_bound**2 + 1.0) + MAX_NODES * NOISE_CLIP * noise_std
    return int(math.floor(62 - math.log2(total)))


def quantize(x: np.ndarray, bits: int, bound: float) -> np.ndarray:
    """round(x 2^bits) as a ring element, x clipped to +-bound first (honest values never reach it)."""
    q = np.rint(np.clip(np.asarray(x, dtype=np.float64), -bound, bound) * 2.0**bits)
    if q.size and np.abs(q).max() >= 2.0**62:
        raise SecAggError(f"statistics of magnitude {bound:.3g} do not fit the ring at scale 2^{bits}")
    return q.astype(np.int64).view(np.uint64)


def dequantize(q: np.ndarray, bits: int) -> np.ndarray:
    """A ring element read as a signed fixed-point number."""
    return np.asarray(q, dtype=np.uint64).view(np.int64).astype(np.float64) / 2.0**bits


def mask_stream(seed: bytes, n: int) -> np.ndarray:
    """n uniform ring elements from a 32-byte seed: the AES-256-CTR keystream. A prefix of a
    longer stream is the shorter stream, so a pair of nodes masks the exits both run alike."""
    if len(seed) != SEED_BYTES:
        raise SecAggError(f"a mask seed has {SEED_BYTES} bytes, got {len(seed)}")
    enc = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    return np.frombuffer(enc.update(bytes(8 * n)) + enc.finalize(), dtype=np.uint64).copy()


def pair_sign(me: int, other: int) -> int:
    """+1 for the lower node id of a pair, -1 for the higher: their masks cancel in the sum."""
    return 1 if me < other else -1


def apply_mask(y: np.ndarray, stream: np.ndarray, sign: int, start: int = 0) -> None:
    """y[start:start+len(stream)] += sign * stream, in the ring, in place."""
    part = y[start : start + len(stream)]
    if sign > 0:
        np.add(part, stream, out=part)
    else:
        np.subtract(part, stream, out=part)


# -- who takes part -----------------------------------------------------------------------------


def threshold(num_nodes: int, fraction: float) -> int:
    """Shares needed to rebuild a secret: more than `fraction` of the nodes that sent keys, at
    least 2 and at most all. Above half, two disjoint groups of nodes cannot both reach it."""
    return min(num_nodes, max(2, int(math.floor(fraction * num_nodes)) + 1))


def shared_exits(depths: list[int]) -> int:
    """The exits at least two of these nodes run (a prefix: deeper exits have fewer nodes).
    Nodes mask and send these only: the sum of an exit one node runs would be that node's."""
    ordered = sorted(depths, reverse=True)
    return ordered[1] if len(ordered) > 1 else 0


def bands(sent: list[int]) -> list[tuple[int, int]]:
    """Exits [lo, hi) that the same nodes send, given how many exits each node sends. A node
    masks each band with a seed of its own, so the server can unmask a band without another
    band that fewer nodes survived to cover (one Shamir secret per band, not per exit: a
    secret's rebuilding costs tens of ms at a threshold of 11)."""
    edges = sorted({s for s in sent if s > 0})
    return list(zip([0, *edges[:-1]], edges))


def covered(sent: dict[int, int], nodes, hi: int) -> int:
    """How many of `nodes` (node -> exits it sent) send the band ending at `hi`."""
    return sum(1 for n in nodes if sent[n] >= hi)


# -- keys and secrets ---------------------------------------------------------------------------


def key_pair() -> tuple[bytes, bytes]:
    """(private, public) key bytes: Flower's SECP384R1 pair, PEM-encoded."""
    sk, pk = generate_key_pairs()
    return private_key_to_bytes(sk), public_key_to_bytes(pk)


def shared_key(private: bytes, public: bytes) -> bytes:
    """The Fernet key two nodes agree on (ECDH + HKDF, Flower's `generate_shared_key`)."""
    return generate_shared_key(bytes_to_private_key(private), bytes_to_public_key(public))


def pair_seed(private: bytes, public: bytes) -> bytes:
    """The 32-byte mask seed two nodes agree on, from their mask keys."""
    return base64.urlsafe_b64decode(shared_key(private, public))


def key_secret(private: bytes) -> bytes:
    """A private key's scalar (48 bytes): what is secret-shared, smaller than its PEM."""
    return bytes_to_private_key(private).private_numbers().private_value.to_bytes(_SCALAR_BYTES, "big")


def key_from_secret(secret: bytes) -> bytes:
    """The PEM private key of a scalar `key_secret` gave."""
    return private_key_to_bytes(ec.derive_private_key(int.from_bytes(secret, "big"), _CURVE))


def new_seed() -> bytes:
    return os.urandom(SEED_BYTES)


def split(secret: bytes, t: int, n: int) -> list[bytes]:
    """n Shamir shares of which any t rebuild `secret` (each share carries its index)."""
    return create_shares(secret, t, n)


def rebuild(shares: list[bytes], t: int) -> bytes:
    """The secret of t or more shares; SecAggError when they do not make one."""
    if len(shares) < t:
        raise SecAggError(f"{len(shares)} shares cannot rebuild a secret of threshold {t}")
    try:
        return combine_shares(shares[:t])
    except ValueError as err:
        raise SecAggError(f"the shares do not rebuild a secret: {err}") from None


def seal(key: bytes, src: int, dst: int, seed_shares: list[bytes], key_share: bytes) -> bytes:
    """Node src's shares for node dst, encrypted for dst: the server relays what it cannot read.
    The seed shares all have one length, so they travel joined."""
    return encrypt(key, share_keys_plaintext_concat(src, dst, b"".join(seed_shares), key_share))


def unseal(key: bytes, ciphertext: bytes, src: int, dst: int, num_seeds: int) -> tuple[list[bytes], bytes]:
    """(seed shares, key share) that src sealed for dst; SecAggError when the envelope is not theirs."""
    try:
        got_src, got_dst, joined, key_share = share_keys_plaintext_separate(decrypt(key, ciphertext))
    except Exception as err:  # noqa: BLE001 - Fernet's InvalidToken or a malformed plaintext
        raise SecAggError(f"the shares of node {src} do not decrypt: {type(err).__name__}") from None
    if (got_src, got_dst) != (src, dst):
        raise SecAggError(f"shares relayed from node {src} to {dst} were sealed by {got_src} for {got_dst}")
    return split_joined(joined, num_seeds), key_share


def split_joined(joined: bytes, parts: int) -> list[bytes]:
    if parts == 0:
        return []
    size = len(joined) // parts
    if size * parts != len(joined):
        raise SecAggError(f"{len(joined)} bytes are not {parts} shares of one length")
    return [joined[i * size : (i + 1) * size] for i in range(parts)]


def config_bytes(values: dict) -> int:
    """Bytes of a config record's values as sent (8 per number; protobuf framing not counted)."""

    def size(v) -> int:
        if isinstance(v, (bytes, str)):
            return len(v)
        if isinstance(v, list):
            return sum(size(x) for x in v)
        return 8

    return int(sum(len(k) + size(v) for k, v in values.items()))
