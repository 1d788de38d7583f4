"""The weights a sampling run loads, and whether this config may sample them.

``pin_weights`` fixes ``init_from`` / ``tokenizer.checkpoint`` to the step
folders they resolve to now (a run's newest step cannot change under the
load); ``check_trained_with`` refuses model settings other than those the
run trained (or was converted) with, telling the changes that would not load
from those that would load and change every image; ``check_tokenizer_origin``
refuses a tokenizer other than the one whose tokens the generator trained on.
``config.sample.allow_model_changes`` names changes made on purpose.
"""

from __future__ import annotations

import copy
import json

import jax
import ml_collections
from absl import logging

from genvis_jax import errors
from genvis_jax import models
from genvis_jax.core import checkpoint_fit as fit
from genvis_jax.core import settings as settings_lib
from genvis_jax.core import weights as weights_lib
from genvis_jax.data import run_origin


class TrainedWithError(errors.UserError, ValueError):
  """A run's weights would be sampled with other model settings than it
  trained with."""


# The sample settings record's keys for the weights (``pinned_sources``).
WEIGHTS = ("weights.generator", "weights.tokenizer")


def pin_weights(config):
  """A copy of ``config`` whose ``init_from`` / ``tokenizer.checkpoint`` name
  the exact folders they resolve to now (``core.weights.resolve``): a run's
  newest step cannot change under the load. Process 0 resolves and every
  process loads its folders, so all draw from the same step even if one is
  saved while they start."""
  paths = weights_lib.resolve_all(
      [config.init_from, config.tokenizer.get("checkpoint", "")])
  pinned = copy.deepcopy(config)
  with pinned.unlocked():
    pinned.init_from = paths[0]
    if pinned.tokenizer.get("checkpoint"):
      pinned.tokenizer.checkpoint = paths[1]
  return pinned


def pinned_sources(pinned) -> dict:
  """``WEIGHTS`` of a pinned config, as ``parts.sample_settings`` records them."""
  return {"weights.generator": weights_lib.params_source(pinned.init_from),
          "weights.tokenizer": weights_lib.params_source(
              pinned.tokenizer.get("checkpoint", ""))}


def check_tokenizer_origin(config, init_from: str,
                           tokenizer_source: str) -> str:
  """Refuses to decode the samples of the generator run ``init_from``
  (pinned) with other tokenizer weights than those whose tokens (codes or
  latents) it trained on: ``tokenizer_source`` (``core.weights.params_source``)
  must be one of them. Passes where they match or the run recorded nothing
  (a converted checkpoint); with ``tokenizer.checkpoint`` named in
  ``config.sample.allow_model_changes`` (a decoder fine-tuned on purpose)
  it warns instead, and returns the warning ("" otherwise).

  Raises:
    TrainedWithError: naming both weights and the fixes.
  """
  run = weights_lib.run_of(init_from)
  trained_on = run_origin.run_token_weights(run)
  if not trained_on or not tokenizer_source or tokenizer_source in trained_on:
    return ""
  msg = weights_lib.readable(
      f"The generator {run} trained on tokens of tokenizer weights "
      f"{trained_on}, but config.tokenizer.checkpoint holds "
      f"{tokenizer_source!r}: the samples would be decoded by another "
      "tokenizer.")
  if _TOKENIZER in allowed_changes(config):
    logging.warning(msg)
    return msg
  raise TrainedWithError(
      f"{msg} Point config.tokenizer.checkpoint at the step the tokens came "
      "from (<run>/checkpoints/<step>); to decode with these weights on "
      "purpose (e.g. a decoder fine-tuned since), pass "
      f"--config.sample.allow_model_changes={_TOKENIZER}.")


# The allow_model_changes name that decodes with other tokenizer weights.
_TOKENIZER = "tokenizer.checkpoint"


def allowed_changes(config) -> set[str]:
  """The keys named in ``config.sample.allow_model_changes`` (a ConfigDict
  or nested dicts; none where unset)."""
  value = (config.get("sample") or {}).get("allow_model_changes") or ""
  return {k.strip() for k in str(value).split(",") if k.strip()}


