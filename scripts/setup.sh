#!/usr/bin/env bash
# Create .venv and install sparsebptt with the pinned CPU build of PyTorch.
# torch==2.13.0 is installed first, on its own: a bare `torch` requirement would pull a CUDA
# build of several GB. The package's own range (torch<=2.13.0) is then already satisfied.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# pip's notes about this machine's local package mirrors are noise: drop them, keep real errors
quiet() { "$@" 2>&1 | { grep -v '^WARNING: Location' || true; }; }
quiet .venv/bin/python -m pip install --quiet "torch==2.13.0"
quiet .venv/bin/python -m pip install --quiet -e ".[test]"
.venv/bin/python -c "import torch, sparsebptt; print('sparsebptt', sparsebptt.__version__, 'torch', torch.__version__)"
