"""Entry point: ``python -m genvis_jax.main --config=configs/X.py --workdir=DIR``.

Only parses flags and dispatches on ``config.mode`` to importable functions:
train | demo | sample | evaluate | pretokenize. Override any config field with
``--config.a.b=value``.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from genvis_jax import cpu_malloc
from genvis_jax import modes

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Path to a configs/*.py file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, images.")
flags.mark_flags_as_required(["config", "workdir"])

def quiet_library_logs():
  """Drops Orbax/Grain INFO chatter that would drown the training log."""
  import logging as py_logging  # pylint: disable=import-outside-toplevel

  class _Filter(py_logging.Filter):

    def filter(self, record):
      return record.levelno >= py_logging.WARNING or not any(
          s in record.pathname for s in ("/orbax/", "/grain/", "/etils/"))

  logging.get_absl_handler().addFilter(_Filter())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from genvis_jax.train import distributed  # pylint: disable=import-outside-toplevel
  distributed.maybe_initialize()
  quiet_library_logs()
  config = FLAGS.config
  logging.info("mode=%s config:\n%s", config.mode, config)
  modes.run(config, FLAGS.workdir)


def _config_root_on_path(argv):
  """Config files import their siblings (``from configs import base``): put the
  folder holding ``configs/`` on sys.path so any working directory works."""
  import os  # pylint: disable=import-outside-toplevel
  for a in argv[1:]:
    if a.startswith("--config="):
      path = a.split("=", 1)[1].split(":", 1)[0]
      root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
      if root not in sys.path:
        sys.path.insert(0, root)


def parse_flags(argv):
  """absl parsing, with a clear message for ``--config.KEY`` typos."""
  _config_root_on_path(argv)
  try:
    return FLAGS(argv)
  except (AttributeError, KeyError) as e:
    overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    detail = str(e).strip("'\"").replace("\\n", " ").replace("\n", " ")
    detail = detail.replace("\\'", "").strip()
    sys.exit(f"Unknown config key among {overrides}: {detail}. Overrides must "
             "name an existing field of the config file; add new fields in "
             "configs/ first.")


if __name__ == "__main__":
  cpu_malloc.tune()   # before any thread allocates; see cpu_malloc.py
  app.run(main, flags_parser=parse_flags)
