#!/usr/bin/env bash
# Starts (or stops) a run on every worker of a TPU VM / pod slice.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SCRIPT_EXTRA_USAGE=" [-- --config.KEY=VALUE ...]"
SCRIPT_USAGE="Runs the same command on every worker, in the background (nohup):
  python -m genvis_jax.main --config=CONFIG --workdir=WORKDIR [args after --]
Each worker logs to LOG_DIR/RUN.log on its own disk (follow with tpu_logs.sh).
The workdir must be a gs:// path all workers share; re-running the same command
resumes from the latest checkpoint there (e.g. after a spot VM was reclaimed).
It first asks every worker whether the run is still going (then it starts
nothing: stop it with --stop, which waits for the clean-stop save), and after the
start it watches each worker for --start-check seconds and fails, with the log's
last lines, if the run exited there.
WORKDIR defaults to gs://BUCKET/runs/RUN.
$RUN_NAME_RULE
Example:
  launch/tpu_run.sh --name=rar-xl --zone=us-central2-b --config=configs/rar_xl.py \\
      --bucket=my-bucket -- --config.data.path='gs://my-bucket/tokens/train-*' \\
      --config.mesh.shape.fsdp=8"

tpu_common_flags
flag config GENVIS_CONFIG "" "config file, e.g. configs/rar_xl.py (path in the repo)"
flag workdir GENVIS_WORKDIR "" "gs:// run directory (checkpoints, TensorBoard logs)"
flag bucket GCS_BUCKET "" "bucket for the default workdir gs://BUCKET/runs/RUN"
flag run-name GENVIS_RUN_NAME "" "run name (default: from --config, see above)"
flag worker TPU_WORKER "all" "workers to start on: all (multi-host runs need all)"
flag remote-dir GENVIS_REMOTE_DIR "genvis_jax" "checkout on the workers (relative: under \$HOME)"
flag venv GENVIS_VENV "genvis_venv" "virtualenv on the workers (relative: under \$HOME)"
flag log-dir GENVIS_LOG_DIR "genvis_logs" "log directory on the workers (relative: under \$HOME)"
flag compilation-cache GENVIS_COMPILATION_CACHE "" "XLA's compiled programs for the next run, shared by the workers (default WORKDIR/jax_cache; 'off' = none)"
flag tmpdir GENVIS_TMPDIR "" "TMPDIR on the workers (a disk with room for samples.npz twice; default: theirs)"
flag coordinator-port JAX_COORDINATOR_PORT "8476" "jax.distributed coordinator port on worker 0"
flag start-check GENVIS_START_CHECK "30" "seconds to watch the started run for an early exit (0 = do not wait)"
bool_flag stop GENVIS_STOP "stop the run (kills the recorded pid on each worker)"
bool_flag allow-local-workdir GENVIS_ALLOW_LOCAL "accept a non-gs:// workdir (single-host VM only)"
parse_flags "$@"
require name zone

config_file="${GENVIS_CONFIG%%:*}"
[[ -n "$GENVIS_RUN_NAME" || -n "$GENVIS_CONFIG" ]] \
  || die "--config (or --run-name with --stop) is required"
