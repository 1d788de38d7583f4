"""Checkpoint/resume through the real loop: train k, stop, resume to n == n
uninterrupted, bit for bit; mismatching checkpoints fail
clearly (more failure cases in test_reliability.py; exploding runs in
test_stops.py)."""

import glob
import logging
import os
import re
import shutil
import signal
from unittest import mock

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from genvis_jax.core import checkpoint as ckpt_lib
from genvis_jax.core import pytree_io
from genvis_jax.core import checkpoint_files as ckpt_files
from genvis_jax.core import weights as weights_lib
from genvis_jax.core import preemption
from genvis_jax.core import run_weights
from genvis_jax.train import resume as resume_lib
from genvis_jax.train import trainer as trainer_lib
from tests import compiles
from tests import small_run


def _traced_steps(workdir):
  """The 0-based steps of each jax.profiler trace in ``workdir``, oldest
  trace first (the annotations the profiler's step views key on)."""
  import gzip
  import json
  out = []
  for run in sorted(glob.glob(os.path.join(workdir, "plugins", "profile", "*"))):
    assert glob.glob(os.path.join(run, "*.xplane.pb"))   # TensorBoard's input
    (trace,) = glob.glob(os.path.join(run, "*.trace.json.gz"))
    with gzip.open(trace) as f:
      events = json.load(f)["traceEvents"]
    out.append(sorted(int(e["args"]["step_num"]) for e in events
                      if e.get("name") == "train" and e.get("ph") == "X"))
  return out


def test_a_negative_profile_window_is_refused_before_compiling():
  from genvis_jax import errors
  for key in ("profile_steps", "profile_skip_steps"):
    config = small_run.config(6)
    config.train[key] = -1
    with pytest.raises(errors.ConfigError,
                       match=rf"config.train.{key}=-1 must be >= 0"):
      trainer_lib.setup(config)


