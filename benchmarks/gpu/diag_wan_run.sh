#!/usr/bin/env bash
# One device call: FLUX stage-by-stage parity diagnostics, then Wan2.1-T2V-1.3B benchmark vs diffusers.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/gpu.txt
if [ "${SKIP_FLUX:-0}" != 1 ]; then
  [ -d /tmp/flux-dev ] || python3 -m diffserve.testing.fixtures flux-dev /tmp/flux-dev --scale full --device cuda --dtype bf16 > /dev/null 2>&1
  python3 benchmarks/check_parity_gpu.py --repo /tmp/flux-dev 2>&1 | grep -v -i "warn\|Loading" | tee $OUT/flux_parity.txt | tail -30
  rm -rf /tmp/flux-dev
fi
[ -d /tmp/wan13 ] || python3 -m diffserve.testing.fixtures wan-t2v /tmp/wan13 --scale full --device cuda --dtype bf16 > /dev/null 2>&1
python3 benchmarks/bench_e2e.py wan-1.3b-480p --repo /tmp/wan13 --steps ${WAN_STEPS:-4} --out $OUT/wan.json --profile $OUT/wan_profiles.txt \
  --engines "${ENGINES:-diffserve,diffusers,diffserve+compile}" 2>&1 | grep -v -i "warn\|Loading" | tee $OUT/wan_bench.txt | tail -40
