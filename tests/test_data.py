"""Grain input pipeline: batches, sharding over processes, shuffling,
iterator checkpoints."""

import os
import signal
import subprocess
import sys
import time

import grain
import numpy as np
import pytest

from genvis_jax import data
from tests import data_common as dc
from tests import process_running


# --- pipeline ----------------------------------------------------------------

def test_training_crops_take_config_data_crop_min_frac():
  """The pipeline's random crop covers ``config.data.crop_min_frac`` of the
  short side (FQGAN's tokenizers: 0.8); 1.0 crops the demo's 32 px images
  whole."""
  c = dc.data_config()
  c.random_crop, c.random_flip = True, False
  first = {}
  for frac in (1.0, 0.8):
    c.crop_min_frac = frac
    it, _ = data.create_dataset(c, split="train", global_batch_size=8, seed=0,
                                process_index=0, process_count=1)
    first[frac] = next(it)["image"]
  c.random_crop = False
  it, _ = data.create_dataset(c, split="train", global_batch_size=8, seed=0,
                              process_index=0, process_count=1)
  np.testing.assert_array_equal(first[1.0], next(it)["image"])
  assert not np.array_equal(first[0.8], first[1.0])


def test_batches_shapes_dtypes_and_ranges():
  c = dc.data_config()
  it, info = data.create_dataset(c, split="train", global_batch_size=16, seed=0,
                                 process_index=0, process_count=1)
  b = next(it)
  assert set(b) == {"image", "label"}
  assert b["image"].shape == (16, 32, 32, 3) and b["image"].dtype == np.float32
  assert b["label"].shape == (16,) and b["label"].dtype == np.int32
  assert 0.0 <= b["image"].min() and b["image"].max() <= 1.0
  assert info.num_classes == 10 and info.num_examples == 10_000
  assert info.steps_per_epoch == 625 and info["local_batch_size"] == 16
  assert info.num_skipped == 0

  c = dc.data_config(source="demo_landscapes", image_width=64)
  it, info = data.create_dataset(c, split="validation", global_batch_size=8,
                                 seed=0, train=False, process_index=0,
                                 process_count=1, value_range=(-1, 1))
  b = next(it)
  assert b["image"].shape == (8, 32, 64, 3)
  assert b["image"].min() < -0.5 and b["image"].max() <= 1.0
  assert info.num_classes == 5


def test_bad_batch_and_class_count_raise_at_creation():
  c = dc.data_config()
  with pytest.raises(ValueError, match="multiple of the process count 3"):
    data.create_dataset(c, split="train", global_batch_size=16, seed=0,
                        process_index=0, process_count=3)
  with pytest.raises(ValueError, match="num_classes=10"):
    data.create_dataset(dc.data_config(num_classes=5), split="train",
                        global_batch_size=8, seed=0, process_index=0,
                        process_count=1)
  with pytest.raises(ValueError, match="Unknown config.data.source"):
    data.create_dataset(dc.data_config(source="nope"), split="train",
                        global_batch_size=8, seed=0, process_index=0,
                        process_count=1)


def test_processes_read_disjoint_shards_covering_the_split():
  c = dc.data_config()
  seen = []
  for pi in range(2):
    it, info = data.create_dataset(c, split="validation", global_batch_size=100,
                                   seed=0, train=False, process_index=pi,
                                   process_count=2)
    assert info.steps_per_epoch == 10 and info.num_examples_per_process == 500
    keys = sum((dc.keys(b) for b in it), [])
    assert len(keys) == 500
    # Training: the first epoch of a process is a permutation of its shard.
    it_train, _ = data.create_dataset(
        dc.data_config(random_flip=False), split="validation",
        global_batch_size=100, seed=0, train=True, process_index=pi,
        process_count=2)
    assert set(sum((dc.keys(b) for b in dc.take(it_train, 10)), [])) == set(keys)
    seen.append(set(keys))
  assert not seen[0] & seen[1]
  assert len(seen[0] | seen[1]) == 1000
  # One pass keeping every example (pre-tokenizing): 100 over 3 processes
  # gives shards of 34 / 33 / 33, none dropped.
  kept = []
  for pi in range(3):
    it, info = data.create_dataset(
        dc.data_config(num_examples=100), split="validation", global_batch_size=9,
        seed=0, train=False, process_index=pi, process_count=3,
        drop_remainder=False)
    assert info.num_examples_per_process == (34 if pi == 0 else 33)
    kept += sum((dc.keys(b) for b in it), [])
  assert len(kept) == len(set(kept)) == 100


