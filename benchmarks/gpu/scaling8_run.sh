#!/usr/bin/env bash
# Issue #18: scaling on one 8-GPU host (8x H100 or H200), bf16, random weights. One device call (<= 10 min)
# per stage; run them in this order (the chart stage can run after any of them):
#   bash benchmarks/gpu/scaling8_run.sh wan         Wan2.1-T2V-14B 720x1280x81, CFG: 1, CFG2xU4, U8, U4xR2
#   bash benchmarks/gpu/scaling8_run.sh hunyuan-1   HunyuanVideo 720x1280x129: build the repo, 1 GPU
#   bash benchmarks/gpu/scaling8_run.sh hunyuan-8   HunyuanVideo: U8, U4xR2
#   bash benchmarks/gpu/scaling8_run.sh serve-flux  FLUX.1-dev 1024x1024: 1 GPU vs 8 DP replicas behind serve
#   bash benchmarks/gpu/scaling8_run.sh serve-qwen  Qwen-Image 1328x1328, true CFG: 1 GPU vs 8 DP replicas
#   bash benchmarks/gpu/scaling8_run.sh build NAME  only build a full-size repo (NAME: a fixture, e.g. qwen-image)
#   bash benchmarks/gpu/scaling8_run.sh chart       only the chart and the rows below
# Repos, reports and the 1-GPU reference outputs live in $STATE (default /tmp/scaling8) while the machine
# stays warm; a stage on a fresh machine rebuilds the repo it needs (a hunyuan-8 stage then has no 1-GPU
# baseline to compare with: run hunyuan-1 again first). Every stage leaves in $OUT: its log, the reports
# (scaling8.json, serve-*.json), the chart (scaling8.png) and BENCHMARKS.md rows (scaling8.md) of
# everything measured so far.
# Knobs: LAYOUTS (the stage's layouts, ";"-separated), STEPS (timed steps per layout, default 2),
# T (seconds for the stage's benchmark, not counting a repo build, default 540), REQUESTS (burst size; FLUX 16,
# Qwen-Image 8), SERVE_STEPS (FLUX 28, Qwen-Image 8: throughput, not the model's 50 steps, to fit one call).
set -uo pipefail
stage=${1:?usage: scaling8_run.sh wan|hunyuan-1|hunyuan-8|serve-flux|serve-qwen|build NAME|chart}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
STATE=${STATE:-/tmp/scaling8}
OUT=${OUT:-$STATE/out}
mkdir -p "$STATE" "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/gpu.txt"
nvidia-smi topo -m >> "$OUT/gpu.txt" 2>&1

scaling() {  # WORKLOAD REPO LAYOUTS: time the layouts, merge the rows into $STATE/scaling8.json
  timeout "${T:-540}" python3 benchmarks/bench_scaling.py "$1" --repo "$2" --layouts "$3" --steps "${STEPS:-2}" \
    --out "$STATE/scaling8.json" 2>&1 | grep -v -i "warn\|Loading" | tee -a "$OUT/$stage.txt" | tail -25
}

build() {  # FIXTURE: the full-size random-weight repo $STATE/FIXTURE (bf16, built on GPU 0), once
  [ -d "$STATE/$1" ] || python3 -m diffserve.testing.fixtures "$1" "$STATE/$1" --scale full --device cuda \
    --dtype bf16 > "$OUT/build-$1.txt" 2>&1 || { echo "building $1 failed"; tail "$OUT/build-$1.txt"; rm -rf "${STATE:?}/$1"
    return 1; }
}

serve() {  # LABEL FIXTURE SIZE STEPS REQUESTS [ARGS...]: one burst against 1 GPU, then 8 replicas (one at a time)
  local label=$1 fixture=$2 size=$3 steps=$4 requests=$5
  shift 5
  build "$fixture" || return 1
  timeout "${T:-540}" python3 benchmarks/bench_server_batching.py --model "$STATE/$fixture" --device cuda \
    --dtype bf16 --size "$size" --steps "$steps" --requests "$requests" --batch-sizes 8 --dp-sizes 1,8 --repeats 1 \
    --warmup 1 --one-at-a-time --out "$STATE/serve-$label.json" "$@" 2>&1 | grep -v -i warn \
    | tee -a "$OUT/$stage.txt" | tail -12
}

case $stage in
  wan) build wan-t2v-14b && scaling wan-14b-720p "$STATE/wan-t2v-14b" "${LAYOUTS:-1;cfg2xu4;u8;u4xr2}" ;;
  hunyuan-1) build hunyuan-video && scaling hunyuan-720p "$STATE/hunyuan-video" "${LAYOUTS:-1}" ;;
  hunyuan-8) build hunyuan-video && scaling hunyuan-720p "$STATE/hunyuan-video" "${LAYOUTS:-u8;u4xr2}" ;;
  serve-flux) serve flux-dev-1024 flux-dev 1024x1024 "${SERVE_STEPS:-28}" "${REQUESTS:-16}" ;;
  serve-qwen) serve qwen-image-1328 qwen-image 1328x1328 "${SERVE_STEPS:-8}" "${REQUESTS:-8}" --negative-prompt " " ;;
  build) build "${2:?build needs a fixture name}" ;;
  chart) ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac
rc=$?

serve_args=()
for f in "$STATE"/serve-*.json; do
  [ -e "$f" ] && serve_args+=(--serve "$(basename "$f" .json | sed 's/^serve-//')=$f")
done
python3 benchmarks/bench_scaling.py --report "$STATE/scaling8.json" ${serve_args[@]+"${serve_args[@]}"} --chart "$OUT/scaling8.png" \
  --markdown "$OUT/scaling8.md" > /dev/null 2>> "$OUT/$stage.txt" && cat "$OUT/scaling8.md"
cp "$STATE"/*.json "$OUT"/ 2>/dev/null
exit $rc
