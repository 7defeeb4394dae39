#!/usr/bin/env bash
# Runs a simulation with `flwr run` on the local SuperLink, offline, and
# behaves like one foreground program: the run config is checked first
# (the project's message, not Flower's "Invalid run configuration"),
# Ctrl-C stops the run on the SuperLink, and the exit status is the run's
# (0 completed, 1 failed, 130 stopped). See docs/running.md.
#
#   bash scripts/simulate.sh [--run-config PRESET.toml|"key=value ..."]... [other `flwr run` options]
#
# Flower's SuperExec would otherwise build a fresh environment per run from
# pyproject's dependencies (and fetch torch), and a SuperLink started before
# without the flag keeps its setting, so the flag goes in before anything starts.
set -uo pipefail
cd "$(dirname "$0")/.."
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export FLWR_HOME=${FLWR_HOME:-$HOME/.flwr}
PYTHON=${PYTHON:-python3}

again=""  # this command's arguments, for the resume hint
[ $# -gt 0 ] && again=$(printf ' %q' "$@")
config=()  # --run-config values, in order: later ones win
rest=()    # anything else goes to `flwr run`
while [ $# -gt 0 ]; do
    case "$1" in
        --run-config|-c)
            [ $# -gt 1 ] || { echo "simulate.sh: $1 needs a value" >&2; exit 2; }
            config+=(--run-config "$2"); shift 2 ;;
        --run-config=*) config+=(--run-config "${1#*=}"); shift ;;
        --stream) shift ;;  # always streamed
        *) rest+=("$1"); shift ;;
    esac
done

# Results go to ./outputs unless the config says otherwise: the ServerApp
# does not run in this folder, so a relative output-dir would land elsewhere.
# Flower refuses a TOML file next to key=value overrides, so presets and
# overrides are merged into one file, after the project's own checks.
merged=$(mktemp --suffix=.toml)
trap 'rm -f "$merged"' EXIT
"$PYTHON" -m anytime_fl.cli check-config --quiet --num-nodes "${NUM_SUPERNODES:-20}" --run-config "output-dir='$PWD/outputs'" \
    "${config[@]+"${config[@]}"}" --write "$merged" || exit 2

# The run folder's name, so that Ctrl-C can say how to resume it: left unset, the
# ServerApp would pick a timestamp that this script never learns. The same format.
run_name=$("$PYTHON" - "$merged" <<'PY'
import sys, time, tomllib
path = sys.argv[1]
with open(path, "rb") as fh:
    cfg = tomllib.load(fh)
name = cfg.get("run-name", "")
if not name and not cfg.get("resume", False):
    name = time.strftime("%Y%m%d-%H%M%S")
    with open(path, "a") as fh:
        fh.write(f'run-name = "{name}"\n')
print(name)
PY
) || exit 1

# The local SuperLink outlives a run and keeps the federation size it was
# given first, so the size is passed on every run.
# One CPU per simulated client (Flower's default is 2): two clients train at once on two cores.
started=$(flwr run . --format json --federation-config "num-supernodes=${NUM_SUPERNODES:-20} client-resources-num-cpus=1" \
    --run-config "$merged" "${rest[@]+"${rest[@]}"}") || { echo "$started" >&2; exit 1; }
run_id=$("$PYTHON" -c 'import json, sys; print(json.loads(sys.stdin.read())["run-id"])' <<<"$started" 2>/dev/null) \
    || { echo "simulate.sh: flwr run did not start a run: $started" >&2; exit 1; }
echo "simulate.sh: run $run_id started (Ctrl-C stops it; \`flwr ls\` lists runs)"

status() {  # the run's status as `flwr ls` gives it, e.g. finished:completed
    flwr ls --run-id "$run_id" --format json 2>/dev/null | "$PYTHON" -c \
        'import json, sys; d = json.loads(sys.stdin.read()); r = d.get("runs", d) if isinstance(d, dict) else d; print(r[0]["status"], "|", r[0].get("status-details", ""))' 2>/dev/null
}

wait_finished() {  # up to $1 seconds for the run to end on the SuperLink
    for _ in $(seq "$1"); do
        case "$(status)" in finished*) return 0 ;; esac
        sleep 1
    done
    return 1
}

log_pid=""
stop_run() {
    trap - INT TERM
    [ -n "$log_pid" ] && kill "$log_pid" 2>/dev/null
    echo "simulate.sh: stopping run $run_id on the SuperLink ..." >&2
    flwr stop "$run_id" >/dev/null 2>&1
    wait_finished 120 || echo "simulate.sh: run $run_id has not stopped yet; check \`flwr ls\`" >&2
    local resume="resume=true${run_name:+ run-name='$run_name'}"
    echo "simulate.sh: run $run_id stopped; resume it with: bash scripts/simulate.sh$again --run-config \"$resume\"" >&2
    exit 130
}
trap stop_run INT TERM

# The log stream runs in the background so that Ctrl-C reaches the trap
# at once (bash runs a trap only after a foreground command ends).
flwr log "$run_id" --stream &
log_pid=$!
wait "$log_pid"
log_pid=""

wait_finished 60
final=$(status)
case "$final" in
    finished:completed*) exit 0 ;;
    finished:stopped*) echo "simulate.sh: run $run_id was stopped (${final#*| })" >&2; exit 130 ;;
    *) echo "simulate.sh: run $run_id did not complete: ${final:-no status from flwr ls} (details: flwr log $run_id --show)" >&2; exit 1 ;;
esac
