#!/usr/bin/env bash
# Train cm_jax on a Cloud TPU VM slice (single host or pod): create it, set up every worker, start training
# on all workers, follow the log, stop, delete. `bash launch/tpu_pod.sh -h` prints the usage; launch/README.md
# has a worked example. With --dry-run (or DRY_RUN=1) it prints every command, one per line and shell-quoted,
# instead of running it; a dry run needs neither gcloud nor a network.
set -euo pipefail

PROG=tpu_pod.sh

usage() {
  local text
  IFS= read -r -d '' text <<'EOF' || true  # builtins only: a dry run needs no external program
Usage: bash launch/tpu_pod.sh [OPTIONS] COMMAND [-- EXTRA_TRAIN_ARGS...]

Commands
  create   Create the TPU VM (gcloud compute tpus tpu-vm create), or with --queued a queued resource
           (gcloud compute tpus queued-resources create) and wait until it is ACTIVE.
  setup    On every worker: python3-venv if missing, the cm_jax source (a copy of this checkout, or
           --repo), a virtual environment with `pip install -e 'cm_jax[tpu,gcs]'` (jax[tpu] with libtpu,
           google-cloud-storage for gs://) and JAX_SPEC if given.
  check    On every worker: jax.distributed.initialize(), then print process index/count and devices.
  train    On every worker, in the background (nohup; survives ssh disconnects):
           python -m cm_jax.train --config=CONFIG --workdir=WORKDIR [--config.data.data_dir=DATA_DIR] ...
           output appended to ~/cm_jax_train.log on each worker. Refused if a run is already going.
  logs     Follow the training log of one worker (default worker 0): tail -F.
  stop     Send SIGTERM to the run on every worker: cm_jax saves a checkpoint and exits 0.
  status   Describe the TPU VM (or the queued resource).
  delete   Delete the TPU VM (with --queued: the queued resource and its node).
  all      create, setup, train, logs.

Options (each also read from the environment variable in brackets; options win)
  --name=NAME              TPU VM name (node id) [TPU_NAME]; required
  --zone=ZONE              e.g. us-central2-b [TPU_ZONE]; required
  --project=PROJECT        GCP project; default: gcloud's configured project [TPU_PROJECT]
  --type=TYPE              accelerator type, e.g. v4-32, v5litepod-16, v5p-16, v6e-16 [TPU_TYPE; v4-32].
                           A suffix above 8 is a multi-host slice (a pod): its WORKDIR must be gs://.
  --runtime-version=V      TPU software version [TPU_RUNTIME]; default by type: v2/v3/v4
                           tpu-ubuntu2204-base, v5litepod/v5e v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5,
                           v6e v2-alpha-tpuv6e
  --queued                 create/delete/status through a queued resource [TPU_QUEUED=1]
  --qr-id=ID               queued resource id [TPU_QR_ID; NAME-qr]
  --spot                   Spot capacity (preemptible; resume by re-running setup+train) [TPU_SPOT=1]
  --create-arg=ARG         extra argument for the gcloud create command, repeatable
  --repo=GIT_URL           clone this repository on the workers instead of copying this checkout
                           [CM_JAX_REPO]
  --ref=REF                branch, tag or commit of --repo [CM_JAX_REF; HEAD]
  --config=PATH            cm_jax config, relative to the repository root [CONFIG]; required by train
  --workdir=DIR            training workdir, gs://BUCKET/... on a pod [WORKDIR]; required by train
  --data-dir=DIR           TFDS data_dir, e.g. gs://BUCKET/tensorflow_datasets [DATA_DIR]; passed as
                           --config.data.data_dir=DIR
  --config.KEY=VALUE       passed to cm_jax.train unchanged (as is everything after --)
  --jax-spec=SPEC          extra pip requirement, e.g. to pin JAX: 'jax[tpu]==0.6.2' [JAX_SPEC]
  --python=PYTHON          python on the workers that creates the venv [TPU_PYTHON; python3]
  --worker=N               worker whose log `logs` follows [0]
  --yes                    delete without gcloud's confirmation prompt
  -n, --dry-run            print the commands instead of running them [DRY_RUN=1]
  -h, --help               this text

Remote layout (relative to the home directory of each worker): cm_jax/ (source), cm_jax_venv/ (venv),
cm_jax_train.log (training output), cm_jax_train.pid.
EOF
  printf '%s' "$text"
}

die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 2; }
info() { printf '%s: %s\n' "$PROG" "$*" >&2; }

