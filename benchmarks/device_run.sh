#!/usr/bin/env bash
# The one script a GPU device call runs (docs/gpu-runs.md), in priority order, each step under its
# own time limit and each writing its part as soon as it finishes (a time-out keeps the rest):
#   1. nvidia-smi -L, torch / triton / nvcc versions
#   2. build flashdiff (both modules, sm_90a only, parallel nvcc), failing loudly
#   3. flashdiff tune --quick: the dispatch table that ships (and that the later steps use)
#   4. end-to-end sampling (flashdiff bench --op e2e --preset e2e-gpu)
#   5. flashdiff validate
#   6. a trimmed GPU test selection (graph capture first)
#   7. flashdiff bench on the model presets: each case's auto row, every backend, baselines
#   8. $OUT/results.json (every number), $OUT/summary.md; the summary table printed last
#
#   OUT=/some/dir FLASHDIFF_GIT_COMMIT=<sha> bash benchmarks/device_run.sh
#
# Knobs: FD_TOTAL_S (target wall time, default 540), FD_TUNE_BUDGET_S, FD_E2E_BUDGET_S,
# FD_BENCH_ARGS (extra `flashdiff bench` args), FD_SKIP_BUILD=1 (already built).
# Without a GPU it stops at once with exit status 3.
# Files under $OUT (the device tool returns at most 8): results.json summary.md device_run.log
# dispatch-table.json build.log tune.log tests.log bench.log.
set -uo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
T0=$(date +%s)
TOTAL=${FD_TOTAL_S:-540}

# ---------------------------------------------------------------- no GPU: fail fast
# FD_DRY_RUN_CPU=1 walks every step on a CPU machine instead (no build, tiny preset, no GPU
# numbers): a check of this script, not a benchmark.
DRY=${FD_DRY_RUN_CPU:-0}
if [ "$DRY" = 1 ]; then
    echo "device_run.sh: FD_DRY_RUN_CPU=1: walking the steps on the CPU (no build, tiny shapes, no GPU numbers)"
    FD_SKIP_BUILD=1
    FD_BENCH_ARGS=${FD_BENCH_ARGS:---preset tiny}
    export FLASHDIFF_CACHE_DIR=${FLASHDIFF_CACHE_DIR:-$(mktemp -d)}
elif ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "device_run.sh: no NVIDIA GPU here (nvidia-smi is missing or 'nvidia-smi -L' failed)." >&2
    echo "device_run.sh: run it on a GPU machine (docs/gpu-runs.md); nothing was built or measured." >&2
    exit 3
fi

OUT=${OUT:-$ROOT/device_out}
mkdir -p "$OUT"
WORK=$(mktemp -d)
export PYTHONUNBUFFERED=1
export FLASHDIFF_GIT_COMMIT=${FLASHDIFF_GIT_COMMIT:-$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)}
exec > >(tee -a "$OUT/device_run.log") 2>&1
STATUS=0

elapsed() { echo $(( $(date +%s) - T0 )); }

# step NAME LIMIT_S LOGFILE CMD...: run with a time limit, log, record "name rc seconds" in steps.tsv
step() {
    local name=$1 limit=$2 log=$3
    shift 3
    local s rc
    s=$(date +%s)
    echo
    echo "=== [$name] (limit ${limit}s, at $(elapsed)s) $*"
    timeout --signal=TERM --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$OUT/$log"
    rc=${PIPESTATUS[0]}
    [ "$rc" = 124 ] && echo "!!! [$name] timed out after ${limit}s"
    [ "$rc" != 0 ] && echo "!!! [$name] exit status $rc"
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - s ))" "$log" >> "$WORK/steps.tsv"
    return "$rc"
}

# ---------------------------------------------------------------- 1. versions
echo "=== [versions]"
nvidia-smi -L || true
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv || true
python -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda, '| device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
python -c "import triton; print('triton', triton.__version__)" || echo "triton: not importable"
(command -v nvcc >/dev/null && nvcc --version | tail -n 2) || echo "nvcc: not found"
if [ "$DRY" != 1 ] && ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "device_run.sh: nvidia-smi sees a GPU but torch does not (torch.cuda.is_available() is False)." >&2
    exit 3
fi

# ---------------------------------------------------------------- 2. build
export FLASHDIFF_CUDA=1 FLASHDIFF_CUDA_ARCHS=${FLASHDIFF_CUDA_ARCHS:-90a}
export FLASHDIFF_BUILD_JOBS=${FLASHDIFF_BUILD_JOBS:-$(nproc)}
if [ "${FD_SKIP_BUILD:-0}" != 1 ]; then
    if ! step build 170 build.log python -m pip install --no-build-isolation --no-deps -v -e .; then
        echo "!!! pip install -e . failed; trying python setup.py build_ext --inplace"
        if step build-inplace 150 build.log python setup.py build_ext --inplace; then
            # the in-place tree has no flashdiff.triton_kernels: point it at triton_kernels/
            [ -e python/flashdiff/triton_kernels ] || ln -s ../../triton_kernels python/flashdiff/triton_kernels
            export PYTHONPATH=$ROOT/python${PYTHONPATH:+:$PYTHONPATH}
        fi
    fi
