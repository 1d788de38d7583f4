"""``config.mode`` -> the importable function that runs it."""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
import traceback

import jax
import ml_collections

from genvis_jax import errors
from genvis_jax.core import dtypes
from genvis_jax.core import files
from genvis_jax.core import registry
from genvis_jax.core import workdir_lock
from genvis_jax.core import settings as settings_lib
from genvis_jax.errors import ConfigError

# mode -> "module:function(config, workdir)"
MODES = {
    "train": "genvis_jax.train.trainer:train_and_evaluate",
    "demo": "genvis_jax.demo:run",
    "sample": "genvis_jax.sample.driver:sample_and_save",
    "pretokenize": "genvis_jax.data.pretokenize:pretokenize",
    "evaluate": "genvis_jax.evaluate.driver:run",
}


def resolve(mode: str):
  if mode not in MODES:
    raise ConfigError(f"Unknown config.mode {mode!r}; choose one of "
                      f"{sorted(MODES)}.")
  return registry.function(MODES[mode])


# mode -> "module:function(config, workdir)" raising what the mode refuses
# before it reads or writes any file (each mode calls its own first); the
# demo calls every stage's before the first stage starts, so a later stage's
# bad setting is not found after the earlier ones trained.
CONFIG_CHECKS = {
    "train": "genvis_jax.train.trainer:check_config",
    "sample": "genvis_jax.sample.driver:check_config",
    "pretokenize": "genvis_jax.data.pretokenize:check_config",
    "evaluate": "genvis_jax.evaluate.driver:check_config",
}


def check_config(config, workdir: str) -> None:
  """``config.mode``'s ``CONFIG_CHECKS`` on ``config``, run in ``workdir``
  (nothing is read or written there). Raises ``ConfigError`` (or the
  ``UserError`` the mode raises for that setting)."""
  check = CONFIG_CHECKS.get(config.mode)
  if check:
    registry.function(check)(config, workdir)


# (config key, package, names the module must define) per mode.
_NAMED = {
    "train": [("model.name", "genvis_jax.models", ("build", "example_inputs")),
              ("task", "genvis_jax.train.tasks", ("TASK",))],
    "sample": [("model.name", "genvis_jax.sample", ("generate",))],
    "evaluate": [("evaluate.kind", "genvis_jax.evaluate", ("evaluate",))],
}


def check_names(config) -> None:
  """The config strings ``config.mode`` will resolve to modules, checked
  before any device starts (so a misspelt name is the first and only
  message). Raises ``ConfigError`` naming the choices."""
  resolve(config.get("mode"))
  check_config_kind(config)
  dtypes.matmul_precision(config)   # a value jax does not take
  name = (config.get("model") or {}).get("name")
  if config.mode == "sample" and name:
    generators = registry.available("genvis_jax.sample", ("generate",))
    if name not in generators:   # e.g. a tokenizer's config
      raise ConfigError(
          f"config.mode=sample draws from a generator, and config.model.name="
          f"{name!r} is not one (generators: {', '.join(generators)}): pass a "
          "generator's config, e.g. configs/eq_s.py, configs/far_b.py or "
          "configs/rar_b.py, with --config.tokenizer.checkpoint naming the "
          "tokenizer that decodes its samples.")
  for key, package, attrs in _NAMED.get(config.mode, ()):
    node = config
    for part in key.split("."):
      node = node.get(part, None) if node is not None else None
    if node:
      registry.module(package, node, attrs, setting=f"config.{key}")


