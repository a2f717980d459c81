#!/usr/bin/env bash
# Before/after on one GPU in one call: the tree in .snap (new) against the tree in .old (an earlier commit),
# each imported from its own folder, on the same full-size random weights. `wan` or `flux`.
#   new: git archive HEAD | tar -x -C .snap;  old: git archive <commit> | tar -x -C .old  (both carried)
set -uo pipefail
which=${1:-wan}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .snap/.whl/*.whl || exit 1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
root=$PWD
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/gpu.txt
bench() {  # bench TREE OUTNAME TIMEOUT ARGS...
  local tree=$1 name=$2 limit=$3; shift 3
  (cd $root/$tree && PYTHONPATH=/tmp/site:$root/$tree timeout $limit python3 benchmarks/bench_e2e.py "$@" \
     --out $OUT/$name.json 2>&1 | grep -v -i "warn\|Loading\|USDT\|deprecat" | grep '^{"engine"' | tee -a $OUT/rows.txt)
}
if [ "$which" = wan ]; then
  (cd .snap && PYTHONPATH=/tmp/site:$root/.snap python3 -m diffserve.testing.fixtures wan-t2v /tmp/wan13 --scale full --device cuda --dtype bf16 > /dev/null 2>&1)
  bench .snap wan_new 330 wan-1.3b-480p --repo /tmp/wan13 --steps 4 \
    --engines "diffusers,diffserve+compile+vaebf16[cudnn],diffserve+compile+vaebf16[fa3]"
  bench .old wan_old 150 wan-1.3b-480p --repo /tmp/wan13 --steps 4 --engines "diffserve+compile+vaebf16[cudnn]"
else
  (cd .snap && PYTHONPATH=/tmp/site:$root/.snap python3 -m diffserve.testing.fixtures flux-dev /tmp/flux-dev --scale full --device cuda --dtype bf16 > /dev/null 2>&1)
  bench .snap flux_new 240 flux-dev-1024 --repo /tmp/flux-dev --engines "diffusers,diffserve+compile[cudnn],diffserve+compile[fa3]"
  bench .old flux_old 120 flux-dev-1024 --repo /tmp/flux-dev --engines "diffserve+compile[cudnn]"
fi
python3 - <<'PY'
import json, os
for line in open(os.path.join(os.environ["OUT"], "rows.txt")):
    r = json.loads(line)
    print(f'{r["engine"]:32s} step {r["per_step_s"]*1000:8.1f} ms  total {r["total_s"]:7.2f} s  peak {r["peak_gib"]:5.1f} GiB')
PY
