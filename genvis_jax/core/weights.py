"""Parameter-only loading: ``--config.init_from``, tokenizer and reference weights.

Three kinds of folder hold weights a run can load:

- a parameter checkpoint, ``DIR/params`` (a plain Orbax ``StandardCheckpointer``
  directory holding ``{"params": ...}``), written by ``genvis_jax.convert`` or
  :func:`save_params` (``core.param_checkpoint``);
- a training workdir, ``DIR/checkpoints/<step>/`` (``core.checkpoint``): its
  newest step that loads gives its EMA parameters, or the model's without EMA
  (``core.run_weights``);
- one step of a training workdir, ``DIR/checkpoints/<step>``: that step only.

This module decides which of these a folder is and which step it resolves to.

:func:`params_source` names the weights a folder resolves to, so a resumed
sampling or pre-tokenizing run can tell a run trained further (other weights)
from a copied folder or the same official weights converted again (the same
ones). :func:`resolve` / :func:`resolve_all`
pin a run to its newest step's folder (on process 0, for every process), so
what such a run records is what it loads.

On a multi-host job every process calls the loaders: what a folder holds is
decided on process 0, and the outcome of each check and read is agreed, so
every process loads the same weights or all stop (a host that cannot read
them is named) instead of some waiting for the rest.
"""

from __future__ import annotations

import datetime
import json
import re
from typing import Any

import jax
from absl import logging
from etils import epath

from genvis_jax import errors
from genvis_jax.core import checkpoint as ckpt_lib
from genvis_jax.core import checkpoint_files as ckpt_files
from genvis_jax.core import multihost
from genvis_jax.core import param_checkpoint
from genvis_jax.core import run_weights
# Re-exported: what writes and names the parameter checkpoints loaded here.
from genvis_jax.core.param_checkpoint import DIGEST_FILE, params_digest, save_params  # re-exported


def restore_params(directory: str, abstract_params, *, setting: str = "",
                   model_name: str = "", group: str | None = None,
                   model_config=None) -> Any:
  """Loads the parameters ``directory`` holds into the abstract tree.

  Args:
    directory: a parameter checkpoint, a training workdir or one of its
      ``checkpoints/<step>`` folders (see the module docstring). A workdir's
      damaged newer steps are skipped with a warning and left in place; a
      named step is loaded or refused, never swapped for another.
    abstract_params: the model's tree of ``jax.ShapeDtypeStruct`` (shapes,
      dtypes, shardings) to load into.
    setting: the config field that named ``directory`` (e.g.
      ``config.tokenizer.checkpoint``), for the messages.
    model_name: the expected ``config.model.name``; a training run of another
      model, or weights converted for one, are refused before their arrays
      are read.
    group: read this parameter group of a training run's step (e.g.
      ``"disc"``, a GAN's discriminator) instead of its model's weights; a
      parameter checkpoint holds none.
    model_config: the configured ``config.model`` (its name is
      ``model_name``): weights that do not fit are refused naming the model
      settings that differ from those the run was trained with (or a
      parameter checkpoint converted for, where it recorded them).

  Returns:
    The parameters, on ``abstract_params``' shardings; NumPy arrays where a
    leaf names none (never the devices they were saved from). Which weights
    were loaded (the step, EMA or not) is logged.

  Raises:
    CheckpointNotFoundError: nothing loadable at ``directory``; with
      ``group``, a folder that is not a training run.
    CheckpointMismatchError: the checkpoint is of another model or size, or
      has no ``group``.
    CheckpointRestoreError: the step(s) to load are damaged, or a parameter
      checkpoint's files are, or its arrays do not match the SHA-256
      ``save_params`` recorded.
    step_walk.CheckpointStorageError: reading a training run's steps
      failed in the storage (unavailable, denied), not in its files:
      nothing is skipped; the same command retries.
    multihost.OtherProcessError: loading failed on another process (every
      process must call this; all stop together).
  """
  path = ckpt_files.absolute(directory)
  where = f" ({setting})" if setting else ""
  if model_config is not None:
    model_name = model_name or model_config.name
  # Process 0's view of what the folder holds: every process then takes the
  # same path through the agreements below.
  kind = multihost.decided_on_process_0(lambda: _folder_kind(path))
  if kind == _PARAMS and group is not None:
    raise _no_group_error(path, where, group)
  if kind == _PARAMS:
    return param_checkpoint.load(path, abstract_params, where, model_config,
                                 model_name)
  if kind in (_RUN, _IN_RUN):
    run, step = (path, None) if kind == _RUN else _split_names(path)
    return run_weights.load(run, abstract_params, where, model_name, step,
                            group, model_config)
  raise _not_found_error(path, where)