def check_overrides(config, names) -> None:
  """Command-line overrides (``names``: ``"data.random_flip"``, ... as
  ml_collections' ``get_override_values`` gives them; a demo's
  ``"stages.<stage>.data...."`` for that stage) that nothing would read: a
  ``config.data`` key of image data when ``config.data.source`` is
  ``tokens`` (the crops and flips were fixed when pre-tokenizing), one of
  token files for image data, a key one image source alone reads (an image
  folder's file settings, a TFDS data set's name) for the others, or any
  ``config.data`` key in a pre-tokenizing job (which reads
  ``config.pretokenize.data``, judged the same way against its own source;
  a generator's token files keep only ``source``). The same keys in a
  config file are its defaults and pass. Raises ``ConfigError`` naming the
  flags."""
  from genvis_jax.data import sources   # pylint: disable=import-outside-toplevel
  by_section = {}   # (stage prefix, "" or "pretokenize.") -> keys overridden
  for name in names:
    head, sep, key = name.rpartition("data.")
    if not sep or (head and not head.endswith(".")):
      continue   # not a data section's key (mode, train.num_steps, ...)
    stage = ""
    if head.startswith("stages."):
      stage = ".".join(head.split(".")[:2]) + "."
    if head.removeprefix(stage) in ("", "pretokenize.") and head != "stages.":
      by_section.setdefault((stage, head.removeprefix(stage)), []).append(key)
  for (stage, inner), keys in by_section.items():
    job = config.stages[stage.split(".")[1]] if stage else config
    section = f"config.{stage}{inner}data"
    data = job.get("pretokenize", {}).get("data") if inner else job.get("data")
    source = (data or {}).get("source")
    encodes = not inner and job.get("mode") == "pretokenize"
    others = {s: k for s, k in sources.ONE_SOURCE_KEYS.items()
              if s != source or encodes}   # read by other sources alone
    one_source = sum(others.values(), ())
    tokens = source == "tokens" and not encodes
    if encodes and source == "tokens":
      # A generator's config: config.data is the token files this job
      # writes (a --config.data.source of images is named by
      # pretokenize_checks.check_images_in_data).
      unread = tuple(k for k in keys if k != "source")
    elif encodes:   # a tokenizer's own config, encoding pretokenize.data
      unread = sources.IMAGE_ONLY_KEYS + sources.TOKEN_ONLY_KEYS + one_source
    elif tokens:
      unread = sources.IMAGE_ONLY_KEYS + one_source
    else:
      unread = sources.TOKEN_ONLY_KEYS + one_source
    flags_ = [f"--{section}.{k}" for k in keys if k in unread]
    if not flags_:
      continue
    fix = f"Drop {'it' if len(flags_) == 1 else 'them'}."
    if encodes:
      why = (f"config.{stage}mode=pretokenize encodes the images of "
             f"config.{stage}pretokenize.data and reads no such key of "
             f"{section}")
      fix = (f"Set them under --config.{stage}pretokenize.data instead "
             "(crops and flips excepted: pre-tokenizing makes its own).")
    else:
      fixed = [k for k in keys if tokens and k in sources.IMAGE_ONLY_KEYS]
      why = (f"{section}.source='tokens' reads pre-tokenized codes" if tokens
             else f"{section}.source={source!r} reads images")
      if fixed:
        why += (", whose crops and flips pre-tokenizing fixed (config."
                "pretokenize.ten_crop)")
      groups = [(k, f"{sources.SOURCE_WORDS[s]} (source={s!r})")
                for s, k in others.items()]
      if not tokens:
        groups.insert(0, (sources.TOKEN_ONLY_KEYS, "token files (source="
                          "'tokens')"))
      said = []
      for group, what in groups:
        hit = [k for k in keys if k in group and k not in fixed]
        if hit:
          said.append(f"{', '.join(hit)} {'is' if len(hit) == 1 else 'are'} "
                      f"read for {what} alone")
      if said:
        why += ("; " if tokens else ": ") + "; ".join(said)
    raise ConfigError(
        f"{', '.join(flags_)} would be read by nothing: {why}. {fix}")


DEMO_CONFIGS = "configs/demo.py, configs/demo_fqgan.py, configs/demo_eq.py"


