#!/usr/bin/env bash
# One machine with one or more GPUs: install, convert official weights, sample, evaluate.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SCRIPT_EXTRA_USAGE=" [-- --config.KEY=VALUE ... (sampling overrides)]"
SCRIPT_USAGE="On one GPU machine (jax uses every local GPU; no distributed set-up needed):
  1. python -m venv + pip install -e '.[gpu]'            (skip with --skip-install)
  2. convert official weights given as --*-src files     (genvis_jax.convert)
  3. sample --num-samples images  (config.mode=sample)   -> WORKDIR/samples/samples.npz
  4. FID / sFID / IS / precision / recall against an ADM reference batch
     (config.mode=evaluate, config.evaluate.kind=generation) -> WORKDIR/eval/metrics.json
Sampling resumes where it stopped when re-run with the same --workdir; compiled
programs are kept in WORKDIR/jax_cache (JAX_COMPILATION_CACHE_DIR overrides).
Example (official RAR-XL weights):
  launch/gpu_sample_eval.sh --config=configs/rar_xl.py --workdir=/data/rar_xl_eval \\
      --rar-src=rar_xl.bin --tokenizer-src=maskgit-vqgan-imagenet-f16-256.bin \\
      --inception-src=pt_inception-2015-12-05-6726825d.pth \\
      --reference=VIRTUAL_imagenet256_labeled.npz"

flag config GENVIS_CONFIG "configs/rar_xl.py" "generator config"
flag workdir GENVIS_WORKDIR "" "local output directory (weights/, samples/, eval/)"
flag rar-ckpt GENVIS_RAR_CKPT "" "converted generator dir or a training workdir (e.g. from tpu_copy_ckpt.sh)"
flag rar-src GENVIS_RAR_SRC "" "official RAR checkpoint (.bin) to convert"
flag tokenizer-ckpt GENVIS_TOKENIZER_CKPT "" "converted MaskGIT VQGAN dir"
flag tokenizer-src GENVIS_TOKENIZER_SRC "" "official maskgit-vqgan-imagenet-f16-256.bin to convert"
flag inception GENVIS_INCEPTION "" "converted FID Inception dir"
flag inception-src GENVIS_INCEPTION_SRC "" "pytorch-fid pt_inception-2015-12-05-6726825d.pth to convert"
flag reference GENVIS_REFERENCE "" "ADM reference batch, e.g. VIRTUAL_imagenet256_labeled.npz"
flag num-samples GENVIS_NUM_SAMPLES "50000" "images to sample (50 per class for 50k)"
flag batch-size GENVIS_SAMPLE_BATCH "" "sampling batch, a multiple of the GPU count (default: the config's)"
flag venv GENVIS_VENV ".venv-gpu" "virtualenv (relative: under the repo)"
flag python GENVIS_PYTHON "python3" "python (>= 3.11) that creates the venv"
bool_flag skip-install GENVIS_SKIP_INSTALL "use the existing venv as is"
bool_flag skip-eval GENVIS_SKIP_EVAL "sample only"
parse_flags "$@"
require workdir
[[ "$GENVIS_NUM_SAMPLES" =~ ^[1-9][0-9]*$ ]] || die "--num-samples=$GENVIS_NUM_SAMPLES is not a positive number"
[[ -z "$GENVIS_SAMPLE_BATCH" || "$GENVIS_SAMPLE_BATCH" =~ ^[1-9][0-9]*$ ]] \
  || die "--batch-size=$GENVIS_SAMPLE_BATCH is not a positive number"
[[ -f "$GENVIS_ROOT/${GENVIS_CONFIG%%:*}" ]] || die "--config=$GENVIS_CONFIG: no such file in $GENVIS_ROOT"
[[ -n "$GENVIS_RAR_CKPT" || -n "$GENVIS_RAR_SRC" ]] || die "--rar-ckpt or --rar-src is required"
[[ -n "$GENVIS_TOKENIZER_CKPT" || -n "$GENVIS_TOKENIZER_SRC" ]] \
  || die "--tokenizer-ckpt or --tokenizer-src is required"
if [[ "$GENVIS_SKIP_EVAL" != 1 ]]; then
  [[ -n "$GENVIS_INCEPTION" || -n "$GENVIS_INCEPTION_SRC" ]] \
    || die "--inception or --inception-src is required (or --skip-eval)"
  [[ -n "$GENVIS_REFERENCE" ]] || die "--reference is required (or --skip-eval)"