TPU_NAME=${TPU_NAME:-}
TPU_ZONE=${TPU_ZONE:-}
TPU_PROJECT=${TPU_PROJECT:-}
TPU_TYPE=${TPU_TYPE:-v4-32}
TPU_RUNTIME=${TPU_RUNTIME:-}
TPU_QUEUED=${TPU_QUEUED:-0}
TPU_QR_ID=${TPU_QR_ID:-}
TPU_SPOT=${TPU_SPOT:-0}
TPU_PYTHON=${TPU_PYTHON:-python3}
CM_JAX_REPO=${CM_JAX_REPO:-}
CM_JAX_REF=${CM_JAX_REF:-HEAD}
CONFIG=${CONFIG:-}
WORKDIR=${WORKDIR:-}
DATA_DIR=${DATA_DIR:-}
JAX_SPEC=${JAX_SPEC:-}
CM_JAX_EXTRAS=tpu,gcs  # pyproject.toml: tpu = jax[tpu] (libtpu), gcs = google-cloud-storage for gs:// workdirs
DRY_RUN=${DRY_RUN:-0}
LOG_WORKER=0
ASSUME_YES=0
CREATE_ARGS=()
TRAIN_ARGS=()
COMMAND=

REMOTE_DIR=cm_jax
REMOTE_VENV=cm_jax_venv
REMOTE_LOG=cm_jax_train.log
REMOTE_PID=cm_jax_train.pid
REMOTE_TARBALL=cm_jax-src.tar.gz

