"""A Flower strategy class and its arguments from the run config.

`strategy = "flwr:Krum"` (a class of flwr.serverapp.strategy) or
`"package.module:Class"` (a user's Strategy subclass);
`strategy-args = "num_malicious_nodes=1 num_nodes_to_select=3"`: keyword
arguments, whitespace-separated `name=value`, each value a Python literal
(a bare word is taken as a string). A wrapper (a class taking `strategy`,
such as the DP wrappers) wraps `strategy-inner` built with
`strategy-inner-args`. Everything is checked by building the strategy once,
so a bad name or argument stops the run before round 1.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import shlex
from collections.abc import Callable
from typing import Any

from flwr.serverapp.strategy import Strategy

from core.config import ConfigError, round_lr

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


def parse_args(text: str, key: str) -> dict[str, Any]:
    try:
        tokens = shlex.split(text)
    except ValueError as err:
        raise ConfigError(key, f"cannot split {text!r}: {err}") from None
    out: dict[str, Any] = {}
    for token in tokens:
        name, eq, raw = token.partition("=")
        if not eq or not name.isidentifier():
            raise ConfigError(key, f"expected name=value pairs separated by spaces, got {token!r}")
        try:
            out[name] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[name] = raw
    return out


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


def _checked(cls: type, kwargs: dict[str, Any], key: str) -> None:
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as err:
        required = [
            n
            for n, p in inspect.signature(cls).parameters.items()
            if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        raise ConfigError(key, f"{cls.__name__}: {err} (it requires: {', '.join(required) or 'nothing'})") from None


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
        _checked(cls, kwargs, "strategy-args")

    def factory() -> Strategy:
        if inner is None:
            return cls(**kwargs)
        return cls(strategy=inner(), **kwargs)

    _build(factory, {}, "strategy-args", cls.__name__)()  # a bad value fails here, before round 1
    return factory


def _build(fn: Callable, kwargs: dict[str, Any], key: str, label: str) -> Callable[[], Strategy]:
    def make() -> Strategy:
        try:
            return fn(**kwargs)
        except ConfigError:
            raise
        except Exception as err:  # noqa: BLE001  (a user's class may raise anything on bad arguments)
            raise ConfigError(key, f"{label}: {type(err).__name__}: {err}") from None

    return make
