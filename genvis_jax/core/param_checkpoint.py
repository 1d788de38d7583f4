"""Parameter checkpoints, ``DIR/params``: weights alone, as
``genvis_jax.convert`` and :func:`save_params` write them.

A plain Orbax PyTree checkpoint holding ``{"params": ...}``, with the SHA-256
of its arrays recorded beside it (``DIR/params_sha256.json``,
:func:`params_digest`): Orbax keeps no checksums, so a damaged or replaced
file would otherwise load silently, and the digest names the weights
(``core.weights.params_source``). :func:`load` checks the files on every
process before any reads them and agrees each stage's outcome, so all
processes load the weights or all stop.
"""

from __future__ import annotations

import hashlib
import json

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from genvis_jax import errors
from genvis_jax.core import checkpoint as ckpt_lib
from genvis_jax.core import checkpoint_files as ckpt_files
from genvis_jax.core import checkpoint_fit as fit
from genvis_jax.core import files
from genvis_jax.core import multihost
from genvis_jax.core import pytree_io
from genvis_jax.errors import UserError


# Beside ``DIR/params``: the content digest that names those weights.
DIGEST_FILE = "params_sha256.json"
# Beside ``DIR/params``: the config they were converted to fit (convert's
# ``--config``), as a training step records its run's config.
CONFIG_FILE = "config.json"
# Beside ``DIR/params``: the official files a conversion read (path, bytes,
# SHA-256) and its ``--key``.
SOURCE_FILE = "converted_from.json"
RECORDS = (DIGEST_FILE, CONFIG_FILE, SOURCE_FILE)


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


# Inside ``DIR``: where ``save_params`` writes weights that replace others,
# moved into place once whole.
STAGING = ".params_partial"
# Inside ``DIR``: the weights a replacement sets aside until the new ones
# are in place.
REPLACED = ".params_replaced"


def save_params(directory: str, params, config=None,
                source: dict | None = None) -> None:
  """Writes a parameter checkpoint ``directory/params`` (what ``init_from``
  loads) and its ``params_digest`` beside it; replaces one already there.
  ``config`` (an ``ml_collections.ConfigDict``, e.g. convert's ``--config``)
  is recorded beside them (``saved_config``): sampling then refuses other
  model settings, and a mismatch names them, as for a training run.
  ``source`` (JSON-able: what a conversion read) goes to ``SOURCE_FILE``.

  The records are written before the arrays, whose folder Orbax finalizes
  last: a save stopped after the arrays left weights that loaded with no
  digest or model check. Weights replacing others (one local process) are
  written whole in ``directory/STAGING`` first and then moved into place, so
  a failed write (a full disk, Ctrl-C) keeps the old ones: Orbax's
  ``force`` deleted them before writing."""
  path = ckpt_files.absolute(directory)
  digest = params_digest(params) if _on_this_host(params) else None
  in_place = (files.is_remote(path) or jax.process_count() > 1
              or not (path / "params").exists())
  target = path if in_place else path / STAGING
  if not in_place and target.exists():
    target.rmtree()   # a replacement a killed run left unfinished
  target.mkdir(parents=True, exist_ok=True)
  for name in RECORDS:   # never beside other weights
    (target / name).unlink(missing_ok=True)
  if jax.process_index() == 0:
    # Sharded over several hosts, no process holds the bytes: the commit
    # time names these weights then.
    if digest is not None:
      (target / DIGEST_FILE).write_text(json.dumps({"sha256": digest}))
    if config is not None:
      (target / CONFIG_FILE).write_text(config.to_json_best_effort(indent=2))
    if source is not None:
      (target / SOURCE_FILE).write_text(json.dumps(source, indent=1))
  # Synchronous: after a failed write no background thread is left waiting
  # at Orbax's barrier (the command hung 5 minutes after its error).
  ckptr = ocp.Checkpointer(ocp.StandardCheckpointHandler())
  try:
    ckptr.save(target / "params",
               args=ocp.args.StandardSave({"params": params}), force=True)
  except BaseException:
    if jax.process_index() == 0:   # what this save wrote, not the old weights
      if not in_place:
        target.rmtree()
      else:
        for name in RECORDS:
          (target / name).unlink(missing_ok=True)
        for tmp in target.glob("params.orbax-checkpoint-tmp*"):
          tmp.rmtree()
    raise
  if not in_place:
    _swap_in(path, target)
  elif not files.is_remote(path) and jax.process_index() == 0:
    for left in (STAGING, REPLACED):   # of a replacement stopped earlier
      if (path / left).exists():
        (path / left).rmtree()


def _swap_in(path: epath.Path, staged: epath.Path) -> None:
  """Moves the weights staged whole in ``staged`` into ``path``, replacing
  the old ones. Renames only, ordered so that a stop anywhere leaves either
  the old or the new weights each with their own records, or no
  ``params`` (a loud error; the old weights set aside in ``REPLACED``), never
  weights beside another conversion's records, which would load with the
  wrong checks or none."""
  aside = path / REPLACED
  if aside.exists():
    aside.rmtree()   # what a stopped swap set aside
  aside.mkdir()
  (path / "params").rename(aside / "params")   # one rename: no weights now
  for name in RECORDS:
    if (path / name).exists():
      (path / name).rename(aside / name)
  for name in RECORDS:
    if (staged / name).exists():
      (staged / name).rename(path / name)
  (staged / "params").rename(path / "params")  # the new ones, whole
  staged.rmdir()
  aside.rmtree()


