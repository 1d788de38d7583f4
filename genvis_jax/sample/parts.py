"""The part files of a sampling run (``<workdir>/sample_parts``).

Each finished batch of ``mode=sample`` is one part file, ``<start>.npz``
(``images`` uint8 (n, H, W, 3), ``labels`` (n,) int32), named by the index of
its first image. ``settings.json`` beside them records what decides their
images (weights as their folders hold them, model, tokenizer, sampler); a
resume with other settings is refused instead of mixing. ``assemble`` joins
the parts into ``samples.npz`` (ADM layout) and a PNG grid.
"""

from __future__ import annotations

import copy
import json
import os

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from genvis_jax import errors
from genvis_jax import models
from genvis_jax.core import checkpoint_fit as fit
from genvis_jax.core import files
from genvis_jax.core import multihost
from genvis_jax.core import settings as settings_lib
from genvis_jax.core import weights as weights_lib
from genvis_jax.data import token_origin
from genvis_jax.models import inference
from genvis_jax.sample import common
from genvis_jax.sample import images as images_lib


def directory(workdir: str) -> str:
  """Where a sampling run in ``workdir`` keeps its part files."""
  return os.path.join(workdir, "sample_parts")


def path(parts_dir: str, start: int) -> str:
  """The part file of the batch whose first image has index ``start``."""
  return os.path.join(parts_dir, f"{start:09d}.npz")


def _listed(parts_dir: str) -> list[str]:
  found = epath.Path(parts_dir)
  if not found.exists():
    return []
  return sorted(str(p) for p in found.glob("[0-9]*[0-9].npz"))


def _labels(part: str) -> np.ndarray:
  """The labels of a part file (its images are not read).

  Raises:
    PartUnreadableError: the file is cut short or not a part file.
  """
  try:
    with files.open_read(part) as f, np.load(f) as d:
      return d["labels"]
  except (*files.NPZ_READ_ERRORS, KeyError) as e:   # KeyError: not a part
    raise PartUnreadableError(
        f"Sample part {part} cannot be read ({type(e).__name__}: "
        f"{str(e)[:200]}); run the same sample command: it draws that "
        "batch again.") from e


class PartUnreadableError(errors.UserError, ValueError):
  """A sample part file is damaged (cut short, or not a part file)."""


# config.tokenizer keys that only messages read (configs/base.py add_tokenizer):
# parts drawn before they existed, or with other values, still resume.
MESSAGE_ONLY = ("config_file",)
# config.sample keys that guard the run without deciding its images.
SAMPLE_GUARDS = ("allow_model_changes",)


def sample_settings(config, pinned=None) -> dict:
  """What decides the images of a part file (flat, JSON-normalised); the
  weights as the folders of ``pinned`` (``pin_weights(config)``) hold them.
  Raises ``pixels.Uint8MethodError`` / ``ConfigError`` for a tokenizer
  uint8 method or dtype that cannot be resolved."""
  pinned = config if pinned is None else pinned
  tok = config.tokenizer
  # Resolved, so a config without the keys still records what decoded.
  tokenizer = {**{k: v for k, v in tok.to_dict().items()
                  if k not in MESSAGE_ONLY},
               "uint8": images_lib.uint8_method(tok),
               "dtype": inference.data_model_config(tok).get("dtype", "")}
  # The sampler's dtype as resolved: a config without the key samples in
  # fp32, whatever its model trains in.
  sample = {**{k: v for k, v in config.sample.to_dict().items()
              if k not in SAMPLE_GUARDS},
            "dtype": common.config_dtype(config.sample)}
  # The weights each path resolves to (a training workdir's newest step), not
  # the paths: a run trained further since is other weights, a copied folder
  # the same ones.
  keep = {"init_from": config.init_from, "model": config.model.to_dict(),
          "tokenizer": tokenizer, "sample": sample,
          "devices": jax.device_count()}
  return _model_settings(json.loads(json.dumps(
      {**settings_lib.flatten(keep), **pinned_sources(pinned)})))


# The model sections of a flat settings record.
_MODEL_PREFIXES = ("model.", "tokenizer.model.")


def _model_settings(flat: dict) -> dict:
  """A flat settings record as compared: the settings its model sections
  leave out at their defaults (``models.with_defaults``: a record written
  before a config listed a setting equals one listing its default), and
  without dropout rates (``models.is_dropout``: training only)."""
  out = dict(flat)
  for prefix in _MODEL_PREFIXES:
    name = flat.get(prefix + "name")
    if isinstance(name, str):
      for k, v in settings_lib.flatten(models.with_defaults(
          {"name": name})).items():
        out.setdefault(prefix + k, v)
  return {k: v for k, v in out.items()
          if not (k.startswith(_MODEL_PREFIXES) and models.is_dropout(k))}


