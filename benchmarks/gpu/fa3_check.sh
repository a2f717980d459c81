#!/usr/bin/env bash
# FlashAttention 3 behind the attention seam on one Hopper GPU: `bash benchmarks/gpu/fa3_check.sh` (one device
# call, carry .whl holding fa3_fwd-0.0.3-cp39-abi3-manylinux_2_24_x86_64.whl; about 2-3 minutes).
# Writes $OUT/gpu.txt, $OUT/fa3_check.json and $OUT/fa3_check.log; the table is printed last.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-.}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,power.draw,temperature.gpu --format=csv,noheader | tee "$OUT/gpu.txt"
timeout 400 python3 benchmarks/gpu/fa3_check.py --out "$OUT/fa3_check.json" 2>&1 | tee "$OUT/fa3_check.log" | grep -v -i "warn"
