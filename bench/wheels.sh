#!/usr/bin/env bash
# Wheels for a GPU machine whose python has torch, transformers, typer and
# prometheus-client but not deepspeed, submitit or mosaicml-streaming (and cannot reach
# an index): run this on a CPU machine with the project's venv, carry the folder, and
# bench/gpu.sh installs it with `pip install --no-index`.
#   bash bench/wheels.sh [OUT=.whl] [PYTHON_VERSION=3.12]
# Versions are the ones installed here, so both machines run the same code. The list is
# what `import cmal.workflow.pretrain, cmal.data.stream, cmal.launch.jobs` loads beyond such an image
# (measured with importlib.metadata.packages_distributions on this venv).
set -euo pipefail
out=${1:-.whl}
py=${2:-3.12}
pure="deepspeed submitit mosaicml-streaming hjson pydantic annotated-types typing-inspection
      catalogue python-snappy opentelemetry-api"
binary="pydantic_core zstd cramjam"
pin() { python3 -c "import importlib.metadata as m, sys; print(f'{sys.argv[1]}=={m.version(sys.argv[1])}')" "$1"; }
mkdir -p "$out"
pins=(); for p in $pure; do pins+=("$(pin "$p")"); done
# deepspeed is an sdist on PyPI: build it (pure Python without its ops, which we never use).
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps -w "$out" "${pins[@]}"
get() {
    python3 -m pip download -q --no-deps --only-binary=:all: -d "$out" --python-version "$py" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 "$1" 2>/dev/null
}
for p in $binary; do
    # A compiled wheel of this version may not exist for that Python (zstd 1.5.7.2 has
    # none for 3.12 in this index): then the newest one that does.
    get "$(pin "$p")" || { echo "note: $(pin "$p") has no $py wheel; taking the newest" >&2; get "$p"; }
done
ls "$out"
du -sh "$out"
