#!/bin/sh
# Runs the C kernels' tests with the kernels built under AddressSanitizer (out-of-bounds reads and
# writes, use after free in lif/rnn/delta/egru/sparse_input .c files): the kernels are compiled by a gcc wrapper
# that adds -fsanitize=address into their own cache folder, and libasan is preloaded into Python
# (libstdc++ after it, so C++ exceptions thrown by torch's autograd pass through ASan's interceptor).
# A report goes to $ASAN_LOG.<pid> and fails the run. Usage: scripts/asan_check.sh [pytest args]
# (default: the kernel, exactness and recomputation-check test files; ~3 min on 2 cores)
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
printf '#!/bin/sh\nexec gcc "$@" -fsanitize=address -fno-omit-frame-pointer -g\n' > "$work/cc"
chmod +x "$work/cc"
ASAN_LOG=${ASAN_LOG:-$work/asan}
export CC="$work/cc" SPARSEBPTT_CACHE_DIR="$work/cache"
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so.6)"
export ASAN_OPTIONS="detect_leaks=0:log_path=$ASAN_LOG"
cd "$here"
set +e
if [ $# -eq 0 ]; then
    set -- tests/test_kernels_lif.py tests/test_kernels_rnn.py tests/test_kernels_delta_cpu.py \
        tests/test_kernels_egru_cpu.py tests/test_scan_exact.py tests/test_recompute_checks.py \
        tests/test_sparse_input.py tests/test_kernels_rnn_sparse_input.py
fi
.venv/bin/python -m pytest -o addopts="" -q -p no:cacheprovider "$@"
rc=$?
set -e
if ls "$ASAN_LOG".* >/dev/null 2>&1; then
    cat "$ASAN_LOG".*
    echo "AddressSanitizer reported an error (above)"
    exit 1
fi
exit $rc