# The repository root, found with shell builtins only (a dry run needs no external program).
case ${BASH_SOURCE[0]} in
  */*) SCRIPT_DIR=${BASH_SOURCE[0]%/*} ;;
  *) SCRIPT_DIR=. ;;
esac
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)

need_value() { [ -n "${2:-}" ] || die "$1 needs a value"; }

while [ $# -gt 0 ]; do
  arg=$1
  shift
  case $arg in
    -h|--help) usage; exit 0 ;;
    -n|--dry-run) DRY_RUN=1 ;;
    --queued) TPU_QUEUED=1 ;;
    --spot) TPU_SPOT=1 ;;
    --yes) ASSUME_YES=1 ;;
    --config.*) TRAIN_ARGS+=("$arg") ;;
    --) TRAIN_ARGS+=("$@"); break ;;
    --*=*)
      value=${arg#*=}
      ;;&
    --name|--zone|--project|--type|--runtime-version|--qr-id|--create-arg|--repo|--ref|--config|--workdir|\
    --data-dir|--jax-spec|--python|--worker)
      need_value "$arg" "${1:-}"
      value=$1
      shift
      ;;&
    --name|--name=*) TPU_NAME=$value ;;
    --zone|--zone=*) TPU_ZONE=$value ;;
    --project|--project=*) TPU_PROJECT=$value ;;
    --type|--type=*) TPU_TYPE=$value ;;
    --runtime-version|--runtime-version=*) TPU_RUNTIME=$value ;;
    --qr-id|--qr-id=*) TPU_QR_ID=$value ;;
    --create-arg|--create-arg=*) CREATE_ARGS+=("$value") ;;
    --repo|--repo=*) CM_JAX_REPO=$value ;;
    --ref|--ref=*) CM_JAX_REF=$value ;;
    --config|--config=*) CONFIG=$value ;;
    --workdir|--workdir=*) WORKDIR=$value ;;
    --data-dir|--data-dir=*) DATA_DIR=$value ;;
    --jax-spec|--jax-spec=*) JAX_SPEC=$value ;;
    --python|--python=*) TPU_PYTHON=$value ;;
    --worker|--worker=*) LOG_WORKER=$value ;;
    -*) die "unknown option '$arg' (see -h)" ;;
    *)
      [ -z "$COMMAND" ] || die "one command at a time (got '$COMMAND' and '$arg'); 'all' runs create, setup, train, logs"
      COMMAND=$arg
      ;;
  esac
done

[ -n "$COMMAND" ] || { usage >&2; die "no command given"; }
case $COMMAND in
  create|setup|check|train|logs|stop|status|delete|all) ;;
  *) usage >&2; die "unknown command '$COMMAND'" ;;
esac
case $DRY_RUN in 0|1) ;; *) die "DRY_RUN must be 0 or 1, not '$DRY_RUN'" ;; esac
[ -n "$TPU_NAME" ] || die "--name (or TPU_NAME) is required"
[ -n "$TPU_ZONE" ] || die "--zone (or TPU_ZONE) is required"
[ -n "$TPU_QR_ID" ] || TPU_QR_ID=$TPU_NAME-qr
[[ $LOG_WORKER =~ ^[0-9]+$ ]] || die "--worker must be a worker number, not '$LOG_WORKER'"

GCLOUD_FLAGS=(--zone="$TPU_ZONE")
[ -z "$TPU_PROJECT" ] || GCLOUD_FLAGS+=(--project="$TPU_PROJECT")

# quote WORD: WORD as one shell word, readable: bare when it is plain, else in single quotes ('\'' for a
# quote); of --flag=VALUE only VALUE is quoted. The result reads back as WORD in bash, sh or Python's shlex.
quote() {
  local word=$1 prefix='' q="'"
  if [[ $word =~ ^(--[A-Za-z0-9][A-Za-z0-9.-]*=)(.*)$ ]]; then
    prefix=${BASH_REMATCH[1]}
    word=${BASH_REMATCH[2]}
  fi
  if [[ $word =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s%s' "$prefix" "$word"
  else
    printf '%s%s%s%s' "$prefix" "$q" "${word//$q/$q\\$q$q}" "$q"
  fi
}

# run CMD ARGS...: print it (dry run) or echo it to stderr and run it.
run() {
  local line='' word
  for word in "$@"; do
    line+="${line:+ }$(quote "$word")"
  done
  if [ "$DRY_RUN" = 1 ]; then
    printf '%s\n' "$line"
  else
    info "+ $line"
    "$@"
  fi
}

# remote_path P: P for a command string run by bash on a worker; relative paths are under $HOME.
remote_path() {
  case $1 in
    /*) printf '%q' "$1" ;;
    *) printf '"%s"/%q' "\$HOME" "$1" ;;
  esac
}

# The number after the last '-' of the accelerator type: TensorCores (v2, v3, v4, v5p) or chips (v5e, v6e).
# Above 8 the slice spans several hosts in every generation.
is_multi_host() {
  local size=${TPU_TYPE##*-}
  [[ $size =~ ^[0-9]+$ ]] || die "cannot read the size of accelerator type '$TPU_TYPE' (expected e.g. v4-32)"
  [ "$size" -gt 8 ]
}

# TPU_RUNTIME, when not given: the TPU software version Google lists for JAX on each generation.
set_default_runtime() {
  [ -z "$TPU_RUNTIME" ] || return 0
  case $TPU_TYPE in
    v2-*|v3-*|v4-*) TPU_RUNTIME=tpu-ubuntu2204-base ;;
    v5litepod-*|v5e-*) TPU_RUNTIME=v2-alpha-tpuv5-lite ;;
    v5p-*) TPU_RUNTIME=v2-alpha-tpuv5 ;;
    v6e-*) TPU_RUNTIME=v2-alpha-tpuv6e ;;
    *) die "no default runtime version for accelerator type '$TPU_TYPE': pass --runtime-version" ;;
  esac
}

ssh_workers() {  # ssh_workers WORKER REMOTE_COMMAND
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --worker="$1" --command="$2"
}

wait_active() {
  local describe=(gcloud compute tpus queued-resources describe "$TPU_QR_ID" "${GCLOUD_FLAGS[@]}"
                  --format='value(state.state)')
  if [ "$DRY_RUN" = 1 ]; then
    run "${describe[@]}"  # polled every 30 s until ACTIVE
    return
  fi
  local state
  while :; do
    state=$("${describe[@]}")
    case $state in
      ACTIVE) info "queued resource $TPU_QR_ID is ACTIVE"; return ;;
      FAILED|SUSPENDED) die "queued resource $TPU_QR_ID is $state (gcloud compute tpus queued-resources describe $TPU_QR_ID --zone=$TPU_ZONE)" ;;
      *) info "queued resource $TPU_QR_ID is ${state:-not visible yet}; checking again in 30 s"; sleep 30 ;;
    esac
  done
}

cmd_create() {
  set_default_runtime
  local extra=()
  [ "$TPU_SPOT" != 1 ] || extra+=(--spot)
  extra+=(${CREATE_ARGS[@]+"${CREATE_ARGS[@]}"})
  if [ "$TPU_QUEUED" = 1 ]; then
    run gcloud compute tpus queued-resources create "$TPU_QR_ID" --node-id="$TPU_NAME" "${GCLOUD_FLAGS[@]}" \
      --accelerator-type="$TPU_TYPE" --runtime-version="$TPU_RUNTIME" ${extra[@]+"${extra[@]}"}
    wait_active
  else
    run gcloud compute tpus tpu-vm create "$TPU_NAME" "${GCLOUD_FLAGS[@]}" \
      --accelerator-type="$TPU_TYPE" --version="$TPU_RUNTIME" ${extra[@]+"${extra[@]}"}
  fi
}

cmd_setup() {
  local dir venv python fetch
  dir=$(remote_path "$REMOTE_DIR")
  venv=$(remote_path "$REMOTE_VENV")
  python=$(printf '%q' "$TPU_PYTHON")
  if [ -z "$CM_JAX_REPO" ]; then
    local tarball="${TMPDIR:-/tmp}/cm_jax-$TPU_NAME.tar.gz"
    run tar -C "$REPO_ROOT" -czf "$tarball" --exclude=.git --exclude=.venv --exclude=__pycache__ \
      --exclude='*.egg-info' --exclude=.pytest_cache --exclude=./workdirs --exclude=./build .
    run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:$REMOTE_TARBALL" "${GCLOUD_FLAGS[@]}" --worker=all
    fetch="mkdir -p $dir && tar -xzf $(remote_path "$REMOTE_TARBALL") -C $dir"
  else
    local url ref
    url=$(printf '%q' "$CM_JAX_REPO")
    ref=$(printf '%q' "$CM_JAX_REF")
    fetch="{ [ -d $dir/.git ] || git clone --quiet $url $dir; } && git -C $dir fetch --quiet $url $ref"
    fetch+=" && git -C $dir checkout --quiet --force FETCH_HEAD"
  fi
  local steps=(
    "set -euo pipefail"
    "$python -c \"import ensurepip, venv\" 2>/dev/null || { sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv; }"
    "$fetch"
    "$python -m venv $venv"
    "$venv/bin/python -m pip install --quiet --upgrade pip"
    "$venv/bin/python -m pip install --quiet --upgrade -e $dir$(printf '%q' "[$CM_JAX_EXTRAS]")${JAX_SPEC:+ $(printf '%q' "$JAX_SPEC")}"
    "$venv/bin/python -c \"import jax, cm_jax; print(jax.__version__)\""
  )
  local remote
  printf -v remote '%s; ' "${steps[@]}"
  ssh_workers all "${remote%; }"
}

cmd_check() {
  local py="import jax; jax.distributed.initialize(); print(jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())"
  ssh_workers all "$(remote_path "$REMOTE_VENV")/bin/python -c \"$py\""
}

validate_train() {
  [ -n "$CONFIG" ] || die "--config (or CONFIG) is required by train, e.g. --config=configs/imagenet64_ct.py"
  [ -n "$WORKDIR" ] || die "--workdir (or WORKDIR) is required by train, e.g. --workdir=gs://BUCKET/runs/NAME"
  if is_multi_host; then
    case $WORKDIR in
      gs://?*) ;;
      *) die "$TPU_TYPE spans several hosts: --workdir must be a gs:// path that every worker shares (got '$WORKDIR')" ;;
    esac
    case $DATA_DIR in
      ''|gs://?*) ;;
      *) info "warning: --data-dir '$DATA_DIR' is not gs://: every worker must have the prepared data at that path" ;;
    esac
  fi
}

cmd_train() {
  validate_train
  local args=(-m cm_jax.train --config="$CONFIG" --workdir="$WORKDIR")
  [ -z "$DATA_DIR" ] || args+=(--config.data.data_dir="$DATA_DIR")
  args+=(${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"})
  local dir log pid quoted
  dir=$(remote_path "$REMOTE_DIR")
  log=$(remote_path "$REMOTE_LOG")
  pid=$(remote_path "$REMOTE_PID")
  printf -v quoted '%q ' "${args[@]}"
  local train
  train="$(remote_path "$REMOTE_VENV")/bin/python ${quoted% }"
  # One line for bash on each worker. nohup + redirected stdin/stdout/stderr: the run outlives the ssh session.
  local remote="cd $dir || exit 1; "
  remote+="if [ -f $pid ] && kill -0 \"\$(cat $pid)\" 2>/dev/null; then "
  remote+="echo \"cm_jax.train is already running on \$(hostname) (pid \$(cat $pid)): stop it first\" >&2; exit 1; fi; "
  remote+="echo \"=== \$(date -u +%FT%TZ) starting on \$(hostname)\" >> $log; "
  remote+="nohup $train >> $log 2>&1 < /dev/null & echo \$! > $pid; "
  remote+="echo \"cm_jax.train started on \$(hostname), pid \$(cat $pid), log ~/$REMOTE_LOG\""
  ssh_workers all "$remote"
}

cmd_logs() {
  ssh_workers "$LOG_WORKER" "tail -n 200 -F $(remote_path "$REMOTE_LOG")"
}

cmd_stop() {
  local pid
  pid=$(remote_path "$REMOTE_PID")
  ssh_workers all "if [ -f $pid ] && kill -TERM \"\$(cat $pid)\" 2>/dev/null; then echo \"SIGTERM sent on \$(hostname): cm_jax saves a checkpoint and exits\"; else echo \"no cm_jax.train running on \$(hostname)\"; fi"
}

cmd_status() {
  if [ "$TPU_QUEUED" = 1 ]; then
    run gcloud compute tpus queued-resources describe "$TPU_QR_ID" "${GCLOUD_FLAGS[@]}"
  else
    run gcloud compute tpus tpu-vm describe "$TPU_NAME" "${GCLOUD_FLAGS[@]}"
  fi
}

cmd_delete() {
  local quiet=()
  [ "$ASSUME_YES" != 1 ] || quiet=(--quiet)
  if [ "$TPU_QUEUED" = 1 ]; then
    run gcloud compute tpus queued-resources delete "$TPU_QR_ID" "${GCLOUD_FLAGS[@]}" --force ${quiet[@]+"${quiet[@]}"}
  else
    run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${GCLOUD_FLAGS[@]}" ${quiet[@]+"${quiet[@]}"}
  fi
}

if [ "$DRY_RUN" != 1 ] && ! command -v gcloud >/dev/null; then
  die "gcloud not found: install the Google Cloud CLI (or use --dry-run to print the commands)"
fi

case $COMMAND in
  all)
    # Check what create and train need before creating anything.
    set_default_runtime
    validate_train
    cmd_create
    cmd_setup
    cmd_train
    cmd_logs
    ;;
  *) "cmd_$COMMAND" ;;
esac
