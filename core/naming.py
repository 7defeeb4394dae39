"""Names of trainable parameters and the block each belongs to.

Pure Python (no torch) so the server and the strategies can reason about
which parameters a client of depth d trains without building a model.
Per-block parameters are named `adapters.<i>.*`, `token_adapters.<i>.*` and
`heads.<i>.*` with i counted from 0 for block 1; the shared adapter is `adapter.*` and belongs to
every depth.
"""

from __future__ import annotations

PER_BLOCK = ("adapters", "token_adapters", "heads")


def param_block(name: str) -> int:
    """1-based block a trainable parameter belongs to; 0 for shared ones."""
    parts = name.split(".")
    if parts[0] in PER_BLOCK and len(parts) > 1 and parts[1].isdigit():
        return int(parts[1]) + 1
    if parts[0] == "adapter":
        return 0
    raise KeyError(f"not a trainable adapter/head parameter: {name!r}")


def names_up_to(names, depth: int) -> list[str]:
    """The parameters a client that runs blocks 1..depth trains."""
    return [n for n in names if param_block(n) <= depth]


def sent_by_clients(name: str, clients_train_heads: bool) -> bool:
    """Whether clients train, and so send, a parameter: the exit heads only when
    `clients_train_heads` (core.config.clients_train_heads: not with `heads = "ridge"`,
    whose heads the server fits in closed form)."""
    return clients_train_heads or not name.startswith("heads.")


def sent_up_to(names, depth: int, clients_train_heads: bool) -> list[str]:
    """What a client that runs blocks 1..depth trains and sends."""
    return [n for n in names_up_to(names, depth) if sent_by_clients(n, clients_train_heads)]


def up_to_depth(arrays: dict, depth: int | None) -> dict:
    """The arrays a node that runs blocks 1..depth needs; all of them while its depth is unknown."""
    return arrays if depth is None else {k: arrays[k] for k in names_up_to(arrays, depth)}