def test_resume_is_bit_exact(tmp_path, monkeypatch, capsys):
  # small_run traces steps 2-3 (0-based) of each run, so this also shows that
  # profiling leaves the steps' results alone.
  full = trainer_lib.train_and_evaluate(small_run.config(6),
                                        str(tmp_path / "full"))
  assert _traced_steps(str(tmp_path / "full")) == [[2, 3]]
  # Interrupted run: 3 steps, then a new process-like call continues to 6.
  part = str(tmp_path / "part")
  trainer_lib.train_and_evaluate(small_run.config(3), part)
  assert ckpt_lib.Checkpointer(part).latest_step() == 3
  at_3 = weights_lib.params_source(part)
  pinned = weights_lib.resolve(part)       # what a sampler started now loads
  assert pinned == os.path.join(part, "checkpoints", "3")
  capsys.readouterr()
  resumed = trainer_lib.train_and_evaluate(small_run.config(6), part)
  assert int(resumed.step) == 6
  # The mode's last line says where the run is, as the other modes' do.
  assert capsys.readouterr().out.splitlines()[-1] == (
      f"[train] done at step 6: checkpoints in {part}/checkpoints, "
      f"TensorBoard logs and grids in {part}")
  # A window the run's end cuts short stops there; the resume traces none
  # (each start of "the same command" added a trace: test_profiling.py).
  assert _traced_steps(part) == [[2]]
  # What a sampler records of its weights: the step read, and not the path
  # (a copied workdir holds the same weights).
  at_6 = weights_lib.params_source(part)
  assert at_3.startswith("step 3 committed 1") and at_6.startswith("step 6 ")
  # People read the commit time as a date; the record keeps the nanoseconds.
  assert re.fullmatch(r"step 3 committed 20\d\d-\d\d-\d\d \d\d:\d\d:\d\d"
                      r"\.\d\d\d UTC", weights_lib.readable(at_3))
  assert weights_lib.readable(f"weights: {at_3!r} -> {at_6!r}").count(
      " UTC") == 2
  assert weights_lib.readable("params sha256 ab") == "params sha256 ab"
  shutil.copytree(part, tmp_path / "copy")
  assert weights_lib.params_source(str(tmp_path / "copy")) == at_6
  assert weights_lib.params_source(str(tmp_path / "nothing")) == ""
  # One step of the run, named by its folder: that step's EMA weights.
  step_3 = os.path.join(part, "checkpoints", "3")
  assert weights_lib.params_source(step_3) == at_3
  # Pinned before step 6 was saved: still step 3 (no newer step slips in).
  assert weights_lib.params_source(pinned) == at_3
  assert weights_lib.resolve(step_3) == step_3
  assert weights_lib.resolve(str(tmp_path / "nothing")) == str(tmp_path / "nothing")
  # A step Orbax has not finalized (still being written, as on GCS) is not
  # pinned: the newest finalized one is.
  with monkeypatch.context() as m:
    m.setattr(ckpt_files, "saved_steps", lambda d: {3})
    assert weights_lib.resolve(part) == step_3
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), resumed.ema)
  restored = []
  real_restore = pytree_io.restore_item

  def spy(*args, **kwargs):
    out = real_restore(*args, **kwargs)
    restored.append(sorted(out))
    return out
  with monkeypatch.context() as m:
    m.setattr(pytree_io, "restore_item", spy)
    got_6 = weights_lib.restore_params(part, abstract)
  assert restored == [["ema"]]   # the optimizer state and params stay on disk
  got_3 = weights_lib.restore_params(step_3, abstract)
  for a, b in zip(small_run.leaves(resumed.ema), small_run.leaves(got_6)):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b)
             for a, b in zip(small_run.leaves(got_3), small_run.leaves(got_6)))
  with pytest.raises(ckpt_lib.CheckpointNotFoundError,
                     match=r"No checkpoint step 4 .*saved steps: \[3, 6\]"):
    weights_lib.restore_params(os.path.join(part, "checkpoints", "4"), abstract)
  with pytest.raises(ckpt_lib.CheckpointNotFoundError,
                     match=r"inside step 3 of a training run: point the "
                           r"setting at the step's folder, .*checkpoints/3\."):
    weights_lib.restore_params(os.path.join(step_3, "state"), abstract)
  with pytest.raises(ckpt_lib.CheckpointNotFoundError,
                     match=r"inside the training run .*saved: \[3, 6\]"):
    weights_lib.restore_params(os.path.join(part, "checkpoints", "corrupt-9"),
                               abstract)
  # A run whose own name is a number, kept under a "checkpoints" folder (as
  # launch/tpu_copy_ckpt.sh copies runs): still the run, not a step.
  numbered = tmp_path / "copies" / "checkpoints" / "20240601"
  shutil.copytree(part, numbered)
  assert weights_lib.params_source(str(numbered)) == at_6
  for a, b in zip(small_run.leaves(full), small_run.leaves(resumed)):
    np.testing.assert_array_equal(a, b)
  # Something was actually learned (the test would pass trivially otherwise).
  init = trainer_lib.Trainer(small_run.config(6)).init_state()
  assert any(not np.array_equal(a, b)
             for a, b in zip(small_run.leaves(init.params),
                             small_run.leaves(full.params)))
  # Checkpoints hold the data iterator position and the config.
  assert os.path.exists(os.path.join(part, "checkpoints", "6", "data"))
  assert os.path.exists(os.path.join(part, "checkpoints", "6", "config"))


def test_resume_refuses_a_different_model(tmp_path, monkeypatch):
  from genvis_jax.data import run_origin
  wd = str(tmp_path / "wd")
  trainer_lib.train_and_evaluate(small_run.config(3), wd)
  other = small_run.config(6)
  other.model.widths = (8, 32)
  # As if `other` trained on token files: the refused run must not leave
  # its token record in this (another run's) workdir.
  monkeypatch.setattr(run_origin, "written_weights",
                      lambda c, encodes=False: ["other"])
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match="widths"):
    trainer_lib.train_and_evaluate(other, wd)
  assert not os.path.exists(os.path.join(wd, run_origin.ORIGIN_FILE))
  # The model's difference is named before the token files are judged (a
  # dual FAR run resumed as triple was told its tokens were rewritten).
  def tokens_blamed(*args, **kwargs):
    raise AssertionError("the token files were judged first")
  monkeypatch.setattr(run_origin, "check", tokens_blamed)
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match="widths"):
    trainer_lib.train_and_evaluate(other, wd)
  monkeypatch.undo()
  # Same model, no EMA any more: the message names the setting.
  no_ema = small_run.config(6)
  no_ema.train.ema_decay = 0.0
  with pytest.raises(ckpt_lib.CheckpointMismatchError,
                     match=r"train.ema_decay: checkpoint 0.9 vs config 0.0"):
    trainer_lib.train_and_evaluate(no_ema, wd)


