"""The files of a run folder (`output-dir/run-name`), named once.

The ServerApp writes them; `anytime-fl predict` and `anytime-fl plot` read
them, and docs/outputs.md describes each.
"""

CONFIG = "config.json"  # the run config, with the changes a resume made
RESULTS = "results.jsonl"  # one row per round
RESULTS_CSV = "results.csv"
CHECKPOINT = "checkpoint.npz"
WEIGHTS = "adapters.safetensors"  # the final global adapters and heads, the run config in the metadata
ANYTIME = "anytime.json"  # accuracy and cost per exit and per confidence threshold
PERSONALIZATION = "personalization.json"
HEAD_FIT = "head_fit.json"
PARTITION_STATS = "partition-stats.json"
LOCK = ".lock"  # held while a run writes into the folder
