"""Command-line error handling shared by the entry points (``genvis_jax.main``,
``genvis_jax.convert``): a user error prints one ``Error: ...`` message on
stderr, no traceback, and exits non-zero (2 for flags, 128 + the signal for a
run a signal stopped, 1 otherwise).

User errors are absl flag errors (missing, unknown or ill-typed flags), a
config file that fails to load or an unknown ``--config.KEY``, and any
``genvis_jax.errors.UserError``. ``--verbose`` (defined here) or
``GENVIS_VERBOSE=1`` re-raises them with their traceback for debugging.
Importing this module defines the ``--verbose`` flag; only entry points do.
"""

from __future__ import annotations

import ast
import functools
import logging as py_logging
import os
import re
import signal
import sys
import textwrap
import traceback

from absl import flags
from absl import logging

from genvis_jax import errors
from genvis_jax.errors import UserError

VERBOSE_ENV = "GENVIS_VERBOSE"
flags.DEFINE_bool("verbose", False, "Show Python tracebacks for user errors "
                  f"(also {VERBOSE_ENV}=1) and log the whole config.")


class _LibraryInfo(py_logging.Filter):
  """Drops INFO records of the libraries ``quiet_library_logs`` names."""

  def filter(self, record):
    return record.levelno >= py_logging.WARNING or not any(
        s in record.pathname for s in ("/orbax/", "/grain/", "/etils/",
                                       "/jax/_src/xla_bridge.py"))


def quiet_library_logs():
  """Drops Orbax/Grain INFO chatter that would drown the training log, and
  jax's INFO line about each backend it could not start (on every GPU or
  CPU machine: "Unable to initialize backend 'tpu'"): from the loggers they
  write to (absl's, jax's backend module), so also where the handler that
  prints is made later (absl's first record sets up the root logger's in a
  notebook or script that has logged nothing yet), and from the handlers
  already there. Calling it again adds nothing."""
  for where in {logging.get_absl_logger(),
                py_logging.getLogger("jax._src.xla_bridge"),
                logging.get_absl_handler(), *py_logging.getLogger().handlers}:
    if not any(isinstance(f, _LibraryInfo) for f in where.filters):
      where.addFilter(_LibraryInfo())


def verbose(argv=()) -> bool:
  """``--verbose`` (parsed, or still in ``argv`` if parsing failed) or the env."""
  if os.environ.get(VERBOSE_ENV, "").lower() in ("1", "true", "yes"):
    return True
  if flags.FLAGS.is_parsed():
    return flags.FLAGS.verbose
  return any(a in ("--verbose", "--verbose=true", "--verbose=1") for a in argv)


def fail(message: str, exit_code: int = 1):
  """Prints ``Error: message`` on stderr (after flushing stdout) and exits."""
  sys.stdout.flush()
  print(f"Error: {message}", file=sys.stderr, flush=True)
  sys.exit(exit_code)


def root_cause(e: BaseException) -> BaseException:
  """The exception at the bottom of ``e``'s chain; ``raise ... from None``
  ends the chain there (its message is the one meant for the user)."""
  while True:
    inner = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    if inner is None:
      return e
    e = inner


def flag_error_message(e: BaseException) -> str:
  """One line for a flag error. absl wraps a config file's own exception with
  its traceback as text; that part is reduced to ``Type: message``."""
  text = str(e).strip()
  first = text.splitlines()[0] if text else type(e).__name__
  suffix = " must have a value other than None"
  if first.startswith("flag --") and first.endswith(suffix + "."):
    return f"Missing required flag {first[len('flag '):].split('=')[0]}."
  root = root_cause(e)
  if root is e or str(root) in first:
    return first
  return f"{first} {type(root).__name__}: {root}"


def _config_specs(argv) -> list[str]:
  """The ``PATH[:ARG]`` of ``--config=PATH[:ARG]`` and ``--config PATH``."""
  args = list(argv[1:])
  return [a.split("=", 1)[1] if a.startswith("--config=") else nxt
          for a, nxt in zip(args, args[1:] + [""])
          if a.startswith("--config=") or (a == "--config" and nxt)]


def _config_paths(argv):
  """The config file paths of ``--config=PATH[:ARG]`` and ``--config PATH``."""
  return [spec.split(":", 1)[0] for spec in _config_specs(argv)]


def _file_config(argv):
  """The config of the (last) config file named in ``argv``, loaded afresh
  without its overrides; None where it does not load (a message's hint
  must not fail)."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  specs = _config_specs(argv)
  if not specs:
    return None
  path, _, arg = specs[-1].partition(":")
  try:
    spec = importlib.util.spec_from_file_location("_genvis_hint_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg or None)
  except Exception:  # pylint: disable=broad-except
    return None


def _demo_stages(config):
  """A demo config's ``stages``; None for another config (or none)."""
  return config.get("stages") if config is not None else None


