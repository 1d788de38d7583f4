"""Reliability of the real training loop: damaged checkpoints fall back to the
previous step (then match an uninterrupted run bit for bit), an input position
saved by another process count or pipeline is drawn afresh (the state still
resumes), failed saves stop the run with one message, and NaN / runaway
training stops before a diverged state is saved."""

import json
import logging
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

from genvis_jax import models
from genvis_jax.errors import UserError
from genvis_jax.core import checkpoint as ckpt_lib
from genvis_jax.core import checkpoint_files as ckpt_files
from genvis_jax.core import weights as weights_lib
from genvis_jax.train import guard as guard_lib
from genvis_jax.train import trainer as trainer_lib
from tests.test_checkpoint_resume import _config  # the smallest resumable run


def _leaves(state):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(state)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """An uninterrupted 9-step run, and a 6-step workdir with checkpoints 3, 6."""
  root = tmp_path_factory.mktemp("reliability")
  full = trainer_lib.train_and_evaluate(_config(9), str(root / "full"))
  base = str(root / "base")
  trainer_lib.train_and_evaluate(_config(6), base)
  assert sorted(os.listdir(os.path.join(base, "checkpoints"))) == ["3", "6"]
  return _leaves(full), base


def _copy(base, tmp_path):
  wd = str(tmp_path / "wd")
  shutil.copytree(base, wd)
  return wd


