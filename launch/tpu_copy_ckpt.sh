#!/usr/bin/env bash
# Copies a run's checkpoints from its gs:// workdir to a local directory.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SCRIPT_USAGE="Copies checkpoints (workdir/checkpoints/<step>/) from the run's gs:// workdir
to --dest. The copy is itself a workdir: --config.init_from=DEST loads its latest
checkpoint (EMA if present), e.g. for sampling on a GPU machine.
--config=CONFIG (instead of --run-name=RUN) copies tpu_run.sh's run of CONFIG:
$RUN_NAME_RULE
Example:
  launch/tpu_copy_ckpt.sh --bucket=my-bucket --run-name=rar_xl --step=250000 --dest=ckpt/rar_xl"

flag workdir GENVIS_WORKDIR "" "gs:// run directory"
flag bucket GCS_BUCKET "" "bucket of the default workdir gs://BUCKET/runs/RUN"
flag run-name GENVIS_RUN_NAME "" "run name for the default workdir (default: from --config)"
flag config GENVIS_CONFIG "" "the run's --config of tpu_run.sh, for its default run name"
flag dest GENVIS_DEST "" "local directory (default: checkpoints/RUN)"
flag step GENVIS_STEP "" "copy only this step (default: every kept step)"
flag tool GENVIS_GCS_TOOL "gcloud" "gcloud (gcloud storage cp) or gsutil (gsutil -m cp)"
parse_flags "$@"
resolve_run_name

if [[ -z "$GENVIS_WORKDIR" ]]; then
  [[ -n "$GCS_BUCKET" && -n "$GENVIS_RUN_NAME" ]] \
    || die "--workdir=gs://... (or --bucket and --run-name or --config) is required"
  GENVIS_WORKDIR="gs://${GCS_BUCKET#gs://}/runs/$GENVIS_RUN_NAME"
fi
check_gs "$GENVIS_WORKDIR" workdir
GENVIS_WORKDIR="${GENVIS_WORKDIR%/}"
dest="${GENVIS_DEST:-checkpoints/$(basename "$GENVIS_WORKDIR")}"
[[ -z "$GENVIS_STEP" || "$GENVIS_STEP" =~ ^[0-9]+$ ]] || die "--step=$GENVIS_STEP is not a number"

# Step directories land in DEST/checkpoints/<step>, the layout a workdir has.
src="$GENVIS_WORKDIR/checkpoints/${GENVIS_STEP:-*}"
case "$GENVIS_GCS_TOOL" in
  gcloud) copy=(gcloud storage cp -r) ;;
  gsutil) copy=(gsutil -m cp -r) ;;
  *) die "--tool=$GENVIS_GCS_TOOL: choose gcloud or gsutil" ;;
esac
run mkdir -p "$dest/checkpoints"
run "${copy[@]}" "$src" "$dest/checkpoints/"
echo "copied to $dest (use --config.init_from=$dest)" >&2
