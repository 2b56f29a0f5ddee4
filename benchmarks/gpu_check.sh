#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run of about 6 minutes, for the device tool (or any
# CUDA machine): the CUDA tests (tests/e2e/test_gpu.py: fp16 vs fp32, pinned batches, decode
# processes beside a GPU model, Ray actors with --gpus-per-actor), then the ingest and server
# benchmarks on the GPU (PyTorch runs fp16 there), and ONNX Runtime's ingest on the same machine's
# CPUs beside them.
# Writes $OUT/gpu_check.md (a table) and $OUT/gpu_check.log.
#
#   bash benchmarks/gpu_prepare.sh          # here: .whl/ and .gpu-data/ to carry
#   bash benchmarks/gpu_check.sh            # there, in the repository root
#   DEVICE=cpu SMALL=60 LARGE=20 CPU_SMALL=60 bash benchmarks/gpu_check.sh  # a rehearsal, no GPU
#
# The device machine has Python with PyTorch (CUDA) but no package index and no ../shared: the
# other dependencies travel as wheels in .whl/ (installed into /tmp/site first) and the photos
# in .gpu-data/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-check-out}"
DEVICE="${DEVICE:-cuda}"
# photos per run (fewer for a rehearsal on 2 cores); past the 300 carried ones, brightened copies
SMALL="${SMALL:-3000}" LARGE="${LARGE:-300}" CPU_SMALL="${CPU_SMALL:-1000}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        >>"$LOG" 2>&1 || { echo "installing the carried wheels failed; see $LOG"; exit 2; }
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
[ -d .gpu-data/imagenet-sample ] && export CLIPSEARCH_BENCH_DATA="$PWD/.gpu-data"
{
    echo "# GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/GPU: /'
    "$PY" -c 'import os, torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, sees {torch.cuda.device_count()} GPU, {os.cpu_count()} CPUs")'
    echo
    echo "| check | result | seconds |"
    echo "|---|---|---|"
} >"$OUT/gpu_check.md"

step() {  # step NAME TIMEOUT COMMAND...: one row of the table
    local name="$1" limit="$2" started rc
    shift 2
    started=$(date +%s)
    echo "== $name" >>"$LOG"
    timeout "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    local result="passed"
    [ $rc -eq 124 ] && result="timed out after ${limit}s"
    [ $rc -ne 0 ] && [ $rc -ne 124 ] && result="FAILED (exit $rc)"
    echo "| $name | $result | $(( $(date +%s) - started )) |" >>"$OUT/gpu_check.md"
}

# the tests first: their fixtures write the model checkpoints the encoders load. A run of 300
# photos on the GPU is mostly its start (decode processes, CUDA, cuDNN): 3000 show its pace.
step "CUDA tests (tests/e2e/test_gpu.py)" 120 "$PY" -m pytest -q -p no:cacheprovider tests/e2e/test_gpu.py -rs
step "ingest benchmark, $SMALL photos, PyTorch on $DEVICE" 150 "$PY" benchmarks/ingest.py --count "$SMALL" \
    --plain 30 --sets small --runtimes "torch fp32" --ingest-args "--device $DEVICE"
step "ingest benchmark, $LARGE 3000x2000 photos, PyTorch on $DEVICE" 100 "$PY" benchmarks/ingest.py \
    --count "$LARGE" --plain 30 --sets large --runtimes "torch fp32" --ingest-args "--device $DEVICE"
step "ingest benchmark, $CPU_SMALL photos, ONNX Runtime on the CPUs" 100 "$PY" benchmarks/ingest.py \
    --count "$CPU_SMALL" --plain 30 --sets small --runtimes "onnx fp32"
step "server benchmark, PyTorch on $DEVICE" 75 env CLIPSEARCH_DEVICE="$DEVICE" "$PY" benchmarks/server.py \
    --seconds 5 --runtimes torch
{
    echo
    echo "The benchmarks' own tables:"
    echo
    echo '```'
    grep -E '^(\||ingest:|clipsearch serve)' "$LOG" || true
    echo '```'
} >>"$OUT/gpu_check.md"
cat "$OUT/gpu_check.md"
