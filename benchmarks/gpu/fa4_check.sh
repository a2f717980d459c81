#!/usr/bin/env bash
# flash-attn-4 (CuTe DSL) vs FA3 vs cuDNN at the models' attention shapes, one Hopper GPU.
# Its nvidia-cutlass-dsl-libs-cu13 wheel (92 MB) and the rest do not fit one call's 64 MiB carry beside the
# tree, so the wheels travel in pieces over several calls to one warm machine (`fa4_check.sh stage DIR`
# copies DIR's files to /tmp/fa4-wheels; `fa4_check.sh run` joins the split wheel, installs, measures).
# Pieces: split -b with names nvidia_cutlass_dsl_libs_cu13-...whl.part-aa, -ab, ... (joined in name order).
set -uo pipefail
mkdir -p /tmp/fa4-wheels
case ${1:?stage DIR|run} in
  stage) cp "${2:?}"/* /tmp/fa4-wheels/ && ls -la /tmp/fa4-wheels | tail -n +2 ;;
  run)
    cd /tmp/fa4-wheels
    for whl in $(ls *.part-* 2>/dev/null | sed 's/\.part-..$//' | sort -u); do cat "$whl".part-* > "$whl" && rm "$whl".part-*; done
    cd - > /dev/null
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site /tmp/fa4-wheels/*.whl || exit 1
    # the cutlass DSL's packages are found through a .pth file, which --target installs do not process
    export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PWD PYTHONUNBUFFERED=1
    OUT=${OUT:-.}
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
    python3 -c "import flash_attn.cute, cutlass; print('flash_attn.cute', flash_attn.cute.__version__)" 2>&1 | tail -2
    timeout 500 python3 benchmarks/gpu/fa4_check.py --out "$OUT/fa4_check.json" 2>&1 | tee "$OUT/fa4_check.log" \
      | grep -v -i "warn" ;;
esac
