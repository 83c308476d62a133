#!/usr/bin/env bash
# GPU proof (issue 18): benchmarks/gpu.py on a lent GPU machine, in one call of the `run` tool:
#
#   run(command="bash scripts/gpu_check.sh", carry=[], timeout_s=540)
#
# (the script itself stops at 500 s; the wheels below are committed, so nothing needs carrying).
# The machine's python3 holds torch, triton, cupy, pytest and pytest-timeout and reaches no
# network: the peers (snntorch, norse, spikingjelly 2.0.0 + loguru, nir, nirtorch) and
# sparsebptt's one missing dependency (checkpoint_schedules) are installed from the wheels in
# benchmarks/gpu_wheels/ (pip --no-index --no-deps --target), SpikingJelly 0.0.0.0.14 (its last
# release with the CuPy backend) into a site of its own; sparsebptt runs from src/.
# What comes back under $OUT: gpu_<device>.{json,csv,png}, gpu_<device>_tests.log, gpu_check.log:
# copy them into benchmarks/results/.
#
#   bash scripts/gpu_check.sh --fetch-wheels      # here (with a package registry): refresh the wheels
#   PY=.venv/bin/python OUT=/tmp/g bash scripts/gpu_check.sh --device cpu --preset tiny   # CPU rehearsal
# Arguments after the script's name go to benchmarks/gpu.py (they override its defaults).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
W=benchmarks/gpu_wheels

if [ "${1:-}" = "--fetch-wheels" ]; then
    set -e
    # the GPU machine's interpreter: CPython 3.12 on x86-64; every wheel here is pure Python
    plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
    mkdir -p "$W/sj_cupy"
    for p in snntorch==1.0.0 spikingjelly==2.0.0 nirtorch==2.6 nir==1.0.8 loguru==0.7.3 checkpoint_schedules==1.0.4; do
        "$PY" -m pip download -q --no-deps "${plat[@]}" -d "$W" "$p"
    done
    "$PY" -m pip download -q --no-deps "${plat[@]}" -d "$W/sj_cupy" spikingjelly==0.0.0.0.14
    # norse 1.1.0 is published as a source archive only: build its (pure-Python) wheel here
    "$PY" -m pip wheel -q --no-deps -w "$W" norse==1.1.0
    ls -la "$W" "$W/sj_cupy"
    exit 0
fi

DEST=${OUT:-benchmarks/results}
SITE=${GPU_SITE:-/tmp/gpu_site}
SJ_SITE=${SJ_CUPY_SITE:-/tmp/sj_cupy_site}
mkdir -p "$DEST"
pipi() { "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$@"; }
pipi "$SITE" "$W"/*.whl || { echo "gpu_check: installing the wheels from $W failed"; exit 1; }
pipi "$SJ_SITE" "$W"/sj_cupy/*.whl || echo "gpu_check: spikingjelly 0.0.0.0.14 did not install: no CuPy peer"
export PYTHONPATH="$PWD/src:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
"$PY" -c "import torch, triton, sparsebptt; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'available', torch.cuda.is_available(), '| triton', triton.__version__, '| sparsebptt from', sparsebptt.__file__)"
timeout -k 10 "${GPU_CHECK_LIMIT_S:-500}" "$PY" benchmarks/gpu.py --device cuda --sj-cupy-path "$SJ_SITE" \
    --out-dir "$DEST" "$@" 2>&1 | tee "$DEST/gpu_check.log"
rc=${PIPESTATUS[0]}
echo "gpu_check: benchmarks/gpu.py exited $rc; files in $DEST:"
ls -la "$DEST"
exit "$rc"
