#!/usr/bin/env bash
# Scaling of Qwen-Image and HunyuanVideo on one 4-GPU host (4x H100 or H200; kind nvidia-h100-x4), bf16, random
# weights, diffserve eager (no --compile, as the earlier scaling rows). One device call (<= 10 min, timeout_s 600,
# carry .whl) per stage, in this order (the chart stage can run after any of them):
#   bash benchmarks/gpu/scaling4_qwen_hunyuan.sh qwen      Qwen-Image 1328x1328, 50 steps, true CFG 4.0 (negative
#                                                           prompt " "): 1 GPU, CFG2 x U2, U4
#   bash benchmarks/gpu/scaling4_qwen_hunyuan.sh hunyuan   HunyuanVideo 720x1280x129, 50 steps, embedded guidance
#                                                           6.0: 1 GPU, U4, U2 x R2
#   bash benchmarks/gpu/scaling4_qwen_hunyuan.sh chart     only the chart and the rows of what was measured
# Each layout (benchmarks/bench_scaling.py) starts its own worker processes (NCCL), warms up (Qwen-Image: 2 steps
# at the full size; HunyuanVideo: a 5-frame clip, 1 step), times STEPS steps of the full workload (per step and
# fixed costs; end to end = fixed + 50 x per step) and compares its output with the 1-GPU one (mean |diff| /255).
# Speed-ups and efficiencies (speed-up / GPUs) per step and end to end are against the "1" row of the same call.
# Fairness: every layout loads the same repo (random weights from the real configs, bf16, seed 0) and runs the
# same prompt, seed, size, steps and dtype; the only change is the layout. The big text encoder (Qwen2.5-VL,
# LLaMA) is built with TEXT_LAYERS (default 4) decoder layers, as in qwen_run.sh / hunyuan_run.sh (real widths
# and outputs; it shortens every layout's loading and its text encoding equally). TEXT_LAYERS=0: real depth.
# Repos, the report and the 1-GPU reference outputs live in $STATE (default /tmp/scaling4) while the machine
# stays warm; a stage on a fresh machine rebuilds its repo (and re-runs the 1-GPU baseline: it is in LAYOUTS).
# Knobs: LAYOUTS (";"-separated), STEPS (timed steps per layout; Qwen-Image 4, HunyuanVideo 2), T (seconds for
# the stage's benchmark, after the repo build; default 540 minus the build time, at least 300).
# Out: $OUT/<stage>.txt (log), scaling4.json (rows so far), scaling4.png (chart), scaling4.md (BENCHMARKS.md rows),
# gpu.txt (cards, topology); the rows come last.
# Expected time (estimates, not measured): qwen ~4-5 min (build ~70 s, ~40-70 s per layout: 4 ranks each load
# the ~47 GB repo); hunyuan ~6 min (build ~45 s, 1 GPU ~2 min at ~30 s/step, ~1.5 min per 4-GPU layout).
set -uo pipefail
stage=${1:?usage: scaling4_qwen_hunyuan.sh qwen|hunyuan|chart}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
STATE=${STATE:-/tmp/scaling4}
OUT=${OUT:-$STATE/out}
mkdir -p "$STATE" "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/gpu.txt"
nvidia-smi topo -m >> "$OUT/gpu.txt" 2>&1
start=$SECONDS

build() {  # WORKLOAD FIXTURE: the full-size repo $STATE/FIXTURE (bf16, built on GPU 0), once
  local layers=${TEXT_LAYERS:-4} args=()
  [ "$layers" = 0 ] || args=(--text-layers "$layers")
  [ -d "$STATE/$2" ] && return 0
  python3 benchmarks/bench_e2e.py "$1" --repo "$STATE/$2" "${args[@]}" --build-only --device "${DEVICE:-cuda}" \
    --dtype "${DTYPE:-bf16}" > "$OUT/build-$2.txt" 2>&1 \
    || { echo "building $2 failed"; tail "$OUT/build-$2.txt"; rm -rf "${STATE:?}/$2"; return 1; }
  grep "^built" "$OUT/build-$2.txt"
}

scaling() {  # WORKLOAD FIXTURE LAYOUTS STEPS: time the layouts, merge the rows into $STATE/scaling4.json
  local left=$((540 - (SECONDS - start)))
  [ "$left" -lt 300 ] && left=300
  timeout -k 20 "${T:-$left}" python3 benchmarks/bench_scaling.py "$1" --repo "$STATE/$2" --layouts "$3" \
    --steps "$4" --device "${DEVICE:-cuda}" --dtype "${DTYPE:-bf16}" --out "$STATE/scaling4.json" 2>&1 \
    | grep -v -i "warn\|Loading\|deprecat\|rope_parameters\|rope_scaling" | tee -a "$OUT/$stage.txt" \
    | grep -E '^\{"layout'
}

case $stage in
  qwen) build "${WORKLOAD:-qwen-image-1328}" qwen-image \
          && scaling "${WORKLOAD:-qwen-image-1328}" qwen-image "${LAYOUTS:-1;cfg2xu2;u4}" "${STEPS:-4}" ;;
  hunyuan) build "${WORKLOAD:-hunyuan-720p}" hunyuan-video \
             && scaling "${WORKLOAD:-hunyuan-720p}" hunyuan-video "${LAYOUTS:-1;u4;u2xr2}" "${STEPS:-2}" ;;
  chart) ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac
rc=$?
cp "$STATE/scaling4.json" "$OUT/" 2>/dev/null
python3 benchmarks/bench_scaling.py --report "$STATE/scaling4.json" --chart "$OUT/scaling4.png" > /dev/null \
  2>> "$OUT/$stage.txt" || echo "no chart (no multi-GPU row with a 1-GPU baseline yet)"
python3 benchmarks/bench_scaling.py --report "$STATE/scaling4.json" --markdown "$OUT/scaling4.md" > /dev/null \
  2>> "$OUT/$stage.txt" && cat "$OUT/scaling4.md"
exit $rc
