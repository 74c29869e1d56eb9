#!/usr/bin/env bash
# The main job on a fresh machine: install, then run the TinyWorld demo (CPU or GPU).
#   bash demo.sh [--quick] [--out DIR] [--device cuda]
set -euo pipefail
cd "$(dirname "$0")"

# The CPU build of torch comes from a local file; a bare `torch` requirement would pull
# several GB of CUDA packages, so install it first and only when no torch is there.
if ! python -c "import torch" 2>/dev/null; then
    python -m pip install -q torch==2.13.0
fi
python -m pip install -q -e .

lifelong-engine demo "$@"
