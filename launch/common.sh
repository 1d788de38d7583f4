# shellcheck shell=bash
# Shared helpers for launch/*.sh (sourced, not run).
#
# A script declares its flags, then parses:
#   SCRIPT_USAGE="what it does"            # first lines of --help
#   flag zone TPU_ZONE "" "GCE zone"        # --zone=V / --zone V; env TPU_ZONE is the default
#   bool_flag spot TPU_SPOT "spot VM"       # --spot sets TPU_SPOT=1
#   parse_flags "$@"                         # --help, --dry-run, --, unknown flags
#   require zone                             # clear error when empty
#   run gcloud compute tpus ...              # prints instead of running under --dry-run
#
# DRY_RUN=1 (or --dry-run) prints each command, shell-quoted, prefixed "+ ",
# and runs nothing: the tests check the printed gcloud commands this way.

set -euo pipefail

# shellcheck disable=SC2034  # used by the scripts that source this file
GENVIS_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY_RUN="${DRY_RUN:-0}"
EXTRA_ARGS=()
_FLAG_NAMES=()
_FLAG_VARS=()
_FLAG_BOOL=()
_FLAG_HELP=()

die() {
  echo "error: $*" >&2
  exit 2
}

# flag NAME VAR DEFAULT HELP: a valued flag; the env var VAR overrides DEFAULT.
flag() {
  local name="$1" var="$2" default="$3" help="$4"
  _FLAG_NAMES+=("$name"); _FLAG_VARS+=("$var"); _FLAG_BOOL+=(0); _FLAG_HELP+=("$help")
  printf -v "$var" '%s' "${!var:-$default}"
}

# bool_flag NAME VAR HELP: --NAME sets VAR=1, --no-NAME sets VAR=0 (default env or 0).
bool_flag() {
  local name="$1" var="$2" help="$3"
  _FLAG_NAMES+=("$name"); _FLAG_VARS+=("$var"); _FLAG_BOOL+=(1); _FLAG_HELP+=("$help")
  printf -v "$var" '%s' "${!var:-0}"
}

usage() {
  local script
  script="$(basename "$0")"
  echo "Usage: launch/$script [flags]${SCRIPT_EXTRA_USAGE:-}"
  echo
  echo "${SCRIPT_USAGE}"
  echo
  echo "Flags (each defaults to the environment variable named in brackets):"
  local i
  for i in "${!_FLAG_NAMES[@]}"; do
    local name="${_FLAG_NAMES[$i]}" var="${_FLAG_VARS[$i]}"
    if [[ "${_FLAG_BOOL[$i]}" == 1 ]]; then
      printf '  --%-22s %s [%s]\n' "$name" "${_FLAG_HELP[$i]}" "$var"
    else
      printf '  --%-22s %s [%s%s]\n' "$name=VALUE" "${_FLAG_HELP[$i]}" "$var" \
        "${!var:+, now: ${!var}}"
    fi
  done
  printf '  --%-22s %s [%s]\n' "dry-run" "print the commands, run nothing" "DRY_RUN=1"
  printf '  --%-22s %s\n' "help" "this message"
}

_flag_index() {
  local i
  for i in "${!_FLAG_NAMES[@]}"; do
    if [[ "${_FLAG_NAMES[$i]}" == "$1" ]]; then echo "$i"; return 0; fi
  done
  return 1
}

parse_flags() {
  while (($#)); do
    local arg="$1"; shift
    case "$arg" in
      -h|--help) usage; exit 0 ;;
      --dry-run) DRY_RUN=1; continue ;;
      --) EXTRA_ARGS+=("$@"); return 0 ;;
      --*) ;;
      *) die "unexpected argument '$arg' (see --help; pass program arguments after --)" ;;
    esac
    local name="${arg#--}" value="" has_value=0
    if [[ "$name" == *=* ]]; then
      value="${name#*=}"; name="${name%%=*}"; has_value=1
    fi
    local i negate=0
    if ! i="$(_flag_index "$name")"; then
      if [[ "$name" == no-* ]] && i="$(_flag_index "${name#no-}")" \
          && [[ "${_FLAG_BOOL[$i]}" == 1 ]]; then
        negate=1
      else
        die "unknown flag --$name (see launch/$(basename "$0") --help)"
      fi
    fi
    local var="${_FLAG_VARS[$i]}"
    if [[ "${_FLAG_BOOL[$i]}" == 1 ]]; then
      ((has_value)) && die "--$name takes no value"
      printf -v "$var" '%s' "$((1 - negate))"
      continue
    fi
    if ((!has_value)); then
      (($#)) && [[ "$1" != --* ]] || die "--$name needs a value (--$name=VALUE)"
      value="$1"; shift
    fi
    printf -v "$var" '%s' "$value"
  done
}

# require NAME...: each flag must be non-empty.
require() {
  local name i var
  for name in "$@"; do
    i="$(_flag_index "$name")" || die "internal: no flag --$name"
    var="${_FLAG_VARS[$i]}"
    [[ -n "${!var}" ]] || die "--$name is required (or set $var); see launch/$(basename "$0") --help"
  done
}

# quote ARGS...: one shell-safe, readable line (plain words stay unquoted).
quote() {
  local out=() a
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=,@%+~-]+$ ]]; then
      out+=("$a")
    else
      out+=("'${a//\'/\'\\\'\'}'")
    fi
  done
  echo "${out[*]}"
}

# run CMD ARGS...: runs, or prints "+ CMD ARGS" under --dry-run.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "+ $(quote "$@")"
  else
    echo "+ $(quote "$@")" >&2
    "$@"
  fi
}

