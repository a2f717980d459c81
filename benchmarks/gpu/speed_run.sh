#!/usr/bin/env bash
# The harness on one GPU: `bash benchmarks/gpu/speed_run.sh flux|wan` (one device call each; both fit in 10 min).
# diffserve unoptimised (+nofuse), default (fused kernels), compiled, and diffusers eager / compiled, same run,
# same weights; appends rows to BENCHMARKS.md (copied to $OUT: apply the new rows to the repo's copy).
set -uo pipefail
which=${1:-flux}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/gpu.txt
if [ "$which" = flux ]; then
  [ -d /tmp/flux-dev ] || python3 -m diffserve.testing.fixtures flux-dev /tmp/flux-dev --scale full --device cuda --dtype bf16 > /dev/null 2>&1
  timeout 540 python3 benchmarks/bench_e2e.py flux-dev-1024 --repo /tmp/flux-dev --out $OUT/flux.json --profile $OUT/flux_profiles.txt \
    --benchmarks BENCHMARKS.md --engines "diffserve+nofuse,diffserve,diffusers,diffserve+compile,diffusers+compile" 2>&1 \
    | grep -v -i "warn\|Loading\|USDT" | tee $OUT/flux_bench.txt | tail -40
else
  [ -d /tmp/wan13 ] || python3 -m diffserve.testing.fixtures wan-t2v /tmp/wan13 --scale full --device cuda --dtype bf16 > /dev/null 2>&1
  timeout 540 python3 benchmarks/bench_e2e.py wan-1.3b-480p --repo /tmp/wan13 --steps 4 --out $OUT/wan.json --benchmarks BENCHMARKS.md \
    --engines "diffserve+nofuse,diffserve,diffusers,diffserve+compile+vaebf16" 2>&1 \
    | grep -v -i "warn\|Loading\|USDT" | tee $OUT/wan_bench.txt | tail -40
fi
cp BENCHMARKS.md $OUT/
