#!/usr/bin/env bash
# Copies a run's checkpoints from its gs:// workdir to a local directory.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SCRIPT_USAGE="Copies a checkpoint (workdir/checkpoints/<step>/; by default the newest step,
--step=all every kept one) from the run's gs:// workdir to --dest. The copy is itself a workdir: --config.init_from=DEST loads its latest
checkpoint (EMA if present), e.g. for sampling on a GPU machine.
--config=CONFIG (instead of --run-name=RUN) copies tpu_run.sh's run of CONFIG:
$RUN_NAME_RULE
Example:
  launch/tpu_copy_ckpt.sh --bucket=my-bucket --run-name=rar_xl --dest=ckpt/rar_xl   # newest step"

flag workdir GENVIS_WORKDIR "" "gs:// run directory"
flag bucket GCS_BUCKET "" "bucket of the default workdir gs://BUCKET/runs/RUN"
flag run-name GENVIS_RUN_NAME "" "run name for the default workdir (default: from --config)"
flag config GENVIS_CONFIG "" "the run's --config of tpu_run.sh, for its default run name"
flag dest GENVIS_DEST "" "local directory (default: checkpoints/RUN)"
flag step GENVIS_STEP "latest" "the step to copy: a number, latest (the newest saved) or all (every kept step)"
flag tool GENVIS_GCS_TOOL "gcloud" "gcloud (gcloud storage cp) or gsutil (gsutil -m cp)"
parse_flags "$@"
# A run of another mode (-- --config.mode=sample) has its own name, as
# tpu_run.sh gives it.
resolve_run_name "$(extra_mode)"

if [[ -z "$GENVIS_WORKDIR" ]]; then
  [[ -n "$GCS_BUCKET" && -n "$GENVIS_RUN_NAME" ]] \
    || die "--workdir=gs://... (or --bucket and --run-name or --config) is required"
  GENVIS_WORKDIR="$(run_workdir "$GCS_BUCKET" "$GENVIS_RUN_NAME")"
fi
check_gs "$GENVIS_WORKDIR" workdir
GENVIS_WORKDIR="${GENVIS_WORKDIR%/}"
dest="${GENVIS_DEST:-checkpoints/$(basename "$GENVIS_WORKDIR")}"
[[ "$GENVIS_STEP" =~ ^([0-9]+|latest|all)$ ]] || die "--step=$GENVIS_STEP: give a step number, latest or all"

case "$GENVIS_GCS_TOOL" in
  gcloud) copy=(gcloud storage cp -r); list=(gcloud storage ls) ;;
  gsutil) copy=(gsutil -m cp -r); list=(gsutil ls) ;;
  *) die "--tool=$GENVIS_GCS_TOOL: choose gcloud or gsutil" ;;
esac
case "$GENVIS_STEP" in
  all) GENVIS_STEP="[0-9]*" ;;   # every kept step, not the corrupt-<step> folders
  latest)
    # The newest finished save: on gs:// Orbax writes a step in its folder
    # and adds commit_success.txt last (a save cut short has none).
    done_files="$GENVIS_WORKDIR/checkpoints/*/commit_success.txt"
    if [[ "$DRY_RUN" == 1 ]]; then
      run "${list[@]}" "$done_files"
      GENVIS_STEP=NEWEST
    else
      steps="$("${list[@]}" "$done_files")" \
        || die "cannot list $done_files (above): no finished step, or the bucket cannot be read"
      GENVIS_STEP="$(sed -nE 's#.*/checkpoints/([0-9]+)/commit_success\.txt$#\1#p' <<< "$steps" | sort -n | tail -n 1)"
      [[ -n "$GENVIS_STEP" ]] || die "no finished step in $GENVIS_WORKDIR/checkpoints/"
    fi ;;
esac

# Step directories land in DEST/checkpoints/<step>, the layout a workdir has.
src="$GENVIS_WORKDIR/checkpoints/$GENVIS_STEP"
run mkdir -p "$dest/checkpoints"
run "${copy[@]}" "$src" "$dest/checkpoints/"
echo "copied to $dest (use --config.init_from=$dest)" >&2
