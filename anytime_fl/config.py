"""The run config: every key a user may set, its default, and its checks.

`KEYS` is the single source of truth: pyproject.toml's
[tool.flwr.app.config] and the README's table are tested against it.
Values arrive from Flower's run config (pyproject defaults merged with
`--run-config` overrides) as a flat dict of str/int/float/bool.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable


class ConfigError(ValueError):
    """A bad run-config value; the message starts with the key's name."""

    def __init__(self, key: str, message: str):
        super().__init__(f"run config '{key}': {message}")
        self.key = key


@dataclass(frozen=True)
class Key:
    name: str
    default: Any
    doc: str
    check: Callable[[Any], str | None] | None = None  # returns a complaint or None
    choices: tuple = ()


def _positive(v):
    return None if v > 0 else "must be > 0"


def _non_negative(v):
    return None if v >= 0 else "must be >= 0"


def _fraction(v):
    return None if 0.0 <= v <= 1.0 else "must be between 0 and 1"


def _open_fraction(v):
    return None if 0.0 < v <= 1.0 else "must be in (0, 1]"


def _decay(v):
    return None if 0.0 <= v < 1.0 else "must be in [0, 1)"


def _trim(v):
    return None if 0.0 <= v < 0.5 else "must be in [0, 0.5): the share trimmed at each end"


def _speech_classes(v):
    return None if v in (12, 35) else "must be 12 or 35"


def _int_list(v):
    try:
        items = [int(s) for s in str(v).split(",") if s.strip()]
    except ValueError:
        return "must be a comma-separated list of integers, e.g. '3,6,9,12'"
    if not items:
        return "must list at least one depth"
    if any(i < 1 for i in items):
        return "depths must be >= 1"
    return None


def _device(v):
    if v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
        return None
    return "must be 'auto', 'cpu', 'cuda' or 'cuda:N'"


def _tier_assignment(v):
    if v == "even":
        return None
    try:
        parts = [float(s) for s in str(v).split(",")]
    except ValueError:
        return "must be 'even' or comma-separated fractions, one per tier, e.g. '0.4,0.3,0.2,0.1'"
    if any(p < 0 for p in parts) or abs(sum(parts) - 1.0) > 1e-6:
        return "fractions must be >= 0 and sum to 1"
    return None