# The run's mode: the last --config.mode given (default train). Other modes
# get their own run name (and so log file and default workdir).
mode="$(extra_mode)"
tokens=""
for ((i = 0; i < ${#EXTRA_ARGS[@]}; i++)); do
  case "${EXTRA_ARGS[i]}" in
    --config.pretokenize.output=*) tokens="${EXTRA_ARGS[i]#*=}" ;;
    --config.pretokenize.output) tokens="${EXTRA_ARGS[i + 1]:-}" ;;
  esac
done
resolve_run_name "$mode"

dir="$(remote_path "$GENVIS_REMOTE_DIR")"
start=(bash launch/worker_start.sh --run-name="$GENVIS_RUN_NAME"
       --log-dir="$(remote_path "$GENVIS_LOG_DIR")"
       --python="$(remote_path "$GENVIS_VENV")/bin/python")

if [[ "$GENVIS_STOP" == 1 ]]; then
  tpu_ssh "$TPU_WORKER" "cd $dir && ${start[*]} --stop"
  exit 0
fi
[[ "$GENVIS_START_CHECK" =~ ^[0-9]+$ ]] || die "--start-check=$GENVIS_START_CHECK is not a whole number of seconds"
[[ "$JAX_COORDINATOR_PORT" =~ ^[0-9]+$ ]] || die "--coordinator-port=$JAX_COORDINATOR_PORT is not a port number"

require config
[[ -f "$GENVIS_ROOT/$config_file" ]] \
  || die "--config=$GENVIS_CONFIG: no file $config_file in $GENVIS_ROOT (paths are relative to the repo root)"
if [[ -z "$GENVIS_WORKDIR" ]]; then
  [[ -n "$GCS_BUCKET" ]] || die "--workdir=gs://... or --bucket=NAME is required"
  GENVIS_WORKDIR="$(run_workdir "$GCS_BUCKET" "$GENVIS_RUN_NAME")"
fi
[[ "$GENVIS_ALLOW_LOCAL" == 1 ]] || check_gs "$GENVIS_WORKDIR" workdir
GENVIS_WORKDIR="${GENVIS_WORKDIR%/}"
# JAX writes cache entries from process 0 only: a cache on each worker's own
# disk would spare a restart's compile on worker 0 alone, and every worker
# waits for the slowest; the bucket is read by all.
case "$GENVIS_COMPILATION_CACHE" in
  '') GENVIS_COMPILATION_CACHE="$GENVIS_WORKDIR/jax_cache" ;;
  off) GENVIS_COMPILATION_CACHE="" ;;
esac
# Quoted for the workers' shell (${start[*]} joins the words there).
start+=(--compilation-cache="${GENVIS_COMPILATION_CACHE:+$(remote_word "$GENVIS_COMPILATION_CACHE")}"
        --tmpdir="${GENVIS_TMPDIR:+$(remote_word "$GENVIS_TMPDIR")}"
        --coordinator-port="$JAX_COORDINATOR_PORT" --start-check="$GENVIS_START_CHECK")
# The token writer writes local files only (its default, <workdir>/tokens, is
# the bucket here): refused now rather than after the whole data set encoded.
if [[ "$mode" == pretokenize && ( -z "$tokens" || "$tokens" == *://* ) ]]; then
  die "--config.mode=pretokenize writes local files on each worker: add -- --config.pretokenize.output=/tmp/tokens/NAME (not gs://), then copy the files and their .json records to the bucket (README, pre-tokenize on a pod)"
fi

# A run still going on any worker (a peer that crashed left the others
# waiting; a --stop still saving) would make this start a second, partial run.
if ! check_out="$(tpu_ssh "$TPU_WORKER" "cd $dir && ${start[*]} --check" 2>&1)" \
    || grep -q "is already running" <<< "$check_out"; then
  echo "$check_out" >&2
  grep -q "unknown flag" <<< "$check_out" \
    && die "the workers' copy of launch/worker_start.sh is older than this one: run launch/tpu_setup.sh first"
  die "run $GENVIS_RUN_NAME is still running on a worker, or a worker could not be asked (above); stop it on every worker first: launch/tpu_run.sh --name=$TPU_NAME --zone=$TPU_ZONE --run-name=$GENVIS_RUN_NAME --stop"
fi
[[ "$DRY_RUN" == 1 ]] && echo "$check_out"
main_args=(--config="$GENVIS_CONFIG" --workdir="$GENVIS_WORKDIR" "${EXTRA_ARGS[@]}")
# The remote shell must expand $HOME in the paths but not touch the run's arguments.
tpu_ssh "$TPU_WORKER" "cd $dir && ${start[*]} -- $(quote "${main_args[@]}")"
case "$mode" in
  pretokenize) output="tokens: $tokens-* on each worker's disk (copy them and their .json records to the bucket)" ;;
  sample) output="samples: $GENVIS_WORKDIR/samples.npz" ;;
  evaluate) output="metrics: $GENVIS_WORKDIR/metrics.json" ;;
  *) output="checkpoints: $GENVIS_WORKDIR/checkpoints" ;;
esac
echo "logs: launch/tpu_logs.sh --name=$TPU_NAME --zone=$TPU_ZONE --run-name=$GENVIS_RUN_NAME; $output" >&2
