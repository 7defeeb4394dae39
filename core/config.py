"""The run config: every key a user may set, its default, and its checks.

`KEYS` is the single source of truth: pyproject.toml's
[tool.flwr.app.config] and the README's table are tested against it, and
each key's group decides what it reaches: `keys_in("model")` is the model
cache's key, `keys_in("data")` the data cache's, and a `training` key with a
`setting` becomes that field of the local training settings. Values arrive
from Flower's run config (pyproject defaults merged with `--run-config`
overrides) as a flat dict of str/int/float/bool.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable


class ConfigError(ValueError):
    """A bad run-config value; the message starts with the key's name."""

    def __init__(self, key: str, message: str):
        super().__init__(f"run config '{key}': {message}")
        self.key = key


GROUPS = ("run", "strategy", "training", "devices", "model", "data")


@dataclass(frozen=True)
class Key:
    """One run-config key.

    Args:
        name: the key as users write it.
        default: its value when unset; its type is the key's type.
        doc: one sentence for the README table.
        check: returns a complaint about a value, or None when it is fine.
        choices: the only values allowed, when the key is an enumeration.
        setting: the `TrainSettings` field a training key sets ('' = none).
        shapes: groups beyond its own whose cached objects it changes
            (e.g. `seed` shapes the model's initialisation and the data split).
        group: set by the section the key is declared in (see GROUPS).
    """

    name: str
    default: Any
    doc: str
    check: Callable[[Any], str | None] | None = None
    choices: tuple = ()
    setting: str = ""
    shapes: tuple[str, ...] = ()
    group: str = ""


def _section(group: str, *keys: Key) -> tuple[Key, ...]:
    assert group in GROUPS, group
    return tuple(replace(k, group=group) for k in keys)


def _positive(v):
    return None if v > 0 else "must be > 0"


def _non_negative(v):
    return None if v >= 0 else "must be >= 0"


def _head_bits(v):
    return None if v == 0 or 8 <= v <= 32 else "must be 0 (float32) or between 8 and 32"


def _fraction(v):
    return None if 0.0 <= v <= 1.0 else "must be between 0 and 1"


def _open_fraction(v):
    return None if 0.0 < v <= 1.0 else "must be in (0, 1]"


def _val_fraction(v):
    return None if 0.0 <= v < 1.0 else "must be in [0, 1): a client needs at least one training example"


def _decay(v):
    return None if 0.0 <= v < 1.0 else "must be in [0, 1)"


def _trim(v):
    return None if 0.0 <= v < 0.5 else "must be in [0, 0.5): the share trimmed at each end"


def _speech_classes(v):
    return None if v in (12, 35) else "must be 12 or 35"


def comma_list(value: Any, kind: Callable[[str], Any] = str) -> list:
    """The items of a comma-separated run-config value, each stripped and
    converted by `kind` ('' = no items); `kind` raises ValueError on a bad item.
    The one parser of every list-valued key."""
    text = str(value).strip()
    return [kind(s.strip()) for s in text.split(",")] if text else []


def _int_list(v):
    try:
        items = comma_list(v, int)
    except ValueError:
        return "must be a comma-separated list of integers, e.g. '3,6,9,12'"
    if not items:
        return "must list at least one depth"
    if any(i < 1 for i in items):
        return "depths must be >= 1"
    return None


def _id_list(v):
    try:
        items = comma_list(v, int)
    except ValueError:
        return "must be '' or a comma-separated list of partition ids, e.g. '0,3'"
    return None if all(i >= 0 for i in items) else "partition ids must be >= 0"


def parse_attackers(cfg: dict[str, Any]) -> set[int]:
    return set(comma_list(cfg["attack-partitions"], int))


def check_attackers(cfg: dict[str, Any], num_partitions: int) -> None:
    """Attacking partition ids the federation does not have would attack nothing, silently."""
    beyond = sorted(p for p in parse_attackers(cfg) if p >= num_partitions)
    if beyond:
        raise ConfigError(
            "attack-partitions",
            f"partition id {beyond[0]} is beyond the federation's {num_partitions} partitions "
            f"(ids 0..{num_partitions - 1})",
        )


