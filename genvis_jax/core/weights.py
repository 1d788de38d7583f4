"""Parameter-only loading: ``--config.init_from``, tokenizer and reference weights.

Three kinds of folder hold weights a run can load:

- a parameter checkpoint, ``DIR/params`` (a plain Orbax ``StandardCheckpointer``
  directory holding ``{"params": ...}``), written by ``genvis_jax.convert`` or
  :func:`save_params`;
- a training workdir, ``DIR/checkpoints/<step>/`` (``core.checkpoint``): its
  newest step that loads gives its EMA parameters, or the model's without EMA;
- one step of a training workdir, ``DIR/checkpoints/<step>``: that step only.

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

import hashlib
import json
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from genvis_jax.core import checkpoint as ckpt_lib
from genvis_jax.core import checkpoint_files as ckpt_files
from genvis_jax.core import checkpoint_fit as fit
from genvis_jax.core import multihost
from genvis_jax.errors import UserError


# Beside ``DIR/params``: the content digest that names those weights.
DIGEST_FILE = "params_sha256.json"


def params_digest(params) -> str:
  """Hex SHA-256 over every leaf's path, dtype, shape and bytes, in tree
  order: equal exactly when the weights are (a conversion is deterministic,
  so converting the same official file again gives the same digest)."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    a = np.ascontiguousarray(jax.device_get(leaf))
    h.update(f"{fit.key_path(path)}|{a.dtype.name}|{a.shape};".encode())
    h.update(a.reshape(-1).view(np.uint8))
  return h.hexdigest()


def save_params(directory: str, params) -> None:
  """Writes a parameter checkpoint ``directory/params`` (what ``init_from``
  loads) and its ``params_digest`` beside it; replaces one already there."""
  path = _absolute(directory)
  (path / DIGEST_FILE).unlink(missing_ok=True)  # never beside other weights
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(path / "params", {"params": params}, force=True)
  ckptr.wait_until_finished()
  # Sharded over several hosts, no process holds the bytes: the commit time
  # names these weights then.
  if _on_this_host(params) and jax.process_index() == 0:
    (path / DIGEST_FILE).write_text(
        json.dumps({"sha256": params_digest(params)}))


def restore_params(directory: str, abstract_params, *, setting: str = "",
                   model_name: str = "") -> Any:
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
      model is refused before its arrays are read.

  Returns:
    The parameters, on ``abstract_params``' shardings; NumPy arrays where a
    leaf names none (never the devices they were saved from). Which weights
    were loaded (the step, EMA or not) is logged.

  Raises:
    CheckpointNotFoundError: nothing loadable at ``directory``.
    CheckpointMismatchError: the checkpoint is of another model or size.
    CheckpointRestoreError: the step(s) to load are damaged, or a parameter
      checkpoint's files are, or its arrays do not match the SHA-256
      ``save_params`` recorded.
    multihost.OtherProcessError: loading failed on another process (every
      process must call this; all stop together).
  """
  path = _absolute(directory)
  where = f" ({setting})" if setting else ""
  # Process 0's view of what the folder holds: every process then takes the
  # same path through the agreements below.
  kind = multihost.decided_on_process_0(lambda: _folder_kind(path))
  if kind == _PARAMS:
    return _load_param_checkpoint(path, abstract_params, where)
  if kind in (_RUN, _IN_RUN):
    run, step = (path, None) if kind == _RUN else _split_names(path)
    return _load_run_params(run, abstract_params, where, model_name, step)
  raise ckpt_lib.CheckpointNotFoundError(
      f"No checkpoint at {path}{where}: expected {path}/params (written by "
      "`python -m genvis_jax.convert` or save_params), a training workdir "
      f"with {path}/checkpoints, or one of its checkpoints/<step> folders. "
      + _inside_run_hint(path))


def _restore_args(abstract_params):
  """Per leaf: restore onto its sharding, or as a host array where it names
  none. (Without a sharding Orbax places an array on the devices it was saved
  from: weights saved from device 0 of one process then fail to load on the
  other processes of a job, which do not have that device.)"""
  def one(a):
    sharding = getattr(a, "sharding", None)
    if sharding is None:
      return ocp.RestoreArgs(restore_type=np.ndarray, dtype=a.dtype)
    return ocp.ArrayRestoreArgs(sharding=sharding, global_shape=a.shape,
                                dtype=a.dtype)
  return jax.tree_util.tree_map(one, abstract_params)


def restore_pinned(directory: str, abstract_params, **kwargs) -> Any:
  """:func:`restore_params` of the folder process 0 pins for ``directory``
  (:func:`resolve_all`): every process of a job loads the same step of a
  run, even one saved while they start. Every process must call it."""
  return restore_params(resolve_all([directory])[0], abstract_params, **kwargs)


def resolve(directory: str, quiet: bool = False) -> str:
  """The folder :func:`restore_params` would read for ``directory``, pinned:
  a training run -> its newest step that passes
  ``checkpoint_files.validate_step`` (``<run>/checkpoints/<step>``), so a step saved meanwhile cannot change
  what is loaded; anything else (a parameter checkpoint, a step folder, a
  run with no readable step, nothing) as given. Loading the pinned folder
  never falls back to an older step: a step that validates but does not
  restore is an error, so what was recorded is what was read. Skipped newer
  steps are logged unless ``quiet``."""
  if not directory:
    return directory
  path = _absolute(directory)
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
  training run resolves to (its newest that passes
  ``checkpoint_files.validate_step``, or the named one) with its commit time;
  the folder's path where Orbax recorded neither. "" when there is nothing to
  read (``restore_params`` raises the error then).
  """
  if not directory:
    return ""
  path = _absolute(resolve(directory, quiet=True))
  if (path / "params").exists():
    digest = _recorded_digest(path)
    return f"params sha256 {digest}" if digest else _source("params",
                                                           path / "params")
  run, step = _split_step(path)
  if step is None or _newest_valid(run, step) is None:
    return ""
  return _source(f"step {step}", path)


