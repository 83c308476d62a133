#!/bin/sh
# The C kernels' tests with the kernels built as for an x86-64 CPU without AVX
# ($SPARSEBPTT_KERNEL_BASELINE=1: no AVX-512/AVX2 copies, every run-time ISA check says no), so the
# baseline code paths are checked on a machine that has AVX-512 too. ~1 min on 2 cores.
# Usage: scripts/baseline_check.sh [pytest args]
set -eu
cd "$(dirname "$0")/.."
if [ $# -eq 0 ]; then
    set -- tests/test_kernels_lif.py tests/test_kernels_rnn.py tests/test_kernels_delta_cpu.py \
        tests/test_kernels_egru_cpu.py tests/test_scan_exact.py tests/test_backends.py \
        tests/test_sparse_input.py tests/test_kernels_rnn_sparse_input.py
fi
SPARSEBPTT_KERNEL_BASELINE=1 exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