# Settings a resume may change: the parts depend only on their start index;
# the paths may move as long as ``weights`` (what they hold) stays the same;
# another device count draws the same keys with other per-device shapes
# (a warning: float rounding may flip a few tokens).
MAY_CHANGE = ("sample.num_samples", "init_from", "tokenizer.checkpoint",
              "devices")
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
  """``WEIGHTS`` of a pinned config, as ``sample_settings`` records them."""
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
  trained_on = token_origin.run_token_weights(run)
  if not trained_on or not tokenizer_source or tokenizer_source in trained_on:
    return ""
  msg = weights_lib.readable(
      f"The generator {run} trained on tokens of tokenizer weights "
      f"{trained_on}, but config.tokenizer.checkpoint holds "
      f"{tokenizer_source!r}: the samples would be decoded by another "
      "tokenizer.")
  if _TOKENIZER in _allowed_changes(config):
    logging.warning(msg)
    return msg
  raise TrainedWithError(
      f"{msg} Point config.tokenizer.checkpoint at the step the tokens came "
      "from (<run>/checkpoints/<step>); to decode with these weights on "
      "purpose (e.g. a decoder fine-tuned since), pass "
      f"--config.sample.allow_model_changes={_TOKENIZER}.")


# The allow_model_changes name that decodes with other tokenizer weights.
_TOKENIZER = "tokenizer.checkpoint"


def _allowed_changes(config) -> set[str]:
  """The keys named in ``config.sample.allow_model_changes``."""
  return {k.strip() for k in
          str(config.sample.get("allow_model_changes", "")).split(",")
          if k.strip()}


class SampleSettingsError(errors.UserError, ValueError):
  """Sample parts in the workdir were drawn with other settings."""



class TrainedWithError(errors.UserError, ValueError):
  """A run's weights would be sampled with other model settings than it
  trained with."""


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
  allowed = _allowed_changes(config)
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
    tree = jax.eval_shape(lambda r: models.init_params(cfg, r),
                          jax.random.key(0))
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


def check_settings(parts_dir: str, settings: dict) -> None:
  """Writes ``settings.json`` on a fresh start; refuses a resume that differs
  (except in ``num_samples``, as a set can grow or shrink, and in the
  checkpoint paths while the weights they resolve to are the same). Process
  0 checks and writes; its error stops every process.

  Raises:
    SampleSettingsError: parts drawn with other settings, parts without a
      readable ``settings.json``.
  """
  multihost.on_process_0(lambda: _check_settings(parts_dir, settings))


def _check_settings(parts_dir: str, settings: dict) -> None:
  path = os.path.join(parts_dir, "settings.json")
  found = _listed(parts_dir)
  # A config without config.sample.seed (or parts drawn before it was a
  # setting) draws with seed 0; parts recorded before the dtype was drew in
  # float32 where the config left it unset (the samplers' default then), and
  # before every config declared them, balanced labels of all classes.
  unset = {"sample.seed": 0, "sample.dtype": common.DEFAULT_DTYPE,
           "sample.labels": "balanced", "sample.classes": []}
  settings = {**unset, **settings}
  recorded = _recorded_settings(path, found)
  if recorded is not None:
    old = {**unset, **_model_settings(recorded)}
    # Parts written before the weights were recorded: compare the paths.
    may_change = MAY_CHANGE if all(k in old for k in WEIGHTS) else (
        "sample.num_samples", "devices") + WEIGHTS
    diff = settings_lib.differences(old, settings, ignore=may_change)
    if diff and found:
      raise SampleSettingsError(weights_lib.readable(
          f"{parts_dir} holds {len(found)} sample parts drawn with other "
          f"settings ({settings_lib.shorten(diff, 5)}). Use a new workdir, or "
          "delete that folder to start over."))
    if found and old.get("devices") not in (None, settings.get("devices")):
      logging.warning(
          "%s holds %d sample parts drawn on %d device(s) and this run has %d: "
          "the same keys and weights, but each device's share of a batch "
          "differs, so float rounding may change a few tokens against an "
          "uninterrupted run.", parts_dir, len(found), old["devices"],
          settings["devices"])
  elif found:
    raise SampleSettingsError(f"{parts_dir} holds {len(found)} sample parts but no "
                     "settings.json, so they cannot be checked against this "
                     "run. Use a new workdir, or delete that folder.")
  text = json.dumps(settings, indent=1, sort_keys=True)
  files.write_whole(path, lambda tmp: epath.Path(tmp).write_text(text))


