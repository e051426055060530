#!/usr/bin/env bash
# One-command set-up and run for cm_jax on Debian/Ubuntu.
#   bash run.sh train [--config.KEY=VALUE ...]   set up, then train configs/fashion_mnist_ct.py (CONFIG, WORKDIR)
#   bash run.sh test  [pytest args ...]          set up, then run the test suite
#   bash run.sh setup                            set up only
# Set-up: system packages when run as root (python3-venv, Debian's dataset-fashion-mnist for offline data),
# a virtual environment in $CM_JAX_VENV (default .venv) with cm_jax and its dependencies.
set -euo pipefail
CALLER_DIR=$PWD
abs_path() { case "$1" in /*) printf '%s' "$1" ;; *) printf '%s/%s' "$CALLER_DIR" "$1" ;; esac; }
[ -n "${CONFIG:-}" ] && CONFIG=$(abs_path "$CONFIG")
[ -n "${WORKDIR:-}" ] && WORKDIR=$(abs_path "$WORKDIR")
cd "$(dirname "$0")"
VENV=${CM_JAX_VENV:-.venv}
FASHION_DIR=/usr/share/datasets/fashion-mnist

log() { printf '[run.sh] %s\n' "$*" >&2; }

system_packages() {
  local need=()
  python3 -c 'import sys; assert sys.version_info >= (3, 10)' 2>/dev/null || need+=(python3)
  python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
  [ -f "$FASHION_DIR/train-images-idx3-ubyte.gz" ] || need+=(dataset-fashion-mnist)
  [ ${#need[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    log "Installing Debian packages: ${need[*]}"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null; }; then
      log "apt-get could not install: ${need[*]}."
      for p in "${need[@]}"; do [ "$p" = dataset-fashion-mnist ] || exit 1; done
      log "Continuing without the offline Fashion-MNIST files (training then needs TFDS or data.manual_dir)."
    fi
    python3 -c 'import sys; assert sys.version_info >= (3, 10)' 2>/dev/null \
      || { log "cm_jax needs Python >= 3.10; this system's python3 is $(python3 --version 2>&1)."; exit 1; }
  else
    log "Missing system packages: ${need[*]}."
    log "Install them with: sudo apt-get install ${need[*]}"
    log "(dataset-fashion-mnist provides Fashion-MNIST offline in $FASHION_DIR; without it, training needs"
    log " internet for TFDS, or --config.data.manual_dir=DIR with the four IDX files, and one test fails.)"
    for p in "${need[@]}"; do [ "$p" = dataset-fashion-mnist ] || exit 1; done
  fi
}

python_env() {
  local stamp="$VENV/.cm_jax_installed"
  if ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then  # Missing, or half-made by an interrupted run.
    log "Creating the virtual environment $VENV"
    rm -rf "$VENV"
    python3 -m venv "$VENV"
  fi
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    log "Installing cm_jax and its dependencies into $VENV (a few minutes the first time)"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e '.[test]'
    touch "$stamp"
  fi
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  setup) system_packages; python_env ;;
  train)
    system_packages; python_env
    CONFIG=${CONFIG:-configs/fashion_mnist_ct.py}
    WORKDIR=${WORKDIR:-workdirs/$(basename "$CONFIG" .py)}
    log "Training $CONFIG in $WORKDIR (run again to resume; TensorBoard: tensorboard --logdir $WORKDIR)"
    exec "$VENV/bin/python" -m cm_jax.train --config="$CONFIG" --workdir="$WORKDIR" "$@" ;;
  test)
    system_packages; python_env
    exec "$VENV/bin/python" -m pytest tests -q "$@" ;;
  *) sed -n '2,7p' "$0"; exit 2 ;;
esac