def _truncate_data_files(step_dir):
  """Cuts every OCDBT data file to half its size. (Cutting only the largest
  one was not always damage: the file layout varies from run to run, and a
  run whose largest file was not read on restore resumed from it.)"""
  d = os.path.join(step_dir, "state", "ocdbt.process_0", "d")
  for f in (os.path.join(d, n) for n in os.listdir(d)):
    with open(f, "r+b") as fh:
      fh.truncate(os.path.getsize(f) // 2)


DAMAGES = {
    "truncated_ocdbt_file": _truncate_data_files,
    "no_state_metadata": lambda s: os.remove(os.path.join(s, "state", "_METADATA")),
    "empty_iterator_json": lambda s: open(
        os.path.join(s, "data", "process_0-of-1.json"), "w").close(),
    "no_iterator_json": lambda s: os.remove(
        os.path.join(s, "data", "process_0-of-1.json")),
    "no_state_dir": lambda s: shutil.rmtree(os.path.join(s, "state")),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_latest_checkpoint_falls_back(runs, tmp_path, caplog, damage):
  full, base = runs
  wd = _copy(base, tmp_path)
  DAMAGES[damage](os.path.join(wd, "checkpoints", "6"))
  with caplog.at_level(logging.WARNING):
    resumed = trainer_lib.train_and_evaluate(_config(9), wd)
  warnings = [r.getMessage() for r in caplog.records
              if "cannot be restored" in r.getMessage()]
  assert len(warnings) == 1 and "step 6" in warnings[0], warnings
  # Moved aside, not deleted; training redid steps 4..9 from step 3.
  assert os.path.isdir(os.path.join(wd, "checkpoints", "corrupt-6"))
  assert ckpt_lib.Checkpointer(wd).latest_step() == 9
  for a, b in zip(full, _leaves(resumed)):
    np.testing.assert_array_equal(a, b)


def _as_if_two_processes_wrote(step_dir):
  """Step 6's input position as a 2-process job saves it (one file each)."""
  data = os.path.join(step_dir, "data")
  os.rename(os.path.join(data, "process_0-of-1.json"),
            os.path.join(data, "process_0-of-2.json"))
  shutil.copy(os.path.join(data, "process_0-of-2.json"),
              os.path.join(data, "process_1-of-2.json"))


def _as_if_another_pipeline_wrote(step_dir):
  """Valid JSON of a state this pipeline's ``set_state`` refuses."""
  with open(os.path.join(step_dir, "data", "process_0-of-1.json"), "w") as f:
    f.write('{"workers_state": {}, "iterations_to_skip": {}}')


def _with_another_worker_count(config):
  # Grain takes some such states and then yields other batches: the saved
  # config decides.
  config.data.num_workers = config.data.num_workers + 1
  return config


SAVED_ELSEWHERE = {   # case: (damage to step 6, resume config, warning)
    "other_process_count": (_as_if_two_processes_wrote, lambda c: c,
                            "was written by 2 process(es) and this job has 1"),
    "other_pipeline": (_as_if_another_pipeline_wrote, lambda c: c,
                       "does not fit this input pipeline (KeyError"),
    "other_num_workers": (lambda s: None, _with_another_worker_count,
                          "was saved with config.data.num_workers=0 and this "
                          "run has 1"),
}


@pytest.mark.parametrize("case", sorted(SAVED_ELSEWHERE))
def test_resume_with_unfitting_input_position_keeps_state(runs, tmp_path,
                                                          caplog, case):
  """A job resumed on a slice with another number of hosts, or with another
  input pipeline, restores the train state and draws a fresh data order
  (the saved positions do not map onto the new shards or pipeline). Before,
  it found every step "damaged" and could not resume at all."""
  full, base = runs
  wd = _copy(base, tmp_path)
  change, configure, said = SAVED_ELSEWHERE[case]
  change(os.path.join(wd, "checkpoints", "6"))
  seen = []
  with caplog.at_level(logging.WARNING):
    resumed = trainer_lib.train_loop(configure(_config(9)), wd,
                                     on_log=lambda s, _: seen.append(s))
  warnings = [r.getMessage() for r in caplog.records
              if "input position" in r.getMessage()]
  assert len(warnings) == 1, warnings
  assert f"saved with step 6 {said}" in warnings[0], warnings[0]
  assert seen == [8, 9], seen                       # resumed at step 6
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["3", "6", "9"]
  # Another data order after step 6 than the uninterrupted run's, drawn with
  # the seed from (config.seed, 6), which later checkpoints keep.
  assert any(not np.array_equal(a, b) for a, b in zip(full, _leaves(resumed)))
  with open(os.path.join(wd, "checkpoints", "9", "data",
                         "process_0-of-1.json")) as f:
    assert json.load(f)["data_seed"] == trainer_lib.resume_seed(0, 6)
  assert trainer_lib.resume_seed(0, 6) != trainer_lib.resume_seed(0, 3)


def test_order_drawn_afresh_survives_later_resumes(runs, tmp_path):
  """After a resume on another process count, resuming again (on the same
  count) continues the redrawn order: the same as not stopping at all."""
  straight = _copy(runs[1], tmp_path)
  _as_if_two_processes_wrote(os.path.join(straight, "checkpoints", "6"))
  split = shutil.copytree(straight, str(tmp_path / "split"))
  want = trainer_lib.train_and_evaluate(_config(12), straight)
  trainer_lib.train_and_evaluate(_config(9), split)
  got = trainer_lib.train_and_evaluate(_config(12), split)
  for a, b in zip(_leaves(want), _leaves(got)):
    np.testing.assert_array_equal(a, b)


def _saved_with_data_seed(step_dir, seed):
  """Step 6's position as a run whose order was drawn with ``seed`` saves it
  (a run resumed once without its position keeps that seed)."""
  path = os.path.join(step_dir, "data", "process_0-of-1.json")
  with open(path) as f:
    saved = json.load(f)
  with open(path, "w") as f:
    json.dump({"data_seed": seed, "iterator": saved["iterator"]}, f)


# Process 1's answers to the agreement collectives (process 0 is this one,
# its saved seed 7; None: the same as this one's): (read failed -1 /
# position unfit 1, its saved seed's upper and lower 16 bits, building the
# iterator failed -1 / set_state unfit 1).
OTHER_PROCESS = {
    "cannot_read": (-1,),
    "unfit_position": (1,),
    "other_data_seed": (0, 1, None, 1),      # 7 + 2**16: only the upper half
    "cannot_build": (0, None, None, -1),
    "set_state_failed": (0, None, None, 1),
}


@pytest.mark.parametrize("case", sorted(OTHER_PROCESS))
def test_processes_agree_on_the_input_position(runs, tmp_path, monkeypatch,
                                               caplog, case):
  """Every process reaches each collective of a resume, whatever it alone
  read: one that cannot read its position (storage) stops them all, with
  the data order unchanged, before any builds an iterator (building one
  holds a collective on token data: a process that skipped it hung the
  others); one whose position does not fit, or whose files hold another
  data seed, makes every process draw the order afresh."""
  from genvis_jax.core import multihost  # pylint: disable=import-outside-toplevel
  wd = _copy(runs[1], tmp_path)
  _saved_with_data_seed(os.path.join(wd, "checkpoints", "6"), 7)
  # The first two agree that step 6 reads and restores on both.
  answers, events = [None, None, *OTHER_PROCESS[case]], []

  def gather_ints(v):
    events.append("gather")
    other = answers.pop(0) if answers else None
    return np.array([v, v if other is None else other])

  build = trainer_lib.create_train_iterator
  monkeypatch.setattr(multihost, "gather_ints", gather_ints)
  monkeypatch.setattr(trainer_lib, "create_train_iterator", lambda *a, **k: (
      events.append("iterator"), build(*a, **k))[1])
  if case in ("cannot_read", "cannot_build"):
    said = {"cannot_read": "could not read their input position saved with "
                           "step 6",
            "cannot_build": "could not open their input pipeline in the data "
                            "order saved with step 6"}[case]
    with pytest.raises(multihost.OtherProcessError,
                       match=r"Processes \[1\] " + said):
      trainer_lib.train_and_evaluate(_config(9), wd)
    # No iterator for seed 7 before the agreements that precede it.
    assert events == ["iterator", "gather", "gather", "gather"] + (
        ["gather", "gather", "iterator", "gather"]
        if case == "cannot_build" else [])
    assert ckpt_lib.Checkpointer(wd).latest_step() == 6
    return
  with caplog.at_level(logging.WARNING):
    trainer_lib.train_and_evaluate(_config(9), wd)
  said = {"unfit_position": "cannot be used on processes [1]",
          "other_data_seed": "holds another data seed than on other processes",
          "set_state_failed": "cannot be used on processes [1]"}[case]
  assert f"saved with step 6 {said}, so it cannot be restored" in caplog.text
  assert not answers                          # every collective was reached


def test_a_storage_error_reading_the_position_is_told_to_every_process(
    runs, tmp_path, monkeypatch):
  """Any error reading this process's position (a bucket's 503 may come as
  the file system backend's own error type, not OSError) is told to the
  other processes (-1 in the agreement) before it is raised here."""
  from genvis_jax.core import multihost  # pylint: disable=import-outside-toplevel
  wd = _copy(runs[1], tmp_path)
  told = []

  def unavailable(self, step):
    raise RuntimeError(f"503 reading step {step}'s position")

  monkeypatch.setattr(ckpt_lib.Checkpointer, "saved_position", unavailable)
  monkeypatch.setattr(multihost, "gather_ints",
                      lambda v: (told.append(v), np.array([v, 0]))[1])
  with pytest.raises(RuntimeError, match="503 reading step 6"):
    trainer_lib.train_and_evaluate(_config(9), wd)
  assert told == [0, 0, -1]   # step 6 read and restored; its position not
  assert ckpt_lib.Checkpointer(wd).latest_step() == 6


@pytest.mark.parametrize("other", ["unreadable", "other_config"])
def test_processes_restore_the_same_step(runs, tmp_path, monkeypatch, caplog,
                                         other):
  """A step that process 1 alone cannot read is skipped by every process
  (a process falling back alone restored another step than the others); one
  that process 1 finds saved with another config stops every process."""
  from genvis_jax.core import multihost  # pylint: disable=import-outside-toplevel
  full, base = runs
  wd = _copy(base, tmp_path)
  answers = [1 if other == "unreadable" else 2]   # process 1, at step 6

  def gather_ints(v):
    return np.array([v, answers.pop(0) if answers else v])

  monkeypatch.setattr(multihost, "gather_ints", gather_ints)
  if other == "other_config":
    with pytest.raises(multihost.OtherProcessError,
                       match=r"Processes \[1\] found that step 6 was saved "
                             r"with another config"):
      trainer_lib.train_and_evaluate(_config(9), wd)
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["3", "6"]
    return
  with caplog.at_level(logging.WARNING):
    resumed = trainer_lib.train_and_evaluate(_config(9), wd)
  assert ("Checkpoint step 6 in {} cannot be restored (it cannot be read on "
          "processes [1]".format(os.path.join(wd, "checkpoints"))) in caplog.text
  assert os.path.isdir(os.path.join(wd, "checkpoints", "corrupt-6"))
  for a, b in zip(full, _leaves(resumed)):      # steps 4..9 redone from 3
    np.testing.assert_array_equal(a, b)


def test_partial_iterator_states_are_damage(runs, tmp_path):
  wd = _copy(runs[1], tmp_path)
  step_dir = os.path.join(wd, "checkpoints", "6")
  _as_if_two_processes_wrote(step_dir)
  assert ckpt_files.saved_process_count(epath.Path(step_dir)) == 2
  os.remove(os.path.join(step_dir, "data", "process_1-of-2.json"))
  with pytest.raises(ValueError, match="process_1-of-2.json is missing"):
    ckpt_files.validate_step(epath.Path(step_dir))
  shutil.copy(os.path.join(wd, "checkpoints", "3", "data", "process_0-of-1.json"),
              os.path.join(step_dir, "data"))
  with pytest.raises(ValueError, match="mixed"):
    ckpt_files.validate_step(epath.Path(step_dir))


def test_truncation_is_caught_before_orbax_reads(runs, tmp_path):
  wd = _copy(runs[1], tmp_path)
  step_dir = epath.Path(wd) / "checkpoints" / "6"
  ckpt_files.validate_step(step_dir)  # intact: passes
  _truncate_data_files(str(step_dir))
  with pytest.raises(ValueError, match="is unreadable.*OUT_OF_RANGE"):
    ckpt_files.validate_step(step_dir)
  # Data files gone (an interrupted copy): TensorStore reads empty values.
  step_3 = epath.Path(wd) / "checkpoints" / "3"
  ckpt_files.validate_step(step_3)
  shutil.rmtree(step_3 / "state" / "ocdbt.process_0")
  with pytest.raises(ValueError, match="is empty .*data file under state/ is missing"):
    ckpt_files.validate_step(step_3)


def test_no_loadable_checkpoint_lists_what_was_tried(runs, tmp_path):
  wd = _copy(runs[1], tmp_path)
  for step in ("3", "6"):
    os.remove(os.path.join(wd, "checkpoints", step, "state", "_METADATA"))
  with pytest.raises(ckpt_lib.CheckpointRestoreError) as e:
    trainer_lib.train_and_evaluate(_config(9), wd)
  assert isinstance(e.value, UserError)
  msg = str(e.value)
  assert "step 6: ValueError: state/_METADATA is missing" in msg
  assert "step 3: ValueError: state/_METADATA is missing" in msg
  # Nothing is moved when nothing loads (it may be a config or code problem).
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["3", "6"]


class _NoSpaceFuture:
  """A background write that fails the way TensorStore reports a full disk."""

  def result(self, timeout=None):
    del timeout
    raise ValueError(
        'RESOURCE_EXHAUSTED: Error writing local file "x/_sharding": Failed '
        "to write 14723 bytes to file 5: No space left on device "
        "[os_error_code='28']")


@pytest.mark.parametrize("where", ["background", "foreground"])
def test_failed_save_stops_training_with_one_message(tmp_path, monkeypatch,
                                                      where):
  orig = ocp.PyTreeCheckpointHandler.async_save
  calls = []

  async def failing_second_save(self, *args, **kwargs):
    calls.append(1)
    futures = await orig(self, *args, **kwargs)
    if len(calls) < 2:
      return futures
    if where == "foreground":
      raise OSError(28, "No space left on device")
    return list(futures or []) + [_NoSpaceFuture()]

  monkeypatch.setattr(ocp.PyTreeCheckpointHandler, "async_save",
                      failing_second_save)
  seen = []
  wd = str(tmp_path / "wd")
  with pytest.raises(ckpt_lib.CheckpointSaveError) as e:
    trainer_lib.train_loop(_config(9), wd,
                           on_log=lambda s, _: seen.append(s))
  msg = str(e.value)
  assert isinstance(e.value, UserError)
  assert "step 6" in msg and "no space left on device" in msg, msg
  assert str(tmp_path / "wd" / "checkpoints") in msg
  assert "newest complete checkpoint is step 3" in msg
  # Stopped at the failing save itself (foreground) or the step after it.
  stop = 6 if where == "foreground" else 7
  assert max(seen) == 6 and f"stopped at step {stop};" in msg, (seen, msg)
  names = os.listdir(os.path.join(wd, "checkpoints"))
  assert not [n for n in names if "tmp" in n], names
  assert ckpt_lib.Checkpointer(wd).latest_step() == 3


class _NaNAtStep:
  """Wraps the training iterator: step ``bad`` (0-based) gets NaN images."""

  def __init__(self, it, bad):
    self._it, self._bad, self._i = it, bad, 0

  def __next__(self):
    batch = next(self._it)
    if self._i == self._bad:
      batch = dict(batch, image=np.full_like(batch["image"], np.nan))
    self._i += 1
    return batch

  def __iter__(self):
    return self

  def get_state(self):
    return self._it.get_state()

  def set_state(self, state):
    self._it.set_state(state)


@pytest.fixture
def nan_at_step_4(monkeypatch):
  orig = trainer_lib.create_train_iterator

  def create(config, task, **kw):
    it, info = orig(config, task, **kw)
    return _NaNAtStep(it, 3), info

  monkeypatch.setattr(trainer_lib, "create_train_iterator", create)


@pytest.mark.parametrize("check_finite", [True, False])
def test_nan_loss_honours_check_finite(tmp_path, nan_at_step_4, check_finite):
  c = _config(6)
  c.train.check_finite = check_finite
  wd = str(tmp_path / "wd")
  logs = {}
  if check_finite:
    with pytest.raises(trainer_lib.NonFiniteLossError) as e:
      trainer_lib.train_loop(c, wd, on_log=logs.__setitem__)
    msg = str(e.value)
    assert "between steps 3 and 4" in msg and "NaN/Inf in 1 of" in msg, msg
    assert "newest checkpoint, step 3" in msg
    assert "grad_clip" not in msg   # already on in this config
    assert "check_finite=False" in msg
    assert ckpt_lib.Checkpointer(wd).latest_step() == 3
  else:
    state = trainer_lib.train_loop(c, wd, on_log=logs.__setitem__)
    assert int(state.step) == 6
    assert logs[4]["nonfinite_steps"] == 1.0 and logs[6]["nonfinite_steps"] == 0.0
    assert all(np.isfinite(x).all() for x in _leaves(state.params))


def test_an_error_waits_for_the_save_in_flight(tmp_path, monkeypatch):
  """The save of step 3 is still writing when reading batch 4 fails; the
  error propagates only once the save is finished (a multi-host process
  exits at once after an error, which would cut it off)."""
  orig_create = trainer_lib.create_train_iterator
  waited = []

  class FailAt3(_NaNAtStep):
    def __next__(self):
      if self._i == self._bad:
        raise OSError("the data disk went away")
      return super().__next__()

  def create(config, task, **kw):
    it, info = orig_create(config, task, **kw)
    return FailAt3(it, 3), info

  orig_wait = ckpt_lib.Checkpointer.wait
  monkeypatch.setattr(trainer_lib, "create_train_iterator", create)
  monkeypatch.setattr(ckpt_lib.Checkpointer, "wait",
                      lambda self: waited.append(1) or orig_wait(self))
  wd = str(tmp_path / "wd")
  with pytest.raises(OSError, match="data disk went away"):
    trainer_lib.train_loop(_config(6), wd)
  assert waited
  assert ckpt_lib.Checkpointer(wd).latest_step() == 3


def test_finite_runaway_stops_before_a_diverged_checkpoint(runs, tmp_path):
  """lr=1e8 with clipping on: the loss stays finite (the issue ran to the end
  with loss 1e17); the guard stops at the first check after step 3."""
  wd = _copy(runs[1], tmp_path)
  shutil.rmtree(os.path.join(wd, "checkpoints", "6"))
  c = _config(9, lr=1e8)
  with pytest.raises(trainer_lib.DivergenceError) as e:
    trainer_lib.train_and_evaluate(c, wd)
  msg = str(e.value)
  assert isinstance(e.value, UserError)
  assert "between steps 3 and 4" in msg and "parameter norm" in msg, msg
  assert "newest checkpoint, step 3" in msg
  assert "optimizer.lr (now 1e+08)" in msg
  assert "grad_clip" not in msg and "divergence_factor" in msg
  assert ckpt_lib.Checkpointer(wd).latest_step() == 3


def test_guard_loss_bound_uses_running_median():
  g = guard_lib.DivergenceGuard(10.0)
  g.record(None, {"model": 5.0})
  for loss in (2.0, 1.9, 2.1, 1.8, 2.0):
    assert g.runaway(loss, {"model": 5.0}) is None
    g.record(loss, {"model": 5.0})
  assert g.runaway(19.0, {"model": 5.0}) is None        # 9.5x the median 2.0
  assert "loss 21 is 10.5x" in g.runaway(21.0, {"model": 5.0})
  assert "parameter norm of group 'model'" in g.runaway(2.0, {"model": 51.0})
  assert g.nonfinite_params({"model": float("inf")})
  assert guard_lib.DivergenceGuard(0.0).runaway(1e30, {"model": 1e30}) is None
  # Fewer than MIN_HISTORY intervals: the loss bound does not apply yet.
  fresh = guard_lib.DivergenceGuard(10.0)
  fresh.record(1.0, {})
  assert fresh.runaway(1e6, {}) is None


def _ema_of_step(wd, step):
  """The EMA parameters Orbax holds for ``step`` (restored directly)."""
  ckpt = ckpt_lib.Checkpointer(wd, async_save=False)
  meta = ckpt.manager.item_metadata(step)["state"]
  as_numpy = jax.tree_util.tree_map(
      lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
  restored = ckpt.manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(restore_args=as_numpy)))
  return restored["state"]["ema"]


def test_inference_loading_skips_a_damaged_latest_step(runs, tmp_path, caplog):
  """Sampling / pretokenize / evaluate read a training workdir like a resume:
  the newest step that loads (here 3, step 6 truncated), files left in place."""
  wd = _copy(runs[1], tmp_path)
  want = _ema_of_step(wd, 3)
  _truncate_data_files(os.path.join(wd, "checkpoints", "6"))
  model = _config(1).model
  with caplog.at_level(logging.WARNING):
    got = models.load_params(model, wd, setting="--config.init_from")
  assert any("step 6" in r.getMessage() and "cannot be read" in r.getMessage()
             for r in caplog.records)
  for a, b in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got)):
    np.testing.assert_array_equal(a, np.asarray(b))
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["3", "6"]


