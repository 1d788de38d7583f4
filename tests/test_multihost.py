"""2 processes x 4 CPU devices (jax.distributed on localhost, gloo collectives)
train, checkpoint, stop, restore and continue; losses and parameters equal
1 process x 8 devices fed the same global batches. The workers also pin and
load weights (also weights saved from one process's device 0), feed
training batches by data group (a tensor axis across the processes), place
sampling labels on a mesh that interleaves them, share the sample grids'
inputs, place host weights on every device, refuse settings and image
folders that differ between them and share process 0's failed write. A step one process cannot read is skipped by both
(tests/restore_worker.py)."""

import json
import os
import sys

import jax
import numpy as np

from genvis_jax import models
from genvis_jax.core import checkpoint as ckpt_lib
from genvis_jax.core import sharding as shd
from genvis_jax.core import weights as weights_lib
from genvis_jax.data import pipeline
from genvis_jax.train import trainer as trainer_lib
from tests import multihost_common


def _run_two_processes(workdir, steps, out):
  worker = os.path.join(multihost_common.ROOT, "tests", "multihost_worker.py")
  return multihost_common.run_processes(
      [[sys.executable, worker, workdir, str(steps), out]] * 2)


def _reference(steps):
  """1 process x 8 devices; global batch = the two processes' halves."""
  cfg = multihost_common.config(steps)
  its = [pipeline.create_dataset(cfg.data, split="train", global_batch_size=16,
                                 seed=cfg.seed, process_index=i, process_count=2)[0]
         for i in range(2)]
  tr = trainer_lib.Trainer(cfg, mesh=shd.create_mesh(cfg.mesh, jax.devices()))
  state, losses = tr.init_state(), {}
  for step in range(steps):
    parts = [next(it) for it in its]
    batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    state, m = tr.step(state, batch)
    losses[str(step + 1)] = float(m["loss"])
  return losses, jax.device_get(state.params)


def _save_on_device_0(directory: str) -> dict:
  """Random classifier weights saved as jax arrays on device 0 (as
  ``save_params`` of a one-process run's arrays writes them)."""
  abstract = jax.eval_shape(lambda r: models.init_params(
      multihost_common.config(1).model, r), jax.random.key(0))
  rng = np.random.default_rng(0)
  host = jax.tree_util.tree_map(
      lambda a: rng.normal(size=a.shape).astype(a.dtype), abstract)
  weights_lib.save_params(directory, jax.device_put(host, jax.devices()[0]))
  return {jax.tree_util.keystr(k): v
          for k, v in jax.tree_util.tree_leaves_with_path(host)}


def test_two_processes_match_one(tmp_path):
  wd, out = str(tmp_path / "wd"), str(tmp_path / "params.npz")
  single = _save_on_device_0(out + ".single")
  _run_two_processes(wd, 2, out)                   # train to 2, checkpoint, exit
  assert os.path.exists(os.path.join(wd, "checkpoints", "2", "data",
                                     "process_1-of-2.json"))
  logs = _run_two_processes(wd, 4, out)            # both processes restore
  # A mode's console lines are said once, by process 0.
  assert [log.count("[console] said by process") for log in logs] == [1, 0]
  assert "[console] said by process 0" in logs[0]
  ref_losses, ref_params = _reference(4)
  losses = json.load(open(out + ".json"))
  assert sorted(losses) == ["3", "4"]              # resumed at step 2
  for i in range(2):   # both processes pin process 0's newest step
    assert open(f"{out}.pin{i}").read() == os.path.join(wd, "checkpoints", "4")
  # ... and load its EMA weights, which a fresh one-process load also reads.
  want = ckpt_lib.Checkpointer(wd).restore(
      4, trainer_lib.Trainer(multihost_common.config(4)).abstract_state()).ema
  for i in range(2):
    got = np.load(f"{out}.load{i}.npz")
    for path, leaf in jax.tree_util.tree_leaves_with_path(want):
      np.testing.assert_array_equal(got[jax.tree_util.keystr(path)],
                                    np.asarray(leaf))
  for i in range(2):   # weights saved from device 0 load on both processes
    for name in ("nomesh", "mesh"):
      got = np.load(f"{out}.single_{name}{i}.npz")
      assert sorted(got) == sorted(single)
      for k, v in single.items():
        np.testing.assert_array_equal(got[k], v)
  for i in range(2):   # sampling labels on an interleaved mesh, in row order
    np.testing.assert_array_equal(np.load(f"{out}.labels{i}.npy"),
                                  np.arange(16)[::-1] * 3)
  for i in range(2):   # training batches fed by data group
    groups = json.load(open(f"{out}.groups{i}.json"))
    assert groups["tensor_across"] == [0, 1, list(range(16))], groups
    assert groups["data"] == [i, 2, list(range(16))], groups
  for i in range(2):   # the sample grids' inputs: process 0's, on both;
    # a resume's: the ones process 0 kept before
    vis = np.load(f"{out}.vis{i}.npz")
    np.testing.assert_array_equal(vis["image"], np.zeros((16, 2, 2, 3)))
    np.testing.assert_array_equal(np.load(f"{out}.kept{i}.npz")["image"],
                                  np.zeros((16, 2, 2, 3)))
    assert vis["image"].dtype == np.uint8
    np.testing.assert_array_equal(vis["label"], np.arange(16))
  for i in range(2):   # settings that differ, a failed write on process 0,
    # listings, an image folder with another image on process 1, a frozen
    # weight whose bytes differ there
    differ, write, listing, lacking, images, weights, kept = json.load(
        open(f"{out}.agree{i}.json"))
    # The grids' kept batch: process 0's failure, named on process 1 too
    # (a bare collective error there before).
    assert kept.startswith(("IsADirectoryError", "OtherProcessError: On "
                            "process 0: IsADirectoryError")[i]), kept
    assert weights.startswith(
        "OtherProcessError: Processes [1] run with other frozen weights than "
        "process 0"), weights
    assert "copy the same files to every host" in weights, weights
    assert ("['lpips']['w']: process 0" in weights) == (i == 1), weights
    assert "['lpips']['b']" not in weights, weights
    assert images.startswith(
        "OtherProcessError: Processes [1] run with other training data "
        "(config.data: image_folder '/data/images') than process 0"), images
    assert ("count: process 0 2 vs this process 3" in images) == (i == 1), (
        images)
    assert differ.startswith("OtherProcessError: Processes [1] run with other "
                             "settings than process 0"), differ
    assert ("p: process 0 0 vs this process 1" in differ) == (i == 1), differ
    assert write.startswith(("FileNotFoundError", "OtherProcessError: On "
                             "process 0: FileNotFoundError")[i]), write
    assert listing.startswith("OtherProcessError: Processes [1] list other "
                              "token files for "), listing
    assert ("1 file(s) process 0 does not list: u-0.array_record"
            in listing) == (i == 1), listing
    assert lacking.startswith(listing.split(" for ")[0]), lacking
    assert ("1 of process 0's file(s) missing" in lacking) == (i == 1), lacking
  for k in ("3", "4"):
    np.testing.assert_allclose(losses[k], ref_losses[k], rtol=1e-5)
  got = np.load(out)
  bad = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(ref_params):
    a, b = got[jax.tree_util.keystr(path)], np.asarray(leaf)
    if not np.allclose(a, b, rtol=1e-5, atol=1e-6):
      bad.append((jax.tree_util.keystr(path), float(np.abs(a - b).max())))
  # The checkpoint both processes wrote restores in one process, same values.
  tr = trainer_lib.Trainer(multihost_common.config(4))
  restored = ckpt_lib.Checkpointer(wd).restore(4, tr.abstract_state())
  for path, leaf in jax.tree_util.tree_leaves_with_path(ref_params):
    a = np.asarray(_get(restored.params, path))
    if not np.allclose(a, np.asarray(leaf), rtol=1e-5, atol=1e-6):
      bad.append(("ckpt" + jax.tree_util.keystr(path),
                  float(np.abs(a - np.asarray(leaf)).max())))
  assert not bad, bad