def _seed(v):
    # numpy's seeds are 32-bit unsigned integers
    return None if 0 <= v < 2**32 else "must be in 0..4294967295"


def _majority(v):
    # Below half, two disjoint groups of nodes could each rebuild a node's secrets for a lying server.
    return None if 0.5 <= v <= 1.0 else "must be between 0.5 and 1"


def _device(v):
    if v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
        return None
    return "must be 'auto', 'cpu', 'cuda' or 'cuda:N'"


def _tier_assignment(v):
    if v == "even":
        return None
    try:
        parts = comma_list(v, float)
    except ValueError:
        return "must be 'even' or comma-separated fractions, one per tier, e.g. '0.4,0.3,0.2,0.1'"
    if any(p < 0 for p in parts) or abs(sum(parts) - 1.0) > 1e-6:
        return "fractions must be >= 0 and sum to 1"
    return None


KEYS: tuple[Key, ...] = (
    # federation rounds, sampling, waiting, evaluation, outputs
    *_section(
        "run",
        Key("num-server-rounds", 15, "Federated rounds to run.", _positive),
        Key("fraction-train", 1.0, "Fraction of connected nodes sampled for training each round.", _open_fraction),
        Key(
            "fraction-evaluate",
            0.5,
            "Fraction of nodes sampled for federated evaluation on their validation split (0 turns it off).",
            _fraction,
        ),
        Key(
            "min-nodes",
            2,
            "Minimum nodes to sample for training/evaluation and to wait for before a round starts.",
            _positive,
        ),
        Key(
            "min-nodes-timeout",
            600,
            "Seconds the server waits before round 1 for `min-nodes` nodes to connect; then it stops, saying "
            "how many came.",
            _positive,
        ),
        Key(
            "round-timeout",
            3600,
            "Seconds the server waits for replies in a round; late nodes are left out of it.",
            _positive,
        ),
        Key(
            "superlink-patience",
            300,
            "Seconds the server retries a failing SuperLink (push or pull, with growing waits) before it stops "
            "the run, which then resumes from its last checkpoint with resume=true.",
            _positive,
        ),
        Key(
            "upload-stall-timeout",
            30,
            "Seconds the server waits for the next part of a reply whose upload has begun; a node stopped "
            "mid-upload is then dropped from the round (Flower alone waits ~210 s).",
            _positive,
        ),
    ),
    # server aggregation
    *_section(
        "strategy",
        Key(
            "strategy",
            "fedavg",
            "Server aggregation strategy: a built-in name (fedavg, fedavgm, fedadam, fedyogi, fedprox, median, "
            "trimmed-mean), `flwr:<Class>` for any Flower Message-API strategy (e.g. flwr:Krum), or "
            "`package.module:Class` (see docs/strategies.md).",
        ),
        Key(
            "strategy-args",
            "",
            "Keyword arguments of a Flower or user strategy class: space-separated name=value, values as Python"
            " literals, e.g. 'num_malicious_nodes=1 num_nodes_to_select=3'.",
        ),
        Key(
            "strategy-inner",
            "flwr:FedAvg",
            "The strategy a wrapper strategy (the DP wrappers) wraps: flwr:<Class> or package.module:Class.",
        ),
        Key("strategy-inner-args", "", "Keyword arguments of strategy-inner, as strategy-args."),
        Key(
            "strategy-groups",
            "tier",
            "How a Flower/user strategy sees the blocks: one instance per tier band of blocks ('tier') or per "
            "block ('block'; fits nodes whose max-depth is not a tier depth).",
            choices=("tier", "block"),
        ),
        Key(
            "server-lr",
            0.0,
            "Server learning rate on the aggregated update (0 = the strategy's own: 1 for the averaging "
            "strategies, 0.01 for fedadam/fedyogi).",
            _non_negative,
        ),
        Key("server-momentum", 0.9, "Server momentum of fedavgm.", _decay),
        Key("beta1", 0.9, "First-moment decay of fedadam/fedyogi.", _decay),
        Key("beta2", 0.99, "Second-moment decay of fedadam/fedyogi.", _decay),
        Key("tau", 0.001, "Adaptivity of fedadam/fedyogi: added to the root of the second moment.", _positive),
        Key("proximal-mu", 0.01, "Weight of the proximal term fedprox adds to every client's loss.", _non_negative),
        Key("trim-fraction", 0.2, "Share of the senders trimmed-mean drops at each end, per coordinate.", _trim),
    ),
    # local training and personalisation on the clients
    *_section(
        "training",
        Key("local-epochs", 3, "Local epochs per round on each client.", _positive, setting="epochs"),
        Key("batch-size", 16, "Local training batch size.", _positive),
        Key(
            "lr",
            3e-3,
            "Learning rate of the adapters and exit heads (the first round's, under a schedule).",
            _positive,
            setting="lr",
        ),
        Key(
            "optimizer",
            "adamw",
            "Local optimiser, made fresh each round: 'adamw' or 'sgd' (momentum 0.9).",
            choices=("adamw", "sgd"),
            setting="optimizer",
        ),
        Key(
            "lr-schedule",
            "constant",
            "Learning rate over the rounds: 'constant' or 'cosine' (decays to 0.05 lr at the last round).",
            choices=("constant", "cosine"),
        ),
        Key(
            "weight-decay",
            1e-4,
            "Weight decay of the local optimiser, on weight matrices only: LayerNorm weights, biases and the "
            "adapters' query and position tokens take none (timm's rule).",
            _non_negative,
            setting="weight_decay",
        ),
        Key(
            "heads",
            "ridge",
            "How the exit heads learn: 'ridge' fits each exit's linear layer in closed form (ridge regression on "
            "the clients' summed feature statistics, exact whatever the label skew) before round 1 and every "
            "head-refit-every rounds, and clients train only the adapters; 'ridge-init' fits them the same way "
            "and clients also train them; 'trained' starts them at random and clients train them (the paper's "
            "method). See docs/benchmarks.md.",
            choices=("ridge", "ridge-init", "trained"),
        ),
        Key(
            "head-refit-every",
            15,
            "With heads 'ridge' or 'ridge-init': fit the heads again on the trained adapters' features after "
            "every N-th round and after the last (0 = only before round 1); each fit is one more exchange of "
            "the nodes' feature statistics. 15 (with the default 15 rounds: before round 1 and after the last) "
            "was chosen over 5 on validation, at 62 % of the bytes. See docs/benchmarks.md.",
            _non_negative,
        ),
        Key(
            "serve-last-fit",
            True,
            "With heads 'ridge' and head-refit-every > 0: between refits the server evaluates, checkpoints and "
            "sends for federated evaluation the adapters of the last head fit (the heads were fitted to their "
            "features) while the nodes train newer ones; false = the latest round's adapters under heads fitted to "
            "older ones (3-8 points lower on the characters). See docs/benchmarks.md.",
        ),
        Key(
            "ridge-lambda",
            1e-6,
            "Ridge penalty of the closed-form heads, relative to the mean feature outer product.",
            _positive,
        ),
        Key(
            "ridge-scale",
            12.0,
            "Logit scale of ridge-fitted heads: the regression's 0..1 scores times this (softmax confidence for "
            "early exit, cross-entropy for further training).",
            _positive,
        ),
        Key(
            "head-features",
            0,
            "With closed-form heads: nodes send the statistics of this many features per exit, a projection of "
            "the head's input on the directions of the exit's current head, then fixed random directions drawn "
            "from the seed (0 or at least the input's width = every feature, no projection). "
            "bench/communication.py prints the widest whose statistics at head-bits cost one dense adapter "
            "update: every feature on the default task, 228 of 384 on ViT-Tiny and 475 of 1536 on ViT-B at 100 "
            "classes (accuracy there not measured). See docs/benchmarks.md.",
            _non_negative,
        ),
        Key(
            "head-bits",
            22,
            "With closed-form heads: bits per number of the statistics a node sends, fixed point around the "
            "node's own feature mean, each feature scaled by its spread (its feature sum and label counts "
            "travel exactly); 0 = float32 as they are. 22 bits give the float32 fit on the default task (so do "
            "16) at 0.71x of float32's bytes, less than one dense adapter update. Secure aggregation "
            "(head-secagg) sends its own 64-bit fixed point instead. See docs/benchmarks.md.",
            _head_bits,
        ),
        Key(
            "head-weight-cap",
            3.0,
            "With closed-form heads: no node's statistics count for more than this many times the median node's "
            "examples (0 = no cap).",
            _non_negative,
        ),
        Key(
            "head-screen",
            0.8,
            "With closed-form heads: a node is left out of an exit's fit when the other nodes' fit puts the class "
            "means of a share d of its examples in other classes with (d - m) / (1 - m) above this, m the other "
            "nodes' median share (flipped or rotated labels; 1 = off). See docs/benchmarks.md.",
            _fraction,
        ),
        Key(
            "head-influence",
            5.0,
            "With closed-form heads: a node is left out of an exit's fit when adding its statistics raises the "
            "other nodes' squared error more than this many times as much as the median node's do (a made-up "
            "data set, real data counted many times over; 0 = off). See docs/benchmarks.md.",
            _non_negative,
        ),
        Key(
            "head-dp-epsilon",
            0.0,
            "With closed-form heads: differentially private statistics. Each node adds Gaussian noise to its G "
            "and R, calibrated to the bound LayerNorm puts on the features, so that all the fits of the run "
            "together are (head-dp-epsilon, head-dp-delta)-DP for any one of its examples (0 = off, exact "
            "statistics). See docs/benchmarks.md.",
            _non_negative,
        ),
        Key(
            "head-dp-delta",
            1e-5,
            "With head-dp-epsilon: the delta of the run's differential privacy (below 1 / a node's examples).",
            _open_fraction,
        ),
        Key(
            "head-secagg",
            False,
            "With closed-form heads: secure aggregation of the statistics (pairwise masks, Bonawitz et al.'s "
            "SecAgg): the server reads only their sums per exit, never one node's, at 3 more message rounds per "
            "fit and twice the bytes up; the per-node checks, head-weight-cap, head-influence and head-screen are "
            "then off (only the sum is checked). Composes with head-dp-epsilon. See docs/benchmarks.md.",
        ),
        Key(
            "head-secagg-threshold",
            0.5,
            "With head-secagg: more than this share of the nodes that sent keys must stay to the end of a fit "
            "(and at least 2), else the run stops; nodes that drop before that cost only their own statistics.",
            _majority,
        ),
        Key(
            "logit-adjust",
            0.0,
            "Label-skew correction in local training: each exit's logits get + tau * log(client's label "
            "frequencies) in the loss (1 = balanced softmax; 0 = off; see docs/benchmarks.md). Never at "
            "inference.",
            _non_negative,
            setting="logit_adjust",
        ),
        Key(
            "grad-through-blocks",
            True,
            "Local training backpropagates through the frozen blocks (true), or each exit's gradient stops at "
            "them (false: blocks run without a graph, faster; adapters still modulate the forward pass; see "
            "docs/benchmarks.md).",
            setting="block_grad",
        ),
        Key(
            "exit-loss",
            "sum",
            "How the cross-entropy of a client's exits is combined.",
            choices=("sum", "mean"),
            setting="exit_loss",
        ),
        Key(
            "distill-weight",
            0.0,
            "Weight of self-distillation from the deepest exit a client runs (0 = off).",
            _non_negative,
            setting="distill_weight",
        ),
        Key(
            "device",
            "auto",
            "Where clients train and the server evaluates: 'auto' (a CUDA GPU when torch sees one, else the "
            "CPU), 'cpu', 'cuda' or 'cuda:N'.",
            _device,
            shapes=("model",),
        ),
        Key(
            "autocast",
            "none",
            "Mixed precision of local training: 'none' (float32) or 'bf16' (bfloat16 autocast: faster only "
            "where the hardware has fast bf16, see bench/README.md).",
            choices=("none", "bf16"),
            setting="autocast",
        ),
        Key("client-threads", 1, "torch threads per client process.", _positive),
        Key(
            "personalize-epochs",
            1,
            "Local epochs each client fine-tunes the final global adapters for, reporting validation accuracy "
            "per exit before/after (0 = no personalisation round). With closed-form heads (heads other than "
            "'trained') each client instead moves its heads to its own label prior.",
            _non_negative,
        ),
        Key("personalize-lr", 1e-3, "AdamW learning rate of personalisation fine-tuning.", _positive),
    ),
    # depth budgets and what a client sends
    *_section(
        "devices",
        Key("tiers", "3,6,9,12", "Depth budgets (blocks a device runs), one per tier.", _int_list),
        Key(
            "tier-assignment",
            "even",
            "How partitions are spread over tiers: 'even' (partition-id modulo tiers) or fractions per tier. A "
            "node's own `max-depth` node config wins.",
            _tier_assignment,
        ),
        Key(
            "tier-names",
            "",
            "Names of the tiers, comma-separated, one per tier, for logs and results (e.g. "
            "'phone,tablet,laptop,server'); '' = named by depth.",
        ),
        Key(
            "attack-partitions",
            "",
            "Benchmark/testing aid: comma-separated partition ids whose clients send N(0, attack-noise-std^2) "
            "noise instead of their update ('' = none).",
            _id_list,
        ),
        Key("attack-noise-std", 10.0, "Standard deviation of the noise attacking clients send.", _non_negative),
        Key(
            "attack-heads",
            "noise",
            "Benchmark/testing aid: what the attacking clients send as head statistics: 'noise' (N(0, "
            "attack-noise-std^2)), 'scale-class' (class 0's feature sum times 1000), 'rotate-labels' (labels "
            "shifted by one class), 'inflate-count' (everything times 100), 'fake-data' (their features ten times "
            "over, every one labelled class 0).",
            choices=("noise", "scale-class", "rotate-labels", "inflate-count", "fake-data"),
        ),
        Key(
            "topk-fraction",
            0.1,
            "Fraction of update entries a client sends (top-k by magnitude with error feedback); 1 sends the "
            "dense delta. 0.1 sends a tenth of the bytes; on the default task it ends within half a point of "
            "dense (docs/benchmarks.md).",
            _open_fraction,
        ),
    ),
    # the backbone and its adapters
    *_section(
        "model",
        Key("backbone", "vit_micro_patch7_28", "timm ViT/DeiT model name."),
        Key(
            "backbone-weights",
            "shipped",
            "Local weights file (.safetensors/.pth); 'shipped' = the Fashion-MNIST weights in anytime_assets/; "
            "'' = none.",
        ),
        Key("pretrained", False, "Fetch timm's hub weights (needs a network; ignored when backbone-weights is set)."),
        Key("img-size", 0, "Backbone input size in pixels (0 = the backbone's own).", _non_negative),
        Key("patch-size", 0, "Patch size in pixels (0 = the backbone's own).", _non_negative),
        Key("adapter-width", 32, "Attention width of each accumulator adapter.", _positive),
        Key("adapter-heads", 2, "Attention heads of each adapter (must divide adapter-width).", _positive),
        Key("adapter-mlp-ratio", 2.0, "MLP hidden size of the adapter as a multiple of its width.", _positive),
        Key("shared-adapter", False, "One adapter shared by all blocks instead of one per block."),
        Key(
            "token-adapter-width",
            32,
            "Bottleneck width of a token adapter after every block (a residual MLP on every token, which "
            "changes the patch features the accumulator cannot reach); 0 = none (the paper's adapters alone). See "
            "docs/benchmarks.md.",
            _non_negative,
        ),
        Key(
            "exit-ensemble",
            True,
            "Exit k predicts the mean of the logits of heads 1..k (no extra cost: every head runs on the way); "
            "a deep exit, reached by few nodes, leans on the heads every node fits. false = each exit its own "
            "head (the paper). See docs/benchmarks.md.",
        ),
        Key(
            "ensemble-votes",
            "examples",
            "With exit-ensemble and closed-form heads: 'examples' weighs each head's logits in the mean by the "
            "examples its fit saw (a deep head, fitted on the deep tiers' few, counts less); 'equal' = every head "
            "alike. See docs/benchmarks.md.",
            choices=("examples", "equal"),
        ),
        Key(
            "exit-patch-mean",
            True,
            "Each exit head also reads the mean of its block's patch tokens beside the CLS token (a shallow "
            "block's CLS token has read little of the image). false = the CLS token only (the paper). "
            "See docs/benchmarks.md.",
        ),
    ),
    # the task, its source and its split
    *_section(
        "data",
        Key(
            "task",
            "chars",
            "Federated task: chars (offline: 62 characters rendered from 22 typefaces, one typeface per "
            "client), digits (offline, small: a smoke test), cifar100, femnist or speechcommands (see docs/tasks.md).",
            shapes=("model",),
        ),
        Key(
            "data-dir",
            "",
            "Local dataset folder for tasks loaded offline ('' = the task's default source: the hub for "
            "cifar100/femnist/speechcommands).",
        ),
        Key(
            "dirichlet-alpha",
            0.5,
            "Dirichlet concentration of the label-skewed split (smaller = more heterogeneous).",
            _positive,
        ),
        Key(
            "hub-dataset",
            "",
            "Hugging Face dataset ('name' or 'name:config') a task loads when data-dir is '' ('' = the task's "
            "own: uoft-cs/cifar100, flwrlabs/femnist, google/speech_commands:v0.02).",
        ),
        Key(
            "speech-classes",
            12,
            "Speech Commands classes: 12 (10 words + silence + unknown) or 35 (all words).",
            _speech_classes,
        ),
        Key(
            "val-fraction",
            0.2,
            "Share of each client's partition held out for validation (below 1: every client keeps at least one"
            " training example).",
            _val_fraction,
        ),
        Key("seed", 42, "Seed of partitioning, splits and initialisation.", _seed, shapes=("model",)),
    ),
    # outputs
    *_section(
        "run",
        Key("eval-batch-size", 256, "Batch size of evaluation.", _positive),
        Key("output-dir", "outputs", "Folder under which each run writes <run-name>/ (results, weights, checkpoints)."),
        Key(
            "run-name",
            "",
            "Name of the run folder ('' = a timestamp; with resume, the newest run that has a checkpoint).",
        ),
        Key("checkpoint-every", 1, "Save a server checkpoint every N rounds (and always after the last).", _positive),
        Key("resume", False, "Continue the run in output-dir/run-name from its last checkpoint."),
    ),
)

