"""The end of every evaluator: ``workdir/metrics.json``, a log line, a console line."""

from __future__ import annotations

import json
import os

from absl import logging

from genvis_jax.core import multihost


def write(workdir: str, results: dict, msg: str) -> dict:
  """Writes ``results`` (JSON-serialisable) to ``workdir/metrics.json``
  (creating ``workdir``), logs ``msg`` and prints it as
  ``[eval] msg (in <path>)``. Returns ``results``.

  Every process of a multi-host job evaluates the same images; process 0
  writes the file, whole or not at all (a temporary file renamed into place).
  """
  def write(tmp):
    with open(tmp, "w") as f:
      json.dump(results, f, indent=2)

  path = os.path.join(workdir, "metrics.json")
  multihost.write_on_process_0(path, write)
  logging.info(msg)
  print(f"[eval] {msg} (in {path})", flush=True)
  return results
