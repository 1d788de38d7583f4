"""Where token files came from: checks on the records pretokenize writes.

Each ``<file>.array_record`` written by ``--config.mode=pretokenize`` has a
``<file>.array_record.json`` record of its settings: the tokenizer's model
config (``tokenizer``), the weights it loaded (``weights``, see
``core.weights.params_source``), the data and the examples. Before training,
:func:`check_training_files` reads those small records and refuses files that
cannot train the configured generator together; ``token_integrity`` then
checks that every process lists the same files and that they hold the bytes
their records' SHA-256 was computed on. A training run's own record of its
codes' origin is ``run_origin``.
"""

from __future__ import annotations

import collections
import json
import os

from absl import logging
from etils import epath

from genvis_jax.core import files
from genvis_jax.core import multihost
from genvis_jax.core import settings as settings_lib
from genvis_jax.core import weights as weights_lib
from genvis_jax.data import token_integrity
from genvis_jax.data.tokens import (TokenFileError, check_shard_sets,
                                    count_records, glob_files, read_records,
                                    shard_sets)
from genvis_jax.errors import ConfigError


# ``config.pretokenize.data`` settings pre-tokenizing does not read (the
# training augmentations, the eval split, token sampling): left out of the
# records written and compared (older records hold them), so a value there
# neither forces a re-encode giving the same codes nor makes files of the
# same images look like two sets.
UNREAD_DATA_KEYS = ("eval_split", "random_crop", "random_flip",
                    "crop_min_frac", "random_crop_method", "crops_per_epoch")


def comparable(settings: dict) -> dict:
  """A token file's recorded ``settings`` without ``UNREAD_DATA_KEYS``."""
  data = settings.get("data")
  if not isinstance(data, dict):
    return settings
  return {**settings, "data": {k: v for k, v in data.items()
                               if k not in UNREAD_DATA_KEYS}}


def file_records(pattern: str) -> dict[str, dict | None]:
  """``{file: its record}`` for the files matching ``pattern`` (each
  ``<file>.json``; None where there is no readable record)."""
  return read_records(glob_files(pattern))


def crops_per_image(pattern: str) -> int:
  """How many consecutive records each image has in the ten-crop token files
  matching ``pattern`` (10), from the records pretokenize writes beside them.

  Raises:
    TokenFileError: a file has no readable record, or it was not written
      with ten-crop (centre-crop files hold a batch's mirror images after
      its originals, RAR's ``torch.cat([x, x.flip(-1)])``: an image's two
      records are not neighbours); or a file holds another number of records
      than its record says, or not whole groups of ten.
  """
  found = file_records(pattern)
  fix = ("re-run the pre-tokenize mode with ten-crop "
         "(config.pretokenize.ten_crop=True), or train on every record "
         "(--config.data.crops_per_epoch=all)")
  for path, record in found.items():
    if record is None:
      raise TokenFileError(
          f"{path} has no readable pretokenize record ({path}.json "
          f"{_absent_or_damaged(path)}); config.data.crops_per_epoch='one' "
          "reads there that the file holds each image's ten crops as "
          f"consecutive records. Copy the records with the files "
          f"(`{copy_command(pattern)}`), or pre-tokenize again.")
    if (record.get("settings") or {}).get("ten_crop") is not True:
      raise TokenFileError(
          f"{path} was written without ten-crop; config.data.crops_per_epoch="
          "'one' draws one of each image's ten consecutive crop records. "
          f"Then {fix}.")
    n, held = record.get("records"), count_records(path)
    if n != held or held % 10:
      raise TokenFileError(
          f"{path} holds {held} records and its record ({path}.json) says "
          f"{n}: not whole groups of ten crops per image as written; {fix}.")
  return 10


def _settings(records: dict[str, dict | None]) -> dict[str, dict]:
  return {path: comparable(r["settings"]) for path, r in records.items()
          if r is not None and isinstance(r.get("settings"), dict)}


def recorded_settings(pattern: str) -> dict[str, dict]:
  """``{file: settings}`` recorded beside the files matching ``pattern``
  (files without a readable record are left out)."""
  return _settings(file_records(pattern))


