#!/usr/bin/env bash
# Start N JAX processes on this machine, talking over loopback (gloo on CPU).
#
#   launch/local.sh N -- <command ...>
#   launch/local.sh 2 -- musicjax train --config configs/codec/tiny.py --workdir runs/mh
#   launch/local.sh 2 -- python -m musicjax.cli train --config ... --workdir ...
#
# Each process gets JAX_COORDINATOR_ADDRESS=127.0.0.1:<free port>,
# JAX_NUM_PROCESSES=N and JAX_PROCESS_ID=i (musicjax.parallel.distributed reads
# them), and JAX_PLATFORMS=cpu unless already set. For several CPU devices per
# process set XLA_FLAGS=--xla_force_host_platform_device_count=K yourself.
# Output lines are prefixed with [p<i>]. SIGTERM/SIGINT are forwarded to every
# process. If one process fails, the others are stopped (they would otherwise
# wait forever in a collective). Exit status: 0 if all succeeded, else the
# first non-zero status seen.
set -u

if [[ $# -lt 3 || ! "$1" =~ ^[0-9]+$ || "$2" != "--" ]]; then
  echo "usage: $0 N -- <command ...>" >&2
  exit 2
fi
n=$1
shift 2

port=$("${PYTHON:-python3}" -c 'import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export JAX_COORDINATOR_ADDRESS="127.0.0.1:${port}"
export JAX_NUM_PROCESSES="$n"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"

pids=()
for ((i = 0; i < n; i++)); do
  # The subshell execs the command, so $! is the process itself.
  (export JAX_PROCESS_ID=$i; exec "$@") > >(sed -u "s/^/[p$i] /") 2>&1 &
  pids+=($!)
done

forward() {
  for p in "${pids[@]}"; do kill -"$1" "$p" 2>/dev/null; done
}
trap 'forward TERM' TERM
trap 'forward INT' INT

status=0
finished=()
for ((i = 0; i < n; i++)); do finished+=(0); done
remaining=$n
while (( remaining > 0 )); do
  for ((i = 0; i < n; i++)); do
    p=${pids[$i]}
    (( finished[i] )) && continue
    if ! kill -0 "$p" 2>/dev/null; then
      wait "$p"
      rc=$?
      finished[i]=1
      remaining=$((remaining - 1))
      if (( rc != 0 )); then
        echo "[local.sh] process $i exited with status $rc" >&2
        if (( status == 0 )); then
          status=$rc
          forward TERM   # don't leave the others hanging in a collective
        fi
      fi
    fi
  done
  sleep 0.2
done
wait  # let the output prefixers flush
exit "$status"
