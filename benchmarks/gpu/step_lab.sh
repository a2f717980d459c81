#!/usr/bin/env bash
# One device call: one denoising step of FLUX.1-dev 1024² and Wan2.1-1.3B 480p, transformer only, variant by
# variant (time, output vs the plain path, per-kernel breakdown). Results: $OUT/<workload>.json, -kernels.txt.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader | tee $OUT/gpu.txt
# SM clock, power and temperature every 200 ms while the variants run (is the card power-limited under load?)
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active \
  --format=csv,noheader -lms 200 > $OUT/clocks.csv 2>&1 &
SMI=$!
FLUX_VARIANTS=${FLUX_VARIANTS-eager,compile+epilogue+oldrope,compile+epilogue,compile+epilogue+fuse,compile+fuse,diffusers+compile}
WAN_VARIANTS=${WAN_VARIANTS-eager,compile+epilogue+oldrope,compile+epilogue,compile+epilogue+fuse}
[ -n "$FLUX_VARIANTS" ] && timeout 330 python3 benchmarks/profile_step.py flux-dev-1024 --variants "$FLUX_VARIANTS" --epilogue-check --out $OUT 2>&1 \
  | grep -v -i "warn\|USDT" | tee $OUT/flux_log.txt
[ -n "$WAN_VARIANTS" ] && timeout 280 python3 benchmarks/profile_step.py wan-1.3b-480p --variants "$WAN_VARIANTS" --iters 3 --out $OUT 2>&1 \
  | grep -v -i "warn\|USDT" | tee $OUT/wan_log.txt
kill $SMI