def test_small_replicated_arrays_saved_without_slice_compiles(tmp_path, caplog):
  """Replica-parallel saving is kept for big arrays only: a state of small
  replicated arrays on 8 devices is written without compiling per-device
  slices (one compile per shape and device otherwise), and restores."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state = {f"w{i}": jax.device_put(np.full((8, 40 + i), i, np.float32), rep)
           for i in range(4)}
  ck = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
  with compiles.compiled(caplog) as programs:
    ck.save(1, state)
  ck.wait()
  assert "jit(slice)" not in programs, programs
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), state)
  restored = ck.restore(1, abstract)
  for k in state:
    np.testing.assert_array_equal(np.asarray(restored[k]), np.asarray(state[k]))
  ck.close()


def test_a_step_restored_on_another_mesh_says_so(tmp_path, caplog):
  """A step saved on 8 devices restored onto 4 (``mesh.shape.data=-1`` on a
  smaller slice: the saved config holds -1, not the mesh) is resharded and
  logs both meshes; restored on its own mesh it logs nothing of the kind."""
  P = jax.sharding.PartitionSpec
  eight = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  four = jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(2, 2),
                           ("data", "fsdp"))
  state = {"w": jax.device_put(np.arange(32.0, dtype=np.float32).reshape(8, 4),
                               jax.sharding.NamedSharding(eight, P("data")))}
  ck = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
  ck.save(1, state)
  ck.wait()
  for mesh, spec, said in ((four, P("fsdp"), True), (eight, P("data"), False)):
    abstract = {"w": jax.ShapeDtypeStruct(
        (8, 4), np.float32, sharding=jax.sharding.NamedSharding(mesh, spec))}
    caplog.clear()
    with caplog.at_level(logging.INFO):
      restored = ck.restore(1, abstract)
    np.testing.assert_array_equal(np.asarray(restored["w"]),
                                  np.asarray(state["w"]))
    assert restored["w"].sharding.mesh.shape == mesh.shape
    notes = [r.getMessage() for r in caplog.records
             if "saved on mesh" in r.getMessage()]
    assert notes == ([
        "Step 1 was saved on mesh {'data': 8} (8 devices); this run's is "
        "{'data': 2, 'fsdp': 2} (4 devices): the state is resharded onto it, "
        "and the losses continue up to the rounding of sums split another "
        "way."] if said else []), notes
  ck.close()


def test_sigterm_saves_the_step_in_flight_and_the_run_resumes(tmp_path, caplog):
  c = small_run.config(6)
  c.train.checkpoint_every = 100          # only the stop saves before the end
  wd = str(tmp_path / "wd")
  before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)

  logged = []

  def on_log(step, _):
    logged.append(step)
    if step == 2:
      os.kill(os.getpid(), signal.SIGTERM)

  with pytest.raises(preemption.TrainingStopped,
                     match="stopped by SIGTERM after step 3 of 6") as stopped:
    trainer_lib.train_loop(c, wd, on_log=on_log)
  # The stop logs step 3 (log_every=2): the resume's first log covers only
  # steps 4 and 5, so step 3's metrics were lost.
  assert logged == [2, 3]
  assert stopped.value.exit_code == 143    # the command exits as SIGTERM would
  assert ckpt_lib.Checkpointer(wd).latest_step() == 3
  assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
  c.init_from = str(tmp_path / "nowhere")   # would fail if it were read
  with caplog.at_level(logging.WARNING):
    resumed = trainer_lib.train_and_evaluate(c, wd)
  assert any("init_from=" in r.getMessage() and "is not loaded" in
             r.getMessage() and "own step 3" in r.getMessage()
             for r in caplog.records)   # a resume says it is not loaded
  c.init_from = ""
  # A pathlib.Path workdir, as notebooks pass (clu's writer takes str only).
  full = trainer_lib.train_and_evaluate(c, tmp_path / "full")
  assert int(resumed.step) == 6
  for a, b in zip(small_run.leaves(full), small_run.leaves(resumed)):
    np.testing.assert_array_equal(a, b)


def test_a_runs_steps_are_listed_as_orbax_names_them(tmp_path):
  """Loading a run's weights lists its steps as the CheckpointManager does:
  a copy named ``old_6`` or ``006``, a step moved aside or one still being
  written is no step."""
  for name in ("3", "6", "old_6", "006", "corrupt-6",
               "9.orbax-checkpoint-tmp-1700000000"):
    os.makedirs(tmp_path / "checkpoints" / name)
  assert run_weights.candidate_steps(tmp_path) == [6, 3]


def test_a_save_at_a_preemption_point_after_a_resume(tmp_path):
  """Orbax times a save made at a preemption sync point against the step
  before it, which the manager listed when it was built: with steps listed
  without their commit times (lightweight_initialize) that save failed on
  process 0 with a TypeError (naive minus aware datetime)."""
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(3, {"w": np.ones(2, np.float32)})
  ckpt.close()
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
  with mock.patch.object(ocp.CheckpointManager, "reached_preemption",
                         lambda self, step: True):
    ckpt.save(6, {"w": np.ones(2, np.float32)})
    ckpt.wait()
  assert ckpt.manager.all_steps() == [3, 6]
  ckpt.close()


def test_sample_grids_draw_from_their_own_key():
  """No sample grid replays a training step's key; init and training keep
  the keys of runs saved before the grids had their own (resumes continue
  the same streams)."""
  c = small_run.config(1)
  data = lambda k: tuple(np.asarray(jax.random.key_data(k)).tolist())
  for partitionable in (True, False):   # jax's default threefry, and the old
    with jax.threefry_partitionable(partitionable):
      tr = trainer_lib.Trainer(c)
      init, train = jax.random.split(jax.random.key(c.seed))
      assert (data(tr.init_rng), data(tr.train_rng)) == (data(init),
                                                         data(train))
      steps = {data(jax.random.fold_in(tr.train_rng, s)) for s in range(100)}
      grids = {data(jax.random.fold_in(tr.visual_rng, s)) for s in range(100)}
      assert data(tr.visual_rng) not in {data(init), data(train)}
      assert not steps & grids


def test_a_changed_order_setting_draws_the_data_order_afresh():
  """The settings whose saved positions another pipeline would misread;
  a run saved before crops_per_epoch existed took every record."""
  c = small_run.config(9)
  assert resume_lib.order_setting_changed(c.to_dict(), c) == ""
  assert resume_lib.order_setting_changed(None, c) == ""
  old = c.to_dict()
  del old["data"]["crops_per_epoch"]
  assert resume_lib.order_setting_changed(old, c) == ""
  c.data.crops_per_epoch = "one"
  assert resume_lib.order_setting_changed(old, c) == (
      "was saved with config.data.crops_per_epoch='all' and this run has 'one'")
  del old["data"]["num_workers"]       # unknown: no claim
  c.data.crops_per_epoch = "all"
  c.data.num_workers = 2
  assert resume_lib.order_setting_changed(old, c) == ""


def test_a_resume_lists_the_compute_settings_it_changes():
  """How the model computes may change on resume (it loads the same
  weights) and is listed with the rest; other model settings were refused
  before, so they are not."""
  saved = {"model": {"dtype": "float32", "hidden_size": 64},
           "train": {"num_steps": 6}}
  now = {"model": {"dtype": "bfloat16", "hidden_size": 64},
         "train": {"num_steps": 9}}
  assert resume_lib.resumed_differences(saved, now) == [
      "model.dtype: checkpoint 'float32' vs this run 'bfloat16'",
      "train.num_steps: checkpoint 6 vs this run 9"]


def test_a_finished_run_names_the_command_its_weights_are_for():
  """A tokenizer's last line names its evaluation and the generator flag
  that takes it; a generator's, its sampling; the demo classifier's neither
  (pre-tokenizing and sampling name theirs)."""
  from configs import maskgit_vqgan, rar_b
  tok = trainer_lib.next_command(maskgit_vqgan.get_config("runlocal"), "/w/t")
  assert tok == ("; evaluate it with --config.mode=evaluate "
                 "--config.evaluate.checkpoint=/w/t, or give it to a "
                 "generator's config as --config.tokenizer.checkpoint=/w/t")
  gen = rar_b.get_config("runlocal")
  assert trainer_lib.next_command(gen, "/w/g") == (
      "; sample with --config.mode=sample --config.init_from=/w/g "
      "--config.tokenizer.checkpoint=TOKENIZER")
  gen.tokenizer.checkpoint = "/w/t"
  assert trainer_lib.next_command(gen, "/w/g").endswith(
      "--config.tokenizer.checkpoint=/w/t")
  assert trainer_lib.next_command(small_run.config(6), "/w/c") == ""