def saved_config(directory: epath.Path) -> dict | None:
  """The config recorded beside ``directory/params`` (``save_params``), or
  None: written without one, or by an older version."""
  path = directory / CONFIG_FILE
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except ValueError:   # a damaged record only feeds checks and messages
    logging.warning("Ignoring %s: not valid JSON.", path)
    return None


def _damaged(path: epath.Path, where: str, why: str):
  return ckpt_lib.CheckpointRestoreError(
      f"Parameter checkpoint {path}{where} is damaged: {why}. Convert (or "
      "copy) the weights again.")


def fitting_tree(path: epath.Path, abstract_params, where: str = "",
                 model_config=None, model_name: str = ""):
  """The metadata tree of ``path/params``, checked to fit
  ``abstract_params``; reads no array.

  Raises:
    CheckpointMismatchError: as ``load``.
    CheckpointRestoreError: an unfinished save or unreadable metadata.
    ValueError, OSError: from the file checks (``load`` names them).
  """
  saved_name = ((saved_config(path) or {}).get("model") or {}).get("name")
  if model_name and saved_name and saved_name != model_name:
    raise fit.CheckpointMismatchError(
        f"{path}{where} holds weights converted for model {saved_name!r}; "
        f"model {model_name!r} is expected here. Point the setting at "
        f"weights of model {model_name!r} (a tokenizer's and a generator's "
        "folders swapped?).")
  if not ocp.step.is_path_finalized(path / "params"):
    raise _damaged(path, where,
                   "its save did not finish (Orbax never finalized it)")
  ckpt_files.check_ocdbt(path / "params", multihost.share())
  meta = ocp.StandardCheckpointer().metadata(path / "params")
  meta_tree = getattr(meta, "item_metadata", meta)
  if meta_tree is None:   # Orbax logged why
    raise _damaged(path, where, "params/_METADATA is missing or unreadable")
  found = meta_tree["params"] if "params" in meta_tree else meta_tree
  try:
    fit.compare_trees(abstract_params, found,
                      f"Parameter checkpoint {path}{where}",
                      fit.weights_fix(where))
  except fit.CheckpointMismatchError as e:
    raise fit.CheckpointMismatchError(str(e) + fit.model_settings_note(
        saved_config(path), model_config, "converted")) from None
  return found


def load(path: epath.Path, abstract_params, where: str = "",
         model_config=None, model_name: str = ""):
  """``path/params`` on ``abstract_params``' shardings, its files checked
  before Orbax reads them and its digest after. Every process reads it; a
  failure on any stops all (``multihost.run_everywhere``) instead of
  leaving the others waiting in their next collective. A mismatch names the
  ``config.model`` settings (``model_config``) that differ from those the
  weights were converted for, where ``save_params`` recorded them.

  Raises:
    CheckpointMismatchError: the saved tree does not fit ``abstract_params``,
      or the weights were converted for a model other than ``model_name``
      (any, if empty).
    CheckpointRestoreError: the files are damaged or cannot be read, or the
      arrays do not match the recorded digest.
    multihost.OtherProcessError: another process failed.
  """
  failed = (f"could not read the parameter checkpoint {path}{where} (their "
            "logs say why).")

  def read(found):
    # Through the handler: Orbax's Checkpointer.restore ends in a wait for
    # every process, which one whose read failed would skip.
    params = pytree_io.restore_item(path / "params", ocp.args.PyTreeRestore(
        item={"params": abstract_params},
        restore_args={"params": pytree_io.placed_restore_args(abstract_params)}))["params"]
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
      raise _damaged(path, where,
                     errors.first_line(e).split(": ", 1)[1]) from e
    except OSError as e:      # maybe storage that is away for now
      raise ckpt_lib.CheckpointRestoreError(
          f"Parameter checkpoint {path}{where} cannot be read "
          f"({errors.first_line(e)}). Check that its storage is reachable "
          "from this host; if it was copied or converted only in part, "
          "convert (or copy) the weights again.") from e

  found = multihost.run_everywhere(lambda: as_damage(lambda: fitting_tree(
      path, abstract_params, where, model_config, model_name)), failed)
  logging.info("Loading parameters from %s%s.", path / "params", where)
  return multihost.run_everywhere(lambda: as_damage(lambda: read(found)),
                                  failed)


def _verify_digest(directory: epath.Path, params, stored, where: str) -> None:
  """Raises ``CheckpointRestoreError`` when ``params``, restored from
  ``directory/params`` in their stored dtypes, do not hash to the digest
  ``save_params`` recorded (Orbax keeps no checksums: a damaged or replaced
  file would load silently). Skipped where nothing was recorded, a dtype is
  cast on load, or the arrays span several hosts."""
  recorded = recorded_digest(directory)
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


def recorded_digest(directory: epath.Path) -> str:
  """The ``params_digest`` recorded beside ``directory/params``, or ""."""
  try:
    return str(json.loads((directory / DIGEST_FILE).read_text())["sha256"])
  except (OSError, ValueError, KeyError, TypeError):
    return ""
