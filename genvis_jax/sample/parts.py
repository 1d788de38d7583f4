"""The part files of a sampling run (``<workdir>/sample_parts``).

Each finished batch of ``mode=sample`` is one part file, ``<start>.npz``
(``images`` uint8 (n, H, W, 3), ``labels`` (n,) int32), named by the index of
its first image. ``settings.json`` beside them records what decides their
images (weights as their folders hold them, model, tokenizer, sampler); a
resume with other settings is refused instead of mixing. ``assemble`` joins
the parts into ``samples.npz`` (ADM layout) and a PNG grid.
"""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np
from absl import logging
from etils import epath

from genvis_jax import errors
from genvis_jax import models
from genvis_jax.core import checkpoint_fit as fit
from genvis_jax.core import dtypes
from genvis_jax.core import files
from genvis_jax.core import hints
from genvis_jax.core import multihost
from genvis_jax.core import settings as settings_lib
from genvis_jax.core import weights as weights_lib
from genvis_jax.models import inference
from genvis_jax.sample import common
from genvis_jax.sample import images as images_lib
from genvis_jax.sample import trained_with


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
  """The labels of a part file, once the header of its images agrees with
  them (uint8 (n, H, W, 3) for n labels, every byte present); the images
  themselves are not read.

  Raises:
    PartUnreadableError: the file is cut short or not a part file.
  """
  try:
    with files.open_read(part) as f, np.load(f) as d:
      labels = d["labels"]
      info = d.zip.getinfo("images.npy")
      with d.zip.open(info) as m:
        version = np.lib.format.read_magic(m)
        shape, _, dtype = (np.lib.format.read_array_header_1_0(m)
                           if version == (1, 0) else
                           np.lib.format.read_array_header_2_0(m))
        header = m.tell()
    if (dtype != np.uint8 or len(shape) != 4 or shape[0] != len(labels)
        or shape[-1] != 3 or info.file_size != header + math.prod(shape)):
      raise ValueError(f"its images are {dtype} {shape} in {info.file_size} "
                       f"bytes for {len(labels)} labels")
    return labels
  except (*files.NPZ_READ_ERRORS, KeyError) as e:   # KeyError: not a part
    raise _unreadable(part, e) from e


def _unreadable(part: str, e: Exception, moved: str = "") -> PartUnreadableError:
  return PartUnreadableError(
      f"Sample part {part} cannot be read ({type(e).__name__}: "
      f"{str(e)[:200]})" + (f"; moved to {moved}" if moved else "") +
      "; run the same sample command: it draws that batch again.")


def _images(part: str, n: int) -> np.ndarray:
  """The first ``n`` images of a part file whose header ``_labels`` passed.
  Damage only a whole read finds (a flipped byte the zip's CRC catches) moves
  the part aside to ``<part>.unreadable`` (kept, out of the parts' listing),
  so the next run draws that batch again.

  Raises:
    PartUnreadableError: naming the part, where it went and the fix.
  """
  try:
    with files.open_read(part) as f, np.load(f) as d:
      return d["images"][:n]
  except files.NPZ_READ_ERRORS as e:
    aside = part + ".unreadable"
    epath.Path(part).rename(aside)
    raise _unreadable(part, e, aside) from e


class PartUnreadableError(errors.UserError, ValueError):
  """A sample part file is damaged (cut short, or not a part file)."""


# config.tokenizer keys that only messages read (configs/base.py add_tokenizer):
# parts drawn before they existed, or with other values, still resume.
SETTINGS_FILE = "settings.json"
MESSAGE_ONLY = ("config_file",)
# config.sample keys that guard the run without deciding its images.
SAMPLE_GUARDS = ("allow_model_changes",)


