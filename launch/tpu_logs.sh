#!/usr/bin/env bash
# Follows a run's log on one TPU worker (default: worker 0).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SCRIPT_USAGE="Shows the log tpu_run.sh's run writes on a worker (tail -F; Ctrl-C stops
following, the run goes on). Default: the latest run on worker 0.
--config=CONFIG (instead of --run-name=RUN) follows tpu_run.sh's run of CONFIG:
$RUN_NAME_RULE
Example:
  launch/tpu_logs.sh --name=rar-xl --zone=us-central2-b --worker=3 --lines=500"

tpu_common_flags
flag worker TPU_LOG_WORKER "0" "worker index (or all)"
flag run-name GENVIS_RUN_NAME "" "run name (default: from --config, else the latest run on that worker)"
flag config GENVIS_CONFIG "" "the run's --config of tpu_run.sh, for its default run name"
flag log-dir GENVIS_LOG_DIR "genvis_logs" "log directory on the workers (relative: under \$HOME)"
flag lines GENVIS_LOG_LINES "100" "lines of history to show"
bool_flag no-follow GENVIS_NO_FOLLOW "print the last lines and exit"
parse_flags "$@"
require name zone
[[ "$TPU_LOG_WORKER" =~ ^([0-9]+|all)$ ]] || die "--worker=$TPU_LOG_WORKER: use an index (0, 1, ...) or all"
[[ "$GENVIS_LOG_LINES" =~ ^[0-9]+$ ]] || die "--lines=$GENVIS_LOG_LINES is not a number"
# A run of another mode (-- --config.mode=sample) has its own name, as
# tpu_run.sh gives it.
resolve_run_name "$(extra_mode)"

log="$(remote_path "$GENVIS_LOG_DIR")/${GENVIS_RUN_NAME:-latest}.log"
tail_cmd="tail -n $GENVIS_LOG_LINES"
[[ "$GENVIS_NO_FOLLOW" == 1 ]] || tail_cmd="$tail_cmd -F"
tpu_ssh "$TPU_LOG_WORKER" "$tail_cmd $log"
