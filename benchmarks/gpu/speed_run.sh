#!/usr/bin/env bash
# One device call: FLUX and Wan 1.3B, diffserve speed variants vs diffusers in the same run.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/gpu.txt
[ -d /tmp/flux-dev ] || python3 -m diffserve.testing.fixtures flux-dev /tmp/flux-dev --scale full --device cuda --dtype bf16 > /dev/null 2>&1
timeout 330 python3 benchmarks/bench_e2e.py flux-dev-1024 --repo /tmp/flux-dev --out $OUT/flux.json --profile $OUT/profiles.txt --benchmarks BENCHMARKS.md \
  --engines "diffserve,diffusers,diffserve+compile,diffserve+compile+fuse" 2>&1 | grep -v -i "warn\|Loading" | tee $OUT/flux_bench.txt | tail -28
rm -rf /tmp/flux-dev
[ -d /tmp/wan13 ] || python3 -m diffserve.testing.fixtures wan-t2v /tmp/wan13 --scale full --device cuda --dtype bf16 > /dev/null 2>&1
timeout 240 python3 benchmarks/bench_e2e.py wan-1.3b-480p --repo /tmp/wan13 --steps 4 --out $OUT/wan.json --benchmarks BENCHMARKS.md \
  --engines "diffserve,diffusers,diffserve+compile+vaebf16" 2>&1 | grep -v -i "warn\|Loading" | tee $OUT/wan_bench.txt | tail -28
cp BENCHMARKS.md $OUT/  # with the rows the harness appended (apply them to the repo's copy)
