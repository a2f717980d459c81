#!/usr/bin/env bash
# Running big models on small cards (issue 16 item 2): peak GPU memory and time, all on the GPU vs diffserve
# --max-gpu-memory 24 vs diffusers' enable_model_cpu_offload / enable_sequential_cpu_offload, on full-size
# random-weight repos (bf16), one H100 (nvidia-h100-x1), one device call per part (timeout_s 600 each):
#   bash benchmarks/gpu/offload_run.sh flux            # FLUX.1-dev 1024x1024: all four variants (~5-6 min)
#   bash benchmarks/gpu/offload_run.sh wan             # Wan2.1-T2V-14B 720x1280x81: diffserve gpu + budget (~8 min);
#                                                      # VARIANTS=budget,budget-compile(,sequential) for the compiled run
#   bash benchmarks/gpu/offload_run.sh wan-diffusers   # the same repo (same warm machine): diffusers model +
#                                                      # sequential offload (~6 min)
# VARIANTS=gpu,budget,model,sequential overrides a part's variants (e.g. to finish one a part ran out of time
# for); rows are merged into $STATE/<model>.json across calls, and the table printed at the end holds them all.
#
# What is measured (benchmarks/bench_offload.py): each variant loads the repo itself, then one generation of
# STEPS steps (FLUX 8, Wan 2; diffusers' sequential offload: FLUX 2, Wan 2 steps: it is slow), timed per step
# with a CUDA sync at each step's end and end to end; peak = torch.cuda.max_memory_allocated / reserved over
# that generation. "e2e_full_s" extrapolates to the model's 28 (FLUX) / 50 (Wan) steps: measured fixed part
# (text encoding, decode, ...) + full steps x per-step time. FLUX warms up 1 step untimed (diffusers sequential:
# none); Wan has no warm-up, its first step is left out of the per-step time instead.
# Same repo, prompt, seed, size for every variant. diffusers' VAE decodes tiled (enable_tiling(), as it must on a
# small card); diffserve tiles when its decode estimate does not fit the free memory (reported: vae_tiled).
# Wan's UMT5 text encoder is built with TEXT_LAYERS (default 3) of its 24 layers (the build and loads fit the
# 10 minutes; every variant runs the same shallow encoder, so its offload costs less than at real depth: the
# real encoder is ~10 GiB more, which diffserve's planner would offload to the host, one copy per generation).
# FLUX is built at real depth (T5-XXL included: it is what forces offloading at 24 GiB).
# Target (issue 16): at <= 24 GiB peak, diffserve at least 2x faster than diffusers' sequential offload; the
# all-on-GPU row gives the time cost of fitting.
# Out: $OUT/<model>.json (rows), <model>_offload.txt (log); the summary table comes last.
set -uo pipefail
part=${1:-flux}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
STATE=${STATE:-/tmp/bench-offload}
mkdir -p "$STATE" "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
free -g | head -2 >> "$OUT/gpu.txt"
case "$part" in
  flux) model=flux; workload=flux-dev-1024; steps=${STEPS:-8}; seq=${SEQ_STEPS:-2}
        variants=${VARIANTS:-gpu,budget,model,sequential}; layers=() ;;
  wan) model=wan; workload=wan-14b-720p; steps=${STEPS:-2}; seq=${SEQ_STEPS:-2}
       variants=${VARIANTS:-gpu,budget}; layers=(--text-layers "${TEXT_LAYERS:-3}") ;;
  wan-diffusers) model=wan; workload=wan-14b-720p; steps=${STEPS:-2}; seq=${SEQ_STEPS:-2}
       variants=${VARIANTS:-model,sequential}; layers=(--text-layers "${TEXT_LAYERS:-3}") ;;
  *) echo "part must be flux, wan or wan-diffusers" >&2; exit 2 ;;
esac
# the disk (64 GiB) holds one full-size repo at a time: drop the other model's and other benchmarks' repos
for d in /tmp/bench-*/*/; do
  [ "$d" = "$STATE/$model/" ] || { [ -f "$d/model_index.json" ] && rm -rf "$d"; }
done
rm -rf /tmp/flux-dev /tmp/wan14 "$STATE"/*.partial
df -h /tmp | tail -1 | tee -a "$OUT/gpu.txt"
timeout -k 30 "${T:-570}" python3 benchmarks/bench_offload.py "$workload" --repo "$STATE/$model" "${layers[@]}" \
  --variants "$variants" --steps "$steps" --sequential-steps "$seq" --budget "${BUDGET:-24}" \
  --out "$STATE/$model.json" 2>&1 | grep -v -i "warn\|Loading\|deprecat" | tee "$OUT/${model}_offload.txt"
rc=${PIPESTATUS[0]}
cp "$STATE/$model.json" "$OUT/" 2>/dev/null
exit "$rc"