def check_source(directory: str, setting: str, groups=(),
                 model_name: str = "", abstract_params=None,
                 model_config=None) -> None:
  """Raises now what :func:`restore_params` of ``directory`` (and of each of
  ``groups``) would raise before reading any array: nothing loadable there,
  a training run with no saved step (or without the named one) or of
  another model than ``model_name`` (the saved config of the step the load
  would read), groups asked of a parameter checkpoint, and, given
  ``abstract_params`` ({group: its tree of shapes}, "model" and each of
  ``groups``), weights that do not fit them (the arrays' metadata only;
  ``model_config`` as ``restore_params``'). A run's start calls it before
  the data are opened and the state is built, which take minutes on a pod.
  Damaged files are left to the load, which may fall back to an older step.
  Every process must call it (process 0 looks; all raise).

  Raises:
    CheckpointNotFoundError, CheckpointMismatchError: as ``restore_params``.
  """
  path = ckpt_files.absolute(directory)
  where = f" ({setting})" if setting else ""
  kind = multihost.decided_on_process_0(lambda: _folder_kind(path))
  if kind == _PARAMS and groups:
    raise _no_group_error(path, where, groups[0])
  if kind not in (_PARAMS, _RUN, _IN_RUN):
    raise _not_found_error(path, where)
  if kind != _PARAMS:
    run, step = (path, None) if kind == _RUN else _split_names(path)
    run_weights.saved_steps(run, where, step)

  def look() -> str:
    """Why the load would refuse, read on process 0, or ""."""
    try:
      if kind == _PARAMS:
        if abstract_params is not None:
          param_checkpoint.fitting_tree(path, abstract_params["model"], where,
                                        model_config, model_name)
        return ""
      # The step the load would read: the named one, or the newest whose
      # files validate.
      pinned = step if step is not None else _newest_valid(run, quiet=True)
      if pinned is None:
        return ""
      folder = run / "checkpoints"
      if step is not None:   # a damaged named step is the load's to name
        ckpt_files.validate_step(folder / str(step), with_data=False,
                                 weights_only=True)
      message = run_weights.other_model_message(folder, pinned, where,
                                                model_name)
      if message or abstract_params is None:
        return message
      run_weights.fitting_tree(folder, pinned, abstract_params["model"], where,
                               model_config=model_config)
      for group in groups:
        run_weights.fitting_tree(
            folder, pinned, abstract_params[group],
            f" ({setting} with config.init_groups {group!r})", group=group)
    except ckpt_lib.CheckpointMismatchError as e:
      return str(e)
    except Exception:  # pylint: disable=broad-except
      return ""   # damage (files, a cut config's JSON): the load names it
    return ""

  message = multihost.string_on_process_0(look)
  if message:
    raise ckpt_lib.CheckpointMismatchError(message)


def _no_group_error(path, where: str, group: str):
  return ckpt_lib.CheckpointNotFoundError(
      f"{path}{where} is a parameter checkpoint: it holds a model's weights, "
      f"not the {group!r} parameters of a training run. Point the setting "
      "at the training run (its workdir or checkpoints/<step>), or leave "
      f"{group!r} out of config.init_groups to start it afresh.")


def _not_found_error(path, where: str):
  return ckpt_lib.CheckpointNotFoundError(
      f"No checkpoint at {path}{where}: expected {path}/params (written by "
      "`python -m genvis_jax.convert` or save_params), a training workdir "
      f"with {path}/checkpoints, or one of its checkpoints/<step> folders. "
      + (_file_hint(path) or _unfinished_save_hint(path)
         or _inside_run_hint(path)))


def restore_pinned(directory: str, abstract_params, **kwargs) -> Any:
  """:func:`restore_params` of the folder process 0 pins for ``directory``
  (:func:`resolve_all`): every process of a job loads the same step of a
  run, even one saved while they start. Every process must call it."""
  return restore_params(resolve_all([directory])[0], abstract_params, **kwargs)


def recorded_config(directory: str) -> tuple[dict | None, str]:
  """The config recorded with the weights of a pinned folder (``resolve``)
  and how they were made: a training step's run config (``"trained"``), a
  parameter checkpoint's convert config (``"converted"``); ``(None, "")``
  where none was recorded (a run of an older version, a conversion without
  ``--config``)."""
  path = ckpt_files.absolute(directory)
  saved = ckpt_files.saved_config(path)
  if saved is not None:
    return saved, "trained"
  saved = param_checkpoint.saved_config(path)
  return (saved, "converted") if saved is not None else (None, "")


