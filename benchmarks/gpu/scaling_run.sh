#!/usr/bin/env bash
# One device call on a 4-GPU host: NCCL smoke test, then scaling of Wan2.1-T2V-14B 720p (and more if time allows).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/gpu.txt
nvidia-smi topo -m >> $OUT/gpu.txt 2>&1
# 1. smoke: tiny Wan on 2 GPUs (U2, CFG2) equals 1 GPU in fp32
timeout 150 python3 benchmarks/smoke_parallel_gpu.py 2>&1 | grep -v -i warn | tee $OUT/smoke.txt
grep -q "SMOKE OK" $OUT/smoke.txt || exit 1
timeout ${T14:-420} python3 benchmarks/bench_scaling.py wan-14b-720p --repo /tmp/wan14 --layouts "${L14:-1;cfg2;cfg2xu2}" \
  --steps 2 --out $OUT/scaling.json --chart $OUT/scaling.png 2>&1 | grep -v -i "warn\|Loading" | tee $OUT/scaling14.txt | tail -20
