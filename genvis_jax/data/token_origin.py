"""Where token files came from: checks on the records pretokenize writes.

Each ``<file>.array_record`` written by ``--config.mode=pretokenize`` has a
``<file>.array_record.json`` record of its settings: the tokenizer's model
config (``tokenizer``), the weights it loaded (``weights``, see
``core.weights.params_source``), the data and the examples. Before training,
:func:`check_training_files` reads those small records and refuses files that
cannot train the configured generator together; ``token_integrity`` then
checks that every process lists the same files and that they hold the bytes
their records' SHA-256 was computed on.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os

import jax

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


def _records(pattern: str) -> dict[str, dict | None]:
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
  found = _records(pattern)
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
  return {path: r["settings"] for path, r in records.items()
          if r is not None and isinstance(r.get("settings"), dict)}


def recorded_settings(pattern: str) -> dict[str, dict]:
  """``{file: settings}`` recorded beside the files matching ``pattern``
  (files without a readable record are left out)."""
  return _settings(_records(pattern))


def recorded_num_classes(pattern: str) -> int | None:
  """1 + the largest label in the token files matching ``pattern`` (each
  record's ``max_label``, written by pretokenize): every label is below it.
  None when a file's record lacks it (written before labels were recorded)
  or there is no file (or no label)."""
  labels = [(r or {}).get("max_label") for r in _records(pattern).values()]
  if not labels or not all(isinstance(m, int) for m in labels):
    return None
  return max(labels) + 1 if max(labels) >= 0 else None


def _pattern(data) -> str:
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
  pattern = _pattern(config.data)
  if not pattern:
    return ""
  warning = []

  def check():
    check_shard_sets(pattern, glob_files(pattern))
    found = _records(pattern)
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
  read twice (e.g. an output written again under another name)."""
  by_fields = collections.defaultdict(list)
  by_settings = collections.defaultdict(set)
  for path, settings in records.items():
    key = tuple(json.dumps(settings_lib.get(settings, f)) for f in SET_FIELDS)
    by_fields[key].append(path)
    prefix = next(iter(shard_sets([path])), None)
    if prefix is not None:
      by_settings[json.dumps(settings, sort_keys=True)].add(prefix)
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


# A training run's record of the tokenizer weights its token files came from
# (or, for a task that encodes its images in the loss, of the tokenizer it
# encodes with), in its workdir: a resume on other codes is refused, and
# sampling warns when it decodes with other weights.
ORIGIN_FILE = "token_origin.json"


def written_weights(config, encodes: bool = False) -> list[str]:
  """Sorted tokenizer weights the training data's codes come from: those
  the token files of ``config.data`` record, or with ``encodes`` (the task
  encodes images with ``config.tokenizer``) the weights its checkpoint
  holds now. [] when neither applies or nothing is recorded."""
  pattern = _pattern(config.data)
  if not pattern:
    path = config.get("tokenizer", {}).get("checkpoint", "") if encodes else ""
    return [w for w in [weights_lib.params_source(path)] if w] if path else []
  found = {s.get("weights") for s in recorded_settings(pattern).values()}
  return sorted(w for w in found if w)


def files_fingerprint(config) -> str:
  """SHA-256 over the names, record counts and recorded SHA-256s of
  ``config.data``'s token files: what a saved input position counts in.
  "" without token files, or where a file has no record with its hash."""
  pattern = _pattern(config.data)
  if not pattern:
    return ""
  rows = []
  for path, r in sorted(_records(pattern).items()):
    if not r or not r.get("sha256"):
      return ""
    rows.append([os.path.basename(path), r.get("records"), r["sha256"]])
  return hashlib.sha256(json.dumps(rows).encode()).hexdigest() if rows else ""


def files_changed(config, workdir: str) -> str:
  """Why the position a run saved cannot be used on its token files now:
  they are not the files it recorded (written again with the same tokenizer
  weights, e.g. centre crops for ten crops or images added), "" if they are
  or nothing was recorded. Process 0 reads; "" on the others (the resume
  agrees on any process's reason)."""
  def read():
    try:
      before = json.loads((epath.Path(workdir) / ORIGIN_FILE).read_text()
                          ).get("files", "")
    except (OSError, ValueError, AttributeError):
      return ""
    now = files_fingerprint(config)
    if before and now and before != now:
      return (f"counts examples of other token files than config.data.path "
              f"({config.data.path}) holds now (written again since)")
    return ""
  return read() if jax.process_index() == 0 else ""


def check(config, workdir: str, resumed_step: int | None,
          encodes: bool = False) -> None:
  """Before a resume reads any state: raises ``TokenFileError`` when the
  token files now come from other tokenizer weights than the run trained on
  (the record ``record`` wrote), ``ConfigError`` when a task that encodes
  its images (``encodes``) would now encode with other tokenizer weights.
  Writes nothing."""
  multihost.on_process_0(lambda: _check(config, workdir, resumed_step,
                                        encodes))


def record(config, workdir: str, resumed_step: int | None,
           encodes: bool = False) -> None:
  """After the run's state is restored (or initialised): records
  ``written_weights(config, encodes)`` in ``workdir`` unless a record is
  there. A workdir whose checkpoint is refused (another config) gets no
  file."""
  multihost.on_process_0(lambda: _record(config, workdir, resumed_step,
                                         encodes))


def _check(config, workdir: str, resumed_step: int | None,
           encodes: bool) -> None:
  now = written_weights(config, encodes)
  before = run_token_weights(workdir) if resumed_step is not None else []
  if before and now and before != now and not _pattern(config.data):
    raise ConfigError(weights_lib.readable(
        f"This run trained to step {resumed_step} on latents of tokenizer "
        f"weights {before}, but config.tokenizer.checkpoint "
        f"({config.tokenizer.checkpoint}) now holds {now}: it would go on "
        "training on another tokenizer's latents. Resume with the tokenizer "
        "it trained on (<run>/checkpoints/<step>), or start a new --workdir "
        "(--config.init_from=<this run> keeps the weights)."))
  if before and now and before != now:
    path = epath.Path(workdir) / ORIGIN_FILE
    raise TokenFileError(weights_lib.readable(
        f"This run trained to step {resumed_step} on token files written with "
        f"tokenizer weights {before}; the files of config.data.path "
        f"({config.data.path}) now hold {now} (written again, or another "
        "output). Resume on the tokens it trained on, or start a new "
        "--workdir (--config.init_from=<this run> keeps the weights). If the "
        "weights are the same (converted again, where the first conversion "
        f"recorded no {weights_lib.DIGEST_FILE}), delete {path} and resume."))


def _record(config, workdir: str, resumed_step: int | None,
            encodes: bool) -> None:
  now = written_weights(config, encodes)
  path = epath.Path(workdir) / ORIGIN_FILE
  # The token files too: the input position the next checkpoint saves
  # counts in these (a resume on files written again draws afresh).
  files = files_fingerprint(config)
  if resumed_step is not None and run_token_weights(workdir):
    before = json.loads(path.read_text())
    if files and before.get("files") != files:
      path.write_text(json.dumps({**before, "files": files}))
    return
  if not now:
    return
  if resumed_step is not None:   # a run from before this record existed
    logging.warning("Recording the training data's tokenizer weights %s in %s; "
                    "the steps up to %d were trained before such a record "
                    "existed and are not checked.", now, path, resumed_step)
  path.write_text(json.dumps({"weights": now, **({"files": files} if files
                                                 else {})}))


def run_token_weights(run: str) -> list[str]:
  """The tokenizer weights a training run's codes came from (its token files,
  or the tokenizer that encoded its images); [] when not recorded, e.g. a
  converted checkpoint or a run of images without a tokenizer."""
  try:
    return list(json.loads((epath.Path(run) / ORIGIN_FILE).read_text())
                .get("weights") or [])
  except (OSError, ValueError, AttributeError):
    return []