def resolve(directory: str, quiet: bool = False) -> str:
  """The folder :func:`restore_params` would read for ``directory``, pinned:
  a training run -> its newest step whose weights pass
  ``checkpoint_files.validate_step`` (``<run>/checkpoints/<step>``), so a
  step saved meanwhile cannot change what is loaded; anything else (a parameter checkpoint, a step folder, a
  run with no readable step, nothing) as given. Loading the pinned folder
  never falls back to an older step: a step that validates but does not
  restore is an error, so what was recorded is what was read. Skipped newer
  steps are logged unless ``quiet``."""
  if not directory:
    return directory
  path = ckpt_files.absolute(directory)
  if (path / "params").exists():
    return directory
  run, step = _split_step(path)
  if step is not None:
    return directory
  found = _newest_valid(run, quiet=quiet)
  return str(run / "checkpoints" / str(found)) if found is not None else directory


def resolve_all(directories: list[str]) -> list[str]:
  """:func:`resolve` of each, as process 0 sees them, on every process: all
  processes load the same steps even if one is saved while they start.

  Only process 0 looks at the storage. Its error (e.g. storage that cannot
  be listed) is raised on every process, so none waits at a collective.
  """
  if jax.process_count() == 1:
    return [resolve(d) for d in directories]
  error, paths = "", [""] * len(directories)
  if jax.process_index() == 0:
    try:
      paths = [resolve(d) for d in directories]
    except Exception as e:  # pylint: disable=broad-except
      error = f"{type(e).__name__}: {str(e).strip()[:1000]}"
  error, *paths = multihost.broadcast_strings([error] + paths)
  if error:
    raise ckpt_lib.CheckpointRestoreError(
        f"Resolving the checkpoints {directories} failed on process 0: {error}")
  return paths


def params_source(directory: str) -> str:
  """Which weights :func:`restore_params` reads from ``directory``, as a
  string that changes when they do and survives copying the folder.

  A parameter checkpoint's content digest (``save_params``), or its commit
  time where it has none (written before digests were recorded); the step a
  training run resolves to (:func:`resolve`), or the named one, with its
  commit time; the folder's path where Orbax recorded neither. "" when there
  is nothing to read (``restore_params`` raises the error then).

  A named step's arrays are not read here (a name is not a check; the load
  checks them): callers name the step :func:`resolve` pinned, whose weights
  it has just checked, often several times per run.
  """
  if not directory:
    return ""
  path = ckpt_files.absolute(resolve(directory, quiet=True))
  if (path / "params").exists():
    digest = param_checkpoint.recorded_digest(path)
    return f"params sha256 {digest}" if digest else _source("params",
                                                           path / "params")
  step = _split_step(path)[1]
  if step is None or not (path / "state" / "_METADATA").exists():
    return ""
  return _source(f"step {step}", path)


def _newest_valid(run: epath.Path, quiet: bool = False) -> int | None:
  """The newest saved step of ``run`` whose weights pass ``validate_step``
  (as ``run_weights.load`` checks them: a step whose optimizer state alone
  is damaged still gives its weights); None if none does.
  A newer step skipped is logged: the user learns which weights were passed
  over, and the folder is left in place."""
  for s in run_weights.candidate_steps(run):
    try:
      ckpt_files.validate_step(run / "checkpoints" / str(s), with_data=False,
                               weights_only=True)
    except Exception as e:  # pylint: disable=broad-except
      if not quiet:
        logging.warning("Checkpoint step %d in %s cannot be read (%s); trying "
                        "the previous step.", s, run / "checkpoints",
                        errors.first_line(e))
      continue
    return s
  return None


def run_of(directory: str) -> str:
  """The training run a weight setting names: ``<run>`` for ``<run>`` or
  ``<run>/checkpoints/<step>``; anything else (a converted checkpoint) as
  given."""
  return str(_split_step(ckpt_files.absolute(directory))[0])


_NOTHING, _PARAMS, _RUN, _IN_RUN = 0, 1, 2, 3


def _folder_kind(path: epath.Path) -> int:
  """What ``path`` holds: a parameter checkpoint, a training run, a run's
  ``checkpoints`` folder or one of its steps (``_IN_RUN``), or neither."""
  if (path / "params").exists():
    return _PARAMS
  if (path / "checkpoints").exists():
    return _RUN
  run = _split_names(path)[0]
  return _IN_RUN if run != path and (run / "checkpoints").exists() else _NOTHING