def _get(tree, path):
  for k in path:
    tree = tree[k.key]
  return tree


def test_a_step_one_process_cannot_read_is_skipped_by_both(tmp_path):
  """Process 1 cannot read step 6 (a file, or its shard): both restore step
  3, and step 6 is moved aside; loading the run's weights, both load step
  3; a parameter checkpoint it cannot read stops both. Before, a wait
  inside Orbax's restore that process 1 skipped paired the processes' next
  collectives off by one: process 0 hung and process 1 found no step it
  could restore."""
  import shutil  # pylint: disable=import-outside-toplevel
  worker = os.path.join(multihost_common.ROOT, "tests", "restore_worker.py")
  saved = str(tmp_path / "saved")
  multihost_common.run_processes([[sys.executable, worker, "save", saved]] * 2,
                                 local_devices=2, timeout=120)
  # One start of both processes for every case (a start is most of the
  # cost); each case on its own copy. Only process 0 lists the steps: a
  # listing on process 1 that lacks step 6, or fails, changes nothing (it
  # failed there alone before, in the CheckpointManager, while process 0
  # waited), and one that fails on process 0 stops both.
  cases = (("validate6", 3), ("restore6", 3), ("listing", 6),
           ("unlistable", 6), ("intact", 6))
  args = [f"{mode}={shutil.copytree(saved, str(tmp_path / mode))}"
          for mode, _ in cases]
  args += [f"unlistable0={saved}"]
  # Loading the run's weights (init_from): both load step 3, nothing moved;
  # only process 0 lists the run's steps.
  # A parameter checkpoint that process 1 cannot read stops both (process 0
  # waited in Orbax's restore for it before).
  args += [f"load_validate6={saved}", f"load_listing={saved}",
           f"load_params={saved}"]
  logs = multihost_common.run_processes(
      [[sys.executable, worker, *args]] * 2, local_devices=2, timeout=180)
  for mode, step in cases:
    steps = [3, 6] if step == 3 else [3, 6, 9]   # the redone step 6, or 9
    for log in logs:
      assert f"{mode}: restored step {step} holding {step}\n" in log, (
          mode, log[-3000:])
      assert f"{mode}: saved: steps {steps}\n" in log, (mode, log[-3000:])
    on_disk = os.listdir(tmp_path / mode / "checkpoints")
    assert ("corrupt-6" in on_disk) == (step == 3), mode
    assert str(steps[-1]) in on_disk, (mode, on_disk)   # saved, not skipped
  assert "unlistable0: stopped: OSError: injected: cannot list" in logs[0], (
      logs[0][-2000:])
  assert ("unlistable0: stopped: OtherProcessError: On process 0: OSError: "
          "injected: cannot list") in logs[1], logs[1][-2000:]
  assert all("load_validate6: loaded 3\n" in log for log in logs), logs
  assert all("load_listing: loaded 6\n" in log for log in logs), logs
  assert all("load_params: loaded 6\n" in log for log in logs), logs
  assert ("load_params: stopped: OtherProcessError: Processes [1] could not "
          "read the parameter checkpoint") in logs[0], logs[0][-2000:]
  assert ("load_params: stopped: CheckpointRestoreError: Parameter "
          f"checkpoint {saved}/weights cannot be read (OSError: injected"
          ) in logs[1], logs[1][-2000:]
  assert sorted(os.listdir(os.path.join(saved, "checkpoints"))) == ["3", "6"]
