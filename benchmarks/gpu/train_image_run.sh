#!/usr/bin/env bash
# One device call: train the embedded shapes image model (VAE + FLUX-architecture DiT) within MINUTES.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/gpu.txt
python3 -m tools.train_embedded.image --out /tmp/emb --minutes ${MINUTES:-7} --device cuda --seed 0 \
  --eval-images ${EVAL:-48} 2>&1 | tee $OUT/train_log.txt | tail -25
cp /tmp/emb/training_info.json /tmp/emb/samples_*.png /tmp/emb/samples_*.txt $OUT/ 2>/dev/null
tar czf $OUT/repo.tgz -C /tmp/emb repo && ls -la $OUT
