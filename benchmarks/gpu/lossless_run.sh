#!/usr/bin/env bash
# Issue 15 lossless targets on one H100, same run as diffusers: `bash benchmarks/gpu/lossless_run.sh flux|wan`
# (one device call each, carry .whl). FA3 runs right after diffusers, then cuDNN, so that the FA3 row can't carry
# memory left by an earlier diffserve engine; each diffserve row reports `resident_before_gib` (memory still
# allocated when it started). Appends rows to BENCHMARKS.md, copied to $OUT.
set -uo pipefail
which=${1:-flux}
source benchmarks/gpu/setup.sh
if [ "$which" = flux ]; then
  python3 -m diffserve.testing.fixtures flux-dev /tmp/flux-dev --scale full --device cuda --dtype bf16 > /dev/null 2>&1
  timeout 560 python3 benchmarks/bench_e2e.py flux-dev-1024 --repo /tmp/flux-dev --out $OUT/flux.json \
    --benchmarks BENCHMARKS.md --engines "diffusers,diffserve+compile[fa3],diffserve+compile[cudnn],diffusers+compile" 2>&1 | rows $which
else
  python3 -m diffserve.testing.fixtures wan-t2v /tmp/wan13 --scale full --device cuda --dtype bf16 > /dev/null 2>&1
  timeout 560 python3 benchmarks/bench_e2e.py wan-1.3b-480p --repo /tmp/wan13 --steps 4 --out $OUT/wan.json \
    --benchmarks BENCHMARKS.md --engines "diffusers,diffserve+compile+vaebf16[fa3],diffserve+compile+vaebf16[cudnn],diffusers+compile" 2>&1 | rows $which
fi
cp BENCHMARKS.md $OUT/
