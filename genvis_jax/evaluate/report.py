"""The end of every evaluator: ``workdir/metrics.json``, a log line, a console line."""

from __future__ import annotations

import json
import os

from absl import logging

from genvis_jax import errors
from genvis_jax.core import multihost


def write(workdir: str, results: dict, msg: str) -> dict:
  """Writes ``results`` (JSON-serialisable) to ``workdir/metrics.json``
  (creating ``workdir``), logs ``msg`` and prints it as
  ``[eval] msg (in <path>)`` (process 0). Returns ``results``.

  Every process of a multi-host job evaluates the same images; process 0
  writes the file, whole or not at all (a temporary file renamed into place).
  """
  def write(tmp):
    with open(tmp, "w") as f:
      json.dump(results, f, indent=2)

  path = os.path.join(workdir, "metrics.json")
  # The numbers first: a write that fails (a full disk) after hours of
  # features must not take them with it.
  logging.info(msg)
  try:
    multihost.write_on_process_0(path, write)
  except OSError as e:
    logging.error("The results not written to %s: %s", path,
                  json.dumps(results, sort_keys=True))
    raise errors.OutputWriteError(
        f"The evaluation finished but {path} could not be written "
        f"({errors.write_cause(e)}). Its numbers: {msg}; every result is in "
        "the log. Free space (or fix the folder) and run the same command "
        "to write the file.") from e
  multihost.console(f"[eval] {msg} (in {path})")
  return results
