#!/usr/bin/env bash
# Creates a TPU VM (v4-8, v5litepod-8, ...) or a pod slice (v4-64, v5litepod-256, v5p-128, ...).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SCRIPT_USAGE="Creates a Cloud TPU VM or pod slice with gcloud compute tpus tpu-vm create.
The runtime --version defaults from the accelerator generation:
  v4 -> tpu-ubuntu2204-base, v5litepod -> v2-alpha-tpuv5-lite, v5p -> v2-alpha-tpuv5,
  v6e -> v2-alpha-tpuv6e.
Example:
  launch/tpu_create.sh --name=rar-xl --zone=us-central2-b --accelerator-type=v4-256 --spot"

tpu_common_flags
flag accelerator-type TPU_ACCELERATOR_TYPE "" "e.g. v4-8, v4-256, v5litepod-256, v5p-128, v6e-64"
flag version TPU_VERSION "" "TPU software version (default: from the accelerator type)"
bool_flag spot TPU_SPOT "Spot VM (cheaper, can be reclaimed: then tpu_delete.sh, tpu_create.sh, tpu_setup.sh and the same tpu_run.sh resume)"
bool_flag preemptible TPU_PREEMPTIBLE "preemptible VM (older form of --spot)"
flag network TPU_NETWORK "" "VPC network (default: gcloud's default)"
parse_flags "$@"
require name zone accelerator-type

default_version() {
  case "$1" in
    v2-*|v3-*|v4-*) echo "tpu-ubuntu2204-base" ;;
    v5litepod-*|v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) return 1 ;;
  esac
}

[[ "$TPU_ACCELERATOR_TYPE" =~ ^v[0-9]+[a-z]*-[0-9]+$ ]] \
  || die "--accelerator-type=$TPU_ACCELERATOR_TYPE is not GENERATION-CORES like v4-8, v5litepod-256, v5p-128"
if [[ -z "$TPU_VERSION" ]]; then
  TPU_VERSION="$(default_version "$TPU_ACCELERATOR_TYPE")" \
    || die "no default --version for $TPU_ACCELERATOR_TYPE; pass --version (see gcloud compute tpus versions list --zone=$TPU_ZONE)"
fi
[[ "$TPU_SPOT" == 1 && "$TPU_PREEMPTIBLE" == 1 ]] && die "choose one of --spot and --preemptible"

args=("$TPU_NAME" --accelerator-type="$TPU_ACCELERATOR_TYPE" --version="$TPU_VERSION")
[[ "$TPU_SPOT" == 1 ]] && args+=(--spot)
[[ "$TPU_PREEMPTIBLE" == 1 ]] && args+=(--preemptible)
[[ -n "$TPU_NETWORK" ]] && args+=(--network="$TPU_NETWORK")
gcloud_tpu create "${args[@]}"
echo "next: launch/tpu_setup.sh --name=$TPU_NAME --zone=$TPU_ZONE" >&2