fi

for var in GENVIS_WORKDIR GENVIS_RAR_CKPT GENVIS_RAR_SRC GENVIS_TOKENIZER_CKPT \
    GENVIS_TOKENIZER_SRC GENVIS_INCEPTION GENVIS_INCEPTION_SRC GENVIS_REFERENCE; do
  printf -v "$var" '%s' "$(abs_path "${!var}")"   # before cd-ing to the repo
done
# Inputs exist before anything installs or samples (a typo in --reference
# would otherwise surface after the whole sampling run).
for var in GENVIS_RAR_CKPT GENVIS_RAR_SRC GENVIS_TOKENIZER_CKPT GENVIS_TOKENIZER_SRC \
    GENVIS_INCEPTION GENVIS_INCEPTION_SRC GENVIS_REFERENCE; do
  name="$(tr 'A-Z_' 'a-z-' <<< "${var#GENVIS_}")"   # GENVIS_RAR_SRC -> rar-src
  [[ -z "${!var}" || "${!var}" == gs://* || -e "${!var}" ]] \
    || die "--$name=${!var}: no such file or directory"
done
cd "$GENVIS_ROOT"
venv="$GENVIS_VENV"
py="$venv/bin/python"
wd="${GENVIS_WORKDIR%/}"
# XLA's compiled programs, kept across runs: the RAR-B sampler compiles for
# ~110 s on an H200 (bench/RESULTS.md); a resumed or repeated run loads it.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$wd/jax_cache}"
echo "compiled programs cached in $JAX_COMPILATION_CACHE_DIR" >&2

if [[ "$GENVIS_SKIP_INSTALL" != 1 ]]; then
  [[ -x "$py" ]] || run "$GENVIS_PYTHON" -m venv "$venv"
  run "$venv/bin/pip" install --quiet --upgrade pip
  run "$venv/bin/pip" install --quiet -e '.[gpu]'
fi

# convert KIND SRC DST [CONFIG]: official weights -> Orbax dir (skipped if DST exists).
convert() {
  local kind="$1" src="$2" dst="$3" cfg="${4:-}"
  if [[ -e "$dst" ]]; then echo "exists: $dst (delete it to convert again)" >&2; return 0; fi
  local args=(-m genvis_jax.convert --kind="$kind" --src="$src" --dst="$dst")
  [[ -n "$cfg" ]] && args+=(--config="$cfg")
  run "$py" "${args[@]}"
}

rar="$GENVIS_RAR_CKPT"
if [[ -z "$rar" ]]; then
  rar="$wd/weights/rar"
  convert rar "$GENVIS_RAR_SRC" "$rar" "$GENVIS_CONFIG"
fi
tok="$GENVIS_TOKENIZER_CKPT"
if [[ -z "$tok" ]]; then
  tok="$wd/weights/maskgit_vqgan"
  convert maskgit_vqgan "$GENVIS_TOKENIZER_SRC" "$tok" configs/maskgit_vqgan.py
fi

inc="$GENVIS_INCEPTION"   # converted before sampling: a bad file fails early
if [[ "$GENVIS_SKIP_EVAL" != 1 && -z "$inc" ]]; then
  inc="$wd/weights/inception"
  convert inception "$GENVIS_INCEPTION_SRC" "$inc"
fi

sample=(--config="$GENVIS_CONFIG" --workdir="$wd/samples" --config.mode=sample
        --config.init_from="$rar" --config.tokenizer.checkpoint="$tok"
        --config.sample.num_samples="$GENVIS_NUM_SAMPLES")
[[ -n "$GENVIS_SAMPLE_BATCH" ]] && sample+=(--config.sample.batch_size="$GENVIS_SAMPLE_BATCH")
run "$py" -m genvis_jax.main "${sample[@]}" "${EXTRA_ARGS[@]}"
echo "samples: $wd/samples/samples.npz (first 100 as a grid: $wd/samples/samples.png)"

if [[ "$GENVIS_SKIP_EVAL" != 1 ]]; then
  run "$py" -m genvis_jax.main --config="$GENVIS_CONFIG" --workdir="$wd/eval" \
    --config.mode=evaluate --config.evaluate.kind=generation \
    --config.evaluate.samples="$wd/samples/samples.npz" \
    --config.evaluate.reference="$GENVIS_REFERENCE" --config.evaluate.inception="$inc"
  echo "metrics: $wd/eval/metrics.json (TensorBoard: $wd/eval)"
fi