def recorded_num_classes(pattern: str) -> int | None:
  """1 + the largest label in the token files matching ``pattern`` (each
  record's ``max_label``, written by pretokenize): every label is below it.
  None when a file's record lacks it (written before labels were recorded)
  or there is no file (or no label)."""
  labels = [(r or {}).get("max_label") for r in file_records(pattern).values()]
  if not labels or not all(isinstance(m, int) for m in labels):
    return None
  return max(labels) + 1 if max(labels) >= 0 else None


def token_pattern(data) -> str:
  """The token-file glob of ``config.data``; "" unless it reads tokens."""
  if data.get("source") != "tokens" or not data.get("path"):
    return ""
  return data.path.replace("{split}", data.get("split", "train"))


def check_training_files(config) -> str:
  """Checks the token files of ``config.data`` against each other and
  ``config`` before training; a no-op unless ``config.data.source`` is
  ``"tokens"``. Process 0 reads the records; its error stops every process.
  Token files without a record beside them are warned about (once per
  process), naming the missing records and the command that copies them.
  Every process must list the same files (:func:`token_integrity.check_same_listing`).
  Then, unless ``config.data.verify_checksums`` is False, every process
  hashes its share of the files (:func:`token_integrity.verify_checksums`); a mismatch on
  any stops all.

  Raises:
    DataNotFoundError, TokenFileError: the glob misses a file of a
      pre-tokenize output or reads one split twice
      (:func:`tokens.check_shard_sets`).
    TokenFileError: the files were written with different tokenizer weights
      (e.g. a glob over two pre-tokenize outputs): codes of two tokenizers
      cannot train one generator; of two splits, crop modes or image sizes,
      or by two outputs of the same settings (``SET_FIELDS``); or with a
      tokenizer whose codes are laid
      out otherwise than ``config.tokenizer.model``'s (another model, branch
      count, image size or downsampling).
    ConfigError: the tokenizer has more codes (``tokenizer.num_codes``) than
      ``config.model.codebook_size``; the embedding lookups would read past
      the table (NaN losses, not an error).
    TokenFileError: a file's bytes differ from its record's SHA-256.
    OtherProcessError: processes list other files for the pattern.
  Returns:
    The warning of :func:`check_origin` ("" when none).
  """
  pattern = token_pattern(config.data)
  if not pattern:
    return ""
  warning = []

  def check():
    check_shard_sets(pattern, glob_files(pattern))
    found = file_records(pattern)
    _warn_missing_records(pattern, found)
    records = _settings(found)
    _check_one_tokenizer(pattern, records)
    _check_one_set(pattern, records)
    _check_tokenizer_layout(pattern, records,
                            (config.get("tokenizer") or {}).get("model"))
    _check_codes(pattern, records, config.get("model", {}).get("codebook_size"))
    _warn_repeated_names(pattern)
    tok = config.get("tokenizer") or {}
    warning.append(check_origin(pattern, records, tok.get("checkpoint", "")))
  multihost.on_process_0(check)
  # One listing for both checks: the files every process agreed on are the
  # ones hashed.
  listed = glob_files(pattern)
  token_integrity.check_same_listing(pattern, listed)
  if config.data.get("verify_checksums", True):
    multihost.run_everywhere(
        lambda: token_integrity.verify_checksums(pattern, listed),
        "found token files whose bytes differ from the SHA-256 in their "
        "records (each names its files in its log)")
  return warning[0] if warning else ""


# Warnings already logged in this process: a run builds its training
# iterator up to three times (resume paths) and says each one once.
_WARNED: set[str] = set()


def _warn_once(msg: str, *args) -> None:
  text = msg % args if args else msg
  if text not in _WARNED:
    _WARNED.add(text)
    logging.warning("%s", text)


def copy_command(pattern: str) -> str:
  """A command copying pretokenize's files with their ``.json`` records to
  the folder of ``pattern``: both globs, since ``*.array_record`` alone
  leaves the records behind."""
  folder = pattern.rsplit("/", 1)[0] if "/" in pattern else "."
  name = os.path.basename(pattern)
  tool = "gcloud storage cp" if files.is_remote(pattern) else "cp"
  return (f"{tool} <pretokenize output folder>/{name} "
          f"<pretokenize output folder>/{name}.json {folder}/")


def _absent_or_damaged(path: str) -> str:
  """Why the record of token file ``path`` was not read."""
  return ("is damaged" if epath.Path(path + ".json").exists()
          else "is missing")


