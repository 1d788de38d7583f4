"""What a pre-tokenize output records, and whether one on disk is reused.

Each token file is written with a ``<file>.json`` beside it recording what
decided its records (:func:`output_settings`: tokenizer model and weights,
data and the files the split holds, split, crops). A re-run whose output
exists reuses it when those match and it still reads as recorded
(:func:`existing_output`), and otherwise stops (``OutputExistsError``) unless
``config.pretokenize.overwrite``: token files a generator trained on are not
replaced by another tokenizer's codes, or left stale after images were added,
without being asked.
"""

from __future__ import annotations

import glob
import json
import os

import jax
from absl import logging
from etils import epath

from genvis_jax import errors
from genvis_jax import models
from genvis_jax.core import dtypes
from genvis_jax.core import settings as settings_lib
from genvis_jax.core import weights as weights_lib
from genvis_jax.data import pipeline
from genvis_jax.data import sources
from genvis_jax.data import ten_crop
from genvis_jax.data import token_origin
from genvis_jax.data import tokens as tokens_lib
from genvis_jax.models import inference


# Data settings that change how fast records are read, not which.
_READER_KEYS = ("read_threads", "num_workers", "prefetch")
# Data settings added after token files were written -> the values that
# mean what those files were made with: left out of the record at those
# values, so the older files' records still match.
_ADDED_DEFAULTS = {"center_crop": ("", "adm"), "exif_transpose": (True,),
                   "random_crop_method": ("adm",),
                   # Older files listed every PIL format: where that read
                   # other files, the split's fingerprint differs.
                   "extensions": ("torchvision",),
                   "to_float": ("torchvision",)}


def output_settings(config, checkpoint: str | None = None) -> dict:
  """What decides the records of a token file (JSON-normalised);
  ``checkpoint`` (default ``config.tokenizer.checkpoint``) holds the weights."""
  p, tok = config.pretokenize, config.tokenizer
  # EXIF orientation changes only image-folder decodes (files written before
  # the setting applied it: True); TFDS and demo records leave it out.
  data = {k: v for k, v in p.data.to_dict().items() if k not in _READER_KEYS
          and k not in token_origin.UNREAD_DATA_KEYS
          and v not in _ADDED_DEFAULTS.get(k, ())
          and (k != "exif_transpose" or p.data.source == "image_folder")}
  keep = {"tokenizer": models.with_defaults(
              inference.data_model_config(tok).to_dict()),
          "weights": weights_lib.params_source(
              tok.checkpoint if checkpoint is None else checkpoint),
          "data": data, "split": p.split, "ten_crop": p.ten_crop,
          # How the encoder computes: either writes other codes.
          "precision": dtypes.precision_name(config, inference=True),
          **dtypes.rounding_record(inference.data_model_config(tok).get(
              "dtype", "")),
          # Centre-crop files hold mirror images too (written since then).
          **({} if p.ten_crop else {"mirrored": True}),
          "examples": source_fingerprint(p)}
  return json.loads(json.dumps(keep, sort_keys=True, default=str))


def source_fingerprint(p) -> dict:
  """What the split holds (``sources.fingerprint``), so a file written
  before images were added, removed or renamed is not reused."""
  src, _, _ = pipeline.make_source(ten_crop.crop_data_config(p), p.split,
                                   "config.pretokenize.data")
  return sources.fingerprint(src)


def _reads_as_recorded(path: str, record: dict) -> bool:
  """The file holds the record's count of records and, where the record
  has one (writers since ``sha256``), the bytes it hashed."""
  try:
    if tokens_lib.count_records(path) != record.get("records"):
      return False
  except tokens_lib.TokenFileError:
    return False
  want = record.get("sha256")
  return want is None or want == tokens_lib.file_sha256(path)


def pending_record(path: str) -> str:
  """Where pre-tokenizing writes the record of the token file ``path``
  before the file takes its name (renamed to ``<path>.json`` after)."""
  return path + ".json.partial"


def _complete_pending_record(path: str) -> None:
  """A run killed between renaming the token file ``path`` into place and
  renaming its record after it left the record pending: it is the file's
  if the hashes agree, and takes its name (else it is another file's and
  goes)."""
  pending = epath.Path(pending_record(path))
  if not pending.exists() or epath.Path(path + ".json").exists():
    return
  try:
    sha = json.loads(pending.read_text()).get("sha256")
  except ValueError:
    sha = None
  if sha and sha == tokens_lib.file_sha256(path):
    pending.replace(path + ".json")
    logging.warning("%s: completed the record a run stopped before writing "
                    "(its hash matches the file).", path)
  else:
    pending.unlink(missing_ok=True)