# gcloud_tpu VERB ARGS...: gcloud compute tpus tpu-vm VERB with zone / project.
gcloud_tpu() {
  local verb="$1"; shift
  local extra=(--zone="$TPU_ZONE")
  [[ -n "${GCP_PROJECT:-}" ]] && extra+=(--project="$GCP_PROJECT")
  run gcloud compute tpus tpu-vm "$verb" "$@" "${extra[@]}"
}

# tpu_ssh WORKER REMOTE_COMMAND: the same command on one worker or on all.
tpu_ssh() {
  gcloud_tpu ssh "$TPU_NAME" --worker="$1" --command="$2"
}

# Flags every TPU script shares.
tpu_common_flags() {
  flag name TPU_NAME "" "TPU VM / pod slice name"
  flag zone TPU_ZONE "" "GCE zone, e.g. us-central2-b"
  flag project GCP_PROJECT "" "GCP project (default: gcloud's configured one)"
}

# check_gs PATH FLAG: a gs:// URL (what every TPU worker can read and write).
check_gs() {
  [[ "$1" == gs://?* ]] || die "--$2=$1 must be a gs:// URL (every worker writes to it)"
}

# The default run name (tpu_run.sh, tpu_logs.sh, tpu_copy_ckpt.sh): the config
# file's name without .py, then, if --config has an argument after ':', '_' and
# the argument with '=' dropped and every other character outside [A-Za-z0-9_-]
# made '_'. Runs of one file with different arguments get their own workdir.
# shellcheck disable=SC2034  # used in the scripts' --help
RUN_NAME_RULE="Without --run-name, RUN is the --config file's name and argument: configs/rar_xl.py -> rar_xl,
configs/far_b.py:dual,batch=512 -> far_b_dual_batch512 ('=' dropped, any other
character outside A-Z a-z 0-9 _ - made '_'). tpu_run.sh adds a mode other than
train: -- --config.mode=sample runs as rar_xl_sample (its own log and workdir)."

# config_run_name CONFIG: the default run name of --config=CONFIG (see above).
config_run_name() {
  local file="${1%%:*}" name
  name="$(basename "$file" .py)"
  [[ "$1" == *:?* ]] && name+="_${1#*:}"
  name="${name//=/}"
  LC_ALL=C sed 's/[^A-Za-z0-9_-]/_/g' <<< "$name"
}

# extra_mode: the last --config.mode among the program's flags (after --),
# default train: the mode part of the run name tpu_run.sh gives the run.
extra_mode() {
  local mode=train i
  for ((i = 0; i < ${#EXTRA_ARGS[@]}; i++)); do
    case "${EXTRA_ARGS[i]}" in
      --config.mode=*) mode="${EXTRA_ARGS[i]#--config.mode=}" ;;
      --config.mode) mode="${EXTRA_ARGS[i + 1]:-}" ;;
    esac
  done
  echo "$mode"
}

# resolve_run_name [MODE]: GENVIS_RUN_NAME (--run-name) as given, else from
# GENVIS_CONFIG (--config) when set, with "_MODE" for a MODE other than train,
# else left empty; a given name must be a safe file name.
resolve_run_name() {
  local mode="${1:-train}"
  if [[ -z "$GENVIS_RUN_NAME" && -n "${GENVIS_CONFIG:-}" ]]; then
    GENVIS_RUN_NAME="$(config_run_name "$GENVIS_CONFIG")"
    [[ "$mode" == train ]] || GENVIS_RUN_NAME+="_$mode"
  fi
  [[ -z "$GENVIS_RUN_NAME" || "$GENVIS_RUN_NAME" =~ ^[A-Za-z0-9_.-]+$ ]] \
    || die "--run-name=$GENVIS_RUN_NAME: use letters, digits, '.', '_' and '-' only"
}

# run_workdir BUCKET RUN: tpu_run.sh's default workdir gs://BUCKET/runs/RUN
# (BUCKET with or without gs:// and a trailing slash).
run_workdir() {
  local bucket="${1#gs://}"
  echo "gs://${bucket%/}/runs/$2"
}

# remote_path P: P for the worker's shell, quoted (a space in a home folder or
# a name is one word there); relative paths and ~/... are under $HOME there.
# A path holding '$' (or ~user/...) is the user's own words for that shell,
# expanded there, and passed as it is.
remote_path() {
  case "$1" in
    *'$'*) echo "$1" ;;
    '~') echo '"$HOME"' ;;
    '~/'*) echo "\"\$HOME\"/$(quote "${1#\~/}")" ;;
    '~'*) echo "$1" ;;
    /*) quote "$1" ;;
    *) echo "\"\$HOME\"/$(quote "$1")" ;;
  esac
}

# remote_word V: a flag's value for the worker's shell: a path starting with
# ~ or holding $ as remote_path gives it (expanded there), anything else
# (an absolute path, gs://...) quoted.
remote_word() {
  case "$1" in
    *'$'*|'~'*) remote_path "$1" ;;
    *) quote "$1" ;;
  esac
}

# strip_slashes P: P without its trailing slashes ('/' stays '/').
strip_slashes() {
  local p="$1"
  while [[ "$p" == */ && "$p" != / ]]; do p="${p%/}"; done
  echo "$p"
}

# abs_path P: P made absolute against the caller's directory (gs:// and empty kept).
abs_path() {
  case "$1" in
    ''|/*|gs://*) echo "$1" ;;
    *) echo "$PWD/$1" ;;
  esac
}