def _recorded_settings(path: str, found: list[str]) -> dict | None:
  """``settings.json`` as recorded, None where there is none, or a damaged
  one with no parts to check (a fresh start writes it again).

  Raises:
    SampleSettingsError: parts exist and their settings cannot be read.
  """
  if not epath.Path(path).exists():
    return None
  try:
    recorded = json.loads(epath.Path(path).read_text())
    if not isinstance(recorded, dict):
      raise ValueError(f"a JSON {type(recorded).__name__}, not an object")
    return recorded
  except ValueError as e:   # cut short (a full disk, a copy that stopped)
    if not found:
      return None
    raise SampleSettingsError(
        f"{path} cannot be read ({str(e)[:200]}), so the {len(found)} sample "
        "parts beside it cannot be checked against this run. Use a new "
        "workdir, or delete that folder to start over.") from e


def complete_parts(parts_dir: str, num_samples: int, batch: int) -> set[int]:
  """Start indices of the part files that hold the images asked of their
  batch: a short last batch of a smaller earlier set is drawn again when the
  set grows; a whole batch cut by a smaller set is kept (``assemble`` takes
  what it needs), so growing the set back draws nothing again."""
  done = set()
  for p in _listed(parts_dir):
    start = int(os.path.basename(p)[:9])
    if start >= num_samples:
      continue
    try:
      n = len(_labels(p))
    except PartUnreadableError as e:   # drawn again, then replaced whole
      logging.warning("%s", str(e).split(";")[0] + "; drawing it again.")
      continue
    if n >= min(batch, num_samples - start):
      done.add(start)
  return done


def assemble(workdir: str, num_samples: int) -> dict:
  """Joins the part files into ``samples.npz`` + ``samples.png``; checks
  coverage first. Process 0 writes them (it wrote the parts) while the
  others wait for it (``multihost.on_process_0``: a process that exited
  first would leave it to be stopped at ``jax.distributed``'s shutdown
  barrier, 5 minutes on, mid-write on a 50k set), then all get the paths.
  The images are written part by part (``save_npz_parts``): one part in
  memory, and a file cut short never lies under the final name.

  Returns:
    {"npz": path, "png": path, "num_samples": int}.
  Raises:
    RuntimeError: the parts leave a gap or hold fewer than ``num_samples``
      images.
    PartUnreadableError: a part that is needed cannot be read.
    multihost.OtherProcessError: on the other processes, where process 0
      raised one of those.
  """
  out = {"npz": os.path.join(workdir, "samples.npz"),
         "png": os.path.join(workdir, "samples.png"),
         "num_samples": int(num_samples)}
  multihost.on_process_0(lambda: _write_samples(workdir, num_samples, out))
  return out


def _write_samples(workdir: str, num_samples: int, out: dict) -> None:
  """``assemble``'s work on process 0: ``out``'s files from the parts."""
  chosen, labels, held = [], [], 0
  for p in _listed(directory(workdir)):
    start = int(os.path.basename(p)[:9])
    if start != held:
      if start < num_samples:
        raise RuntimeError(
            f"Sample parts have a gap at index {held} (next part starts at "
            f"{start}); re-run the same command to fill it.")
      break
    if start >= num_samples:   # kept from a larger set: only counted
      try:
        held += len(_labels(p))
      except PartUnreadableError:   # not needed now: drawn again when it is
        break
      continue
    part_labels = _labels(p)
    held += len(part_labels)
    chosen.append((p, min(len(part_labels), num_samples - start)))
    labels.append(part_labels[:chosen[-1][1]])
  if held < num_samples:
    raise RuntimeError(f"{held} of {num_samples} samples present; re-run.")
  labels = np.concatenate(labels)

  def read(p, n):
    with files.open_read(p) as f, np.load(f) as d:
      return d["images"][:n]

  parts_images = [read(*chosen[0])]   # read once: it gives the shape too
  first = []   # the grid's images

  def images():
    for i, (p, n) in enumerate(chosen):
      part = parts_images.pop() if i == 0 else read(p, n)
      if sum(map(len, first)) < 100:
        first.append(part[:100 - sum(map(len, first))])
      yield part

  shape = (num_samples, *parts_images[0].shape[1:])
  images_lib.save_npz_parts(out["npz"], images(), shape, labels)
  grid = np.concatenate(first)
  order = np.argsort(labels[:len(grid)], kind="stable")
  images_lib.save_grid(grid[order], out["png"],
                       ncols=images_lib.grid_columns(*shape[1:3]))
  print(f"[sample] wrote {out['npz']} and {out['png']}", flush=True)
  if held > num_samples:   # e.g. a quick look at the first images of a set
    print(f"[sample] {out['npz']} holds the first {num_samples} of the {held} "
          f"images in {directory(workdir)}; --config.sample.num_samples="
          f"{held} writes them all again (nothing is drawn again).",
          flush=True)