def _split_step(path: epath.Path) -> tuple[epath.Path, int | None]:
  """``(run, step)`` for ``run/checkpoints/<step>``, else ``(path, None)``;
  ``run/checkpoints`` itself means the run. A folder with its own
  ``checkpoints/`` is a run whatever its name (``checkpoints/20240601``)."""
  if (path / "checkpoints").exists():
    return path, None
  return _split_names(path)


def _split_names(path: epath.Path) -> tuple[epath.Path, int | None]:
  """:func:`_split_step` by the names alone: ``run/checkpoints/<step>`` ->
  ``(run, step)``, ``run/checkpoints`` -> ``(run, None)``, else
  ``(path, None)``."""
  if path.name.isdigit() and path.parent.name == "checkpoints":
    return path.parent.parent, int(path.name)
  if path.name == "checkpoints":
    return path.parent, None
  return path, None


def _file_hint(path: epath.Path) -> str:
  """Names the conversion a weight file (an official ``.ckpt`` / ``.pt`` /
  ``.bin`` / ``.safetensors`` download) needs first; "" unless ``path`` is a
  file."""
  if not path.is_file():
    return ""
  return (f"{path} is a file, not a folder of weights: an official weight "
          "file loads once converted, `python -m genvis_jax.convert "
          f"--kind=KIND --src={path} --dst=DIR --config=CONFIG` (the "
          "kinds and commands: README, Official checkpoints), then point the "
          "setting at DIR.")


def _unfinished_save_hint(path: epath.Path) -> str:
  """Names an unfinished save of ``path/params``: on a local disk Orbax
  writes it as ``params.orbax-checkpoint-tmp-<time>`` and renames it once
  complete, so an interrupted conversion leaves only that folder. "" if
  there is none."""
  unfinished = sorted(path.glob("params.orbax-checkpoint-tmp*")
                      ) if path.is_dir() else []
  if not unfinished:
    return ""
  return (f"{unfinished[-1]} is a save of these weights that has not "
          "finished: if it is not still running (it was interrupted), convert "
          "(or copy) the weights again.")


def _inside_run_hint(path: epath.Path) -> str:
  """Points at the training run ``path`` lies inside (e.g. a step's
  ``state/`` or a ``corrupt-<step>`` folder), or the parameter checkpoint
  whose ``params/`` it is, else "Check the path."."""
  if path.name == "params" and _folder_kind(path.parent) == _PARAMS:
    return (f"{path} is the inside of a parameter checkpoint: point the "
            f"setting at its folder, {path.parent}.")
  for parent in path.parents:
    if parent.name.isdigit() and parent.parent.name == "checkpoints" and (
        parent / "state").exists():
      return (f"{path} is inside step {parent.name} of a training run: point "
              f"the setting at the step's folder, {parent}.")
    if parent.name == "checkpoints" and parent.exists():
      steps = sorted(ckpt_files.saved_steps(parent))
      return (f"{path} is inside the training run {parent.parent}: point the "
              f"setting at the run (its newest readable step) or at one of "
              f"its steps, {parent}/<step> (saved: {steps or 'none'}).")
  return "Check the path."


def _committed(step_dir: epath.Path) -> str:
  """Orbax's commit time of a checkpoint folder (ns), or "" if unrecorded."""
  try:
    meta = json.loads((step_dir / "_CHECKPOINT_METADATA").read_text())
    return str(meta.get("commit_timestamp_nsecs", ""))
  except (OSError, ValueError):
    return ""


_COMMITTED = re.compile(r"committed (\d{10,})")


def readable(source: str) -> str:
  """Text naming ``params_source`` strings, for people: each Orbax commit
  time (ns since the epoch) as a UTC date and time to the millisecond. The
  recorded strings themselves stay as they are."""
  def date(m):
    when = datetime.datetime.fromtimestamp(int(m[1]) / 1e9,
                                           datetime.timezone.utc)
    return f"committed {when:%Y-%m-%d %H:%M:%S.%f}"[:-3] + " UTC"
  return _COMMITTED.sub(date, source)


def _source(what: str, folder: epath.Path) -> str:
  committed = _committed(folder)
  # Without Orbax's commit time (older writers) the folder's path stands in.
  return f"{what} committed {committed}" if committed else f"{what} at {folder}"


