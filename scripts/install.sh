#!/usr/bin/env bash
# Installs anytime-fl and everything it needs into the current Python.
# torch goes first and is then pinned by a constraint file: any looser
# requirement lets pip replace a CPU build with a multi-GB CUDA one.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# Offline data for the default run (Fashion-MNIST backs the shipped
# pre-training; optional: the default federated task ships with scikit-learn).
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
        || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; }) \
        || echo "install.sh: dataset-fashion-mnist not installed (only needed to re-run pre-training)" >&2
fi

# TORCH_SPEC lets a user pick another build, e.g. a CUDA one on a GPU machine;
# it holds pip arguments, so it is split into words on purpose.
# shellcheck disable=SC2086
"$PY" -m pip install --quiet ${TORCH_SPEC:-torch==2.13.0}
constraints=$(mktemp)
"$PY" -c "import torch; print('torch==' + torch.__version__)" > "$constraints"
"$PY" -m pip install --quiet -c "$constraints" -e ".[test]"
rm -f "$constraints"
# Our top-level import names (core, adapters, runtime, ...) must be ours alone in this environment.
"$PY" -m anytime_fl.names
# timm goes through the project's import guard (PyPI's torchvision is CUDA-linked).
"$PY" -c "import torch, flwr; from adapters.compat import import_timm; timm = import_timm(); print(f'anytime-fl installed: torch {torch.__version__}, flwr {flwr.__version__}, timm {timm.__version__}')"
