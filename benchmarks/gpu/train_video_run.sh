#!/usr/bin/env bash
# One device call: train the embedded shapes video model (Wan-architecture VAE + DiT) within MINUTES.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
[ -z "${RESUME:-}" ] && rm -rf /tmp/emb
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/gpu.txt
python3 -m tools.train_embedded.video --out /tmp/emb --minutes ${MINUTES:-9} --device cuda --seed 0 ${RESUME:+--resume} ${INIT:+--init-from $INIT} ${VAE_SECONDS:+--vae-seconds $VAE_SECONDS} \
  --eval-videos ${EVAL:-32} 2>&1 | tee $OUT/train_log.txt | tail -30
cp /tmp/emb/training_info.json $OUT/ 2>/dev/null
ls /tmp/emb
for f in /tmp/emb/samples_*; do [ -f "$f" ] && cp "$f" $OUT/; done
tar czf $OUT/repo.tgz -C /tmp/emb repo && ls -la $OUT
