# cmal tasks. On a fresh machine `just demo` and `just test` do all the set-up themselves.
set shell := ["bash", "-euo", "pipefail", "-c"]

venv := ".venv"
bin := venv + "/bin"

# Create .venv and install cmal with its test tools (skipped when nothing changed).
setup:
    #!/usr/bin/env bash
    set -euo pipefail
    stamp="{{venv}}/.installed-$(cat pyproject.toml requirements/pins.txt | sha256sum | cut -c1-16)"
    if [ ! -f "$stamp" ]; then
        python3 -m venv {{venv}}
        {{bin}}/pip install -q -U pip
        # pins.txt is the set verified on the project's CPU machines (torch 2.14.1 +
        # torchvision 0.29.1 from the local wheel store); GPU users install without it.
        {{bin}}/pip install -q -c requirements/pins.txt -e '.[test]'
        rm -f {{venv}}/.installed-*
        touch "$stamp"
    fi

# Debian packages the tests run for real on 127.0.0.1 (installed only when missing).
services:
    #!/usr/bin/env bash
    set -euo pipefail
    missing=()
    # command -> Debian package
    for pair in prometheus:prometheus prometheus-pushgateway:prometheus-pushgateway \
                slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge; do
        command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
    done
    [ ${#missing[@]} -eq 0 ] && exit 0
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    export DEBIAN_FRONTEND=noninteractive
    install() { $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }
    install || { $sudo apt-get update -qq && install; }

# Lint, format check and the whole test suite, two tests at a time (pytest-xdist: each
# file's tests on one worker, so one SLURM cluster; each worker makes its own world).
test: setup services
    {{bin}}/ruff check cmal tests bench
    {{bin}}/ruff format --check cmal tests bench
    {{bin}}/python -m pytest -q -n 2 --dist loadfile --durations=15

# The quick tier, for iterating: the tests that make no world and start no server, cluster or training run.
test-quick: setup
    {{bin}}/ruff check cmal tests bench
    {{bin}}/python -m pytest -q -n 2 --dist loadfile -m "not full" --durations=10

# The main job on the embedded default: scene world -> pretrain -> fine-tune x5 -> evaluate x5 (+ zero-shot retrieval).
demo: setup
    {{bin}}/cmal run workflows/world.yaml

# Parameters and FLOPs of a model size: just summary base
summary size="base": setup
    {{bin}}/cmal model summary -q --config configs/model/{{size}}.yaml