_BY_NAME = {k.name: k for k in KEYS}

# What a run saved before a model key existed was trained with: how predict
# rebuilds its weights and what a resume compares against.
BEFORE_KEY: dict[str, Any] = {"exit-ensemble": False, "exit-patch-mean": False, "token-adapter-width": 0}


def clients_train_heads(cfg: dict[str, Any]) -> bool:
    """Whether clients train, and so send, the exit heads: not with `heads = "ridge"`, whose
    heads only the server fits. Client, strategy and codec layout must agree on it."""
    return cfg["heads"] != "ridge"


def serves_last_fit(cfg: dict[str, Any]) -> bool:
    """Whether, between head refits, the server serves the adapters of the last fit rather than the latest
    round's: only where the heads stay fixed while the adapters train and a refit is coming."""
    return cfg["serve-last-fit"] and cfg["heads"] == "ridge" and cfg["head-refit-every"] > 0


def ensemble_votes(cfg: dict[str, Any]) -> bool:
    """Whether the closed-form heads are scaled by their examples for the exit ensemble's mean."""
    return cfg["exit-ensemble"] and cfg["ensemble-votes"] == "examples"


def round_lr(cfg: dict[str, Any], server_round: int, num_rounds: int = 0) -> float:
    """The local learning rate of `server_round` (1-based) under `lr-schedule`: `lr`, or a cosine
    decay over `num_rounds` (0 = `num-server-rounds`) down to 0.05 lr. The one place a round's rate
    is computed: the clients' training, the strategies that need it (QFedAvg) and the benchmarks."""
    lr, num_rounds = cfg["lr"], num_rounds or cfg["num-server-rounds"]
    if cfg["lr-schedule"] == "constant" or num_rounds <= 1 or server_round < 1:
        return lr
    t = min(server_round - 1, num_rounds - 1) / (num_rounds - 1)
    return lr * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * t)))


