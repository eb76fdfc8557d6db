#!/usr/bin/env bash
# The benchmark tables for a randomly initialised Qwen2.5-VL-7B (real shapes,
# bf16, built directly on the GPU) on one CUDA GPU: at most 9.5 minutes, each step
# under its own time limit so one slow step cannot eat
# the others' budget. Uses only what a bare PyTorch GPU image has (torch,
# transformers, tokenizers, pillow, numpy): no downloads and no installs. Without
# qwen-vl-utils the bench's image-only stand-in is used (same resize rule); without
# fastapi/uvicorn the HTTP API path is skipped with a note.
#
#   bash bench/gpu.sh                 # tables on stdout, and in $OUT/bench-gpu.txt if $OUT is set
#   BENCH_DEVICE=cpu BENCH_ARGS="--layers 1 --vision-layers 1 --dtype bfloat16 --max-tokens 4" \
#     bash bench/gpu.sh               # a dry run of the same code path on a CPU
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-$(command -v python3 || command -v python)}
LOG=${OUT:-/tmp}/bench-gpu.txt
mkdir -p "$(dirname "$LOG")"
exec > >(tee -a "$LOG") 2>&1

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

start=$(date +%s)
step() {   # step LIMIT_S TITLE CMD...
  local limit=$1 title=$2; shift 2
  echo; echo "=== $title (limit ${limit}s, at $(( $(date +%s) - start ))s) ==="
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  [ $rc -eq 0 ] || echo "!!! $title: exit $rc$([ $rc -eq 124 ] && echo ' (time limit)')"
}

echo "bench/gpu.sh on $(hostname) at $(date -u +%Y-%m-%dT%H:%MZ)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" - <<'EOF'
import sys, torch, transformers
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"cuda available: {torch.cuda.is_available()}")
for name in ("torchvision", "qwen_vl_utils", "fastapi", "uvicorn", "httpx"):
    try:
        __import__(name); print(f"  {name}: present")
    except Exception as exc:
        print(f"  {name}: missing ({type(exc).__name__})")
EOF

FULL=(--full-size --device "${BENCH_DEVICE:-cuda}" --quiet)
read -r -a EXTRA <<< "${BENCH_ARGS:-}"   # appended last, so they override the defaults below

# Most telling first, so a run cut short still has them. Limits add up to 9.5 minutes,
# model builds, graph capture and imports included.
step 110 "overhead: bare generate vs our engine, decode step captured as CUDA graphs (and our HTTP API if its packages are here), 128 tokens" \
  "$PY" bench/overhead.py "${FULL[@]}" --max-tokens 128 --repeats 3 ${EXTRA[@]+"${EXTRA[@]}"}
step 150 "concurrency: 1, 2, 4, 8 clients (image + text), batched vs max_batch 1, captured step" \
  "$PY" bench/concurrency.py "${FULL[@]}" --clients 1,2,4,8 --max-tokens 64 --requests-per-client 2 --image --no-http ${EXTRA[@]+"${EXTRA[@]}"}
step 80 "overhead with --enforce-eager (the same engine, no graphs)" \
  "$PY" bench/overhead.py "${FULL[@]}" --max-tokens 128 --repeats 2 --no-http --enforce-eager ${EXTRA[@]+"${EXTRA[@]}"}
step 40 "image preprocessing (CPU side)" \
  "$PY" bench/preprocess.py --repeats 1 --bounds 0,1
step 90 "warm-up: first request in a fresh process" \
  "$PY" bench/warmup.py "${FULL[@]}" --max-tokens 16 --variants none,text,engine ${EXTRA[@]+"${EXTRA[@]}"}
step 100 "request fields: 8 rows, half with penalties + logprobs, against 8 plain rows (a JSON-schema answer too where llguidance is installed)" \
  "$PY" bench/fields.py "${FULL[@]}" --max-tokens 64 --pairs 4 --repeats 1 ${EXTRA[@]+"${EXTRA[@]}"}
echo; echo "bench/gpu.sh done in $(( $(date +%s) - start ))s; log: $LOG"
