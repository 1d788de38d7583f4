"""One process of the 2-process restore test (tests/test_multihost.py): a
tiny sharded state saved at steps 3 and 6 (``save``), then restored with one
process failing to read step 6 (``validate6``: its file check, ``restore6``:
its shard), or listing step 3 alone (``listing``), or none (``intact``);
``load_validate6`` loads the run's parameters (``init_from``) instead.
Prints ``restored step N`` (``loaded N``). ``load_params`` loads the
parameter checkpoint ``save`` wrote beside (``WORKDIR/weights``), intact,
then with process 1 failing to read it: prints ``loaded N``, then
``stopped: <error>``.

  python tests/restore_worker.py save|validate6|restore6|listing|intact|load_validate6|load_params WORKDIR
"""

import os
import sys

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

from genvis_jax.core import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
from genvis_jax.core import checkpoint_files as ckpt_files  # pylint: disable=g-import-not-at-top
from genvis_jax.train import distributed  # pylint: disable=g-import-not-at-top

mode, workdir = sys.argv[1:3]
distributed.maybe_initialize()
sharding = jax.sharding.NamedSharding(
    jax.sharding.Mesh(np.array(jax.devices()), ("data",)),
    jax.sharding.PartitionSpec("data"))
config = ml_collections.ConfigDict({"model": {"name": "tiny", "width": 4}})
ckpt = ckpt_lib.Checkpointer(workdir, keep=5)


class _Position:
  def get_state(self):
    return {"next_index": 0}


if mode == "save":
  for step in (3, 6):
    w = jax.make_array_from_callback(
        (4,), sharding, lambda i, s=step: np.full(4, s, np.float32)[i])
    ckpt.save(step, {"params": {"model": {"w": w}}}, _Position(), config,
              data_seed=0)
    ckpt.wait()
  ckpt.close()
  from genvis_jax.core import weights  # pylint: disable=g-import-not-at-top
  weights.save_params(os.path.join(workdir, "weights"), {"w": w})
  sys.exit(0)


def _fail_at_step_6(fn, what):
  def wrapped(*args, **kwargs):
    if "6" in (str(a).rsplit("/", 1)[-1] for a in args):
      raise OSError(f"injected: cannot read {what} of step 6")
    return fn(*args, **kwargs)
  return wrapped


if jax.process_index() == 1 and mode in ("validate6", "load_validate6"):
  ckpt_files.validate_step = _fail_at_step_6(ckpt_files.validate_step, "a file")
if jax.process_index() == 1 and mode == "restore6":
  ckpt_lib.Checkpointer.restore = _fail_at_step_6(ckpt_lib.Checkpointer.restore,
                                                  "a shard")
if jax.process_index() == 1 and mode == "listing":   # a stale listing
  ckpt.manager.all_steps = lambda: [3]
abstract = {"w": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=sharding)}
if mode == "load_params":      # a converted checkpoint (init_from, teachers)
  from genvis_jax.core import weights  # pylint: disable=g-import-not-at-top
  where = os.path.join(workdir, "weights")
  w = weights.restore_params(where, abstract)["w"]
  print(f"loaded {float(np.asarray(w.addressable_data(0))[0]):g}", flush=True)
  if jax.process_index() == 1:
    def _unreadable(*args, **kwargs):
      raise OSError("injected: cannot read the parameter checkpoint")
    ckpt_lib.restore_item = _unreadable
  try:
    weights.restore_params(where, abstract)
  except Exception as e:  # pylint: disable=broad-except
    print(f"stopped: {type(e).__name__}: {e}", flush=True)
  sys.exit(0)
if mode.startswith("load_"):   # init_from / tokenizer.checkpoint of the run
  from genvis_jax.core import weights  # pylint: disable=g-import-not-at-top
  w = weights.restore_params(workdir, abstract, model_name="tiny")["w"]
  print(f"loaded {float(np.asarray(w.addressable_data(0))[0]):g}", flush=True)
  sys.exit(0)
restored = ckpt.restore_latest({"params": {"model": abstract}}, config,
                               with_data=True)
w = restored.state["params"]["model"]["w"]
value = float(np.asarray(w.addressable_data(0))[0])
print(f"restored step {restored.step} holding {value:g}", flush=True)