def keys_in(group: str) -> tuple[str, ...]:
    """Names of the keys of `group`, and of the keys that shape its objects."""
    assert group in GROUPS, group
    return tuple(k.name for k in KEYS if k.group == group or group in k.shapes)


def settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """The training keys that set a `TrainSettings` field, by field name."""
    return {k.setting: cfg[k.name] for k in KEYS if k.setting}


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
    _check_together(out)
    return out


# How Flower's parse_config_args finds the pairs of a "key=value ..." string.
_FLOWER_PAIR = r"(\S+?)=(\'[^\']*\'|\"[^\"]*\"|\S+)"


def parse_run_config(items: list[str]) -> dict:
    """TOML files and key=value strings, later ones winning, as `flwr run` reads them."""
    import re

    from flwr.common.config import parse_config_args

    user: dict = {}
    for item in items:
        if item.endswith(".toml") and not Path(item).expanduser().is_file():
            raise ConfigError("--run-config", f"no such TOML file {item}")
        # Flower keeps the key=value pairs of a string and drops anything else without a word
        # (a preset path among overrides, a stray word): refuse it instead.
        stray = re.sub(_FLOWER_PAIR, " ", item).split() if not item.endswith(".toml") else []
        if stray:
            preset = next((w for w in stray if w.endswith(".toml")), None)
            hint = (
                f'; give a preset as its own --run-config: --run-config {preset} --run-config "key=value ..."'
                if preset
                else "; every word must be key=value"
            )
            raise ConfigError("--run-config", f"{stray[0]!r} in {item!r} is not key=value and would be ignored{hint}")
        try:
            user.update(parse_config_args([item]))
        except Exception as err:  # noqa: BLE001 - flwr raises click/toml errors
            raise ConfigError("--run-config", f"cannot parse {item!r}: {getattr(err, 'message', err)}") from None
    return user


