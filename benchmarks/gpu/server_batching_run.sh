#!/usr/bin/env bash
# One device call: server batching throughput with full-size FLUX.1-dev (random weights) on one GPU.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/gpu.txt
[ -d /tmp/flux-dev ] || python3 -m diffserve.testing.fixtures flux-dev /tmp/flux-dev --scale full --device cuda --dtype bf16 > /dev/null 2>&1
timeout 250 python3 benchmarks/bench_server_batching.py --model /tmp/flux-dev --device cuda --dtype bf16 --size 512x512 \
  --steps 8 --requests 16 --batch-sizes 1,4 --repeats 2 --out $OUT/batching_512.json 2>&1 | grep -v -i warn | tail -12
timeout 200 python3 benchmarks/bench_server_batching.py --model /tmp/flux-dev --device cuda --dtype bf16 --size 1024x1024 \
  --steps 8 --requests 8 --batch-sizes 1,4 --repeats 1 --out $OUT/batching_1024.json 2>&1 | grep -v -i warn | tail -12
