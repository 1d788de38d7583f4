"""A training run's record of where its codes came from: ``token_origin.json``
in its workdir holds the tokenizer weights its token files were written with
(or, for a task that encodes its images in the loss, the tokenizer it encodes
with) and a fingerprint of those files. A resume on codes of other weights is
refused, one on the files written again draws its data order afresh, and
sampling refuses to decode with other weights than the codes came from
(``sample.trained_with.check_tokenizer_origin``).
"""

from __future__ import annotations

import hashlib
import json
import os

import jax
from absl import logging
from etils import epath

from genvis_jax.core import multihost
from genvis_jax.core import weights as weights_lib
from genvis_jax.data import token_origin
from genvis_jax.data import tokens
from genvis_jax.errors import ConfigError


# A training run's record of the tokenizer weights its token files came from
# (or, for a task that encodes its images in the loss, of the tokenizer it
# encodes with), in its workdir: a resume on other codes is refused, and so
# is sampling that decodes with other weights.
ORIGIN_FILE = "token_origin.json"


def written_weights(config, encodes: bool = False) -> list[str]:
  """Sorted tokenizer weights the training data's codes come from: those
  the token files of ``config.data`` record, or with ``encodes`` (the task
  encodes images with ``config.tokenizer``) the weights its checkpoint
  holds now. [] when neither applies or nothing is recorded."""
  pattern = token_origin.token_pattern(config.data)
  if not pattern:
    path = config.get("tokenizer", {}).get("checkpoint", "") if encodes else ""
    return [w for w in [weights_lib.params_source(path)] if w] if path else []
  found = {s.get("weights") for s in token_origin.recorded_settings(pattern).values()}
  return sorted(w for w in found if w)


def files_fingerprint(config) -> str:
  """SHA-256 over the names, record counts and recorded SHA-256s of
  ``config.data``'s token files: what a saved input position counts in.
  "" without token files, or where a file has no record with its hash."""
  pattern = token_origin.token_pattern(config.data)
  if not pattern:
    return ""
  rows = []
  for path, r in sorted(token_origin.file_records(pattern).items()):
    if not r or not r.get("sha256"):
      return ""
    rows.append([os.path.basename(path), r.get("records"), r["sha256"]])
  return hashlib.sha256(json.dumps(rows).encode()).hexdigest() if rows else ""


def _files_at(record: dict, step: int | None) -> str:
  """The token files the input position saved with ``step`` counts in: those
  a start after an earlier step switched to (``pending``, recorded with that
  step as ``after``) once a checkpoint was saved on them, else ``files``."""
  pending = record.get("pending") or {}
  if (pending.get("files") and step is not None
      and step > int(pending.get("after", step))):
    return pending["files"]
  return record.get("files", "")


def files_changed(config, workdir: str, step: int | None) -> str:
  """Why the position saved with ``step`` (the step a resume restored)
  cannot be used on the token files now: it counts in other files (written
  again with the same tokenizer weights, e.g. centre crops for ten crops or
  images added), "" if not or nothing was recorded. Process 0 reads; "" on
  the others (the resume agrees on any process's reason)."""
  def read():
    before = _files_at(_read(epath.Path(workdir) / ORIGIN_FILE), step)
    if not before:
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
  if before and now and before != now and not token_origin.token_pattern(config.data):
    raise ConfigError(weights_lib.readable(
        f"This run trained to step {resumed_step} on latents of tokenizer "
        f"weights {before}, but config.tokenizer.checkpoint "
        f"({config.tokenizer.checkpoint}) now holds {now}: it would go on "
        "training on another tokenizer's latents. Resume with the tokenizer "
        "it trained on (<run>/checkpoints/<step>), or start a new --workdir "
        "(--config.init_from=<this run> keeps the weights)."))
  if before and now and before != now:
    path = epath.Path(workdir) / ORIGIN_FILE
    raise tokens.TokenFileError(weights_lib.readable(
        f"This run trained to step {resumed_step} on token files written with "
        f"tokenizer weights {before}; the files of config.data.path "
        f"({config.data.path}) now hold {now} (written again, or another "
        "output). Resume on the tokens it trained on, or start a new "
        "--workdir (--config.init_from=<this run> keeps the weights). If the "
        "weights are the same (converted again, where the first conversion "
        f"recorded no {weights_lib.DIGEST_FILE}), delete {path} and resume."))


def _record(config, workdir: str, resumed_step: int | None,
            encodes: bool) -> None:
  path = epath.Path(workdir) / ORIGIN_FILE
  # The token files too: the input positions of the checkpoints saved from
  # here on count in these ("pending" until one is: a run stopped before its
  # next save leaves the restored step's position counting the old files).
  files = files_fingerprint(config)
  before = _read(path) if resumed_step is not None else {}
  if before.get("weights"):
    was = _files_at(before, resumed_step)
    after = {k: v for k, v in before.items() if k != "pending"}
    if was:
      after["files"] = was
    if files and files != was:
      after["pending"] = {"files": files, "after": int(resumed_step)}
    if after != before:
      path.write_text(json.dumps(after))
    return
  now = written_weights(config, encodes)
  if not now:
    return
  if resumed_step is not None:   # a run from before this record existed
    logging.warning("Recording the training data's tokenizer weights %s in %s; "
                    "the steps up to %d were trained before such a record "
                    "existed and are not checked.", now, path, resumed_step)
  path.write_text(json.dumps({"weights": now, **({"files": files} if files
                                                 else {})}))


def _read(path: epath.Path) -> dict:
  """The record at ``path``; {} where there is none or it does not read."""
  try:
    record = json.loads(path.read_text())
  except (OSError, ValueError):
    return {}
  return record if isinstance(record, dict) else {}


def run_token_weights(run: str) -> list[str]:
  """The tokenizer weights a training run's codes came from (its token files,
  or the tokenizer that encoded its images); [] when not recorded, e.g. a
  converted checkpoint or a run of images without a tokenizer."""
  return list(_read(epath.Path(run) / ORIGIN_FILE).get("weights") or [])
