"""The end of every evaluator: ``workdir/metrics.json``, a log line, a console line."""

from __future__ import annotations

import json
import os

from absl import logging


def write(workdir: str, results: dict, msg: str) -> dict:
  """Writes ``results`` (JSON-serialisable) to ``workdir/metrics.json``
  (creating ``workdir``), logs ``msg`` and prints it as ``[eval] msg``.
  Returns ``results``."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "metrics.json"), "w") as f:
    json.dump(results, f, indent=2)
  logging.info(msg)
  print(f"[eval] {msg}", flush=True)
  return results
