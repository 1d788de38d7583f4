"""One process of the multi-host test (run by tests/test_multihost.py, which
sets this process's index, the count and the coordinator in the environment:
``multihost_common.process_env``).

  python tests/multihost_worker.py WORKDIR STEPS OUT
"""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

workdir, steps, out = sys.argv[1:4]


def _exit_at_once(*exc_info):
  """An error ends this process now, as the CLI's does (``cli.exit_now``):
  a normal exit waits up to 5 minutes at the distributed shutdown barrier
  for the other process, blocked in a collective with this one."""
  import traceback  # pylint: disable=import-outside-toplevel
  traceback.print_exception(*exc_info)
  sys.stderr.flush()
  os._exit(1)  # pylint: disable=protected-access


sys.excepthook = _exit_at_once
nproc = os.environ["JAX_NUM_PROCESSES"]

import jax  # pylint: disable=g-import-not-at-top
import numpy as np
from jax.experimental import multihost_utils

from genvis_jax.train import distributed, grids, trainer  # pylint: disable=g-import-not-at-top
from tests import multihost_common

distributed.maybe_initialize()
assert jax.process_count() == int(nproc) and jax.device_count() == 4 * int(nproc)
losses = {}
state = trainer.train_loop(multihost_common.config(int(steps)), workdir,
                           on_log=lambda s, m: losses.__setitem__(s, m["loss"]))
params = multihost_utils.process_allgather(state.params, tiled=True)
# Pinned weights: process 0's resolution wins, whatever the others see.
from genvis_jax.core import weights  # pylint: disable=g-import-not-at-top
seen = workdir if jax.process_index() == 0 else os.path.join(workdir, "nothing")
with open(f"{out}.pin{jax.process_index()}", "w") as f:
  f.write(weights.resolve_all([seen])[0])
# models.load_params pins too: process 1 loads process 0's step, not "nothing".
from genvis_jax import models  # pylint: disable=g-import-not-at-top
loaded = models.load_params(multihost_common.config(int(steps)).model, seen)
np.savez(f"{out}.load{jax.process_index()}.npz",
         **{jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_leaves_with_path(loaded)})
# Weights saved from device 0 of one process load on every process (process
# 1 has no device 0), with no mesh as with one.
mesh = jax.make_mesh((jax.device_count(),), ("data",),
                     axis_types=(jax.sharding.AxisType.Auto,))
for name, m in (("nomesh", None), ("mesh", mesh)):
  single = models.load_params(multihost_common.config(int(steps)).model,
                              f"{out}.single", m)
  np.savez(f"{out}.single_{name}{jax.process_index()}.npz",
           **{jax.tree_util.keystr(k): np.asarray(
               multihost_utils.process_allgather(v, tiled=True)
               if isinstance(v, jax.Array) else v)
              for k, v in jax.tree_util.tree_leaves_with_path(single)})
# Sampling labels land on their rows of the global batch whatever the mesh's
# device order; this mesh interleaves the processes' devices.
from genvis_jax.sample import labels as sample_labels  # pylint: disable=g-import-not-at-top
by_process = [[d for d in jax.devices() if d.process_index == p]
              for p in range(jax.process_count())]
mesh = jax.sharding.Mesh(np.array([d for ds in zip(*by_process) for d in ds]),
                         ("data",))
labels = np.arange(16, dtype=np.int32)[::-1] * 3
g_labels = sample_labels.global_labels(labels, jax.sharding.NamedSharding(
    mesh, jax.sharding.PartitionSpec("data")))
np.save(f"{out}.labels{jax.process_index()}.npy",
        np.asarray(multihost_utils.process_allgather(g_labels, tiled=True)))
# Training batches: processes whose devices hold the same rows (a tensor
# axis across the processes) form one data group and feed the same rows;
# on the data-parallel mesh each process is its own group.
from genvis_jax.core import sharding as shd  # pylint: disable=g-import-not-at-top
groups = {}
for name, devices, axes in (
    ("tensor_across", np.array(by_process).T, ("data", "tensor")),
    ("data", np.array(by_process).reshape(-1), ("data",))):
  m = jax.sharding.Mesh(devices, axes)
  group, count = shd.data_groups(m, 16)
  rows = np.arange(16, dtype=np.float32).reshape(count, -1)[group]
  batch = shd.host_to_global({"x": rows[:, None]}, m, 16)["x"]
  groups[name] = [group, count, np.asarray(multihost_utils.process_allgather(
      batch, tiled=True)).ravel().tolist()]
with open(f"{out}.groups{jax.process_index()}.json", "w") as f:
  json.dump(groups, f)
# Sample grids' inputs: process 0's first examples on every process.
vis = grids.visual_batch({
    "image": np.full((20, 2, 2, 3), jax.process_index(), np.uint8),
    "label": np.arange(20, dtype=np.int32) + 100 * jax.process_index()})