def _newest_valid(run: epath.Path, step: int | None = None,
                  quiet: bool = False) -> int | None:
  """``step`` (or the newest saved step) of ``run`` that passes
  ``validate_step``; None if none does (``restore_params`` skips those too).
  A newer step skipped is logged: the user learns which weights were passed
  over, and the folder is left in place."""
  for s in _candidate_steps(run, step):
    try:
      ckpt_files.validate_step(run / "checkpoints" / str(s), with_data=False)
    except Exception as e:  # pylint: disable=broad-except
      if step is None and not quiet:
        logging.warning("Checkpoint step %d in %s cannot be read (%s); trying "
                        "the previous step.", s, run / "checkpoints",
                        ckpt_lib.first_line(e))
      continue
    return s
  return None


def _absolute(directory: str) -> epath.Path:
  """``directory`` as an absolute path (a ``gs://`` URL as it is)."""
  path = epath.Path(directory)
  return path if "://" in str(directory) else path.absolute()


def run_of(directory: str) -> str:
  """The training run a weight setting names: ``<run>`` for ``<run>`` or
  ``<run>/checkpoints/<step>``; anything else (a converted checkpoint) as
  given."""
  return str(_split_step(_absolute(directory))[0])


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


def _load_param_checkpoint(path: epath.Path, abstract_params, where: str):
  """``path/params`` on ``abstract_params``' shardings, its files checked
  before Orbax reads them and its digest after. Every process reads it; a
  failure on any stops all (``multihost.run_everywhere``) instead of
  leaving the others waiting in their next collective."""
  failed = (f"could not read the parameter checkpoint {path}{where} (their "
            "logs say why).")

  def damaged(why):
    return ckpt_lib.CheckpointRestoreError(
        f"Parameter checkpoint {path}{where} is damaged: {why}. Convert (or "
        "copy) the weights again.")

  def check():
    if not ocp.step.is_path_finalized(path / "params"):
      raise damaged("its save did not finish (Orbax never finalized it)")
    ckpt_files.check_ocdbt(path / "params")
    meta = ocp.StandardCheckpointer().metadata(path / "params")
    meta_tree = getattr(meta, "item_metadata", meta)
    if meta_tree is None:   # Orbax logged why
      raise damaged("params/_METADATA is missing or unreadable")
    found = meta_tree["params"] if "params" in meta_tree else meta_tree
    fit.compare_trees(abstract_params, found,
                      f"Parameter checkpoint {path}{where}")
    return found

  def read(found):
    # Through the handler: Orbax's Checkpointer.restore ends in a wait for
    # every process, which one whose read failed would skip.
    params = ckpt_lib.restore_item(path / "params", ocp.args.PyTreeRestore(
        item={"params": abstract_params},
        restore_args={"params": _restore_args(abstract_params)}))["params"]
    _verify_digest(path, params, found, where)
    return params

  def as_damage(fn):
    """``fn``'s storage and format errors (TensorStore's are ValueErrors)
    as one ``CheckpointRestoreError``; the user errors it raises as is."""
    try:
      return fn()
    except UserError:
      raise
    except ValueError as e:   # the file checks', TensorStore's: damage
      raise damaged(ckpt_lib.first_line(e).split(": ", 1)[1]) from e
    except OSError as e:      # maybe storage that is away for now
      raise ckpt_lib.CheckpointRestoreError(
          f"Parameter checkpoint {path}{where} cannot be read "
          f"({ckpt_lib.first_line(e)}). Check that its storage is reachable "
          "from this host; if it was copied or converted only in part, "
          "convert (or copy) the weights again.") from e

  found = multihost.run_everywhere(lambda: as_damage(check), failed)
  logging.info("Loading parameters from %s%s.", path / "params", where)
  return multihost.run_everywhere(lambda: as_damage(lambda: read(found)),
                                  failed)


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


