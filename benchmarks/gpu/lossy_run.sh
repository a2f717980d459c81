#!/usr/bin/env bash
# Issue 15 lossy modes on one H100 (nvidia-h100-x1, carry .whl, timeout 600): `bash benchmarks/gpu/lossy_run.sh flux|wan`.
# diffusers eager through bench_e2e.py (the baseline, same call), then benchmarks/lossy_sweep.py: the lossless
# diffserve --compile FA3 engine, the same with the step cache at several thresholds, FP8 GEMMs (+ cache), FA3 FP8
# attention, SageAttention; PSNR/SSIM of each against the lossless output, cache-hit fraction, ratios.
# After `flux`, the repo is moved to /tmp/bench-offload/flux so `offload_run.sh flux` on the same warm machine reuses it.
set -uo pipefail
which=${1:-flux}
source benchmarks/gpu/setup.sh
if [ "$which" = flux ]; then
  repo=/tmp/bench-offload/flux; mkdir -p /tmp/bench-offload
  [ -f $repo/model_index.json ] || python3 -m diffserve.testing.fixtures flux-dev $repo --scale full --device cuda --dtype bf16 > /dev/null 2>&1
  timeout 150 python3 benchmarks/bench_e2e.py flux-dev-1024 --repo $repo --out $OUT/base.json --no-roofline \
    --no-sync-count --engines diffusers 2>&1 | rows $which
  timeout 400 python3 benchmarks/lossy_sweep.py flux-dev-1024 --repo $repo --engines ${ENGINES:-plain,cache,fp8,fp8attn,sage} \
    --thresholds ${THR:-0.05,0.1,0.2,0.4} --max-skip ${MAX_SKIP:-3} ${SWEEP_ARGS:-} --baseline $OUT/base.json --out $OUT/flux_sweep.json 2>&1 | rows $which
else
  repo=/tmp/wan13
  [ -f $repo/model_index.json ] || python3 -m diffserve.testing.fixtures wan-t2v $repo --scale full --device cuda --dtype bf16 > /dev/null 2>&1
  timeout 100 python3 benchmarks/bench_e2e.py wan-1.3b-480p --repo $repo --steps 4 --out $OUT/base.json --no-roofline \
    --no-sync-count --engines diffusers 2>&1 | rows $which
  timeout 420 python3 benchmarks/lossy_sweep.py wan-1.3b-480p --repo $repo --engines ${ENGINES:-plain,cache,fp8} --skip-zero-cache \
    --thresholds ${THR:-0.1,0.2} --max-skip ${MAX_SKIP:-3} --baseline $OUT/base.json --out $OUT/wan_sweep.json 2>&1 | rows $which
fi