def sample_settings(config, pinned=None) -> dict:
  """What decides the images of a part file (flat, JSON-normalised); the
  weights as the folders of ``pinned`` (``trained_with.pin_weights(config)``) hold them.
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
  # The precision of float32 dots, and how 16-bit models round (recorded
  # where one computes): either draws other images.
  computes = (sample["dtype"] or config.model.get("dtype", "float32"),
              tokenizer["dtype"])
  # The weights each path resolves to (a training workdir's newest step), not
  # the paths: a run trained further since is other weights, a copied folder
  # the same ones.
  keep = {"init_from": config.init_from, "model": config.model.to_dict(),
          "tokenizer": tokenizer, "sample": sample,
          "devices": jax.device_count(),
          "precision": dtypes.precision_name(config, inference=True),
          **dtypes.rounding_record(*computes)}
  return _model_settings(json.loads(json.dumps(
      {**settings_lib.flatten(keep), **trained_with.pinned_sources(pinned)})))


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


def same_images(settings: dict) -> tuple[str, ...]:
  """Recorded settings (flat) that leave the images as they are: how the
  models compute (``checkpoint_fit.COMPUTE_ONLY``; the compute dtype only
  while ``sample.dtype`` / the recorded resolved ``tokenizer.dtype``
  replaces it) and the training grids' width. Never ``param_dtype``: the
  weights are loaded in it (bf16-rounded weights draw other images)."""
  keep = {"model.param_dtype"} | (set() if settings.get("sample.dtype")
                                  else {"model.dtype"})
  return (("sample.wide_columns",) +
          tuple(k for k in fit.COMPUTE_ONLY if k not in keep) +
          tuple("tokenizer." + k for k in fit.COMPUTE_ONLY
                if k != "model.param_dtype"))


class SampleSettingsError(errors.UserError, ValueError):
  """Sample parts in the workdir were drawn with other settings."""


def check_settings(parts_dir: str, settings: dict) -> None:
  """Writes ``settings.json`` on a fresh start; refuses a resume that differs
  (except in ``num_samples``, as a set can grow or shrink, in the
  checkpoint paths while the weights they resolve to are the same, and in
  ``same_images``: how the models compute). Process
  0 checks and writes; its error stops every process.

  Raises:
    SampleSettingsError: parts drawn with other settings, parts without a
      readable ``settings.json``.
  """
  multihost.on_process_0(lambda: _check_settings(parts_dir, settings))


def _check_settings(parts_dir: str, settings: dict) -> None:
  path = os.path.join(parts_dir, SETTINGS_FILE)
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
    if "precision" in settings and "precision" not in old:
      # Recorded before the precision was: drawn at the config's precision
      # as now, or where it was "" by a version that drew at XLA's default
      # (the same on GPUs and CPUs; one bf16 pass on a TPU: said there).
      old["precision"] = settings["precision"]
      if (found and settings["precision"] == dtypes.INFERENCE_DEFAULT
          and jax.default_backend() == "tpu"):
        logging.warning(
            "%s holds %d sample parts recorded before their matmul precision "
            "was: an earlier version may have drawn them at XLA's default "
            "(one bf16 pass on a TPU), this run draws at %r. Use a new "
            "workdir for a set of one precision.", parts_dir, len(found),
            settings["precision"])
    # Parts written before the weights were recorded: compare the paths.
    may_change = MAY_CHANGE if all(k in old for k in trained_with.WEIGHTS) else (
        "sample.num_samples", "devices") + trained_with.WEIGHTS
    diff = settings_lib.differences(
        old, settings, ignore=may_change + same_images(settings))
    if diff and found:
      raise SampleSettingsError(weights_lib.readable(
          f"{parts_dir} holds {len(found)} sample parts drawn with other "
          f"settings ({settings_lib.shorten(diff, 5)}"
          f"{dtypes.rounding_note(diff)}). Use a new workdir, or "
          "delete that folder (and the samples.npz / samples.png beside it, "
          "made from it) to start over."))
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


OUTPUTS = ("samples.npz", "samples.png")


def drop_earlier_outputs(workdir: str, num_samples: int) -> None:
  """Removes an earlier run's ``samples.npz`` / ``samples.png`` before this
  one draws more: until ``assemble`` writes the new ones (a run stopped
  half-way never does) they would pass for this run's ``num_samples``. Their
  images stay in the parts (or are drawn again alike), which the next
  ``samples.npz`` holds again. Process 0 removes them; the others wait.

  Raises:
    OutputExistsError: a ``samples.npz`` beside no sample parts (a file
      copied in, its parts deleted): it is kept, and the run stops before
      drawing.
  """

  def drop():
    _check_held_in_parts(os.path.join(workdir, OUTPUTS[0]),
                         directory(workdir))
    gone = []
    for name in OUTPUTS:
      path = epath.Path(workdir) / name   # local or gs://
      if path.exists():
        path.unlink()
        gone.append(name)
    if gone:
      print(f"[sample] removed {' and '.join(gone)} of the earlier set "
            f"(its images are in {directory(workdir)}); the new ones, of "
            f"{num_samples} images, are written when every part is drawn",
            flush=True)
  multihost.on_process_0(drop)


def _check_held_in_parts(npz_path: str, parts_dir: str) -> None:
  """Raises ``OutputExistsError`` when ``npz_path`` exists but ``parts_dir``
  holds no part (a file copied in, or its parts deleted): nothing would
  draw its images again. (Parts drawn with this run's settings, which
  ``check_settings`` verified, hold or redraw the earlier set's images.)"""
  if epath.Path(npz_path).exists() and not _listed(parts_dir):
    raise errors.OutputExistsError(
        f"{npz_path} lies beside no sample parts ({parts_dir} holds none: a "
        "file copied in, or its parts deleted), so nothing would draw its "
        "images again, and this run would replace it. Move it out of the "
        "workdir (or delete it), or sample into another --workdir.")


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
    PartUnreadableError: a part that is needed cannot be read (moved aside
      when its images fail to read; the next run draws it again).
    errors.UserError: the files cannot be written (a full disk); the parts
      are kept.
    multihost.OtherProcessError: on the other processes, where process 0
      raised one of those.
  """
  out = {"npz": os.path.join(workdir, "samples.npz"),
         "png": os.path.join(workdir, "samples.png"),
         "num_samples": int(num_samples)}
  try:
    multihost.on_process_0(lambda: _write_samples(workdir, num_samples, out))
  except OSError as e:
    raise errors.OutputWriteError(
        f"Joining the sample parts into {out['npz']} failed "
        f"({errors.write_cause(e)}); every part is kept in "
        f"{directory(workdir)}. Free space (or fix the folder) and run the "
        "same command: it joins them again, drawing nothing.") from e
  return out


def _write_samples(workdir: str, num_samples: int, out: dict) -> None:
  """``assemble``'s work on process 0: ``out``'s files from the parts."""
  chosen, labels, held = [], [], 0
  listed = _listed(directory(workdir))
  for p in listed:
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

  parts_images = [_images(*chosen[0])]   # read once: it gives the shape too
  first = []   # the grid's images

  def images():
    for i, (p, n) in enumerate(chosen):
      part = parts_images.pop() if i == 0 else _images(p, n)
      if sum(map(len, first)) < 100:
        first.append(part[:100 - sum(map(len, first))])
      yield part

  shape = (num_samples, *parts_images[0].shape[1:])
  images_lib.save_npz_parts(out["npz"], images(), shape, labels)
  grid = np.concatenate(first)
  order = np.argsort(labels[:len(grid)], kind="stable")
  images_lib.save_grid(grid[order], out["png"],
                       ncols=images_lib.grid_columns(*shape[1:3]))
  # The parts hold every image again (9.8 GB for 50,000 at 256 px), kept so
  # a larger set draws only the rest: said, with what they take.
  size = sum(epath.Path(p).stat().length for p in listed)
  print(f"[sample] {directory(workdir)} holds these images again "
        f"({size / 2**20:,.1f} MiB), kept so that a larger "
        "--config.sample.num_samples draws only the rest: delete it once the "
        "set is final.", flush=True)
  print(f"[sample] wrote {out['npz']} and {out['png']}" + hints.next_step(
      f"; score them with --config.mode=evaluate --config.evaluate.kind="
      f"generation --config.evaluate.samples={out['npz']} --config.evaluate."
      "reference=REF.npz --config.evaluate.inception=ckpt/inception (REF: "
      "an ADM batch, or one of your data: kind=reference; ckpt/inception: "
      "python -m genvis_jax.convert --kind=inception)"),
        flush=True)
  if held > num_samples:   # e.g. a quick look at the first images of a set
    print(f"[sample] {out['npz']} holds the first {num_samples} of the {held} "
          f"images in {directory(workdir)}; --config.sample.num_samples="
          f"{held} writes them all again (nothing is drawn again).",
          flush=True)
