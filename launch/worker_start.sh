#!/usr/bin/env bash
# Runs ON a TPU worker (tpu_run.sh calls it on every worker): starts
# `python -m genvis_jax.main ARGS` in the background with nohup, one log per worker.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SCRIPT_EXTRA_USAGE=" -- MAIN_ARGS..."
SCRIPT_USAGE="Starts python -m genvis_jax.main MAIN_ARGS in the background on this worker
(nohup; log LOG_DIR/RUN.log, pid LOG_DIR/RUN.pid, LOG_DIR/latest.log -> the log).
On a multi-host TPU slice it exports JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID from the worker metadata (worker-network-endpoints,
agent-worker-number) so genvis_jax.train.distributed initialises jax.distributed;
TPU_WORKER_ENDPOINTS / TPU_WORKER_NUMBER override the metadata (tests).
With --stop it stops the run recorded in RUN.pid instead."

flag run-name GENVIS_RUN_NAME "" "run name (log / pid file names)"
flag log-dir GENVIS_LOG_DIR "$HOME/genvis_logs" "log directory on this worker"
flag python GENVIS_PYTHON_BIN "$HOME/genvis_venv/bin/python" "python of the project venv"
flag coordinator-port JAX_COORDINATOR_PORT "8476" "jax.distributed coordinator port"
flag compilation-cache JAX_COMPILATION_CACHE_DIR "$HOME/jax_cache" "XLA's compiled programs kept for the next run on this worker ('' = off)"
bool_flag stop GENVIS_STOP "stop the run instead of starting it"
parse_flags "$@"
require run-name

log="$GENVIS_LOG_DIR/$GENVIS_RUN_NAME.log"
pidfile="$GENVIS_LOG_DIR/$GENVIS_RUN_NAME.pid"
running_pid() {
  [[ -f "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null && cat "$pidfile"
}

if [[ "$GENVIS_STOP" == 1 ]]; then
  if pid="$(running_pid)"; then
    run kill "$pid"
  else
    echo "$(hostname): run $GENVIS_RUN_NAME is not running"
  fi
  exit 0
fi
if pid="$(running_pid)"; then
  die "$(hostname): run $GENVIS_RUN_NAME is already running (pid $pid); stop it first with --stop"
fi

metadata() {
  curl -sf --max-time 5 -H Metadata-Flavor:Google \
    "http://metadata.google.internal/computeMetadata/v1/instance/attributes/$1"
}

env_args=(PYTHONUNBUFFERED=1)
# A restarted or later run on this worker (resume, sampling after training)
# loads its compiled programs instead of compiling for minutes again.
[[ -n "$JAX_COMPILATION_CACHE_DIR" ]] \
  && env_args+=(JAX_COMPILATION_CACHE_DIR="$JAX_COMPILATION_CACHE_DIR")
if [[ -z "${JAX_COORDINATOR_ADDRESS:-}" ]]; then
  endpoints="${TPU_WORKER_ENDPOINTS-$(metadata worker-network-endpoints || true)}"
  IFS=',' read -r -a hosts <<< "$endpoints"
  if ((${#hosts[@]} > 1)); then
    # Entries are "host" or "name:id:ip"; the last field is the address.
    worker="${TPU_WORKER_NUMBER:-$(metadata agent-worker-number)}"
    env_args+=(JAX_COORDINATOR_ADDRESS="${hosts[0]##*:}:$JAX_COORDINATOR_PORT"
               JAX_NUM_PROCESSES="${#hosts[@]}" JAX_PROCESS_ID="$worker")
  fi
fi

cmd=(env "${env_args[@]}" "$GENVIS_PYTHON_BIN" -m genvis_jax.main "${EXTRA_ARGS[@]}")
if [[ "$DRY_RUN" == 1 ]]; then
  echo "+ nohup $(quote "${cmd[@]}") > $log 2>&1 &"
  exit 0
fi
mkdir -p "$GENVIS_LOG_DIR"
cd "$GENVIS_ROOT"
nohup "${cmd[@]}" > "$log" 2>&1 < /dev/null &
echo $! > "$pidfile"
ln -sf "$log" "$GENVIS_LOG_DIR/latest.log"
echo "$(hostname): started pid $! (log $log)"
