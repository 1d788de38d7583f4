#!/usr/bin/env bash
# Installs genvis_jax on every worker of a TPU VM / pod slice.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SCRIPT_USAGE="Installs the project on every worker: copies this checkout (a tarball of the
git-tracked and untracked-but-not-ignored files, via gcloud ... scp --worker=all) or
clones --git-url, creates a venv and runs pip install -e '.[tpu]', then prints
each worker's JAX devices. Re-running replaces the copied code with this checkout's
(files deleted or renamed here go there too; the venv is kept).
Example:
  launch/tpu_setup.sh --name=rar-xl --zone=us-central2-b"

tpu_common_flags
flag worker TPU_WORKER "all" "workers to set up: all, or an index"
flag git-url GENVIS_GIT_URL "" "clone this repository instead of copying the local checkout"
flag git-ref GENVIS_GIT_REF "main" "branch / tag / commit for --git-url"
flag remote-dir GENVIS_REMOTE_DIR "genvis_jax" "checkout on the workers (relative: under \$HOME)"
flag venv GENVIS_VENV "genvis_venv" "virtualenv on the workers (relative: under \$HOME)"
flag extras GENVIS_EXTRAS "tpu" "pip extras to install"
flag python GENVIS_PYTHON "python3.11" "python (>= 3.11) for the venv; apt-installed if missing"
flag log-dir GENVIS_LOG_DIR "genvis_logs" "tpu_run.sh's log directory on the workers: a run recorded there as running stops a copy"
bool_flag skip-check GENVIS_SKIP_CHECK "do not run the jax device check"
parse_flags "$@"
require name zone

# The folder as given, without trailing slashes (quoted, a slash left in
# the quotes would put $dir.new inside the checkout).
given_dir="$(strip_slashes "$GENVIS_REMOTE_DIR")"
dir="$(remote_path "$given_dir")"
venv="$(remote_path "$GENVIS_VENV")"

# A run started from the checkout works in it: replacing or updating it under
# the run would pull its code away. A run's pid file (worker_start.sh) holds
# its pid and start time; a pid alone (an older file) is trusted as it is.
logs="$(remote_path "$GENVIS_LOG_DIR")"
live="for p in $logs/*.pid; do [ -f \"\$p\" ] || continue; read -r pid started < \"\$p\"; if kill -0 \"\$pid\" 2>/dev/null && { [ -z \"\$started\" ] || [ \"\$(sed 's/.*) //' /proc/\$pid/stat | cut -d' ' -f20)\" = \"\$started\" ]; }; then echo \"\$(hostname): a run is going (\$p); stop it first (tpu_run.sh --stop)\" >&2; exit 3; fi; done"

if [[ -n "$GENVIS_GIT_URL" ]]; then
  fetch="if [ -d $dir/.git ]; then git -C $dir fetch --quiet origin; elif [ -e $dir ]; then echo \"\$(hostname): $dir holds a copied checkout, not a git one: remove it (rm -rf $dir) or set it up without --git-url\" >&2; exit 3; else git clone --quiet $(quote "$GENVIS_GIT_URL") $dir; fi && git -C $dir checkout --quiet $(quote "$GENVIS_GIT_REF") && (git -C $dir pull --quiet --ff-only 2>/dev/null || true)"
  tpu_ssh "$TPU_WORKER" "$live; $fetch"
else
  # A folder of its own: a fixed name in a shared TMPDIR could be another
  # user's file, or a second setup's half-written one.
  if [[ "$DRY_RUN" == 1 ]]; then
    tarball="${TMPDIR:-/tmp}/tmp.XXXXXXXXXX/genvis_jax_src.tar.gz"
  else
    staging="$(mktemp -d)"
    trap 'rm -rf "$staging"' EXIT
    tarball="$staging/genvis_jax_src.tar.gz"
  fi
  # Re-running setup replaces this folder: not /, a top-level folder, a home
  # folder (~, ~user, $HOME in any spelling), the current one or a parent.
  home_re='^(~[^/]*|\$HOME|\$\{HOME\}|"\$HOME"|"\$\{HOME\}")(/\.)?$'
  if [[ "$given_dir" =~ ^/[^/]*$ || "$given_dir" =~ $home_re
        || "$given_dir" =~ ^(\.\.?)?$ || "$given_dir" =~ /\.\.?$ ]]; then
    die "--remote-dir=$GENVIS_REMOTE_DIR: give the checkout's own folder (e.g. genvis_jax): re-running setup replaces it"
  fi
  # Tracked + untracked-not-ignored files (no venvs, caches or build outputs),
  # less those deleted here but not yet committed.
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "+ (cd $GENVIS_ROOT && git ls-files -co --exclude-standard -z | (existing files) | tar czf $tarball --null -T -)"
  else
    (cd "$GENVIS_ROOT" && git ls-files -co --exclude-standard -z \
       | while IFS= read -r -d '' f; do if [[ -e "$f" || -L "$f" ]]; then printf '%s\0' "$f"; fi; done \
       | tar czf "$tarball" --null -T -)
  fi
  gcloud_tpu scp "$tarball" "$TPU_NAME:genvis_jax_src.tar.gz" --worker="$TPU_WORKER"
  # Unpacked beside the old copy, then swapped in: no stale files survive.
  tpu_ssh "$TPU_WORKER" "$live; rm -rf $dir.new $dir.old && mkdir -p $dir.new && tar xzf \"\$HOME\"/genvis_jax_src.tar.gz -C $dir.new && rm \"\$HOME\"/genvis_jax_src.tar.gz && (test ! -e $dir || mv $dir $dir.old) && mv $dir.new $dir && rm -rf $dir.old"
fi

py="$GENVIS_PYTHON"
# TPU VM images (Ubuntu 22.04) ship python 3.10; the project needs >= 3.11.
get_python="(command -v $py >/dev/null || (sudo apt-get -qq update && sudo DEBIAN_FRONTEND=noninteractive apt-get -qq install -y $py $py-venv))"
install="$get_python && (test -x $venv/bin/python || $py -m venv $venv) && $venv/bin/pip install --quiet --upgrade pip && cd $dir && $venv/bin/pip install --quiet -e '.[$GENVIS_EXTRAS]'"
tpu_ssh "$TPU_WORKER" "$install"

if [[ "$GENVIS_SKIP_CHECK" != 1 ]]; then
  # Every worker must run it at once on a pod (the TPU runtime waits for all).
  check="$venv/bin/python -c 'import jax; print(\"process\", jax.process_index(), \"of\", jax.process_count(), jax.local_device_count(), \"local /\", jax.device_count(), \"devices:\", jax.devices()[0].device_kind)'"
  tpu_ssh "$TPU_WORKER" "$check"
fi
echo "next: launch/tpu_run.sh --name=$TPU_NAME --zone=$TPU_ZONE --config=configs/... --workdir=gs://..." >&2