def test_inference_loading_errors_name_the_setting(runs, tmp_path):
  model = _config(1).model
  with pytest.raises(ckpt_lib.CheckpointNotFoundError,
                     match="--config.tokenizer.checkpoint=DIR"):
    models.load_params(model, "", setting="--config.tokenizer.checkpoint")
  with pytest.raises(ckpt_lib.CheckpointNotFoundError,
                     match=r"nowhere \(--config.init_from\)"):
    models.load_params(model, str(tmp_path / "nowhere"),
                               setting="--config.init_from")
  other = ml_collections_copy(model, name="rar")
  with pytest.raises(ckpt_lib.CheckpointMismatchError,
                     match="training run of model 'classifier'; a checkpoint of model 'rar'"):
    weights_lib.restore_params(runs[1], None, setting="--config.init_from",
                         model_name=other.name)
  for damage in ("3", "6"):
    _truncate_data_files(os.path.join(_copy_once(runs[1], tmp_path),
                                             "checkpoints", damage))
  with pytest.raises(ckpt_lib.CheckpointRestoreError, match="step 6.*\n.*step 3"):
    models.load_params(model, _copy_once(runs[1], tmp_path))


def _copy_once(base, tmp_path):
  wd = tmp_path / "wd"
  return str(wd) if wd.exists() else _copy(base, tmp_path)


def ml_collections_copy(cfg, **changes):
  c = cfg.copy_and_resolve_references()
  c.update(changes)
  return c