def _stage_hint(stages, override: str) -> str:
  """Where a demo's stage keeps ``override`` (``--config.KEY``): the stages
  whose config has KEY, or the stage names."""
  key = override[len("--config."):]
  has = [name for name, stage in stages.items()
         if _has_path(stage, key.split("."))]
  if has:
    return ("e.g. " + ", ".join(f"--config.stages.{n}.{key}" for n in has[:3]))
  return f"this demo's stages: {', '.join(stages.keys())}"


def _has_path(node, parts) -> bool:
  """Whether ``node`` holds the dotted path ``parts`` (``"teachers[0]"``
  indexes a list)."""
  for part in parts:
    name, *index = re.findall(r"[^\[\]]+", part)
    try:
      node = node[name]
      for i in index:
        node = node[int(i)]
    except (KeyError, TypeError, AttributeError, IndexError, ValueError):
      return False
  return True


def unknown_key_message(error: Exception, argv) -> str:
  """One line for ml_collections' unknown-key error: the override that named
  it, its suggestion, and the fix."""
  text = str(error)
  m = re.search(r"([A-Za-z_][\w]*)", text)
  key = m.group(1) if m else "?"
  # The override naming it, wherever in its path the unknown part is.
  named = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")
           and key in a.split("=")[0].split(".")[1:]] or [key]
  # Of those, one whose path the config lacks (--config.train.num_steps
  # holds the key of a wrong --config.sample.num_steps too).
  config = _file_config(argv)
  bad = [o for o in named if config is not None and o.startswith("--config.")
         and not _has_path(config, o[len("--config."):].split("."))] or named
  hint = re.search(r'Did you mean "([\w.]+)"', text)
  hint = f' (did you mean "{hint.group(1)}"?)' if hint else ""
  stages = _demo_stages(config)
  staged = ""
  if stages and not bad[0].startswith("--config.stages."):
    staged = (" A demo config runs stages: their settings are under "
              f"--config.stages.<stage> ({_stage_hint(stages, bad[0])}), and "
              "--config.only=<stage> runs one.")
  elif stages and bad[0].split(".")[2] not in stages:
    staged = f" This demo's stages: {', '.join(stages.keys())}."
  return (f"Unknown config key {bad[0]}{hint}: an override must name a field "
          f"the config file has; add new fields to the config file first."
          f"{staged}")


def config_catalogue(configs_dir: str) -> str:
  """``--help``'s list of the runnable configs in ``configs_dir``: each file
  that defines ``get_config(arg=...)`` (one argument; the shared ``*_common``
  files take a size too), but ``base.py`` (the defaults the others start
  from), with the first paragraph of its docstring. Read with
  ``ast``, nothing imported; "" when the folder is absent (an installed
  package without the repository's ``configs/``)."""
  if not os.path.isdir(configs_dir):
    return ""
  rows = []
  for name in sorted(os.listdir(configs_dir)):
    if not name.endswith(".py") or name == "base.py":
      continue
    with open(os.path.join(configs_dir, name), encoding="utf-8") as f:
      tree = ast.parse(f.read())
    runnable = any(isinstance(n, ast.FunctionDef) and n.name == "get_config"
                   and len(n.args.args) <= 1 for n in tree.body)
    if runnable:   # the docstring's first paragraph, wrapped
      summary = " ".join((ast.get_docstring(tree) or "").split("\n\n")[0]
                         .split())
      rows.append(textwrap.fill(summary, 79, initial_indent=f"  {name:<22} ",
                                subsequent_indent=" " * 25))
  return "\n".join(rows)


