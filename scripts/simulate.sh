#!/usr/bin/env bash
# Runs the default simulation with `flwr run`, offline. Flower's SuperExec
# would otherwise build a fresh environment per run from pyproject's
# dependencies (and fetch torch), and a SuperLink started before without
# the flag keeps its setting, so the flag goes in before anything starts.
set -euo pipefail
cd "$(dirname "$0")/.."
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export FLWR_HOME=${FLWR_HOME:-$HOME/.flwr}
# The local SuperLink outlives a run and keeps the federation size it was
# given first, so the size is passed on every run.
exec flwr run . --stream --federation-config "num-supernodes=${NUM_SUPERNODES:-20}" \
    --run-config "output-dir='$PWD/outputs'" "$@"
