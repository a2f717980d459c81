#!/usr/bin/env bash
# Qwen-Image / Qwen-Image-Edit end to end on one GPU (80 GB H100 or H200, 64 GiB disk), one device call each
# (carry .whl: the diffusers, importlib_metadata and fa3_fwd wheels; timeout_s 600):
#   bash benchmarks/gpu/qwen_run.sh qwen-image   Qwen-Image 1328x1328, 50 steps, true CFG 4.0, negative prompt " "
#   bash benchmarks/gpu/qwen_run.sh qwen-edit    Qwen-Image-Edit 1024x1024 from one 1024x1024 input image, same
# Engines, in this order (ENGINES overrides): diffusers 0.42.1 eager; diffserve --compile on the cuDNN and on the
# FA3 attention kernel; diffusers with its repeated blocks compiled (`compile_repeated_blocks(fullgraph=True)`,
# diffusers' regional compilation, as diffserve's); diffusers + torch.compile(transformer, fullgraph=True) last,
# its compile (two text lengths: prompt and negative prompt) being the longest. STEPS (default 10) steps are
# timed after a warm-up at the full shape (compilation is never timed); end to end = fixed (text encoding, VAE,
# the rest, measured) + 50 x the per-step time. The harness stops at 540 s (SIGTERM): the engines finished by
# then are reported, the one cut off is named in the report's notes; run it alone in a second call while the
# machine is warm (ENGINES=diffusers+compile bash ...: the repo and the report are kept in $STATE and merged).
#
# Fairness (stated again in the JSON: "fairness", "transformer_inputs_first_step", "text_tokens_per_call"):
# - Same weights: one random-weight repo built from the real configs (bf16, seed 0) on this GPU, written once to
#   /tmp; every engine loads that same folder through its own loader (diffusers: DiffusionPipeline.from_pretrained;
#   diffserve: Engine, as `diffserve generate --model-path` does).
# - The Qwen2.5-VL text encoder is written with TEXT_LAYERS (default 4) of its 28 decoder layers: real widths,
#   vocabulary, vision tower and output (the transformer gets the same inputs). The full repo (~58 GB:
#   transformer 41 GB + text encoder 16.6 GB) does not fit the 64 GiB disk beside the system, and writing and
#   loading it five times would not fit 10 minutes. Both engines run the same shallow encoder, so text
#   encoding (part of the fixed cost) is cheaper than the real model's by the same amount for both: the 24
#   missing layers (5.6 B parameters) would add roughly 10 ms per image for T2I (prompt and negative prompt,
#   ~30 tokens each) and some 50 ms for the edit (~1,400 tokens with the image's vision tokens), an estimate
#   from their size, against ~30 s of denoising; each reported peak is lower than a real run's by the weights
#   not built ("fairness.text_encoders.text_encoder.gib_not_built", ~10.4 GiB). TEXT_LAYERS=0: real depth.
# - Same prompt, negative prompt " ", input image (deterministic, 1024x1024), seed 0, size, bf16 everywhere
#   (text encoder and VAE included), same timed steps and warm-up; the text lengths each transformer call got are
#   in the report (the same for every engine).
# Expected time (one H100; estimates, not measured): build ~60-80 s; diffusers eager ~60 s; each diffserve
# --compile ~70-90 s; diffusers regional ~80 s; diffusers + torch.compile 150-300 s (hence last).
# Out: $OUT/<which>.json (report), <which>_bench.txt (log), gpu.txt, BENCHMARKS.md with the new harness rows
# (apply them to the repo's copy); the table comes last.
set -uo pipefail
which=${1:-qwen-image}
qwen_engines="diffusers,diffserve+compile[cudnn],diffserve+compile[fa3],diffusers+regional,diffusers+compile"
sync_arg=()
case $which in
  qwen-image) workload=qwen-image-1328 fixture=qwen-image steps=10 engines=$qwen_engines ;;
  qwen-edit) workload=qwen-edit-1024 fixture=qwen-image-edit steps=10 engines=$qwen_engines ;;
  # HunyuanVideo (benchmarks/gpu/hunyuan_run.sh says what it measures): one timed step, no sync count
  hunyuan) workload=hunyuan-720p fixture=hunyuan-video steps=1 sync_arg=(--no-sync-count)
           engines="diffusers,diffserve+compile[cudnn],diffserve+compile[fa3]" ;;
  *) echo "usage: qwen_run.sh qwen-image|qwen-edit|hunyuan"; exit 2 ;;
esac
workload=${WORKLOAD:-$workload}  # a CPU dry run: WORKLOAD=tiny-qwen DEVICE=cpu DTYPE=fp32 ENGINES=diffserve,diffusers
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
STATE=${STATE:-/tmp/bench-$which}
OUT=${OUT:-$STATE/out}
mkdir -p "$STATE" "$OUT"
# the disk holds one of these repos at a time: drop the other workloads' (a later call rebuilds them)
for d in /tmp/bench-*; do
  [ "$d" = "$STATE" ] || rm -rf "$d"/qwen-image "$d"/qwen-image-edit "$d"/hunyuan-video "$d"/*.partial "$d"/outputs
done
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
df -h /tmp | tail -1 | tee -a "$OUT/gpu.txt"
layers=${TEXT_LAYERS:-4}
[ "$layers" = 0 ] && layers_arg=() || layers_arg=(--text-layers "$layers")
timeout -k 30 "${T:-540}" python3 benchmarks/bench_e2e.py "$workload" --repo "$STATE/$fixture" "${layers_arg[@]}" \
  --steps "${STEPS:-$steps}" --device "${DEVICE:-cuda}" --dtype "${DTYPE:-bf16}" "${sync_arg[@]}" ${EXTRA:-} \
  --engines "${ENGINES:-$engines}" \
  --out "$STATE/$which.json" --outputs "$STATE/outputs" --merge --benchmarks BENCHMARKS.md 2>&1 \
  | grep -v -i "warn\|Loading\|USDT\|deprecat\|rope_parameters\|rope_scaling" | tee "$OUT/${which}_bench.txt" \
  | grep -E '^\{"engine|^built|failed|stopped|not counted'
rc=${PIPESTATUS[0]}
df -h /tmp | tail -1 >> "$OUT/gpu.txt"
cp "$STATE/$which.json" "$OUT/" 2>/dev/null
cp BENCHMARKS.md "$OUT/"
python3 -c "import json, sys; from benchmarks.bench_e2e import table; print(table(json.load(open(sys.argv[1]))))" \
  "$STATE/$which.json"
exit "$rc"