def _inside_run_hint(path: epath.Path) -> str:
  """Points at the training run ``path`` lies inside (e.g. a step's
  ``state/`` or a ``corrupt-<step>`` folder), else "Check the path."."""
  for parent in path.parents:
    if parent.name.isdigit() and parent.parent.name == "checkpoints" and (
        parent / "state").exists():
      return (f"{path} is inside step {parent.name} of a training run: point "
              f"the setting at the step's folder, {parent}.")
    if parent.name == "checkpoints" and parent.exists():
      steps = sorted(_saved_steps(parent))
      return (f"{path} is inside the training run {parent.parent}: point the "
              f"setting at the run (its newest readable step) or at one of "
              f"its steps, {parent}/<step> (saved: {steps or 'none'}).")
  return "Check the path."


def _candidate_steps(run: epath.Path, step: int | None) -> list[int]:
  """The named step, or every saved step of ``run``, newest first. A step
  Orbax has not finalized (still being written, e.g. straight into its
  folder on GCS) is not saved yet."""
  if step is not None:
    return [step]
  folder = run / "checkpoints"
  if not folder.exists():
    return []
  return sorted(_saved_steps(folder), reverse=True)


def _saved_steps(folder: epath.Path) -> set[int]:
  """The finalized steps under a run's ``checkpoints/``, named as Orbax's
  CheckpointManager names and lists them (``ocp.step.checkpoint_steps``
  also reads ``old_6`` or ``006`` as step 6)."""
  return {m.step for m in ocp.step.standard_name_format().find_all(folder)}


def _verify_digest(directory: epath.Path, params, stored, where: str) -> None:
  """Raises ``CheckpointRestoreError`` when ``params``, restored from
  ``directory/params`` in their stored dtypes, do not hash to the digest
  ``save_params`` recorded (Orbax keeps no checksums: a damaged or replaced
  file would load silently). Skipped where nothing was recorded, a dtype is
  cast on load, or the arrays span several hosts."""
  recorded = _recorded_digest(directory)
  leaves = jax.tree_util.tree_leaves(params)
  cast = any(getattr(b, "dtype", None) is not None and a.dtype != b.dtype
             for a, b in zip(leaves, jax.tree_util.tree_leaves(stored)))
  if not recorded or cast or not _on_this_host(params):
    return
  if params_digest(params) != recorded:
    raise ckpt_lib.CheckpointRestoreError(
        f"Parameter checkpoint {directory}{where} is damaged: its arrays do "
        f"not match the SHA-256 recorded in {directory / DIGEST_FILE} when "
        "they were written. Convert (or copy) the weights again.")


def _on_this_host(params) -> bool:
  """Whether this process holds every byte of ``params`` (numpy, or arrays
  on its own devices)."""
  return all(getattr(x, "is_fully_addressable", True)
             for x in jax.tree_util.tree_leaves(params))


def _recorded_digest(directory: epath.Path) -> str:
  """The ``params_digest`` recorded beside ``directory/params``, or ""."""
  try:
    return str(json.loads((directory / DIGEST_FILE).read_text())["sha256"])
  except (OSError, ValueError, KeyError, TypeError):
    return ""


def _committed(step_dir: epath.Path) -> str:
  """Orbax's commit time of a checkpoint folder (ns), or "" if unrecorded."""
  try:
    meta = json.loads((step_dir / "_CHECKPOINT_METADATA").read_text())
    return str(meta.get("commit_timestamp_nsecs", ""))
  except (OSError, ValueError):
    return ""


