#!/usr/bin/env bash
# Every GPU check of the project in one run (sized for a 15-minute GPU lease):
#   bench/cuda_all.sh FIXTURE_DIR [WHEEL_DIR]
# FIXTURE_DIR is ../shared/fixtures/chatglm2-tiny (or a copy); WHEEL_DIR may hold a cpm_kernels wheel.
# Logs go to $OUT (or ./cuda-logs): quant.py --cuda, cuda_engine.py, train.py --device cuda.
set -u
cd "$(dirname "$0")/.."
FIX=${1:?fixture folder}
OUT=${OUT:-cuda-logs}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "${2:-}" ] && ls "$2"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$2"/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
step() {  # name, seconds, command...
  local name=$1 secs=$2; shift 2
  echo "=== $name ($(date +%T)) ==="
  timeout "$secs" "$@" 2>&1 | tee "$OUT/$name.log"
  echo "=== $name: exit ${PIPESTATUS[0]} ($(date +%T)) ==="
}
ONLY=${ONLY:-quant_cuda,cuda_engine,train_cuda,engine_profile}
want() { [[ ",$ONLY," == *",$1,"* ]]; }
want quant_cuda && step quant_cuda 170 python3 bench/quant.py --cuda "$FIX/model" --decode 64
want cuda_engine && step cuda_engine 170 python3 bench/cuda_engine.py --fixture "$FIX" --gen 32
want train_cuda && step train_cuda 100 python3 bench/train.py --device cuda --configs bf16,bf16-int8,bf16-int4 --steps 3 --batch 4
want engine_profile && step engine_profile 100 python3 bench/cuda_engine.py --fixture "$FIX" --skip-fixture --modes bf16 --profile