def test_processes_shuffle_their_shards_independently():
  """Shards interleave (process p holds examples p, p + 4, ...): with one
  shuffle order everywhere, row j of every process's batch held neighbouring
  examples, e.g. the ten crops of one image in token files."""
  order = {}
  it, _ = data.create_dataset(dc.data_config(num_examples=256), split="validation",
                              global_batch_size=256, seed=0, train=False,
                              process_index=0, process_count=1)
  for i, k in enumerate(dc.keys(next(it))):
    order[k] = i
  groups = []
  for pi in range(4):
    it, _ = data.create_dataset(
        dc.data_config(num_examples=256, random_flip=False), split="validation",
        global_batch_size=64, seed=0, train=True, process_index=pi,
        process_count=4)
    idx = [order[k] for k in dc.keys(next(it))]
    assert all(i % 4 == pi for i in idx)
    groups.append([i // 4 for i in idx])     # the example's group of 4 neighbours
  rows_alike = sum(len(set(g)) == 1 for g in zip(*groups))
  assert rows_alike <= 2, rows_alike          # 16 of 16 with one shared order


def test_shuffle_is_deterministic_per_seed_and_reshuffles_each_epoch():
  c = dc.data_config()
  kw = dict(split="validation", global_batch_size=100, process_index=0,
            process_count=1)
  a = dc.take(data.create_dataset(c, seed=0, **kw)[0], 20)
  b = dc.take(data.create_dataset(c, seed=0, **kw)[0], 3)
  d = dc.take(data.create_dataset(c, seed=1, **kw)[0], 3)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  assert not np.array_equal(a[0]["label"], d[0]["label"])
  epoch1 = np.concatenate([x["label"] for x in a[:10]])
  epoch2 = np.concatenate([x["label"] for x in a[10:]])
  assert not np.array_equal(epoch1, epoch2)
  np.testing.assert_array_equal(np.bincount(epoch1), np.bincount(epoch2))


def test_iterator_state_round_trip_through_orbax(tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  c = dc.data_config()
  kw = dict(split="validation", global_batch_size=32, seed=7, process_index=0,
            process_count=1)
  it, _ = data.create_dataset(c, **kw)
  dc.take(it, 29)
  state = it.get_state()
  mngr = ocp.CheckpointManager(tmp_path / "ckpt")
  mngr.save(29, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  mngr.wait_until_finished()
  expected = dc.take(it, 4)    # 31 batches per epoch: crosses into epoch 2

  it2, _ = data.create_dataset(c, **kw)
  it2.set_state(state)
  it3, _ = data.create_dataset(c, **kw)
  next(it3)                  # a used iterator is overwritten by the restore
  mngr.restore(29, args=ocp.args.Composite(
      data=grain.checkpoint.CheckpointRestore(it3)))
  for got2, got3, want in zip(dc.take(it2, 4), dc.take(it3, 4), expected):
    for got in (got2, got3):
      np.testing.assert_array_equal(got["image"], want["image"])
      np.testing.assert_array_equal(got["label"], want["label"])
  mngr.close()


def test_in_process_and_one_worker_process_agree():
  kw = dict(split="validation", global_batch_size=16, seed=0, process_index=0,
            process_count=1)
  want = dc.take(data.create_dataset(dc.data_config(), **kw)[0], 3)
  it, _ = data.create_dataset(dc.data_config(num_workers=1), **kw)
  got = dc.take(it, 3)
  it.close()
  for g, w in zip(got, want):
    assert type(g["label"]) is np.ndarray
    np.testing.assert_array_equal(g["image"], w["image"])


@pytest.mark.parametrize("drop_remainder", [False, True])
def test_one_pass_in_order_with_worker_processes(drop_remainder):
  """A one-pass reader (evaluation's first ``num_images``, pre-tokenizing)
  gets the source order with worker processes too: batched in the workers,
  the first batches held every other image and each worker dropped its own
  remainder (12 of 14 examples in 2 batches instead of 3)."""
  kw = dict(split="validation", global_batch_size=4, seed=0, train=False,
            process_index=0, process_count=1, drop_remainder=drop_remainder)
  c = dc.data_config(source="demo", num_examples=14)
  want = list(data.create_dataset(c, **kw)[0])
  it, info = data.create_dataset(dc.data_config(source="demo", num_examples=14,
                                                num_workers=2), **kw)
  got = list(it)
  it.close()
  assert [len(b["label"]) for b in want] == (
      [4, 4, 4] if drop_remainder else [4, 4, 4, 2])
  assert len(got) == len(want) == info.steps_per_epoch
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g["image"], w["image"])
    np.testing.assert_array_equal(g["label"], w["label"])


_WORKERS_THEN_WAIT = r"""
import os, sys, time
from configs import base
from genvis_jax import data
c = base.get_config()
c.data.update(source="demo", image_size=16, num_classes=10, num_workers=2)
it, _ = data.create_dataset(c.data, split="train", global_batch_size=4,
                            seed=0, process_index=0, process_count=1)
next(it)
while True:   # both workers up: print their pids
  kids = []
  for p in filter(str.isdigit, os.listdir("/proc")):
    try:
      ppid = int(open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1])
      cmd = open(f"/proc/{p}/cmdline").read()
    except OSError:
      continue
    if ppid == os.getpid() and "spawn_main" in cmd:
      kids.append(p)
  if len(kids) == 2:
    break
  time.sleep(0.2)
print(" ".join(kids), flush=True)
time.sleep(600)
"""


def test_grain_workers_end_with_a_killed_run():
  """kill -9 of a run with ``data.num_workers`` > 0 left grain's workers
  looping under init (214 MB each, one set per kill): they end with it."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.Popen([sys.executable, "-c", _WORKERS_THEN_WAIT],
                          stdout=subprocess.PIPE, text=True, cwd=root)
  kids = proc.stdout.readline().split()
  assert len(kids) == 2, kids
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  deadline = time.time() + 20
  while time.time() < deadline and any(map(process_running, kids)):
    time.sleep(0.2)
  alive = [k for k in kids if process_running(k)]
  for k in alive:   # leave no orphan behind a failure
    os.kill(int(k), signal.SIGKILL)
  assert not alive, f"workers {alive} outlived their run"