np.savez(f"{out}.vis{jax.process_index()}.npz", **vis)
# ... and a resume's: the batch process 0 kept in the workdir, on both.
kept_in = os.path.join(workdir, "vis")
for offset in (0, 7):
  vis = grids.visual_batch({
      "image": np.full((20, 2, 2, 3), offset + jax.process_index(), np.uint8),
      "label": np.arange(20, dtype=np.int32)}, kept_in)
np.savez(f"{out}.kept{jax.process_index()}.npz", **vis)
# Agreement and process-0 writes: an outcome on every process, none waiting.
from genvis_jax.core import multihost  # pylint: disable=g-import-not-at-top
from genvis_jax.data import token_integrity  # pylint: disable=g-import-not-at-top
multihost.check_agree({"steps": steps}, "settings")      # the same: passes
multihost.console(f"[console] said by process {jax.process_index()}")
listed = os.path.join(workdir, "listing")
os.makedirs(listed, exist_ok=True)
for name in ("t-0.array_record", "u-0.array_record"):
  open(os.path.join(listed, name), "a").close()
token_integrity.check_same_listing(f"{listed}/[tu]-*.array_record")  # passes
# An image folder whose copy on process 1 holds an image more.
import types  # pylint: disable=g-import-not-at-top
import ml_collections  # pylint: disable=g-import-not-at-top
from PIL import Image  # pylint: disable=g-import-not-at-top
from genvis_jax.data import sources  # pylint: disable=g-import-not-at-top
from genvis_jax.train import checks  # pylint: disable=g-import-not-at-top
folder = os.path.join(workdir, f"images{jax.process_index()}")
for i in range(2 + jax.process_index()):
  os.makedirs(os.path.join(folder, "a"), exist_ok=True)
  Image.new("RGB", (4, 4)).save(os.path.join(folder, "a", f"{i}.png"))
image_data = types.SimpleNamespace(fingerprint=lambda: sources.fingerprint(
    sources.ImageFolderSource(folder)))
image_config = ml_collections.ConfigDict(
    {"data": {"source": "image_folder", "path": "/data/images"}})
# Host weights placed whole on every device of a mesh over both processes.
weights = {"w": np.arange(12, dtype=np.float32).reshape(3, 4) + 1}
placed = shd.put_replicated(weights, jax.make_mesh(
    (jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,)))
assert placed["w"].sharding.is_fully_replicated
for shard in placed["w"].addressable_shards:
  np.testing.assert_array_equal(np.asarray(shard.data), weights["w"])
checks.check_same_weights({"lpips": weights})       # the same: passes
# ... and split over it (a teacher under fsdp): each process places the
# shards of its own devices.
rows = np.arange(jax.device_count() * 3, dtype=np.float32).reshape(-1, 3)
split = shd.put_host({"w": rows}, jax.sharding.NamedSharding(
    jax.make_mesh((jax.device_count(),), ("fsdp",),
                  axis_types=(jax.sharding.AxisType.Auto,)),
    jax.sharding.PartitionSpec("fsdp")))["w"]
assert not split.sharding.is_fully_replicated
for shard in split.addressable_shards:
  np.testing.assert_array_equal(np.asarray(shard.data), rows[shard.index])
blocked = os.path.join(workdir, "blocked")   # a folder where the kept batch goes
os.makedirs(os.path.join(blocked, "images", "visual_batch.npz", "x"),
            exist_ok=True)
outcomes = []
for check in (
    lambda: multihost.check_agree({"p": jax.process_index()}, "settings"),
    lambda: multihost.on_process_0(
        lambda: open(os.path.join(workdir, "no", "such"), "w")),
    # Process 1 sees a file more (as if copied there only), then one less.
    lambda: token_integrity.check_same_listing(
        f"{listed}/{'[tu]' if jax.process_index() else 't'}-*.array_record"),
    lambda: token_integrity.check_same_listing(
        f"{listed}/{'t' if jax.process_index() else '[tu]'}-*.array_record"),
    lambda: checks.check_same_data(image_config, image_data),
    # Frozen weights: one leaf differs on process 1 (a stale copy there).
    lambda: checks.check_same_weights(
        {"lpips": {"w": weights["w"] + jax.process_index(),
                   "b": weights["w"]}}),
    # The grids' kept batch process 0 cannot write.
    lambda: grids.visual_batch({"image": np.zeros((4, 2, 2, 3), np.uint8)},
                               blocked)):
  try:
    check()
    outcomes.append("passed")
  except Exception as e:  # pylint: disable=broad-except
    outcomes.append(f"{type(e).__name__}: {e}")
with open(f"{out}.agree{jax.process_index()}.json", "w") as f:
  json.dump(outcomes, f)
if jax.process_index() == 0:
  flat = {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(params)}
  np.savez(out, **flat)
  with open(out + ".json", "w") as f:
    json.dump(losses, f)
jax.distributed.shutdown()
