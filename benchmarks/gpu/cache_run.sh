#!/usr/bin/env bash
# Issue 15 item 3a on one H100: the step cache (first-block residual cache), speed and fidelity, same run as
# diffusers eager and the lossless diffserve path.
#   bash benchmarks/gpu/cache_run.sh flux       # FLUX.1-dev 1024^2, 28 steps, every engine at the full schedule:
#                                               # diffusers, diffserve+compile[fa3] (lossless reference), and
#                                               # +fbcache at two thresholds (~8 min with the repo build)
#   bash benchmarks/gpu/cache_run.sh wan        # Wan2.1-1.3B 480p x 81 frames: diffusers eager timed on 10 steps
#                                               # (e2e extrapolated to 50: its step time is constant), then the
#                                               # lossless diffserve+compile+vaebf16[fa3] at the full 50 steps
#                                               # (the fidelity reference) (~8 min with the repo build)
#   bash benchmarks/gpu/cache_run.sh wan-cache  # same warm machine, after wan: the two cache engines at the full
#                                               # 50 steps, merged into wan's report, PSNR/SSIM vs the lossless
#                                               # 50-step output (~5 min)
# One device call each (kind nvidia-h100-x1, timeout 600, carry .whl: fa3_fwd, diffusers). A cached engine's
# step time and output depend on the whole schedule (which steps reuse the cache), so cache engines and their
# reference always run the full step count; only diffusers eager is timed on fewer Wan steps.
# Thresholds: CACHE_THRESHOLDS="0.12 0.2" (default: the recommended one and a faster one; warm-up 2 steps, at most
# 3 cached steps in a row, the StepCacheConfig defaults). Each call prints the bench table last: s/step, e2e,
# speed-up vs diffusers, and per engine PSNR/SSIM against the lossless output with its cache-hit fraction.
# Reports and logs go to $OUT.
set -uo pipefail
which=${1:-flux}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/cache_out}
mkdir -p "$OUT" /tmp/cache_reports
read -r -a thresholds <<< "${CACHE_THRESHOLDS:-0.12 0.2}"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,power.draw,temperature.gpu --format=csv,noheader | tee "$OUT/gpu.txt"
filter() { grep -v -i "warn\|Loading\|USDT\|deprecat" | tee -a "$OUT/$which.log" | grep '^{"engine"\|failed\|Error\|error\|stopped' ; }
bench() {  # bench TIMEOUT WORKLOAD REPO REPORT OUTPUTS REFERENCE ENGINES [extra args...]
  local limit=$1 workload=$2 repo=$3 report=$4 outs=$5 ref=$6 engines=$7; shift 7
  timeout -k 10 "$limit" python3 benchmarks/bench_e2e.py "$workload" --repo "$repo" --out "$report" \
    --outputs "$outs" --reference "$ref" --no-roofline --no-sync-count --engines "$engines" "$@" 2>&1 | filter
}
summary() {  # summary REPORT: the bench table (speed, fidelity, cache hits) and the cache settings
  python3 - "$1" <<'EOF' | tee "$OUT/${which}_summary.txt"
import json, sys
from benchmarks.bench_e2e import parse_engine, step_cache_config, table
report = json.load(open(sys.argv[1]))
print(table(report))
for r in report["runs"]:
    spec = parse_engine(r["engine"])
    if spec.cache is not None:
        print(f"{r['engine']}: {step_cache_config(spec).label()}, {r['steps']} steps timed, "
              f"cache hits {r['stages'].get('cache_hit_fraction')}")
EOF
  cp "$1" "$OUT/"
}
cached() {  # cached BASE BACKEND: the cache engines' names for every threshold, comma-separated
  local names=() t
  for t in "${thresholds[@]}"; do names+=("$1+fbcache$t[$2]"); done
  (IFS=,; echo "${names[*]}")
}
case "$which" in
  flux)
    [ -d /tmp/flux-dev ] || python3 -m diffserve.testing.fixtures flux-dev /tmp/flux-dev --scale full --device cuda \
      --dtype bf16 > /dev/null 2>&1
    REF="diffserve+compile[fa3]"
    rm -rf /tmp/cache_outs/flux /tmp/cache_reports/flux_cache.json
    bench 540 flux-dev-1024 /tmp/flux-dev /tmp/cache_reports/flux_cache.json /tmp/cache_outs/flux "$REF" \
      "diffusers,$REF,$(cached diffserve+compile fa3)"
    summary /tmp/cache_reports/flux_cache.json
    ;;
  wan)
    [ -d /tmp/wan13 ] || python3 -m diffserve.testing.fixtures wan-t2v /tmp/wan13 --scale full --device cuda \
      --dtype bf16 > /dev/null 2>&1
    REF="diffserve+compile+vaebf16[fa3]"
    rm -rf /tmp/cache_outs/wan /tmp/cache_reports/wan_cache.json
    bench 200 wan-1.3b-480p /tmp/wan13 /tmp/cache_reports/wan_cache.json /tmp/cache_outs/wan "$REF" "diffusers" \
      --steps 10
    bench 330 wan-1.3b-480p /tmp/wan13 /tmp/cache_reports/wan_cache.json /tmp/cache_outs/wan "$REF" "$REF" \
      --steps 50 --merge
    summary /tmp/cache_reports/wan_cache.json
    ;;
  wan-cache)
    [ -f /tmp/cache_reports/wan_cache.json ] || { echo "run 'cache_run.sh wan' first on this machine" >&2; exit 2; }
    REF="diffserve+compile+vaebf16[fa3]"
    bench 540 wan-1.3b-480p /tmp/wan13 /tmp/cache_reports/wan_cache.json /tmp/cache_outs/wan "$REF" \
      "$(cached diffserve+compile+vaebf16 fa3)" --steps 50 --merge
    summary /tmp/cache_reports/wan_cache.json
    ;;
  *)
    echo "usage: bash benchmarks/gpu/cache_run.sh flux|wan|wan-cache" >&2; exit 2 ;;
esac