KEYS: tuple[Key, ...] = (
    # federation
    Key("num-server-rounds", 25, "Federated rounds to run.", _positive),
    Key("fraction-train", 1.0, "Fraction of connected nodes sampled for training each round.", _open_fraction),
    Key("fraction-evaluate", 0.5, "Fraction of nodes sampled for federated evaluation on their validation split (0 turns it off).", _fraction),
    Key("min-nodes", 2, "Minimum nodes to sample for training/evaluation and to wait for before a round starts.", _positive),
    Key("round-timeout", 3600, "Seconds the server waits for replies in a round; late nodes are left out of it.", _positive),
    Key("strategy", "fedavg", "Server aggregation strategy by name (see strategies/registry.py)."),
    Key("server-lr", 0.0, "Server learning rate on the aggregated update (0 = the strategy's own: 1 for the averaging strategies, 0.01 for fedadam/fedyogi).", _non_negative),
    Key("server-momentum", 0.9, "Server momentum of fedavgm.", _decay),
    Key("beta1", 0.9, "First-moment decay of fedadam/fedyogi.", _decay),
    Key("beta2", 0.99, "Second-moment decay of fedadam/fedyogi.", _decay),
    Key("tau", 0.001, "Adaptivity of fedadam/fedyogi: added to the root of the second moment.", _positive),
    Key("proximal-mu", 0.01, "Weight of the proximal term fedprox adds to every client's loss.", _non_negative),
    Key("trim-fraction", 0.2, "Share of the senders trimmed-mean drops at each end, per coordinate.", _trim),
    # local training
    Key("local-epochs", 3, "Local epochs per round on each client.", _positive),
    Key("batch-size", 16, "Local training batch size.", _positive),
    Key("lr", 3e-3, "Learning rate of the adapters and exit heads (the first round's, under a schedule).", _positive),
    Key("optimizer", "adamw", "Local optimiser, made fresh each round: 'adamw' or 'sgd' (momentum 0.9).", choices=("adamw", "sgd")),
    Key("lr-schedule", "constant", "Learning rate over the rounds: 'constant' or 'cosine' (decays to 0.05 lr at the last round).", choices=("constant", "cosine")),
    Key("weight-decay", 1e-4, "Weight decay of the local optimiser.", _non_negative),
    Key("logit-adjust", 0.0, "Label-skew correction in local training: each exit's logits get + tau * log(client's label frequencies) in the loss (1 = balanced softmax; 0 = off). Never at inference. At 1 it cost 3.5 points on the default task (docs/benchmarks.md).", _non_negative),
    Key("grad-through-blocks", True, "Local training backpropagates through the frozen blocks (true), or each exit's gradient stops at them (false: blocks run without a graph, adapters still modulate the forward pass; 1.9x local speed, ~5 points less accuracy on the default task, docs/benchmarks.md)."),
    Key("exit-loss", "sum", "How the cross-entropy of a client's exits is combined.", choices=("sum", "mean")),
    Key("distill-weight", 0.0, "Weight of self-distillation from the deepest exit a client runs (0 = off).", _non_negative),
    Key("device", "auto", "Where clients train and the server evaluates: 'auto' (a CUDA GPU when torch sees one, else the CPU), 'cpu', 'cuda' or 'cuda:N'.", _device),
    Key("autocast", "none", "Mixed precision of local training: 'none' (float32) or 'bf16' (bfloat16 autocast; bench/speed.py measured 1.4x training speed for ViT-Tiny at 32x32 on a CPU with AVX512-BF16, but 0.7x for the default ViT-micro).", choices=("none", "bf16")),
    Key("client-threads", 1, "torch threads per client process.", _positive),
    # personalisation (after the last round; clients keep their personal weights)
    Key("personalize-epochs", 1, "Local epochs each client fine-tunes the final global adapters for, reporting validation accuracy per exit before/after (0 = no personalisation round).", _non_negative),
    Key("personalize-lr", 1e-3, "AdamW learning rate of personalisation fine-tuning.", _positive),
    # devices
    Key("tiers", "3,6,9,12", "Depth budgets (blocks a device runs), one per tier.", _int_list),
    Key("tier-assignment", "even", "How partitions are spread over tiers: 'even' (partition-id modulo tiers) or fractions per tier. A node's own `max-depth` node config wins.", _tier_assignment),
    Key("tier-names", "", "Names of the tiers, comma-separated, one per tier, for logs and results (e.g. 'phone,tablet,laptop,server'); '' = named by depth."),
    Key("topk-fraction", 1.0, "Fraction of update entries a client sends (top-k by magnitude with error feedback); 1 sends the dense delta.", _open_fraction),
    # model
    Key("backbone", "vit_micro_patch7_28", "timm ViT/DeiT model name."),
    Key("backbone-weights", "shipped", "Local weights file (.safetensors/.pth); 'shipped' = the Fashion-MNIST weights in anytime_assets/; '' = none."),
    Key("pretrained", False, "Fetch timm's hub weights (needs a network; ignored when backbone-weights is set)."),
    Key("img-size", 0, "Backbone input size in pixels (0 = the backbone's own).", _non_negative),
    Key("patch-size", 0, "Patch size in pixels (0 = the backbone's own).", _non_negative),
    Key("adapter-width", 32, "Attention width of each accumulator adapter.", _positive),
    Key("adapter-heads", 2, "Attention heads of each adapter (must divide adapter-width).", _positive),
    Key("adapter-mlp-ratio", 2.0, "MLP hidden size of the adapter as a multiple of its width.", _positive),
    Key("shared-adapter", False, "One adapter shared by all blocks instead of one per block."),
    # data
    Key("task", "digits", "Federated task: digits, cifar100, femnist or speechcommands (see fedtasks/registry.py and README 'Tasks')."),
    Key("data-dir", "", "Local dataset folder for tasks loaded offline ('' = the task's default source: the hub for cifar100/femnist/speechcommands)."),
    Key("dirichlet-alpha", 0.5, "Dirichlet concentration of the label-skewed split (smaller = more heterogeneous).", _positive),
    Key("hub-dataset", "", "Hugging Face dataset ('name' or 'name:config') a task loads when data-dir is '' ('' = the task's own: uoft-cs/cifar100, flwrlabs/femnist, google/speech_commands:v0.02)."),
    Key("speech-classes", 12, "Speech Commands classes: 12 (10 words + silence + unknown) or 35 (all words).", _speech_classes),
    Key("val-fraction", 0.2, "Share of each client's partition held out for validation.", _fraction),
    Key("seed", 42, "Seed of partitioning, splits and initialisation."),
    Key("eval-batch-size", 256, "Batch size of evaluation.", _positive),
    # outputs
    Key("output-dir", "outputs", "Folder under which each run writes <run-name>/ (results, weights, checkpoints)."),
    Key("run-name", "", "Name of the run folder ('' = a timestamp; with resume, the newest run that has a checkpoint)."),
    Key("checkpoint-every", 1, "Save a server checkpoint every N rounds (and always after the last).", _positive),
    Key("resume", False, "Continue the run in output-dir/run-name from its last checkpoint."),
)