def check_config_kind(config) -> None:
  """``mode=demo`` runs a stage runner (a config with ``stages``); every
  other mode runs one job's config. Raises ``ConfigError`` saying which
  config or mode to use when they are mixed (instead of a missing-field
  error from deep inside the job)."""
  runner = "stages" in config
  if config.mode == "demo" and not runner:
    raise ConfigError(
        "config.mode=demo runs a demo config, whose config.stages list the "
        f"jobs to run ({DEMO_CONFIGS}); this config is one job's and has no "
        "stages. Leave config.mode as the config sets it (train, sample, ...) "
        "or pass one of those demo configs.")
  if config.mode != "demo" and not runner:
    placeholders = [(k, v) for k, v in
                    settings_lib.flatten(config.to_dict()).items()
                    if isinstance(v, str) and "{workdir}" in v]
    if placeholders:
      key, value = placeholders[0]
      raise ConfigError(
          f"config.{key}={value!r} holds {{workdir}}, which a demo config "
          f"({DEMO_CONFIGS}) fills in for its stages: this config is one of "
          "those stages. Run the demo (--config.only=NAME runs some stages), "
          f"or set --config.{key}" + "".join(
              f", --config.{k}" for k, _ in placeholders[1:]) + ".")
  if (config.mode in ("train", "sample") and not runner
      and not (config.get("model") or {}).get("name")):
    raise ConfigError(
        f"config.mode={config.mode} needs a model, and config.model.name is "
        "empty: configs/base.py holds the defaults every "
        "runnable config starts from. Pass a model's config, e.g. "
        "configs/rar_b.py:runlocal (the table in README.md lists them).")
  if config.mode != "demo" and runner:
    stages = ", ".join(config.get("stage_order", ()) or config.stages.keys())
    generators = [PAPER_RUNLOCAL[m] for m in (
        (st.get("model") or {}).get("name") for st in config.stages.values())
                  if m in PAPER_RUNLOCAL]
    raise ConfigError(
        f"config.mode={config.mode} runs one job's config, and this is a demo "
        f"config (stages: {stages}), which runs with config.mode=demo. Run "
        "some of its stages with --config.only=NAME[,NAME] (they read the "
        "earlier stages' outputs in the same --workdir), or pass a paper "
        "config shrunk for a laptop, e.g. "
        f"{(generators or ['configs/rar_b.py:runlocal'])[0]}.")


# A demo's generator -> the paper config its messages point at, shrunk.
PAPER_RUNLOCAL = {"rar": "configs/rar_b.py:runlocal",
                  "far": "configs/far_b.py:dual,runlocal",
                  "eq_generator": "configs/eq_s.py:runlocal"}


def check_workdir(workdir: str) -> str | None:
  """Creates a local ``workdir``; a clear error when it cannot be one (a
  file, under a file, no permission, a read-only file system). Remote
  (``gs://``) ones are left to their writers. Returns the outermost folder
  this call created (``workdir`` or a missing parent of it), None when it
  created none."""
  if not workdir or files.is_remote(workdir):
    return None
  try:
    top = _makedirs(workdir)
    # An existing folder may still refuse files (a read-only mount): found
    # here, before any compute, not by the first writer (a traceback).
    with tempfile.TemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise ConfigError(f"--workdir={workdir} cannot be used as a directory "
                      f"({e.strerror or e}); choose another path.") from e
  return top


def remove_empty_dirs(top: str) -> None:
  """Removes ``top`` and the folders under it if they hold no file; a
  folder with any file in it (or under it) stays, so no data is lost."""
  for path, _, _ in sorted(os.walk(top), key=lambda w: -len(w[0])):
    try:
      os.rmdir(path)     # only succeeds on an empty folder
    except OSError:
      pass


# Modes whose loops stop cleanly on SIGTERM, every process at the same point
# (``core.preemption``). The others keep nothing a kill would lose (a token
# file is renamed into place only when complete), so SIGTERM ends them at
# once: on one process with one line (``errors.StoppedBySignal``, raised
# when the call in progress returns), on several by the default action,
# which does not wait for a collective that may never return (there
# jax.distributed's preemption notifier would otherwise take the signal and
# nothing would ever act on it). On one process the clean modes stop so too
# outside their loops (start-up, a demo between stages), whose
# ``StopRequest`` takes the signal meanwhile; on several they keep the
# notifier throughout.
STOPS_CLEANLY = ("train", "sample", "demo")


def _sigterm_handler(mode: str):
  """The SIGTERM handler ``run`` sets for ``mode``, or None to keep the one
  set (jax.distributed's preemption notifier)."""
  if jax.process_count() == 1:
    return _stop_at_once
  return None if mode in STOPS_CLEANLY else signal.SIG_DFL


# Modes that hold a lock for the whole run (``core.workdir_lock``; the
# trainer takes its workdir's itself, in a demo in its stage's folder).
LOCKED = {"sample": "sampling run", "evaluate": "evaluation run",
          "pretokenize": "pre-tokenizing run", "demo": "demo run"}


def lock_dir(config, workdir: str) -> tuple[str, str | None]:
  """The folder a ``LOCKED`` mode's run holds, and the outermost folder
  made for it (None if none): the workdir, but for pre-tokenizing the folder
  its token files go to (``<workdir>/tokens`` or that of
  ``config.pretokenize.output``, which another run's workdir may hold): two
  runs must not write the same shards, whatever their workdirs."""
  if config.mode != "pretokenize" or "pretokenize" not in config:
    return workdir, None
  from genvis_jax.data import pretokenize  # pylint: disable=import-outside-toplevel
  prefix = pretokenize.output_prefix(config, workdir)
  if files.is_remote(prefix):   # refused by the mode; no lock there anyway
    return os.path.dirname(prefix), None
  folder = os.path.dirname(os.path.abspath(prefix))
  return folder, _makedirs(folder)