def _warn_missing_records(pattern: str,
                          records: dict[str, dict | None]) -> None:
  """Warns, once per process and set of files, when token files have no
  readable ``<file>.json`` record beside them (e.g. copied to a bucket with
  ``*.array_record``, which leaves the records behind): the checks of their
  tokenizer weights, code layout, codebook size and largest label are then
  skipped."""
  missing = tuple(sorted(p for p, r in records.items() if r is None))
  if not missing:
    return
  names = ", ".join(f"{os.path.basename(p)}.json {_absent_or_damaged(p)}"
                    for p in missing[:3])
  _warn_once(
      "config.data.path=%r: %d of %d token file(s) have no readable record "
      "beside them (%s%s). Pretokenize writes <file>.array_record.json "
      "next to each file; without it training cannot check which tokenizer "
      "weights and code layout wrote the codes, the codebook size or the "
      "largest label, and trains on them unchecked. Copy the records with "
      "the token files (on each host that wrote them), e.g. `%s`, or "
      "pre-tokenize again.",
      pattern, len(missing), len(records), names,
      " ..." if len(missing) > 3 else "", copy_command(pattern))


def _check_one_tokenizer(pattern: str, records: dict[str, dict]) -> None:
  by_weights = collections.defaultdict(list)
  for path, settings in records.items():
    by_weights[settings.get("weights", "")].append(path)
  if len(by_weights) < 2:
    return
  groups = "; ".join(f"{w or 'unrecorded'!r}: {len(p)} file(s), e.g. {p[0]}"
                     for w, p in sorted(by_weights.items()))
  raise TokenFileError(
      f"config.data.path={pattern!r} matches token files written with "
      f"{len(by_weights)} different tokenizer weights ({groups}). Codes of two "
      "tokenizers cannot train one generator: point config.data.path at the "
      "files of one pre-tokenize run.")


# Settings the token files of one training set agree in: files of two
# splits mix held-out images in, ten crops beside centre crops read the
# images twice, two image sizes give codes of two lengths (no batch holds
# both). Other data (another folder) with the same tokenizer may be mixed.
SET_FIELDS = ("split", "ten_crop", "mirrored", "data.image_size")


def _check_one_set(pattern: str, records: dict[str, dict]) -> None:
  """Refuses token files that differ in ``SET_FIELDS``, and two pre-tokenize
  outputs (file prefixes) written with the same settings: the same images
  read twice (e.g. an output written again under another name). Warns about
  two outputs of one data set and split written with other settings (e.g.
  another number of images): the images they share are read twice."""
  by_fields = collections.defaultdict(list)
  by_settings = collections.defaultdict(set)
  by_data = collections.defaultdict(set)
  for path, settings in records.items():
    split = str(settings.get("split") or "")
    # Slices of one split ("train[:50%]", "train[50%:]") are one split.
    key = tuple(json.dumps(split.split("[")[0] if f == "split" and split
                           else settings_lib.get(settings, f))
                for f in SET_FIELDS)
    by_fields[key].append(path)
    prefix = next(iter(shard_sets([path])), None)
    if prefix is None:
      continue
    by_settings[json.dumps(settings, sort_keys=True)].add(prefix)
    if "[" not in split:   # slices of one split may be disjoint
      data = settings.get("data") or {}
      by_data[(data.get("source"), data.get("name"), data.get("path"),
               split)].add(prefix)
  if len(by_fields) > 1:
    groups = "; ".join(
        ", ".join(f"{f}={json.loads(v)!r}" for f, v in zip(SET_FIELDS, key)
                  if v != "null") + f": {len(p)} file(s), e.g. {p[0]}"
        for key, p in sorted(by_fields.items()))
    raise TokenFileError(
        f"config.data.path={pattern!r} matches token files of "
        f"{len(by_fields)} different pre-tokenize settings ({groups}): "
        "another split would train on held-out images, ten crops beside "
        "centre crops read each image twice, and codes of two image sizes "
        "cannot share a batch. Point config.data.path at the files of one "
        "pre-tokenize run (e.g. its <output>-*.array_record).")
  for prefixes in by_settings.values():
    if len(prefixes) > 1:
      raise TokenFileError(
          f"config.data.path={pattern!r} matches {len(prefixes)} pre-tokenize "
          f"outputs written with the same settings ({', '.join(sorted(prefixes))}): "
          "every image would be read once per output. Point config.data.path "
          "at one of them, or delete the copies.")
  for (*_, split), prefixes in by_data.items():
    if len(prefixes) > 1:
      _warn_once(
          "config.data.path=%r matches %d pre-tokenize outputs of the same "
          "data and split %s (%s), written with other settings: the images "
          "they share are read once per output. Point config.data.path at "
          "one of them unless that is meant.", pattern, len(prefixes), split,
          ", ".join(sorted(prefixes)))


