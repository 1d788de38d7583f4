#!/usr/bin/env bash
# Runs ON a TPU worker (tpu_run.sh calls it on every worker): starts
# `python -m genvis_jax.main ARGS` in the background with nohup, one log per worker.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SCRIPT_EXTRA_USAGE=" -- MAIN_ARGS..."
SCRIPT_USAGE="Starts python -m genvis_jax.main MAIN_ARGS in the background on this worker
(nohup; log LOG_DIR/RUN.log, pid LOG_DIR/RUN.pid, LOG_DIR/latest.log -> the log).
Each start appends to the log after a dated '==== start' line, so a re-run (a
resume) keeps the failed run's traceback above it. It then watches the run for
--start-check seconds: one that exits in that time (a bad flag, missing data)
fails this script with its exit status and the log's last lines.
On a multi-host TPU slice it exports JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID from the worker metadata (worker-network-endpoints,
agent-worker-number) so genvis_jax.train.distributed initialises jax.distributed;
TPU_WORKER_ENDPOINTS / TPU_WORKER_NUMBER override the metadata (tests).
With --stop it sends SIGTERM to the run recorded in RUN.pid (training saves a
checkpoint and exits) and waits up to --stop-wait seconds for it to end; --check
fails if the run is still running (tpu_run.sh asks every worker before starting)."

flag run-name GENVIS_RUN_NAME "" "run name (log / pid file names)"
flag log-dir GENVIS_LOG_DIR "$HOME/genvis_logs" "log directory on this worker"
flag python GENVIS_PYTHON_BIN "$HOME/genvis_venv/bin/python" "python of the project venv"
flag coordinator-port JAX_COORDINATOR_PORT "8476" "jax.distributed coordinator port"
flag compilation-cache JAX_COMPILATION_CACHE_DIR "$HOME/jax_cache" "XLA's compiled programs kept for the next run ('' = off; on a multi-host slice give a gs:// folder: JAX writes entries from process 0 only)"
flag tmpdir GENVIS_TMPDIR "" "TMPDIR for the run (e.g. a larger disk for samples.npz; default: the worker's)"
flag start-check GENVIS_START_CHECK "30" "seconds to watch a started run for an early exit (0 = do not wait)"
flag stop-wait GENVIS_STOP_WAIT "600" "seconds --stop waits for the run to end (its clean-stop save)"
bool_flag stop GENVIS_STOP "stop the run instead of starting it"
bool_flag check GENVIS_CHECK "fail if the run is still running; start nothing"
parse_flags "$@"
require run-name
for n in START_CHECK STOP_WAIT; do
  v="GENVIS_$n"
  [[ "${!v}" =~ ^[0-9]+$ ]] || die "--$(tr 'A-Z_' 'a-z-' <<< "$n")=${!v} is not a whole number of seconds"
done

log="$GENVIS_LOG_DIR/$GENVIS_RUN_NAME.log"
pidfile="$GENVIS_LOG_DIR/$GENVIS_RUN_NAME.pid"
# A process's start time (clock ticks after boot; /proc/PID/stat field 22,
# counted after the command name, which may hold spaces): with its pid it
# names the process, where a pid alone may have been reused since the run
# ended (or in another boot).
start_time() {
  sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f20
}
running_pid() {
  local pid="" started=""
  [[ -f "$pidfile" ]] && read -r pid started < "$pidfile" || true
  [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
  # An older starter's file holds the pid alone: trusted as before.
  [[ -z "$started" || "$(start_time "$pid")" == "$started" ]] || return 1
  echo "$pid"
}

if [[ "$GENVIS_STOP" == 1 ]]; then
  if ! pid="$(running_pid)"; then
    echo "$(hostname): run $GENVIS_RUN_NAME is not running"
    exit 0
  fi
  run kill "$pid"
  [[ "$DRY_RUN" == 1 ]] && exit 0
  for ((t = 0; t < GENVIS_STOP_WAIT; t++)); do
    kill -0 "$pid" 2>/dev/null || { echo "$(hostname): run $GENVIS_RUN_NAME stopped"; exit 0; }
    sleep 1
  done
  die "$(hostname): run $GENVIS_RUN_NAME (pid $pid) is still running ${GENVIS_STOP_WAIT}s after SIGTERM (saving a checkpoint?); see its log $log, and run --stop again to wait longer"
fi
if pid="$(running_pid)"; then
  die "$(hostname): run $GENVIS_RUN_NAME is already running (pid $pid); stop it first with --stop"
fi
if [[ "$GENVIS_CHECK" == 1 ]]; then
  echo "$(hostname): run $GENVIS_RUN_NAME is not running"
  exit 0
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
[[ -n "$GENVIS_TMPDIR" ]] && env_args+=(TMPDIR="$GENVIS_TMPDIR")
if [[ -z "${JAX_COORDINATOR_ADDRESS:-}" ]]; then
  endpoints="${TPU_WORKER_ENDPOINTS-$(metadata worker-network-endpoints || true)}"
  IFS=',' read -r -a hosts <<< "$endpoints"
  if ((${#hosts[@]} > 1)); then
    # Entries are "host" or "name:id:ip"; the last field is the address.
    worker="${TPU_WORKER_NUMBER:-$(metadata agent-worker-number || true)}"
    [[ "$worker" =~ ^[0-9]+$ ]] || die "$(hostname): cannot read this worker's number (TPU metadata agent-worker-number: '$worker'); set TPU_WORKER_NUMBER"
    env_args+=(JAX_COORDINATOR_ADDRESS="${hosts[0]##*:}:$JAX_COORDINATOR_PORT"
               JAX_NUM_PROCESSES="${#hosts[@]}" JAX_PROCESS_ID="$worker")
  fi
fi

cmd=(env "${env_args[@]}" "$GENVIS_PYTHON_BIN" -m genvis_jax.main "${EXTRA_ARGS[@]}")
if [[ "$DRY_RUN" == 1 ]]; then
  echo "+ nohup $(quote "${cmd[@]}") >> $log 2>&1 &"
  exit 0
fi
mkdir -p "$GENVIS_LOG_DIR"
cd "$GENVIS_ROOT"
echo "==== start $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname): $(quote "${cmd[@]}")" >> "$log"
nohup "${cmd[@]}" >> "$log" 2>&1 < /dev/null &
pid=$!
started="$(start_time "$pid" || true)"   # gone already: no stat
# A run gone before its start time was read: no start time to trust the pid by.
echo "$pid ${started:-exited}" > "$pidfile"
ln -sf "$log" "$GENVIS_LOG_DIR/latest.log"
echo "$(hostname): started pid $pid (log $log)"
# A run that ends this early failed to start (or was a tiny one): say so here,
# not only in a log nobody is reading yet.
for ((t = 0; t < GENVIS_START_CHECK; t++)); do
  sleep 1
  kill -0 "$pid" 2>/dev/null && continue
  status=0
  wait "$pid" || status=$?
  if ((status == 0)); then
    echo "$(hostname): run $GENVIS_RUN_NAME finished (exit status 0) within ${GENVIS_START_CHECK}s"
    exit 0
  fi
  echo "$(hostname): run $GENVIS_RUN_NAME exited with status $status after $((t + 1))s; the end of $log:" >&2
  tail -n 25 "$log" >&2
  exit 1
done