def _source(what: str, folder: epath.Path) -> str:
  committed = _committed(folder)
  # Without Orbax's commit time (older writers) the folder's path stands in.
  return f"{what} committed {committed}" if committed else f"{what} at {folder}"


def _check_step(folder: epath.Path, step: int, where: str,
                model_name: str) -> None:
  """Raises unless step ``step``'s files are whole and it is a run of
  ``model_name`` (any, if empty)."""
  ckpt_files.validate_step(folder / str(step), with_data=False)
  saved = ckpt_files.saved_config(folder / str(step))
  saved_name = ((saved or {}).get("model") or {}).get("name")
  if model_name and saved_name and saved_name != model_name:
    raise fit.CheckpointMismatchError(
        f"{folder.parent}{where} is a training run of model {saved_name!r}; "
        f"a checkpoint of model {model_name!r} is expected here. Point the "
        f"setting at a {model_name!r} run or converted checkpoint.")


def _read_step(folder: epath.Path, step: int):
  """Step ``step``'s EMA or model parameters as host arrays, and which."""
  meta = ckpt_lib.state_metadata(folder / str(step))
  # Only the weights asked for: the optimizer moments, discriminator and
  # other half of (params, EMA) would triple or quadruple the bytes read
  # (RAR-XL fp32: 11.5 GB for its 3.8 GB of weights).
  if meta.get("ema"):
    want, kind = {"ema": meta["ema"]}, "EMA parameters"
  else:
    want, kind = {"params": {"model": meta["params"]["model"]}}, "model parameters"
  as_numpy = jax.tree_util.tree_map(
      lambda _: ocp.RestoreArgs(restore_type=np.ndarray), want)
  # Through the handler: Orbax's CheckpointManager.restore ends in a wait
  # for every process, which one whose read failed would skip (see
  # checkpoint.first_readable).
  state = ckpt_lib.restore_item(folder / str(step) / "state",
                                ocp.args.PyTreeRestore(
                                    item=want, restore_args=as_numpy,
                                    partial_restore=True))
  return (state["ema"] if "ema" in want else state["params"]["model"]), kind


def _load_run_params(run: epath.Path, abstract_params, where: str,
                     model_name: str, step: int | None):
  """A training run's newest loadable step (or ``step``), as arrays on
  ``abstract_params``' shardings (the run may have used another topology)."""
  folder = run / "checkpoints"
  # Process 0's listing of the finalized steps, newest first. No Orbax
  # manager: building one waits for every process after each has listed the
  # steps on its own (one whose listing failed left the others waiting).
  saved = multihost.ints_on_process_0(lambda: _candidate_steps(run, None))
  if step is not None and step not in saved:
    raise ckpt_lib.CheckpointNotFoundError(
        f"No checkpoint step {step} under {folder}{where}; saved "
        f"steps: {sorted(saved) or 'none'}. Name one of them, or the run's "
        f"workdir {run} for its newest.")
  if not saved:
    raise ckpt_lib.CheckpointNotFoundError(
        f"No checkpoint under {folder}{where}: the run has not "
        "saved one yet.")
  # Every process loads the same step or all stop (one that failed alone
  # would leave the others waiting in their next collective); checked on
  # all before any reads the weights.
  walk = ckpt_lib.first_readable(
      [step] if step is not None else saved,
      (lambda s, _: _check_step(folder, s, where, model_name),
       lambda s, _: _read_step(folder, s)),
      folder, log_skipped=step is None)
  failed = walk.failed
  if walk.step is not None:
    params, kind = walk.value
    fit.compare_trees(abstract_params, params,
                      f"Checkpoint {run} step {walk.step}{where}")
    logging.info("Loading the %s of step %d of %s%s.", kind, walk.step, run,
                 where)
    if failed:
      logging.warning("Loaded step %d of %s; newer steps %s are damaged.",
                      walk.step, run, [f for f, _ in failed])
    return jax.tree_util.tree_map(
        lambda a, x: jax.device_put(np.asarray(x), a.sharding)
        if getattr(a, "sharding", None) is not None else x,
        abstract_params, params)
  if step is not None:
    raise ckpt_lib.CheckpointRestoreError(
        f"Checkpoint step {step} under {folder}{where} cannot be read "
        f"({failed[0][1]}). Name another step, or the run's workdir {run} for "
        "its newest readable one.")
  raise ckpt_lib.CheckpointRestoreError(
      f"No checkpoint step under {folder}{where} can be read; "
      "tried:\n  " + "\n  ".join(f"step {s}: {r}" for s, r in failed))