_BY_NAME = {k.name: k for k in KEYS}


def defaults() -> dict[str, Any]:
    return {k.name: k.default for k in KEYS}


def _coerce(key: Key, value: Any) -> Any:
    want = type(key.default)
    if want is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif want is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif want is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif want is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(key.name, f"expected {want.__name__}, got {value!r}")


def validate(user: dict[str, Any]) -> dict[str, Any]:
    """Defaults merged with `user`, type-checked; raises ConfigError naming the key."""
    out = defaults()
    for name, value in user.items():
        if name not in _BY_NAME:
            close = difflib.get_close_matches(name, _BY_NAME, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(name, f"unknown key{hint}")
        key = _BY_NAME[name]
        value = _coerce(key, value)
        if key.choices and value not in key.choices:
            raise ConfigError(name, f"must be one of {', '.join(map(repr, key.choices))}, got {value!r}")
        if key.check is not None:
            complaint = key.check(value)
            if complaint:
                raise ConfigError(name, f"{complaint} (got {value!r})")
        out[name] = value
    return out


def parse_tiers(cfg: dict[str, Any]) -> list[int]:
    return [int(s) for s in str(cfg["tiers"]).split(",") if s.strip()]


def parse_tier_names(cfg: dict[str, Any]) -> list[str]:
    """One name per tier, or [] when the tiers go by their depth."""
    if not str(cfg["tier-names"]).strip():
        return []
    names = [s.strip() for s in str(cfg["tier-names"]).split(",")]
    tiers = parse_tiers(cfg)
    if len(names) != len(tiers):
        raise ConfigError("tier-names", f"has {len(names)} names for {len(tiers)} tiers ({cfg['tiers']})")
    if not all(names) or len(set(names)) != len(names):
        raise ConfigError("tier-names", f"names must be non-empty and distinct, got {cfg['tier-names']!r}")
    return names


def check_depths(cfg: dict[str, Any], num_blocks: int) -> None:
    """Tier depths must fit the backbone; known only once it is built."""
    for d in parse_tiers(cfg):
        if not 1 <= d <= num_blocks:
            raise ConfigError("tiers", f"depth {d} is outside 1..{num_blocks} (the backbone has {num_blocks} blocks)")


def markdown_table() -> str:
    """The README's run-config table, generated from KEYS."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for k in KEYS:
        default = f'"{k.default}"' if isinstance(k.default, str) else str(k.default).lower() if isinstance(k.default, bool) else k.default
        doc = k.doc + (f" One of: {', '.join(k.choices)}." if k.choices else "")
        rows.append(f"| `{k.name}` | `{default}` | {doc} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