def existing_output(path: str, settings: dict, overwrite: bool) -> dict | None:
  """The record of a complete, readable token file at ``path`` written with
  ``settings`` (to reuse), else None (write it): always None with
  ``overwrite``. Raises ``OutputExistsError`` for a file written otherwise,
  or one that no longer reads as its record says (damaged since)."""
  if not epath.Path(path).exists() or overwrite:
    return None
  _complete_pending_record(path)
  record = epath.Path(path + ".json")
  try:
    old = json.loads(record.read_text()) if record.exists() else None
  except ValueError:   # a damaged record is no record
    old = None
  before = token_origin.comparable((old or {}).get("settings") or {})
  if isinstance(before.get("tokenizer"), dict):
    # Written before its config listed every tokenizer setting.
    before = {**before, "tokenizer": models.with_defaults(before["tokenizer"])}
  # Written before records named the precision: at XLA's default.
  unrecorded_precision = (old is not None and "precision" in settings
                          and "precision" not in before)
  if unrecorded_precision:
    before = {**before, "precision": settings["precision"]}
  if old is not None and "examples" not in before and {
      **settings, "examples": None} == {**before, "examples": None}:
    # Written before records held the split's fingerprint: reuse, and say so.
    logging.warning("%s records no fingerprint of its split (an older "
                    "writer); reusing it as its other settings match. Pass "
                    "--config.pretokenize.overwrite=True if images were added "
                    "or removed since.", path)
    before = settings
  if old is not None and before == settings:
    if _reads_as_recorded(path, old):
      if (unrecorded_precision
          and settings["precision"] == dtypes.INFERENCE_DEFAULT):
        logging.warning(
            "%s records no matmul precision (an older writer): it may have "
            "been written at XLA's default, the same as this run's %r on "
            "GPUs and CPUs but one bf16 pass on a TPU. Reusing it; pass "
            "--config.pretokenize.overwrite=True if it was written on a "
            "TPU.", path, settings["precision"])
      return old
    why = (f"with these settings, but they no longer read as its record "
           f"says ({old.get('records')} records"
           f"{', SHA-256 ' + old['sha256'][:12] if old.get('sha256') else ''}"
           f"): damaged since")
  elif old is None:
    why = "with no record of their settings"
  else:
    diff = settings_lib.differences(before, settings)
    why = (f"with other settings ({settings_lib.shorten(diff, 5)}"
           f"{dtypes.rounding_note(diff)})")
  raise errors.OutputExistsError(weights_lib.readable(
      f"{path} already holds token records written {why}. Pass "
      "--config.pretokenize.overwrite=True to replace them, or write "
      "elsewhere (another --workdir or --config.pretokenize.output)."))


def lacks_remainder(record: dict, settings: dict) -> bool:
  """Whether the shard of ``record`` misses an example this process reads:
  writers before ``remainder_kept`` gave every process ``n // count``
  examples, dropping the last ``n % count``, one from each of processes
  0 .. n % count - 1."""
  n, count = settings["examples"]["count"], jax.process_count()
  return not record.get("remainder_kept") and jax.process_index() < n % count


def remove_stale_partials(output: str) -> list[str]:
  """Removes this machine's ``{output}-PPPPP-of-NNNNN.array_record.partial``
  files of another process count NNNNN: a shard killed mid-write on one
  process count, rerun on another, was never written again, so nothing
  removed it (training globs skip it; it took the disk). Returns them."""
  partials = glob.glob(f"{glob.escape(output)}-*-of-*.array_record.partial")
  sets = tokens_lib.shard_sets(p[:-len(".partial")] for p in partials)
  gone = sorted(tokens_lib.shard_path(output, i, n) + ".partial"
                for n, indices in sets.get(output, {}).items()
                if n != jax.process_count() for i in indices)
  for path in gone:
    os.remove(path)
  if gone:
    logging.warning("Removed %d unfinished token file(s) of a run on another "
                    "process count (killed while writing): %s", len(gone),
                    ", ".join(gone[:3]))
  return gone


def warn_other_sets(output: str) -> None:
  """Warns when ``output``'s folder holds token files of the same split
  written by another number of processes: a training glob matching both sets
  is refused (``tokens.check_shard_sets``), the pattern this run prints is
  not."""
  count = jax.process_count()
  try:
    names = [os.path.basename(f) for f in
             tokens_lib.glob_files(f"{output}-*-of-*.array_record")]
  except Exception as e:  # pylint: disable=broad-except
    # Advisory: a listing error must not stop this process alone (the others
    # would wait for it); the writes below meet the storage anyway.
    logging.warning("Could not list %s-*.array_record to look for token files "
                    "of another process count (%s).", output, e)
    return
  sets = tokens_lib.shard_sets(names).get(os.path.basename(output), {})
  others = {n: len(v) for n, v in sets.items() if n != count}
  if others:
    found = ", ".join(f"{v} file(s) -of-{n:05d}" for n, v in sorted(others.items()))
    logging.warning(
        "%s-*.array_record already holds token files written by another "
        "number of processes (%s); this run writes -of-%05d. Train with the "
        "pattern it prints (a glob matching both sets is refused), or delete "
        "the older files.", output, found, count)
