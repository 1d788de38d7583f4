"""``config.mode == "evaluate"``: ``config.evaluate.kind`` names the module.

  tokenizer    reconstruction rFID / LPIPS / PSNR / SSIM / codebook usage
  generation   FID / sFID / IS / precision / recall of a samples npz (ADM)
  demo_fid     demo-scale FID on the demo classifier's features
  class_score  how often samples are classified as their conditioning class

Each is ``genvis_jax/evaluate/<kind>.py`` defining ``evaluate(config, workdir)``
(see ``genvis_jax.core.registry``).
"""

from __future__ import annotations

from genvis_jax import errors
from genvis_jax import models
from genvis_jax.core import registry

# Kinds that score samples with the demo's small classifier (``configs/demo.py``
# stages ``score`` and ``fid``): config.model is that classifier.
CLASSIFIER_KINDS = ("class_score", "demo_fid")


def _check_tokenizer_kind(config) -> None:
  """kind=tokenizer evaluates ``config.model``: a generator config's model is
  not a tokenizer, and its tokenizer's own config holds the data and
  protocol (eval split, rFID preprocessing) that tokenizer is evaluated by.
  Raises ``ConfigError`` naming that config file."""
  model = config.get("model", None)
  if model is None or getattr(models.build(model), "value_range", None):
    return
  tok = config.get("tokenizer", {}).get("model", {}).get("name", "")
  if tok:
    where = (config.tokenizer.get("config_file", "")
             or f"configs/<the config that trains {tok!r}>.py")
    weights = config.tokenizer.get("checkpoint", "") or "DIR"
    hint = (f" Evaluate its tokenizer {tok!r} with that tokenizer's config: "
            f"--config={where} --config.mode=evaluate "
            f"--config.evaluate.checkpoint={weights}.")
  else:
    hint = " Run it with a tokenizer's config (configs/maskgit_vqgan.py, ...)."
  raise errors.ConfigError(
      f"config.evaluate.kind='tokenizer' evaluates config.model as an image "
      f"tokenizer, but this config's model is {model.get('name', '')!r}, "
      f"not a tokenizer.{hint} For this config's samples use "
      "--config.evaluate.kind=generation.")


def run(config, workdir: str):
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
  mod = registry.module("genvis_jax.evaluate", config.evaluate.kind,
                        ("evaluate",), setting="config.evaluate.kind")
  return mod.evaluate(config, workdir)