def _makedirs(path: str) -> str | None:
  """``os.makedirs(path)``; returns the outermost folder it created."""
  top, parent = None, os.path.abspath(path)
  while not os.path.exists(parent):
    top, parent = parent, os.path.dirname(parent)
  os.makedirs(path, exist_ok=True)
  return top


def _clear_frames(e: BaseException) -> None:
  """Clears the locals of the frames ``e``'s traceback and the exceptions
  it chains to (``__context__``: a Ctrl-C during the wait for the save
  after a first) hold; the frames still running are left."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    traceback.clear_frames(e.__traceback__)
    e = e.__cause__ or e.__context__


def _inside(path: str, top: str) -> bool:
  path, top = os.path.abspath(path), os.path.abspath(top)
  return path == top or path.startswith(os.path.join(top, ""))


def _stop_at_once(signum, frame):
  del frame
  raise errors.StoppedBySignal(signum)


def run(config, workdir: str | os.PathLike):
  """Runs ``config.mode`` on ``config`` (what ``python -m genvis_jax.main`` does,
  its checks of the config's names included: ``check_names``).

  A run that fails leaves none of the folders it created empty behind (e.g.
  on a missing data set): the next attempt finds the path as it was.

  Raises:
    ConfigError: an unknown mode or registered name, a demo config outside
      mode=demo (or the reverse), a ``{workdir}`` left in a field, an empty
      or None ``workdir``, a ``config`` that is not a ``ConfigDict``.
  """
  if not isinstance(config, ml_collections.ConfigDict):
    # A plain dict (e.g. config.to_dict()) failed as "'dict' object has no
    # attribute 'mode'".
    raise ConfigError(
        f"config is a {type(config).__name__}, not an ml_collections "
        "ConfigDict: pass get_config() of a configs/ file, or wrap a dict as "
        "ml_collections.ConfigDict(d).")
  if workdir is None or not os.fspath(workdir):
    # The CLI requires --workdir; from Python an unset variable wrote an
    # evaluation's files into the current folder.
    raise ConfigError(
        f"workdir is {workdir!r}: pass the folder the run writes to (a local "
        "path or gs:// URL; python -m genvis_jax.main's --workdir).")
  workdir = os.fspath(workdir)
  check_names(config)
  fn = resolve(config.mode)
  handler = (_sigterm_handler(config.mode)
             if threading.current_thread() is threading.main_thread() else None)
  installed = handler is not None
  if installed:
    previous = signal.signal(signal.SIGTERM, handler)
  try:
    made = [check_workdir(workdir)]
    held = workdir   # training locks its workdir itself
    try:
      if config.mode not in LOCKED:
        return fn(config, workdir)
      held, top = lock_dir(config, workdir)
      made.append(top)
      # Pre-tokenizing's lock sits among the token files, which are copied
      # on as a folder: removed when the run ends.
      with workdir_lock.hold(held, LOCKED[config.mode],
                             remove=config.mode == "pretokenize"):
        return fn(config, workdir)
    except BaseException as e:
      # Refused as busy: the held folder's lock file is the other run's (and
      # keeps that folder); otherwise this run's lock file, in a folder it
      # made, is not data the run made.
      busy = isinstance(e, workdir_lock.WorkdirBusyError)
      for top in filter(None, made):
        if not busy and _inside(held, top):
          with contextlib.suppress(OSError):
            os.remove(os.path.join(held, workdir_lock.LOCK_NAME))
        remove_empty_dirs(top)
      if isinstance(e, (errors.StoppedBySignal, KeyboardInterrupt)):
        e.mode = config.mode   # the CLI's line says what a rerun does
      if isinstance(e, (errors.StoppedBySignal, KeyboardInterrupt,
                        errors.CleanStop)):
        # A notebook keeps a stopped cell's traceback (IPython's, sys.last_*)
        # until another error: its frames' locals held the run's arrays
        # (training's whole state), a second copy on the devices through
        # the rerun. A stop has nothing to debug.
        _clear_frames(e)
      raise
  finally:
    if installed:   # None: a handler not set from Python
      signal.signal(signal.SIGTERM,
                    signal.SIG_DFL if previous is None else previous)