def check_trained_with(config, pinned, run_keys: dict[str, str]) -> None:
  """Refuses to sample a training run's weights (``pinned.init_from``, its
  step's recorded config), or converted ones, with other ``config.model``
  values, or other values of the sampler's ``run_keys`` (sampling key -> the
  run's key, e.g. the Equivariant latent scale ``sample.latent_scale`` ->
  ``latents.scale``), than the run trained with. A change that leaves the
  weights' shapes alone (an attention window, a latent scale) loads without
  an error and changes every image. Dropout rates (training only) pass.
  A model setting the record (or the
  config) leaves out counts at its default (``models.with_defaults``);
  other keys recorded on one side only (another code version) and those
  named in ``config.sample.allow_model_changes`` (comma-separated) are not
  compared. A parameter checkpoint is checked against the config it
  was converted with, where ``python -m genvis_jax.convert --config``
  recorded it.

  Raises:
    TrainedWithError: naming each setting, the run's value and the fix.
  """
  if not pinned.init_from:
    return
  saved, made = weights_lib.recorded_config(pinned.init_from)
  if not saved or "model" not in saved:
    return
  now = json.loads(config.to_json_best_effort())
  # Settings a record (or this config) leaves out, at their defaults.
  saved = {**saved, "model": models.with_defaults(saved["model"])}
  now["model"] = models.with_defaults(now["model"])
  keys = {k: k for k in settings_lib.flatten({"model": now["model"]})}
  keys.update(run_keys)
  allowed = allowed_changes(config)
  flat_saved, flat_now = settings_lib.flatten(saved), settings_lib.flatten(now)
  differing = [(key, run) for key, run in sorted(keys.items())
               if key not in fit.COMPUTE_ONLY and key not in allowed
               and not models.is_dropout(key)
               and key in flat_now and run in flat_saved
               and flat_saved[run] != flat_now[key]]
  if not differing or ("model.name", "model.name") in differing:
    return   # another model: the weight loader names both
  side = fit.SIDE[made]
  reshaping = _reshaping(saved["model"], now["model"],
                         [key for key, _ in differing])
  reshaped = [(k, r) for k, r in differing if k in reshaping]
  neutral = [(k, r) for k, r in differing if k not in reshaping]

  def lines(pairs):
    return "".join(f"\n  {key}: {side} {flat_saved[run]!r} vs config "
                   f"{flat_now[key]!r}" for key, run in pairs)

  msg = (f"{pinned.init_from} was {made} with other settings than this "
         f"config samples it with. Pass the values it was {made} with.")
  if reshaped:
    msg += (" These change the weights' shapes (they would not load):"
            + lines(reshaped))
  if neutral:
    names = ",".join(key for key, _ in neutral)
    msg += ((" These" if not reshaped else "\nThese") + " leave the "
            "weights' shapes alone, so they would load and change every "
            "image:" + lines(neutral) + "\nTo change them on purpose, name "
            f"them: --config.sample.allow_model_changes={names}.")
  raise TrainedWithError(msg)


def _reshaping(saved_model: dict, now_model: dict, keys) -> set[str]:
  """The ``model.<field>`` among ``keys`` whose configured value alone,
  put in the recorded model config, changes the parameter shapes (shapes
  only: ``jax.eval_shape`` of the initialiser). Empty where the recorded
  config no longer builds (another code version)."""
  def shapes(model):
    cfg = ml_collections.ConfigDict(model)
    tree = models.param_shapes(cfg)
    return [(fit.key_path(p), a.shape)
            for p, a in jax.tree_util.tree_leaves_with_path(tree)]
  try:
    recorded = shapes(saved_model)
  except Exception:   # pylint: disable=broad-except
    return set()
  out = set()
  for key in keys:
    field = key.split(".", 1)[1] if key.startswith("model.") else ""
    if not field or "." in field or field not in now_model:
      continue
    try:
      if shapes({**saved_model, field: now_model[field]}) != recorded:
        out.add(key)
    except Exception:   # pylint: disable=broad-except
      out.add(key)      # a value that does not build with the rest
  return out


def warn_untrained_classes(config, labels) -> None:
  """Warns when ``labels`` (the classes sampling draws) reach past the
  labels of the generator's token files (their records' ``max_label``):
  those classes were never trained (the training run warned too, once).
  Silent where the files or their records are not on this machine."""
  from genvis_jax.data import token_origin  # pylint: disable=import-outside-toplevel
  pattern = token_origin.token_pattern(config.get("data") or {})
  if not pattern:
    return
  try:
    trained = token_origin.recorded_num_classes(pattern)
  except Exception:  # pylint: disable=broad-except
    return   # storage: a hint must not stop sampling
  if not trained:
    return
  beyond = sorted({int(c) for c in labels if c >= trained})
  if not beyond:
    return
  fix = (f"--config.sample.classes='({','.join(map(str, range(trained)))})'"
         if trained <= 16 else "config.sample.classes (the trained ones)")
  logging.warning(
      "Sampling draws %d class(es) the generator never trained (e.g. %s): its "
      "token files (config.data.path=%s) hold labels 0...%d only. Set %s to "
      "draw trained classes alone.", len(beyond), beyond[:5], config.data.path,
      trained - 1, fix)
