#!/usr/bin/env bash
# Issue 15 lossless targets on one H100, same run as diffusers: `bash benchmarks/gpu/lossless_run.sh flux|wan|wan14`
# (one device call each, carry .whl). wan14 (Wan2.1-T2V-14B 720x1280x81, 1 step timed, ~7 min) reuses the repo
# that `offload_run.sh wan` left on a warm machine (/tmp/bench-offload/wan, UMT5 at 3 layers) or builds one there;
# the shallow text encoder shortens both engines' text encoding equally (the per-step ratio is unaffected). FA3 runs right after diffusers, then cuDNN, so that the FA3 row can't carry
# memory left by an earlier diffserve engine; each diffserve row reports `resident_before_gib` (memory still
# allocated when it started). Appends rows to BENCHMARKS.md, copied to $OUT.
set -uo pipefail
which=${1:-flux}
source benchmarks/gpu/setup.sh
if [ "$which" = flux ]; then
  python3 -m diffserve.testing.fixtures flux-dev /tmp/flux-dev --scale full --device cuda --dtype bf16 > /dev/null 2>&1
  timeout 560 python3 benchmarks/bench_e2e.py flux-dev-1024 --repo /tmp/flux-dev --out $OUT/flux.json \
    --benchmarks BENCHMARKS.md --engines "diffusers,diffserve+compile[fa3],diffserve+compile[cudnn],diffusers+compile" 2>&1 | rows $which
elif [ "$which" = wan14 ]; then
  repo=/tmp/bench-offload/wan
  [ -f $repo/model_index.json ] || { rm -rf /tmp/flux-dev /tmp/wan13 /tmp/bench-offload/flux; repo=/tmp/wan14; }
  python3 benchmarks/bench_e2e.py wan-14b-720p --repo $repo --text-layers 3 --build-only > /dev/null 2>&1
  timeout 570 python3 benchmarks/bench_e2e.py wan-14b-720p --repo $repo --steps 1 --no-roofline --out $OUT/wan14.json \
    --benchmarks BENCHMARKS.md --engines "diffusers,diffserve+compile+vaebf16[fa3]" 2>&1 | rows $which
else
  python3 -m diffserve.testing.fixtures wan-t2v /tmp/wan13 --scale full --device cuda --dtype bf16 > /dev/null 2>&1
  timeout 560 python3 benchmarks/bench_e2e.py wan-1.3b-480p --repo /tmp/wan13 --steps 4 --out $OUT/wan.json \
    --benchmarks BENCHMARKS.md --engines "diffusers,diffserve+compile+vaebf16[fa3],diffserve+compile+vaebf16[cudnn],diffusers+compile" 2>&1 | rows $which
fi
cp BENCHMARKS.md $OUT/