# Tokenizer config fields that decide the layout of its codes.
LAYOUT_FIELDS = ("name", "branches", "image_size", "channel_mult")


def _check_tokenizer_layout(pattern: str, records: dict[str, dict],
                            model) -> None:
  """Refuses token files whose recorded tokenizer lays codes out otherwise
  than ``config.tokenizer.model`` (e.g. MaskGIT codes for FAR), before the
  first batch fails on its shape."""
  if not model or not model.get("name"):
    return
  want = json.loads(json.dumps(model.to_dict()))
  for path, settings in records.items():
    got = settings.get("tokenizer")
    if not isinstance(got, dict):
      continue
    diff = [f"{k}: files {got.get(k)!r} vs config {want.get(k)!r}"
            for k in LAYOUT_FIELDS
            if k in got and k in want and got[k] != want[k]]
    if diff:
      raise TokenFileError(
          f"The token files {pattern!r} were written by another tokenizer "
          f"than config.tokenizer.model ({'; '.join(diff)}; recorded in "
          f"{path}.json). Train on tokens of this config's tokenizer "
          "(pre-tokenize with it, --config.mode=pretokenize), or pick the "
          "generator config that matches those tokens.")


def _check_codes(pattern: str, records: dict[str, dict], codebook_size) -> None:
  if not codebook_size:
    return
  for path, settings in records.items():
    codes = (settings.get("tokenizer") or {}).get("num_codes")
    if isinstance(codes, int) and codes > int(codebook_size):
      raise ConfigError(
          f"The token files {pattern!r} hold codes 0..{codes - 1} (their "
          f"tokenizer has num_codes={codes}, recorded in {path}.json), but "
          f"config.model.codebook_size={codebook_size}. Set "
          f"--config.model.codebook_size={codes}, or pre-tokenize with a "
          f"tokenizer of {codebook_size} codes.")


def _warn_repeated_names(pattern: str) -> None:
  """Two folders' ``train-00000-of-00001.array_record``: likely two outputs
  of pretokenize matched by one glob, so their examples count twice."""
  names = collections.Counter(os.path.basename(p) for p in glob_files(pattern))
  repeated = sorted(n for n, k in names.items() if k > 1)
  if repeated:
    _warn_once(
        "config.data.path=%r matches files of the same name in several "
        "folders (%s): if these are two pre-tokenize outputs of the same "
        "images, each example is seen twice. Narrow the glob to one folder.",
        pattern, ", ".join(repeated[:3]))


def check_origin(pattern: str, records: dict[str, dict],
                 tokenizer_checkpoint: str) -> str:
  """Warns (and returns the warning) when the token files were written with
  other tokenizer weights than ``tokenizer_checkpoint``
  (``config.tokenizer.checkpoint``) resolves to now: the sample grids, and
  sampling later with the same setting, would decode codes of another
  tokenizer. "" when they match or nothing is recorded. Called on process 0
  only (by ``check_training_files``); never raises."""
  written = {s.get("weights") for s in records.values()} - {None}
  if not tokenizer_checkpoint or not written:
    return ""
  try:   # only a warning: storage trouble here must not stop training
    now = weights_lib.params_source(tokenizer_checkpoint)
  except Exception as e:  # pylint: disable=broad-except
    logging.info("Not checking the token files' tokenizer (%s).", e)
    return ""
  if not now or written == {now}:
    return ""
  msg = weights_lib.readable(
      f"The token files {pattern} were written with tokenizer weights "
      f"{sorted(written)}, but config.tokenizer.checkpoint "
      f"({tokenizer_checkpoint}) now holds {now!r}: sample grids and samples "
      "would decode with another tokenizer. Point it at the step the "
      "tokens came from (<run>/checkpoints/<step>), or pre-tokenize again.")
  _warn_once(msg)
  return msg