def _check_together(cfg: dict[str, Any]) -> None:
    """Checks of keys that must agree with each other (each alone passed)."""
    tiers = parse_tiers(cfg)
    fractions = tier_fractions(cfg)
    if fractions is not None and len(fractions) != len(tiers):
        raise ConfigError(
            "tier-assignment",
            f"has {len(fractions)} fractions for {len(tiers)} tiers (tiers={cfg['tiers']!r}): give one per tier",
        )
    parse_tier_names(cfg)
    if cfg["head-secagg"] and cfg["heads"] == "trained":
        raise ConfigError(
            "head-secagg",
            "secures the closed-form heads' statistics, and heads = 'trained' sends none: "
            "set heads = 'ridge' or 'ridge-init', or head-secagg = false",
        )
    if cfg["adapter-width"] % cfg["adapter-heads"]:
        raise ConfigError(
            "adapter-heads", f"must divide adapter-width ({cfg['adapter-width']}), got {cfg['adapter-heads']}"
        )


def check_heads_privacy(cfg: dict[str, Any]) -> None:
    """Closed-form heads go with a differential-privacy strategy only when their statistics are
    private too (`head-dp-epsilon`).

    Checked once the strategy itself is known to be valid (its own errors
    name its keys first).
    """
    dp = [k for k in ("strategy", "strategy-inner") if "DifferentialPrivacy" in str(cfg[k])]
    if cfg["heads"] != "trained" and dp and cfg["head-dp-epsilon"] <= 0:
        raise ConfigError(
            "head-dp-epsilon",
            f"heads = {cfg['heads']!r} sends each client's feature statistics without noise, outside the "
            f"differential privacy of {dp[0]} {cfg[dp[0]]!r}: set head-dp-epsilon > 0 (noisy statistics) or "
            'heads = "trained"',
        )


