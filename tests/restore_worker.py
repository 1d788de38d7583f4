"""One process of the 2-process restore test (tests/test_multihost.py).

  python tests/restore_worker.py save WORKDIR
  python tests/restore_worker.py MODE=WORKDIR [MODE=WORKDIR ...]

``save`` writes a tiny sharded state at steps 3 and 6, and step 6's weights
as a parameter checkpoint beside them (``WORKDIR/weights``). Then each MODE
runs in turn (one process start for all: starting two is most of a case's
cost), on its own copy of that WORKDIR:

- ``validate6`` / ``restore6``: process 1 fails its file check / its read
  of step 6; ``listing``: process 1's listing of the steps sees step 3
  alone; ``unlistable``: process 1's listing fails; ``intact``: none.
  Prints ``MODE: restored step N holding V``, then saves step N + 3 and
  prints ``MODE: saved: steps [...]``. ``unlistable0``: process 0's
  listing fails; prints ``MODE: stopped: <error>``.
- ``load_validate6``: the run's weights are loaded (``init_from``) with
  process 1 failing step 6's file check; ``load_listing``: with process 1
  unable to list the run's steps. Prints ``MODE: loaded V``.
- ``load_params``: the parameter checkpoint is loaded intact, then with
  process 1 unable to read it. Prints ``MODE: loaded V`` and
  ``MODE: stopped: <error>``.
"""

import contextlib
import os
import sys
from unittest import mock

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def _exit_at_once(*exc_info):
  """An error ends this process now (the other would wait for it at the
  distributed shutdown barrier); see tests/multihost_worker.py."""
  import traceback  # pylint: disable=import-outside-toplevel
  traceback.print_exception(*exc_info)
  sys.stderr.flush()
  os._exit(1)  # pylint: disable=protected-access


sys.excepthook = _exit_at_once

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import ml_collections  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
from etils import epath  # pylint: disable=g-import-not-at-top

from genvis_jax.core import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
from genvis_jax.core import checkpoint_files as ckpt_files  # pylint: disable=g-import-not-at-top
from genvis_jax.core import pytree_io  # pylint: disable=g-import-not-at-top
from genvis_jax.core import weights  # pylint: disable=g-import-not-at-top
from genvis_jax.train import distributed  # pylint: disable=g-import-not-at-top

distributed.maybe_initialize()
sharding = jax.sharding.NamedSharding(
    jax.sharding.Mesh(np.array(jax.devices()), ("data",)),
    jax.sharding.PartitionSpec("data"))
config = ml_collections.ConfigDict({"model": {"name": "tiny", "width": 4}})
abstract = {"w": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=sharding)}
on_1 = jax.process_index() == 1


class _Position:
  def get_state(self):
    return {"next_index": 0}


def save(workdir):
  ckpt = ckpt_lib.Checkpointer(workdir, keep=5)
  for step in (3, 6):
    w = jax.make_array_from_callback(
        (4,), sharding, lambda i, s=step: np.full(4, s, np.float32)[i])
    ckpt.save(step, {"params": {"model": {"w": w}}}, _Position(), config,
              data_seed=0)
    ckpt.wait()
  ckpt.close()
  weights.save_params(os.path.join(workdir, "weights"), {"w": w})


def _fail_at_step_6(fn, what):
  def wrapped(*args, **kwargs):
    if "6" in (str(a).rsplit("/", 1)[-1] for a in args):
      # Damage (a storage error would stop the run instead: step_walk).
      raise ValueError(f"injected: {what} of step 6 is truncated")
    return fn(*args, **kwargs)
  return wrapped


def _first(w) -> str:
  return f"{float(np.asarray(w.addressable_data(0))[0]):g}"


def run(mode, workdir, patches):
  """Mode ``mode`` on ``workdir``; yields its output lines."""
  if on_1 and mode in ("validate6", "load_validate6"):
    patches.enter_context(mock.patch.object(
        ckpt_files, "validate_step",
        _fail_at_step_6(ckpt_files.validate_step, "a file")))
  if on_1 and mode == "restore6":
    patches.enter_context(mock.patch.object(
        ckpt_lib.Checkpointer, "restore",
        _fail_at_step_6(ckpt_lib.Checkpointer.restore, "a shard")))
  if mode == "load_params":      # a converted checkpoint (init_from, teachers)
    where = os.path.join(workdir, "weights")
    yield f"loaded {_first(weights.restore_params(where, abstract)['w'])}"
    if on_1:
      def unreadable(*args, **kwargs):
        raise OSError("injected: cannot read the parameter checkpoint")
      patches.enter_context(mock.patch.object(pytree_io, "restore_item",
                                              unreadable))
    try:
      weights.restore_params(where, abstract)
    except Exception as e:  # pylint: disable=broad-except
      yield f"stopped: {type(e).__name__}: {e}"
    return
  if on_1 and mode == "load_listing":   # only process 0 may list them
    def unlistable(*args, **kwargs):
      raise OSError("injected: cannot list the steps")
    for name in ("checkpoint_steps", "checkpoint_steps_paths",
                 "standard_name_format"):
      patches.enter_context(mock.patch.object(ocp.step, name, unlistable))
    patches.enter_context(mock.patch.object(ocp, "CheckpointManager",
                                            unlistable))
  if mode.startswith("load_"):   # init_from / tokenizer.checkpoint of the run
    w = weights.restore_params(workdir, abstract, model_name="tiny")["w"]
    yield f"loaded {_first(w)}"
    return
  standard = type(ocp.step.standard_name_format())
  lister = {"listing": 1, "unlistable": 1, "unlistable0": 0}.get(mode)
  if lister == jax.process_index():   # Orbax's own listing of the steps
    def listed(self, base_path):
      if mode == "listing":   # stale: step 6 not seen yet
        return [ocp.step.Metadata(step=3, path=epath.Path(base_path) / "3")]
      raise OSError("injected: cannot list the steps")
    patches.enter_context(mock.patch.object(standard, "find_all", listed))
  try:
    ckpt = ckpt_lib.Checkpointer(workdir, keep=5)
  except Exception as e:  # pylint: disable=broad-except
    yield f"stopped: {type(e).__name__}: {e}"
    return
  restored = ckpt.restore_latest({"params": {"model": abstract}}, config,
                                 with_data=True)
  w = restored.state["params"]["model"]["w"]
  yield f"restored step {restored.step} holding {_first(w)}"
  # Training goes on: the manager (built again where steps were moved
  # aside) saves the next step on both processes together.
  ckpt.save(restored.step + 3, restored.state, _Position(), config,
            data_seed=0)
  ckpt.wait()
  yield f"saved: steps {ckpt.manager.all_steps()}"
  ckpt.close()


if sys.argv[1] == "save":
  save(sys.argv[2])
  sys.exit(0)
for arg in sys.argv[1:]:
  mode, workdir = arg.split("=", 1)
  with contextlib.ExitStack() as patches:
    for line in run(mode, workdir, patches):
      print(f"{mode}: {line}", flush=True)
