#!/usr/bin/env bash
# The GPU check as one prepared run (bench/gpu.py says what it does; 8 minutes or less on
# an H100/H200):
#   bash bench/gpu.sh [WHEELS_DIR=.whl] [bench/gpu.py argument ...]
#   bash bench/gpu.sh --device cpu --steps 2 --size tiny --batch 4 --images 64 --pretrain-batch 4  # dry run
# Where python3 lacks deepspeed / submitit / mosaicml-streaming (and nothing can be
# fetched), it installs them from WHEELS, made beforehand on a CPU machine with
# `bash bench/wheels.sh .whl`. The log is also written to $OUT/gpu.log when OUT is set.
set -euo pipefail
cd "$(dirname "$0")/.."
whl=.whl
if [ $# -gt 0 ] && [ -d "$1" ]; then whl=$1; shift; fi
if ! python3 -c "import deepspeed, submitit, streaming" 2>/dev/null; then
    if ! ls "$whl"/*.whl >/dev/null 2>&1; then
        echo "deepspeed/submitit/streaming are missing and $whl holds no wheels:" \
            "run 'bash bench/wheels.sh $whl' on a CPU machine and bring the folder" >&2
        exit 2
    fi
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/cmal-site "$whl"/*.whl
    export PYTHONPATH=/tmp/cmal-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 bench/gpu.py "$@" 2>&1 | grep -v "real_accelerator\|^\[20"