def secagg_note(cfg: dict[str, Any]) -> str | None:
    """What `head-secagg` gives up, for check-config and the ServerApp to say before round 1."""
    if not cfg["head-secagg"] or cfg["heads"] == "trained":
        return None
    return (
        "head-secagg: the server reads only the sums of the nodes' head statistics, so the poisoning "
        "defences of the head fit are reduced to checks on the sum: no per-node check, head-weight-cap, "
        "head-influence or head-screen, and a node that sends made-up statistics cannot be found or left out"
    )


def head_fit_rounds(cfg: dict[str, Any]) -> list[int]:
    """The rounds after which the heads are fitted in closed form (0 = before round 1): the one
    schedule the server follows and the nodes' privacy accounting divides its budget by."""
    if cfg["heads"] == "trained":
        return []
    every, last = cfg["head-refit-every"], cfg["num-server-rounds"]
    return [0] + ([r for r in range(1, last + 1) if r % every == 0 or r == last] if every > 0 else [])


def parse_tiers(cfg: dict[str, Any]) -> list[int]:
    return comma_list(cfg["tiers"], int)


def tier_fractions(cfg: dict[str, Any]) -> list[float] | None:
    """The share of partitions per tier, or None for `tier-assignment = "even"`."""
    return None if cfg["tier-assignment"] == "even" else comma_list(cfg["tier-assignment"], float)


