"""Entry point: ``python -m genvis_jax.main --config=configs/X.py --workdir=DIR``.

Only parses flags and dispatches on ``config.mode`` to importable functions:
train | demo | sample | evaluate | pretokenize. Override any config field with
``--config.a.b=value``.

User errors (bad or missing flags, a config file that fails to load, a
``UserError`` raised by the library: missing data, mismatched checkpoints,
damaged weight files, a batch that does not split across devices) print one
``Error: ...`` line on stderr, no traceback, and exit non-zero (2 for flags, 1
otherwise). ``--verbose`` (or ``GENVIS_VERBOSE=1``) keeps the traceback and
logs the whole config at start-up.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from genvis_jax import cpu_malloc
from genvis_jax import modes
from genvis_jax.errors import UserError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Path to a configs/*.py file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, images.")
flags.DEFINE_bool("verbose", False, "Show Python tracebacks for user errors "
                  "(also GENVIS_VERBOSE=1) and log the whole config.")
flags.mark_flags_as_required(["config", "workdir"])

USAGE = ("usage: python -m genvis_jax.main --config=configs/NAME.py[:ARG] "
         "--workdir=DIR [--config.KEY=VALUE ...] [--verbose]")
VERBOSE_ENV = "GENVIS_VERBOSE"


def verbose(argv=()) -> bool:
  """``--verbose`` (parsed, or still in ``argv`` if parsing failed) or env."""
  if os.environ.get(VERBOSE_ENV, "").lower() in ("1", "true", "yes"):
    return True
  if FLAGS.is_parsed():
    return FLAGS.verbose
  return any(a in ("--verbose", "--verbose=true", "--verbose=1") for a in argv)


def fail(message: str, exit_code: int = 1):
  """Prints ``Error: message`` as the last line on stderr and exits."""
  sys.stdout.flush()
  print(f"Error: {message}", file=sys.stderr, flush=True)
  sys.exit(exit_code)


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
    fail(f"Unexpected arguments {argv[1:]}; flags are written --name=value.\n"
         f"{USAGE}", 2)
  config = FLAGS.config
  if config.get("mode") not in modes.MODES:
    fail(f"Unknown config.mode {config.get('mode')!r} in the config file; "
         f"choose one of {sorted(modes.MODES)}.")
  try:
    from genvis_jax.train import distributed  # pylint: disable=import-outside-toplevel
    distributed.maybe_initialize()
    quiet_library_logs()
    if verbose():
      logging.info("mode=%s config:\n%s", config.mode, config)
    else:   # the full config would bury an early error; --verbose shows it
      logging.info("mode=%s workdir=%s (--verbose logs the whole config)",
                   config.mode, FLAGS.workdir)
    modes.run(config, FLAGS.workdir)
  except UserError as e:
    if verbose():
      raise
    fail(str(e))


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


def _root_cause(e: BaseException) -> BaseException:
  while e.__cause__ is not None or e.__context__ is not None:
    e = e.__cause__ or e.__context__
  return e


def _flag_error_message(e: BaseException) -> str:
  """One line for an absl flag error; a config file's own exception (which
  absl wraps with its traceback as text) is reduced to ``Type: message``."""
  first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
  for name in ("config", "workdir"):
    if f"Flag --{name} must have a value other than None" in first:
      return f"Missing required flag --{name}."
  root = _root_cause(e)
  if root is e or str(root) in first:
    return first
  return f"{first} {type(root).__name__}: {root}"


def _check_config_path(argv):
  for a in argv[1:]:
    if a.startswith("--config="):
      path = a.split("=", 1)[1].split(":", 1)[0]
      if not os.path.isfile(path):
        fail(f"Config file {path!r} (from --config) does not exist; pass a "
             f"file such as configs/demo.py.\n{USAGE}", 2)


def parse_flags(argv):
  """absl parsing; flag and config-file errors print one message and exit 2."""
  _config_root_on_path(argv)
  _check_config_path(argv)
  try:
    return FLAGS(argv)
  except (AttributeError, KeyError) as e:
    if verbose(argv):
      raise
    overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    detail = str(e).strip("'\"").replace("\\n", " ").replace("\n", " ")
    detail = detail.replace("\\'", "").strip()
    fail(f"Unknown config key among {overrides}: {detail}. Overrides must "
         "name an existing field of the config file; add new fields in "
         "configs/ first.", 2)
  except flags.Error as e:
    if verbose(argv):
      raise
    fail(f"{_flag_error_message(e)}\n{USAGE}", 2)
  except Exception as e:  # pylint: disable=broad-exception-caught
    # A config file that raises while loading (bad config argument, ...).
    if verbose(argv):
      raise
    fail(f"Loading the config failed: {_flag_error_message(e)}\n{USAGE}", 2)


if __name__ == "__main__":
  cpu_malloc.tune()   # before any thread allocates; see cpu_malloc.py
  app.run(main, flags_parser=parse_flags)
