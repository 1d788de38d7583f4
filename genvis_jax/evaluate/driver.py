"""``config.mode == "evaluate"``: ``config.evaluate.kind`` names the module.

  tokenizer    reconstruction rFID / LPIPS / PSNR / SSIM / codebook usage
  generation   FID / sFID / IS / precision / recall of a samples npz (ADM)
  reference    an ADM-format reference npz of config.data's eval split
  demo_fid     demo-scale FID on the demo classifier's features
  class_score  how often samples are classified as their conditioning class

Each is ``genvis_jax/evaluate/<kind>.py`` defining ``evaluate(config, workdir)``
(see ``genvis_jax.core.registry``).
"""

from __future__ import annotations

from genvis_jax import errors
from genvis_jax import models
from genvis_jax.core import dtypes
from genvis_jax.core import files
from genvis_jax.core import multihost
from genvis_jax.core import registry
from genvis_jax.evaluate import batching

# Kinds that score samples with the demo's small classifier (``configs/demo.py``
# stages ``score`` and ``fid``): config.model is that classifier.
CLASSIFIER_KINDS = ("class_score", "demo_fid")


def _check_tokenizer_kind(config) -> None:
  """kind=tokenizer evaluates ``config.model``: a generator config's model is
  not a tokenizer, and its tokenizer's own config holds the data and
  protocol (eval split, rFID preprocessing) that tokenizer is evaluated by.
  Raises ``ConfigError`` naming that config file
  (``config.tokenizer.config_file``) where the config records it."""
  model = config.get("model", None)
  if model is None or models.is_image_tokenizer(model):
    return
  tok = config.get("tokenizer", {})
  tok_name = tok.get("model", {}).get("name", "")
  if tok_name:
    weights = (config.evaluate.get("checkpoint", "") or tok.get("checkpoint", "")
               or "DIR")
    flags = f"--config.mode=evaluate --config.evaluate.checkpoint={weights}"
    where = tok.get("config_file", "")
    hint = (f" Evaluate its tokenizer {tok_name!r} with that tokenizer's "
            f"config: --config={where} {flags}." if where else
            f" Evaluate its tokenizer {tok_name!r} with the config that trains "
            f"it, and {flags}.")
  else:
    hint = " Run it with a tokenizer's config (e.g. configs/maskgit_vqgan.py)."
  raise errors.ConfigError(
      f"config.evaluate.kind='tokenizer' evaluates config.model as an image "
      f"tokenizer, but this config's model is {model.get('name', '')!r}, "
      f"not a tokenizer.{hint} For this config's samples use "
      "--config.evaluate.kind=generation.")


def check_config(config, workdir: str | None = None):
  """What ``run`` refuses before reading any file: the kind's name and model
  (below), a batch size below 1, and what the kind's module refuses so (its
  ``check_config``, where it has one). A runner of several jobs (the demo)
  calls it for each before the first starts. Returns the kind's module.
  Raises ``ConfigError``."""
  kind = config.evaluate.kind
  name = config.get("model", {}).get("name", "")
  if kind in CLASSIFIER_KINDS and (
      name != "classifier" or "classifier_checkpoint" not in config.evaluate):
    raise errors.ConfigError(
        f"config.evaluate.kind={kind!r} scores samples with the demo's "
        f"classifier (the 'score' and 'fid' stages of configs/demo.py, whose "
        f"config.model is the classifier and config.evaluate."
        f"classifier_checkpoint its weights); this config's model is "
        f"{name!r}. For FID / IS / precision / recall of its samples use "
        "--config.evaluate.kind=generation (see the README's Evaluation).")
  if kind == "tokenizer":
    _check_tokenizer_kind(config)
  batching.check_batch_size(config.evaluate.get("batch_size", 200))
  mod = registry.module("genvis_jax.evaluate", config.evaluate.kind,
                        ("evaluate",), setting="config.evaluate.kind")
  if hasattr(mod, "check_config"):
    mod.check_config(config, workdir)
  return mod


@dtypes.at_matmul_precision(inference=True)
def run(config, workdir: str):
  """Runs ``genvis_jax.evaluate.<config.evaluate.kind>.evaluate(config,
  workdir)`` and returns its results dict. Raises ``ConfigError`` for an
  unknown kind, a classifier kind whose ``config.model`` is not the demo
  classifier (or no ``classifier_checkpoint``), or kind "tokenizer" on a
  model that is not an image tokenizer (``check_config``)."""
  mod = check_config(config, workdir)
  multihost.on_process_0(lambda: files.remove_stale_temporaries(workdir))
  files.remove_stale_transfers()   # each host's own TMPDIR
  return mod.evaluate(config, workdir)