def parse_tier_names(cfg: dict[str, Any]) -> list[str]:
    """One name per tier, or [] when the tiers go by their depth."""
    names = comma_list(cfg["tier-names"])
    if not names:
        return []
    tiers = parse_tiers(cfg)
    if len(names) != len(tiers):
        raise ConfigError("tier-names", f"has {len(names)} names for {len(tiers)} tiers ({cfg['tiers']})")
    if not all(names) or len(set(names)) != len(names):
        raise ConfigError("tier-names", f"names must be non-empty and distinct, got {cfg['tier-names']!r}")
    return names


def check_depth(key: str, depth: int, num_blocks: int) -> None:
    """A depth budget must be a block the backbone has."""
    if not 1 <= depth <= num_blocks:
        raise ConfigError(key, f"depth {depth} is outside 1..{num_blocks} (the backbone has {num_blocks} blocks)")


def check_depths(cfg: dict[str, Any], num_blocks: int) -> None:
    """Tier depths must fit the backbone; known only once it is built."""
    for d in parse_tiers(cfg):
        check_depth("tiers", d, num_blocks)


def markdown_table() -> str:
    """The README's run-config table, generated from KEYS."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for k in KEYS:
        default = (
            f'"{k.default}"'
            if isinstance(k.default, str)
            else str(k.default).lower()
            if isinstance(k.default, bool)
            else k.default
        )
        doc = k.doc + (f" One of: {', '.join(k.choices)}." if k.choices else "")
        rows.append(f"| `{k.name}` | `{default}` | {doc} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