def flags_parser(usage: str):
  """An ``app.run(flags_parser=...)`` that turns flag and config-file errors
  into one message (plus ``usage``) and exit code 2."""

  def parse(argv):
    for path in _config_paths(argv):
      if not os.path.isfile(path):
        where = ("" if os.path.isabs(path) else
                 f" in the current directory {os.getcwd()}: run from the "
                 "repository root (where configs/ is) or pass an absolute "
                 "path")
        fail(f"Config file {path!r} (from --config) does not exist{where}; "
             f"configs/ holds the paper, runlocal and demo configs, e.g. "
             f"configs/demo.py.\n{usage}", 2)
    try:
      rest = flags.FLAGS(argv)
      # ml_collections keeps some load failures (a --flagfile's missing
      # config) for the first read, as a traceback in main: said here.
      value = flags.FLAGS["config"].value if "config" in flags.FLAGS else None
      if type(value).__name__ == "_ErrorConfig":
        error = object.__getattribute__(value, "_error")
        if verbose(argv):
          raise error
        fail(f"Loading the config (--config) failed: "
             f"{' '.join(str(error).split())}\n{usage}", 2)
      return rest
    except (AttributeError, KeyError) as e:   # ml_collections: unknown key
      if verbose(argv):
        raise
      fail(unknown_key_message(e, argv), 2)
    except IndexError as e:   # ml_collections: --config.a[i].b past the end
      indexed = [a.split("=")[0] for a in argv[1:]
                 if a.startswith("--config.") and "[" in a.split("=")[0]]
      if verbose(argv) or not indexed:
        raise
      fail(f"{' or '.join(indexed)} indexes past the end of its list ({e}): "
           "indices count from 0, and the config file sets how many entries "
           "the list has (e.g. config.teachers: one per feature head).\n"
           f"{usage}", 2)
    except flags.Error as e:
      if verbose(argv):
        raise
      message = flag_error_message(e)
      for path in _config_paths(argv)[-1:]:   # a config argument's example
        message = message.replace("--config=configs/X.py:",
                                  f"--config={path}:")
      fail(f"{message}\n{usage}", 2)
    except Exception as e:  # pylint: disable=broad-exception-caught
      # A config file that raises while it loads (bad config argument, ...).
      if verbose(argv):
        raise
      fail(f"Loading the config failed: {flag_error_message(e)}\n{usage}", 2)

  return parse


def user_errors_exit(main):
  """Wraps an absl ``main(argv)``: a ``UserError`` -> ``fail(message)``.

  In a multi-process job (``jax.distributed``) any error ends the process
  at once, after its message (or traceback): a normal exit would first wait
  at the distributed runtime's shutdown barrier, up to 5 minutes, for
  processes still blocked with it in a collective; gone, it is noticed by
  their heartbeat check (about 100 s) and they stop too.
  """

  @functools.wraps(main)
  def wrapped(argv):
    try:
      try:
        return main(argv)
      except UserError as e:
        if verbose():
          raise
        # A clean stop (work saved) exits as the signal would: 128 + signum.
        fail(str(e), getattr(e, "exit_code", 1))
      except Exception as e:  # pylint: disable=broad-except
        if not errors.out_of_memory(e) or verbose():
          raise
        fail(f"Out of device memory: {str(e).strip().splitlines()[0]} "
             f"{OOM_HINT}")
      except (errors.StoppedBySignal, KeyboardInterrupt) as e:
        # Modes without a clean stop (pre-tokenizing, evaluation), or any
        # mode outside its loop (training before its first step): Ctrl-C,
        # or SIGTERM on one process (``modes.run``); a second Ctrl-C in
        # training or sampling ends in core.preemption's handler. Ends at
        # once (os._exit) with 128 + the signal, as a shell reports it: an
        # interpreter shutdown under a checkpoint save still writing in
        # Orbax's threads crashed (a segfault, or their tracebacks); the next
        # run removes what that save left.
        sys.stdout.flush()
        if verbose():
          traceback.print_exc()
        signum = getattr(e, "signum", signal.SIGINT)
        message = errors.stopped_message(
            signum, getattr(e, "mode", None), getattr(e, "resume", ""),
            getattr(e, "what", ""))
        print(f"Error: {message}", file=sys.stderr)
        exit_now(128 + signum)
    except BaseException as e:  # pylint: disable=broad-except
      if not _distributed():
        raise
      if not isinstance(e, SystemExit):   # fail() has printed its message
        traceback.print_exc()
        code = 1
      elif e.code is None or isinstance(e.code, int):
        code = e.code or 0
      else:                               # sys.exit("message")
        print(e.code, file=sys.stderr)
        code = 1
      exit_now(code)

  return wrapped


OOM_HINT = (
    "Use fewer examples per device: config.train.global_batch_size or more "
    "config.train.micro_batches (training; config.model.remat=full also "
    "helps), config.sample.batch_size (sampling; for the Equivariant "
    "generator also fewer config.sample.num_columns), config.evaluate."
    "batch_size, config.pretokenize.device_batch (pre-tokenizing); or more "
    "devices. bench/plan_memory.py estimates a training "
    "config's memory per device.")


def _distributed() -> bool:
  import jax  # pylint: disable=import-outside-toplevel
  return jax.distributed.is_initialized()


def exit_now(code: int):
  """Flushes the output and logs, then ends the process without its exit
  handlers (``os._exit``)."""
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)  # pylint: disable=protected-access
