#!/usr/bin/env bash
# One-shot check on a GPU machine (no internet needed): install, the CUDA tests (Triton compiled), kernel-level
# timing (fused vs unfused gated MLP at three widths, the elementwise kernel's launch-configuration sweep), and the
# benchmark suite in full mode (op at G = 2 and 8, both LLaVA MLPs at G = 8, the whole LLaVA-7B-width model at full
# depth through the public profile() with the streaming-hooks peer, memory, compact at 2/10/30/50 %, the
# precision torture test; the torch.compile peers hooks-compiled / hooks-compiled-masked at the op, layer and
# model levels, their Inductor compile in the untimed first call). Logs and results.md go to $1, else $OUT, else
# ./gpu_check_out. Every step has its own `timeout`; the steps' limits add up to 7.8 minutes.
# Without CUDA the GPU steps are recorded as SKIPPED and the script exits 0; it exits 1 if a step failed.
# GPU_CHECK_DRY_RUN=1 prints each step's command instead of running it (to check the script's logic).
# PYTHON selects the interpreter (default: python3).
set -u
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-$PWD/gpu_check_out}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
PY="${PYTHON:-python3}"
RESULTS="$OUT_DIR/results.md"
START=$(date +%s)
FAILURES=0

echo "# manu_fast gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ)" > "$RESULTS"
{ echo; echo "| step | status | seconds | limit s | log |"; echo "| --- | --- | --- | --- | --- |"; } >> "$RESULTS"

# run_step NAME LIMIT_S NEEDS_GPU COMMAND...: runs COMMAND under timeout, logs to $OUT_DIR/NAME.log.
run_step() {
    local name="$1" limit="$2" needs_gpu="$3"; shift 3
    local log="$OUT_DIR/$name.log" status rc t0=$(date +%s)
    if [ "${GPU_CHECK_DRY_RUN:-0}" = 1 ]; then
        echo "dry run: timeout $limit $*" | tee "$log"; status="DRY RUN"
    elif [ "$needs_gpu" = 1 ] && [ "$HAVE_GPU" != 1 ]; then
        echo "skipped: no CUDA device" > "$log"; status="SKIPPED (no CUDA)"
    else
        echo "== $name (limit ${limit}s): $*"
        timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1; rc=$?
        case $rc in
            0) status="ok" ;;
            124|137) status="TIMEOUT"; FAILURES=$((FAILURES + 1)) ;;
            *) status="FAILED (rc $rc)"; FAILURES=$((FAILURES + 1)) ;;
        esac
        tail -n 3 "$log"
    fi
    echo "| $name | $status | $(( $(date +%s) - t0 )) | $limit | $name.log |" >> "$RESULTS"
}

HAVE_GPU=0
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then HAVE_GPU=1; fi

{
    echo "python: $("$PY" --version 2>&1)"
    "$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, '| triton', triton.__version__, '| transformers', transformers.__version__)" 2>&1
    command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    echo "cuda available: $HAVE_GPU"
} > "$OUT_DIR/env.log" 2>&1
cat "$OUT_DIR/env.log"

export MANU_FAST_BENCH_MODE=full MANU_FAST_BENCH_OUT="$OUT_DIR/bench"
mkdir -p "$MANU_FAST_BENCH_OUT"
run_step install 60 1 "$PY" -m pip install --no-deps --no-build-isolation -e .
# the test files with CUDA cases (the rest is CPU-only and runs in CI)
run_step tests 140 1 "$PY" -m pytest tests/test_triton.py tests/test_backend_contract.py tests/test_adapters.py -q \
    --durations=10
run_step kernels 80 1 "$PY" benchmarks/gated_paths.py --out "$OUT_DIR/kernels.md"
run_step benchmarks 190 1 "$PY" -m pytest benchmarks/ -q -s

{
    echo
    echo "total: $(( $(date +%s) - START )) s"
    echo
    sed 's/^/    /' "$OUT_DIR/env.log"
    for f in "$OUT_DIR/kernels.md" "$MANU_FAST_BENCH_OUT"/*.md "$MANU_FAST_BENCH_OUT"/*.csv; do
        [ -f "$f" ] && { echo; echo "## $(basename "$f")"; echo; cat "$f"; }
    done
    [ -f "$OUT_DIR/tests.log" ] && { echo; echo "## tests"; echo; tail -n 1 "$OUT_DIR/tests.log"; }
} >> "$RESULTS"
echo "results: $RESULTS"
cat "$RESULTS"
exit $(( FAILURES > 0 ))
