"""A Flower strategy class and its arguments from the run config.

`strategy = "flwr:Krum"` (a class of flwr.serverapp.strategy) or
`"package.module:Class"` (a user's Strategy subclass);
`strategy-args = "num_malicious_nodes=1 num_nodes_to_select=3"`: keyword
arguments, whitespace-separated `name=value`, each value a Python literal
(a string quoted: `weighted_by_key='num-examples'`); a value that is not one
is refused, and so is one whose type the class's signature rules out. A wrapper (a class taking `strategy`,
such as the DP wrappers) wraps `strategy-inner` built with
`strategy-inner-args`. Everything is checked by building the strategy once,
so a bad name or argument stops the run before round 1.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from collections.abc import Callable
from typing import Any

from flwr.serverapp.strategy import Strategy

from core.config import ConfigError, defaults, round_lr

# Aggregate XGBoost trees (bytes), not arrays of weights.
NOT_ARRAYS = {"FedXgbBagging", "FedXgbCyclic"}
# Clip on the client through a Flower mod on the whole reply; our clients
# send deltas (possibly top-k packed) of a depth-dependent subset.
CLIENT_SIDE = {"DifferentialPrivacyClientSideFixedClipping", "DifferentialPrivacyClientSideAdaptiveClipping"}


def resolve(spec: str, key: str) -> type:
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ConfigError(key, f"expected flwr:<Class> or package.module:Class, got {spec!r}")
    if module == "flwr":
        module = "flwr.serverapp.strategy"
    try:
        cls = getattr(importlib.import_module(module), name)
    except ImportError as err:
        raise ConfigError(key, f"cannot import {module!r}: {err}") from None
    except AttributeError:
        hint = ""
        if module == "flwr.serverapp.strategy":
            import flwr.serverapp.strategy as fs

            hint = "; Flower has: " + ", ".join(n for n in fs.__all__ if n not in ("Result", "Strategy"))
        raise ConfigError(key, f"{module} has no {name!r}{hint}") from None
    if not (inspect.isclass(cls) and issubclass(cls, Strategy)):
        raise ConfigError(key, f"{spec!r} is not a Flower Message-API Strategy (flwr.serverapp.strategy.Strategy)")
    if cls.__name__ in NOT_ARRAYS:
        raise ConfigError(key, f"{cls.__name__} aggregates XGBoost trees, not arrays of weights")
    if cls.__name__ in CLIENT_SIDE:
        raise ConfigError(
            key,
            f"{cls.__name__} needs every client to clip its whole reply with a Flower mod, "
            "which depth-limited delta updates do not fit; use the ServerSide variant",
        )
    return cls


OPENERS = ("'", '"', "[", "(", "{")


def parse_args(text: str, key: str) -> dict[str, Any]:
    """`name=value ...` as keyword arguments, each value a Python literal; a value that is not
    one (e.g. `num_malicious_nodes=one`) is refused, not passed on as text."""
    tokens = text.split()
    out: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        name, eq, raw = tokens[i].partition("=")
        i += 1
        if not eq or not name.isidentifier():
            raise ConfigError(key, f"expected name=value pairs separated by spaces, got {tokens[i - 1]!r}")
        # A quoted string or a list may hold spaces: it goes on until it closes.
        while raw.startswith(OPENERS) and not _literal(raw)[0] and i < len(tokens):
            raw += " " + tokens[i]
            i += 1
        ok, value = _literal(raw)
        if not ok:
            quote = "" if raw.startswith(OPENERS) else f" such as {name}={raw!r}"
            raise ConfigError(
                key,
                f"{name}={raw} is not a Python literal: give a number, True/False, None, a list "
                f"or a quoted string{quote}",
            )
        out[name] = value
    return out


def _literal(raw: str) -> tuple[bool, Any]:
    try:
        return True, ast.literal_eval(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return False, None


def _defaults(cls: type, cfg: dict[str, Any]) -> dict[str, Any]:
    """Values a class requires that the run config already holds."""
    params = inspect.signature(cls).parameters
    out = {}
    if "client_learning_rate" in params:  # QFedAvg's estimate of the Lipschitz constant, 1/lr; reset every round
        out["client_learning_rate"] = round_lr(cfg, 1)
    if "num_sampled_clients" in params:  # reset every round to each group's senders
        out["num_sampled_clients"] = cfg["min-nodes"]
    return out


def client_lr(cfg: dict[str, Any]) -> Callable[[int], float] | None:
    """The clients' learning rate by round, for strategies that model it (QFedAvg), unless
    strategy-args or strategy-inner-args fix `client_learning_rate` themselves."""
    given = {**parse_args(cfg["strategy-args"], "strategy-args")}
    given.update(parse_args(cfg["strategy-inner-args"], "strategy-inner-args"))
    if "client_learning_rate" in given:
        return None
    return lambda server_round: round_lr(cfg, server_round)


# Signature annotations whose type a literal can be checked against.
SIMPLE_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def _checked(cls: type, kwargs: dict[str, Any], key: str) -> None:
    params = inspect.signature(cls).parameters
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as err:
        required = [
            n
            for n, p in params.items()
            if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        raise ConfigError(key, f"{cls.__name__}: {err} (it requires: {', '.join(required) or 'nothing'})") from None
    for name, value in kwargs.items():
        if name not in params or value is None:
            continue
        ann = params[name].annotation
        want = ann if isinstance(ann, str) else getattr(ann, "__name__", "")
        if want in SIMPLE_TYPES and (
            not isinstance(value, SIMPLE_TYPES[want]) or (isinstance(value, bool) and want != "bool")
        ):
            raise ConfigError(key, f"{cls.__name__}: {name} must be {want}, got {value!r}")


def strategy_factory(cfg: dict[str, Any]) -> Callable[[], Strategy]:
    """A function that builds a fresh instance (one per group of blocks)."""
    cls = resolve(cfg["strategy"], "strategy")
    kwargs = {**_defaults(cls, cfg), **parse_args(cfg["strategy-args"], "strategy-args")}
    inner: Callable[[], Strategy] | None = None
    if "strategy" in inspect.signature(cls).parameters:
        inner_cls = resolve(cfg["strategy-inner"], "strategy-inner")
        if "strategy" in inspect.signature(inner_cls).parameters:
            raise ConfigError("strategy-inner", f"{inner_cls.__name__} wraps a strategy itself; name the one it wraps")
        inner_kwargs = {**_defaults(inner_cls, cfg), **parse_args(cfg["strategy-inner-args"], "strategy-inner-args")}
        _checked(inner_cls, inner_kwargs, "strategy-inner-args")
        inner = _build(inner_cls, inner_kwargs, "strategy-inner-args", inner_cls.__name__)
        kwargs.pop("strategy", None)
        _checked(cls, {**kwargs, "strategy": None}, "strategy-args")
    else:
        refuse_unused_inner(cfg, cls.__name__)
        _checked(cls, kwargs, "strategy-args")

    def factory() -> Strategy:
        if inner is None:
            return cls(**kwargs)
        return cls(strategy=inner(), **kwargs)

    _build(factory, {}, "strategy-args", cls.__name__)()  # a bad value fails here, before round 1
    return factory


def refuse_unused_inner(cfg: dict[str, Any], strategy: str) -> None:
    """strategy-inner(-args) set for a strategy that wraps nothing would be ignored without a word."""
    for key in ("strategy-inner", "strategy-inner-args"):
        if cfg[key] != defaults()[key]:
            raise ConfigError(
                key,
                f"is {cfg[key]!r}, but strategy {strategy!r} wraps no other strategy, so it would be ignored: "
                f"leave {key} unset, or set strategy to a wrapper that wraps it "
                "(e.g. flwr:DifferentialPrivacyServerSideFixedClipping)",
            )


def _build(fn: Callable, kwargs: dict[str, Any], key: str, label: str) -> Callable[[], Strategy]:
    def make() -> Strategy:
        try:
            return fn(**kwargs)
        except ConfigError:
            raise
        except Exception as err:  # noqa: BLE001  (a user's class may raise anything on bad arguments)
            raise ConfigError(key, f"{label}: {type(err).__name__}: {err}") from None

    return make
