#!/usr/bin/env bash
# Create .venv and install sparsebptt with the pinned CPU build of PyTorch.
# torch==2.13.0 is installed first, on its own: a bare `torch` requirement would pull a CUDA
# build of several GB. The package's own range (torch>=2.4) is then already satisfied.
# The peers (snnTorch, Norse, SpikingJelly: tests/test_adapters.py) go in with --no-deps, since
# norse and spikingjelly require torchvision (another torch); then the modules they import.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# pip's notes about this machine's local package mirrors are noise: drop them, keep real errors
quiet() { "$@" 2>&1 | { grep -v '^WARNING: Location' || true; }; }
quiet .venv/bin/python -m pip install --quiet "torch==2.13.0"
quiet .venv/bin/python -m pip install --quiet -e ".[test]"
quiet .venv/bin/python -m pip install --quiet --no-deps "snntorch==1.0.0" "norse==1.1.0" "spikingjelly==2.0.0" \
    "nirtorch==2.6"
quiet .venv/bin/python -m pip install --quiet "loguru>=0.7,<1" "nir>=1.0.8" "h5py>=3"
# nothing above may replace the pinned CPU build
.venv/bin/python -c "import torch; v = torch.__version__; assert v.startswith('2.13.0') and torch.version.cuda is None, v"
.venv/bin/python -c "import torch, sparsebptt; print('sparsebptt', sparsebptt.__version__, 'torch', torch.__version__)"
