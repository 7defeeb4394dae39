#!/usr/bin/env bash
# Runs the default simulation with `flwr run`, offline. Flower's SuperExec
# would otherwise build a fresh environment per run from pyproject's
# dependencies (and fetch torch), and a SuperLink started before without
# the flag keeps its setting, so the flag goes in before anything starts.
set -euo pipefail
cd "$(dirname "$0")/.."
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export FLWR_HOME=${FLWR_HOME:-$HOME/.flwr}
outputs="output-dir = \"$PWD/outputs\""  # as a TOML line
outputs_kv="output-dir='$PWD/outputs'"   # as a --run-config override

# Results go to ./outputs: the ServerApp process does not run in this
# folder, so a relative output-dir would land elsewhere. Flower refuses a TOML file next to
# key=value overrides, so a preset file gets the line appended in a copy.
args=()
preset=""
while [ $# -gt 0 ]; do
    if { [ "$1" = "--run-config" ] || [ "$1" = "-c" ]; } && [ $# -gt 1 ] && [[ "$2" == *.toml ]]; then
        [ -f "$2" ] || { echo "simulate.sh: no run-config file $2" >&2; exit 2; }
        preset=$(mktemp --suffix=.toml)
        trap 'rm -f "$preset"' EXIT
        { cat "$2"; echo; grep -q '^output-dir' "$2" || echo "$outputs"; } > "$preset"
        args+=("$1" "$preset")
        shift 2
    else
        args+=("$1")
        shift
    fi
done
[ -n "$preset" ] || args=(--run-config "$outputs_kv" "${args[@]+"${args[@]}"}")

# The local SuperLink outlives a run and keeps the federation size it was
# given first, so the size is passed on every run.
flwr run . --stream --federation-config "num-supernodes=${NUM_SUPERNODES:-20}" "${args[@]}"
