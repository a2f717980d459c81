#!/usr/bin/env bash
# One device call: FLUX.1-dev full size, random weights, bf16. CLI run + same-run benchmark vs diffusers.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/gpu.txt
python3 -c "import torch, diffusers, transformers; print(torch.__version__, diffusers.__version__, transformers.__version__)" | tee -a $OUT/gpu.txt
REPO=/tmp/flux-dev
[ -d $REPO ] || { /usr/bin/time -v python3 -m diffserve.testing.fixtures flux-dev $REPO --scale full --device cuda --dtype bf16 2>&1 | tail -25 >> $OUT/gpu.txt; }
du -sh $REPO | tee -a $OUT/gpu.txt
python3 -m diffserve.cli generate --model-path $REPO --prompt "a red fox jumping over a frozen river" --seed 0 \
  --output-dir $OUT 2>&1 | tr '\r' '\n' | grep -v "^denoising:  *[0-9]" | tail -8 | tee $OUT/cli.txt
python3 benchmarks/bench_e2e.py flux-dev-1024 --repo $REPO --out $OUT/flux.json --profile $OUT/profiles.txt \
  --engines "${ENGINES:-diffserve,diffusers,diffserve+compile,diffusers+compile}" 2>&1 | grep -v Warning | tee $OUT/bench.txt | tail -60
