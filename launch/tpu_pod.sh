#!/usr/bin/env bash
# Run a musicjax command on every worker of a Cloud TPU VM pod slice.
#
#   launch/tpu_pod.sh TPU_NAME ZONE [--setup] -- musicjax train --config configs/codec/base.py --workdir gs://bucket/run
#
# --setup copies this checkout to every worker and installs it with jax[tpu] into ~/musicjax/.venv
# (do it once per pod, and again after changing code). Every worker then runs the same command;
# jax.distributed.initialize() finds the other workers by itself on TPU pods
# (MUSICJAX_DISTRIBUTED=1 tells musicjax to call it). The workdir must be shared storage
# (a gs:// bucket or a shared filesystem) so that all hosts write one checkpoint.
set -euo pipefail
if [[ $# -lt 3 ]]; then
  sed -n '2,10p' "$0"; exit 2
fi
TPU_NAME=$1; ZONE=$2; shift 2
SETUP=0
if [[ ${1:-} == --setup ]]; then SETUP=1; shift; fi
[[ ${1:-} == -- ]] || { echo "tpu_pod.sh: expected -- before the command" >&2; exit 2; }
shift
REPO=$(cd "$(dirname "$0")/.." && pwd)
GC="gcloud compute tpus tpu-vm"

if [[ $SETUP == 1 ]]; then
  tar -C "$REPO" --exclude=.venv --exclude=runs --exclude=.git -czf /tmp/musicjax-src.tgz .
  $GC scp /tmp/musicjax-src.tgz "$TPU_NAME":/tmp/ --zone "$ZONE" --worker=all
  $GC ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
    set -e; mkdir -p ~/musicjax && tar -C ~/musicjax -xzf /tmp/musicjax-src.tgz
    cd ~/musicjax && python3 -m venv .venv && .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e '.[tpu]' && .venv/bin/pip install -q --no-deps tinysoundfont"
fi

CMD=$(printf '%q ' "$@")
$GC ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  cd ~/musicjax && export MUSICJAX_DISTRIBUTED=1 PATH=\$HOME/musicjax/.venv/bin:\$PATH && $CMD"
