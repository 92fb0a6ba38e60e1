#!/usr/bin/env bash
# The GPU check, in one command, on one GPU machine with a stock PyTorch image and no network
# (prepare with scripts/gpu-wheels.sh on the CPU machine; the device tool carries .gpu):
#   1. the CUDA tests (tests/test_cuda.py, tests/test_quantize.py -m cuda): engine == PEFT in float32
#      (alone, mixed, prefix hit, preemption) and bfloat16, nf4 and int8 bases;
#      and CUDA graphs against eager decode (same tokens); logprob, grammar and penalty rows beside plain ones;
#   2. hotpeft bench on synthetic:llama-3.1-8b (base, 8 mixed LoRAs + 2 soft prompts, one stream)
#      writing JSON, with decode steps replayed from CUDA graphs (--compile on) and then, shorter,
#      without them (--compile off).
# Results go to $OUT (the device tool's) or ./gpu-out. GPU_CHECK_SMOKE=1: the same on the CPU with
# synthetic:smollm2-135m and `bench --smoke`, to check the script itself (tests/test_default_model.py
# does, with GPU_HOME, PYTHON and OUT set).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
SCRATCH=$(mktemp -d)
SITE=$SCRATCH/site
if [ "${GPU_CHECK_SMOKE:-0}" != 1 ] && compgen -G ".gpu/wheels/*.whl" > /dev/null; then  # (the smoke uses this env)
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .gpu/wheels/*.whl
fi
# hotpeft from this checkout without installing it: hotpeft.<room> -> ./<room>
PKG=$SCRATCH/pkg
mkdir -p "$PKG/hotpeft"
for room in adapters model server trainer cli; do ln -s "$PWD/$room" "$PKG/hotpeft/$room"; done
export PYTHONPATH="$PKG:$SITE:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))" | tee "$OUT/device.txt"
if [ "${GPU_CHECK_SMOKE:-0}" = 1 ]; then
  MODEL=synthetic:smollm2-135m; BENCH=(--smoke --device cpu --dtype float32); SHORT=("${BENCH[@]}")
  GRAPHS=off  # on the CPU, on means torch.compile: minutes
else
  MODEL=synthetic:llama-3.1-8b; BENCH=(--duration 40 --rounds 1 --cold 2 --pickups 3 --metrics-adapters 20)
  SHORT=(--duration 15 --rounds 1 --cold 1 --pickups 1 --metrics-adapters 2)
  GRAPHS=on
fi
status=0
timeout 200 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_quantize.py -m cuda -rs 2>&1 \
  | tee "$OUT/cuda-tests.log" || status=1
timeout 200 $PY -m hotpeft.cli bench --model "$MODEL" --home "${GPU_HOME:-.gpu/home}" --quantize none "${BENCH[@]}" \
  --compile "$GRAPHS" --out "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" || status=1
timeout 100 $PY -m hotpeft.cli bench --model "$MODEL" --home "${GPU_HOME:-.gpu/home}" --quantize none "${SHORT[@]}" \
  --compile off --out "$OUT/bench-eager.json" 2>&1 | tee "$OUT/bench-eager.log" || status=1
echo "gpu-check: exit $status; results in $OUT"
exit $status
