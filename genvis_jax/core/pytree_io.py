"""One Orbax PyTree item (a step's ``state``, a parameter checkpoint's
``params``), written and read through its handler: how arrays are split
between replicas when saved, and how they are read onto shardings.

Reads go through the handler, not ``ocp.Checkpointer`` or a manager: those
end in a wait for every process, which a process whose read failed would
skip (``step_walk``).
"""

from __future__ import annotations

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath


# Orbax's replica-parallel save splits every replicated array over its
# replicas, which compiles one slice per (shape, device) on a run's first save:
# 216 compiles and 9 s for the tiny Equivariant tokenizer on 8 CPU devices.
# Arrays whose per-replica slice would be smaller than this are written whole
# by one replica; big ones (where parallel writes pay off) are still split.
MIN_REPLICA_SLICE_BYTES = 4 << 20


def state_handler() -> ocp.PyTreeCheckpointHandler:
  """The handler of a step's train state (and of parameter checkpoints)."""
  th = ocp.type_handlers
  registry = th.create_type_handler_registry(
      (int, th.ScalarHandler()), (float, th.ScalarHandler()),
      (bytes, th.ScalarHandler()), (np.number, th.ScalarHandler()),
      (np.ndarray, th.NumpyHandler()), (str, th.StringHandler()),
      (jax.Array, th.ArrayHandler(
          min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES)))
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def restore_item(directory: epath.Path, args: ocp.args.PyTreeRestore):
  """A PyTree checkpoint (a step's ``<step>/state``, a parameter
  checkpoint's ``params``) read through the handler: no wait for the other
  processes, unlike ``ocp.CheckpointManager.restore`` and
  ``ocp.Checkpointer.restore`` (which end in one), so a process whose read
  fails cannot leave the others paired with the wrong collective."""
  handler = state_handler()
  try:
    return handler.restore(directory, args=args)
  finally:
    handler.close()


def state_metadata(step_dir: epath.Path):
  """The tree of shapes and dtypes saved in ``<step>/state`` (read through
  the handler, as :func:`restore_item`)."""
  handler = state_handler()
  try:
    return handler.metadata(step_dir / "state")
  finally:
    handler.close()


def saved_mesh(metadata) -> dict[str, int] | None:
  """The mesh (axis name -> size) ``metadata`` (``state_metadata``'s tree)
  records its arrays were saved on: the first one sharded over a mesh
  (None: none recorded, e.g. host arrays)."""
  for leaf in jax.tree_util.tree_leaves(
      getattr(metadata, "tree", metadata),
      is_leaf=lambda x: hasattr(x, "sharding")):
    names = getattr(getattr(leaf, "sharding", None), "axis_names", None)
    if names:
      return dict(zip(names, (int(n) for n in leaf.sharding.shape)))
  return None


def placed_restore_args(abstract_params):
  """Orbax restore arguments that read each leaf of ``abstract_params``
  (ShapeDtypeStructs, shardings optional) straight onto its sharding (each
  host reads only its shards, whatever topology wrote them), or as a host
  array where it names none, in its dtype. (Without a sharding Orbax places
  an array on the devices it was saved from: weights saved from device 0 of
  one process then fail to load on the other processes of a job, which do
  not have that device.)"""
  def one(a):
    sharding = getattr(a, "sharding", None)
    if sharding is None:
      return ocp.RestoreArgs(restore_type=np.ndarray, dtype=a.dtype)
    return ocp.ArrayRestoreArgs(sharding=sharding, global_shape=a.shape,
                                dtype=a.dtype)
  return jax.tree_util.tree_map(one, abstract_params)


def onto(abstract_state) -> ocp.args.PyTreeRestore:
  """PyTree restore into ``abstract_state`` (shapes, dtypes, shardings)."""
  return ocp.args.PyTreeRestore(
      item=abstract_state,
      restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))