fi
if ! step import-check 30 build.log python -c "
import flashdiff, flashdiff._cpu, flashdiff._cuda, flashdiff.triton_kernels
from flashdiff import _ext
print('flashdiff._cuda:', flashdiff._cuda.device_status())
print('backends:', flashdiff.backend_status())
assert _ext.load_cuda()[0] is not None, _ext.load_cuda()[1]
"; then
    echo "################################################################"
    echo "!!! BUILD FAILED: flashdiff._cpu/_cuda/triton_kernels not all usable (see build.log)."
    echo "!!! Continuing so the baselines and the remaining backends are still measured."
    echo "################################################################"
    STATUS=1
fi
python -m flashdiff info || true

# ---------------------------------------------------------------- 3. tune (the dispatch table that ships)
# Written to the user cache dir, so every later step's auto choice already uses it, and to
# $OUT for committing as python/flashdiff/dispatch_tables/dispatch-<card>-sm<cc>.json.
TUNE_BUDGET=${FD_TUNE_BUDGET_S:-120}
# shellcheck disable=SC2086
step tune $(( TUNE_BUDGET + 60 )) tune.log python -m flashdiff tune --quick --time-budget "$TUNE_BUDGET" \
    --out "$OUT/dispatch-table.json" $([ "$DRY" = 1 ] && echo "--device cpu --preset tiny --dtype fp32") || STATUS=1

# ---------------------------------------------------------------- 4. end-to-end sampling
# Whole sampling runs (DiT-XL/2 256 px, SD 1.5 U-Net 512 px; batch 1 and 8; CFG; 10 steps):
# torch eager, torch.compile, flashdiff patch, flashdiff patch+graph.
# Compile rows run last and only while the compile budget has room for one more whole-model
# compile (a compile in flight can pass the time budget: hence the step's margin).
E2E_BUDGET=${FD_E2E_BUDGET_S:-100}
step e2e $(( E2E_BUDGET + 60 )) bench.log python -m flashdiff bench --op e2e \
    --preset "$([ "$DRY" = 1 ] && echo tiny || echo e2e-gpu)" --time-budget "$E2E_BUDGET" \
    --compile-budget 60 --json "$WORK/e2e.json" || STATUS=1

# ---------------------------------------------------------------- 5. validate
step validate 60 tests.log python -m flashdiff validate --cases 1 --quiet --json "$WORK/validate.json" || STATUS=1

# ---------------------------------------------------------------- 6. trimmed GPU tests
# Graph capture first (the captured sampler, patch(cuda_graph=True), capture safety), then the
# measured dispatch and the torch backend on CUDA tensors.
# (validate already ran every backend, torch's included, on CUDA tensors.)
# Then the variants written without a GPU (cuda:onepass, cuda:cross, cuda:m128, triton:v2, triton:tma; their
# bf16 cases), lse and merge.
GPU_TESTS=$(ls tests/test_sampling.py tests/test_patch_graph.py tests/test_capture_safety.py \
    tests/test_group_norm_onepass.py tests/test_attention_cross.py tests/test_attention_v2.py \
    tests/test_attention_m128.py \
    tests/test_attention_lse.py tests/test_dispatch_table.py 2>/dev/null)
# shellcheck disable=SC2086
step gpu-tests 110 tests.log python -m pytest -q -p no:cacheprovider -m gpu $GPU_TESTS || STATUS=1

# ---------------------------------------------------------------- 7. bench (ceilings inside)
# What is left of FD_TOTAL_S goes to the op cases (each with its auto row); the script stays
# under the device tool's 10-minute limit.
LEFT=$(( TOTAL - $(elapsed) - 25 ))
BUDGET=$(( LEFT < 40 ? 40 : LEFT ))
LIMIT=$(( BUDGET + 45 ))
HARD=$(( 575 - $(elapsed) ))
[ "$LIMIT" -gt "$HARD" ] && LIMIT=$HARD && BUDGET=$(( HARD - 45 > 20 ? HARD - 45 : 20 ))
# shellcheck disable=SC2086
step bench "$LIMIT" bench.log python -m flashdiff bench --quick --op scheduler group_norm attention \
    --time-budget "$BUDGET" --compile-budget 15 --json "$WORK/bench.json" ${FD_BENCH_ARGS:-} || STATUS=1

# ---------------------------------------------------------------- 6. results
python benchmarks/device_report.py --work "$WORK" --out "$OUT" --status "$STATUS" --elapsed "$(elapsed)" || STATUS=1
echo
echo "device_run.sh: finished in $(elapsed)s, status $STATUS; files in $OUT"
echo
cat "$OUT/summary.md" 2>/dev/null || echo "(no summary was written)"
exit "$STATUS"
