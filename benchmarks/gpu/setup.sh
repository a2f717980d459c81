# Sourced by the device-call scripts: installs the carried wheels (.whl) into /tmp/site, puts them and the tree on
# PYTHONPATH, records the card in $OUT/gpu.txt, and defines `rows LOGNAME`, a filter that keeps a run's JSON rows,
# summary lines and errors on the console and the whole output in $OUT/LOGNAME.log.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/gpu.txt
rows() { grep -v -i "warn\|Loading\|USDT\|deprecat" | tee -a "$OUT/$1.log" | grep '^{"engine"\|failed\|Error\|error\|^[a-z0-9 .-]\{6,\}' ; }
