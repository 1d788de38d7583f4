"""How a training run stops: an exploding, NaN or runaway loss stops before a
diverged state is saved (the newest good checkpoint is named), an error
mid-run waits for the save in flight, and a stop's skipped grid is drawn."""

import logging
import math
import os
import re
import signal

import numpy as np
import pytest

from genvis_jax.core import checkpoint as ckpt_lib
from genvis_jax.errors import UserError
from genvis_jax.train import guard as guard_lib
from genvis_jax.train import loop
from genvis_jax.core import preemption
from genvis_jax.train import grids
from genvis_jax.train import trainer as trainer_lib
from genvis_jax.train.tasks.classifier import ClassifierTask
from tests import small_run
from tests.small_run import config, copy_run, leaves


@pytest.fixture(scope="module")
def step_3_run(tmp_path_factory):
  """A workdir whose newest checkpoint is step 3 (copy before changing)."""
  wd = tmp_path_factory.mktemp("stops") / "wd"
  small_run.train(3, wd)
  return str(wd)


@pytest.mark.parametrize("check_finite", [True, False])
def test_exploding_run_stops_with_clear_error_and_keeps_checkpoint(
    step_3_run, tmp_path, check_finite):
  """With check_finite off the parameters still overflow (norm inf) while
  the NaN updates after them are skipped: the run used to save that state
  at step 6 and exit 0; the divergence check stops it."""
  wd = copy_run(step_3_run, tmp_path)
  c = config(6, lr=1e30)   # explodes on the first resumed steps
  c.train.grad_clip = 0.0   # the optimizer state layout does not depend on it
  c.train.check_finite = check_finite
  with pytest.raises(trainer_lib.TrainingDivergedError) as e:
    trainer_lib.train_and_evaluate(c, wd)
  msg = str(e.value)
  assert "between steps 3 and 4" in msg and "newest checkpoint, step 3" in msg
  assert "config.train.grad_clip=1.0" in msg   # off here, so suggested
  # Never a knob already turned: check_finite=False is suggested only when on.
  assert ("set config.train.check_finite=False" in msg) == check_finite, msg
  # At once after a resume: the restored files are named as a likely cause
  # (a step damaged after it was written diverges just so).
  assert re.search(r"first updates after resuming from step 3: if its files "
                   r"were damaged .*move .*checkpoints/3 out of checkpoints/",
                   msg), msg
  assert ckpt_lib.Checkpointer(wd).latest_step() == 3


@pytest.mark.parametrize("check_finite", [True, False])
def test_exploding_fresh_run_writes_no_checkpoint(tmp_path, check_finite):
  """lr=1e30 from step 0: the parameters reach ~1e30 after one update; the
  run used to save them at step 3 and later call that checkpoint intact."""
  wd = str(tmp_path / "wd")
  c = config(6, lr=1e30)
  c.train.check_finite = check_finite
  with pytest.raises(trainer_lib.TrainingDivergedError) as e:
    trainer_lib.train_and_evaluate(c, wd)
  assert "between steps 0 and 2" in str(e.value)
  assert "no checkpoint was written" in str(e.value)
  assert ckpt_lib.Checkpointer(wd).latest_step() is None


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
  c = config(6)
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
    assert "after resuming" not in msg   # a fresh run
    assert ckpt_lib.Checkpointer(wd).latest_step() == 3
  else:
    c.optimizer.warmup_steps = 4
    c.train.peak_tflops = 1e-3
    state = trainer_lib.train_loop(c, wd, on_log=logs.__setitem__)
    assert int(state.step) == 6
    assert logs[4]["nonfinite_steps"] == 1.0 and logs[6]["nonfinite_steps"] == 0.0
    # The skipped update's NaN is left out of its interval's means (it made
    # the interval's loss and gradient norm NaN), and no per-group flag is
    # logged.
    assert np.isfinite(logs[4]["loss"]) and np.isfinite(
        logs[4]["grad_norm/model"]), logs[4]
    assert not any(k.startswith("nonfinite/") for k in logs[4]), logs[4]
    assert all(np.isfinite(x).all() for x in leaves(state.params))
    # The learning rate of each log step's last update, and examples/s (a
    # warm-up or decay could not be seen).
    from genvis_jax.train import optimizers as opt_lib  # pylint: disable=import-outside-toplevel
    schedule = opt_lib.make_schedule(c.optimizer, 6)
    for step, scalars in logs.items():
      assert scalars["lr/model"] == pytest.approx(float(schedule(step - 1)))
      assert scalars["examples_per_sec"] == pytest.approx(
          scalars["steps_per_sec"] * c.train.global_batch_size)
      # TFLOP/s per device: the step's FLOPs (the same each interval) times
      # steps/s; its share of the configured peak.
      assert scalars["flops_utilization"] == pytest.approx(
          scalars["tflops_per_device"] / 1e-3)
    flops = {s["tflops_per_device"] / s["steps_per_sec"] for s in logs.values()}
    assert len(flops) == 1 or max(flops) / min(flops) < 1 + 1e-9, flops
    assert 0 < flops.pop() < 1e-3
    assert len({s["lr/model"] for s in logs.values()}) > 1   # it moves


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
    trainer_lib.train_loop(config(6), wd)
  assert waited
  assert ckpt_lib.Checkpointer(wd).latest_step() == 3


def test_finite_runaway_stops_before_a_diverged_checkpoint(step_3_run,
                                                           tmp_path):
  """lr=1e8 with clipping on: the loss stays finite (the issue ran to the end
  with loss 1e17); the guard stops at the first check after step 3."""
  wd = copy_run(step_3_run, tmp_path)
  c = config(9, lr=1e8)
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
  assert g.runaway(2.0, {"model": 49.0}) is None    # 9.8x the median 5: within
  assert g.nonfinite_params({"model": float("inf")})
  assert guard_lib.DivergenceGuard(0.0).runaway(1e30, {"model": 1e30}) is None
  # A NaN/Inf parameter norm is far past any bound: a divergence with
  # check_finite off too (which only skips NaN/Inf updates); both off: none.
  lax = guard_lib.DivergenceGuard(10.0, check_finite=False)
  lax.record(None, {"model": 5.0})
  assert "group(s) model is NaN/Inf" in lax.nonfinite_params({"model": float("inf")})
  assert "divergence_factor=10" in lax.nonfinite_params({"model": float("nan")})
  assert lax.nonfinite_params({"model": 5.0}) is None
  off = guard_lib.DivergenceGuard(0.0, check_finite=False)
  assert off.nonfinite_params({"model": float("inf")}) is None
  # Fewer than MIN_HISTORY intervals: the loss bound does not apply yet.
  fresh = guard_lib.DivergenceGuard(10.0)
  fresh.record(1.0, {})
  assert fresh.runaway(1e6, {}) is None


def test_an_interval_of_skipped_updates_still_names_its_group():
  """Every update of an interval skipped (the disc's gradients NaN): the
  means keep the skipped fractions (1.0, not 0 / 0), the other metrics are
  NaN, the disc is blamed, and that NaN loss is not taken into the loss
  history (a NaN median would turn the loss bound off for good)."""
  from genvis_jax.train import step as step_lib  # pylint: disable=import-outside-toplevel
  sums = {"loss": 0.0, "nonfinite": 3.0, "nonfinite/model": 0.0,
          "nonfinite/disc": 3.0, "grad_norm/model": 0.0}
  means = step_lib.interval_means(sums, 3)
  assert means["nonfinite"] == means["nonfinite/disc"] == 1.0
  assert means["nonfinite/model"] == 0.0
  assert math.isnan(means["loss"]) and math.isnan(means["grad_norm/model"])
  g = guard_lib.DivergenceGuard(10.0)
  norms = {"model": 5.0, "disc": 2.0}
  for _ in range(guard_lib.MIN_HISTORY):
    g.record(1.0, norms)
  assert guard_lib.blamed_groups(g, means, norms) == (["disc"],
                                                      "NaN/Inf gradients")
  g.record(means["loss"], norms)
  assert "loss 11 is 11x" in g.runaway(11.0, norms)
  # Half the interval skipped: the rest's means, over its finite steps.
  half = step_lib.interval_means({"loss": 4.0, "nonfinite": 1.0}, 2)
  assert half == {"loss": 4.0, "nonfinite": 0.5}


def test_each_log_step_feeds_the_guard(monkeypatch):
  """The guard's medians are of the logged intervals (log_step.Logger records
  each interval's mean loss and the norms): without them the loss bound
  never applies and the norm bound stays at the start's."""
  from genvis_jax.core import multihost   # pylint: disable=import-outside-toplevel
  from genvis_jax.train import log_step   # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(multihost, "gather_ints", lambda v: np.array([v]))

  class Stub:   # writer, progress, pipeline info and task at once
    num_skipped = 0
    write_scalars = staticmethod(lambda step, scalars: None)
    learning_rates = staticmethod(lambda step: {"model": 0.1})
    __call__ = lambda self, done: {}
    exclude = staticmethod(lambda seconds: None)

  stub, guard = Stub(), guard_lib.DivergenceGuard(10.0)
  guard.record(None, {"model": 5.0})      # the start, as the loop does
  log = log_step.Logger(stub, guard, stub, stub, 100, None, stub, 8)
  for i in range(guard_lib.MIN_HISTORY):
    log(2 * (i + 1), {"loss": 2.0, "nonfinite": 0.0}, {"model": 5.0 + i}, 2)
  assert "loss 30 is 15x" in guard.runaway(30.0, {"model": 6.0})
  # The norms' median is of the start and the logged ones: 5, 5, 6, 7, 8, 9.
  assert "running median 6.5" in guard.runaway(2.0, {"model": 70.0})


def test_grids_are_due_every_n_steps_and_at_the_last_and_show_the_ema():
  """Schedule: every ``every`` steps and at the last (0: never);
  write_visuals draws with the EMA of the task's ema_group where kept."""
  import contextlib   # pylint: disable=import-outside-toplevel
  import types   # pylint: disable=import-outside-toplevel
  import jax   # pylint: disable=import-outside-toplevel
  assert [d for d in range(1, 11) if grids.Schedule(None, None, None, 4, 10).due(d)] == [4, 8, 10]
  assert not any(grids.Schedule(None, None, None, 0, 10).due(d) for d in range(1, 11))
  seen = {}

  class Task:
    ema_group = "model"
    def visualize(self, params, frozen, batch, rng):
      seen.update(params)
      return {}

  trainer = types.SimpleNamespace(task=Task(), frozen={}, visual_rng=jax.random.key(0),
                                  context=contextlib.nullcontext)
  state = types.SimpleNamespace(params={"model": np.zeros(2), "disc": 1}, ema=np.ones(2))
  grids.write_visuals(trainer, state, {}, None, None, 5)
  assert seen["model"].sum() == 2.0 and seen["disc"] == 1


def test_a_blown_up_group_is_named_with_its_own_learning_rate(tmp_path):
  """A discriminator learning rate that blows the run up: the advice was to
  lower config.optimizer.lr (the tokenizer's, which was fine). The message
  names the group and that group's own setting."""
  from configs import demo  # pylint: disable=import-outside-toplevel
  c = demo.tokenizer_config()
  c.model.update(hidden_channels=32, channel_mult=(1, 2), z_channels=32,
                 code_dim=32, num_codes=64)
  c.disc.n_layers = 1
  c.loss.disc_start = 0
  # The mesh of test_tokenizer_task's runs: their initialiser, compiled once.
  c.mesh.shape.update(dict(data=-1, fsdp=2, tensor=1))
  c.train.update(global_batch_size=8, num_steps=6, log_every=3,
                 checkpoint_every=3, image_every=0)
  c.disc.optimizer.lr = 1e30
  c.optimizer.warmup_steps = 0      # neither group has a warm-up
  with pytest.raises(guard_lib.NonFiniteLossError) as e:
    trainer_lib.train_and_evaluate(c, str(tmp_path / "wd"))
  msg = str(e.value)
  assert "in parameter group(s) disc." in msg, msg
  assert "To fix: lower config.disc.optimizer.lr (now 1e+30);" in msg, msg
  assert "add a warm-up (config.disc.optimizer.warmup_steps)" in msg, msg
  assert "config.optimizer." not in msg, msg   # nor the model's warm-up


def _inputs_grid(self, params, frozen, batch, rng):
  """The grids' batch itself as a grid (the classifier draws none)."""
  del params, frozen, rng
  return {"inputs": self.grid_uint8(batch["image"])}


@pytest.mark.parametrize("stop_at", [3, 6])
def test_a_stops_grid_is_drawn_later_from_the_runs_first_batch(
    tmp_path, monkeypatch, stop_at):
  """A stop skips its step's grid, so the save comes first in a grace
  period. That grid was never drawn: the resume draws it (a stop on the
  last step, after the save). The resume's grids show the batch the run
  began with: they showed its own first batch, so a tokenizer's
  reconstructions changed images at every resume."""
  monkeypatch.setattr(ClassifierTask, "visualize", _inputs_grid)
  monkeypatch.setattr(ClassifierTask, "grids_show_batch", True)
  c = small_run.config(6)
  c.train.image_every, c.train.log_every = 3, 1
  c.train.checkpoint_every = 100     # only the stop and the end save
  wd = tmp_path / "wd"

  def on_log(step, _):
    if step == stop_at - 1:
      os.kill(os.getpid(), signal.SIGTERM)

  png = lambda step: wd / "images" / f"inputs_{step:07d}.png"
  kept = wd / "images" / grids.KEPT_BATCH
  if stop_at < 6:
    with pytest.raises(preemption.TrainingStopped, match="after step 3 of 6"):
      trainer_lib.train_loop(c, str(wd), on_log=on_log)
    assert not png(3).exists() and kept.exists()
    before = kept.read_bytes()
    trainer_lib.train_and_evaluate(c, str(wd))
    assert kept.read_bytes() == before
    # The stop's save, superseded, is not kept (keep_checkpoints counts the
    # multiples of checkpoint_every, and the newest step).
    assert ckpt_lib.Checkpointer(str(wd)).manager.all_steps() == [6]
  else:
    trainer_lib.train_loop(c, str(wd), on_log=on_log)   # ends: the last step
  assert png(3).read_bytes() == png(6).read_bytes()


def test_a_kept_grid_batch_of_another_layout_or_unreadable_is_replaced(
    tmp_path, caplog):
  """A resume with another image size (or a damaged file) keeps this run's
  first batch instead, with a warning, not an error."""
  local = {"image": np.ones((20, 4, 4, 3), np.float32),
           "label": np.arange(20, dtype=np.int32)}
  path = tmp_path / "images" / grids.KEPT_BATCH
  path.parent.mkdir()
  for old in (b"not a zip", None):
    if old is None:
      np.savez(path, image=np.zeros((16, 8, 8, 3), np.float32),
               label=np.zeros(16, np.int32))
    else:
      path.write_bytes(old)
    got = grids.visual_batch(local, tmp_path)
    np.testing.assert_array_equal(got["image"], local["image"][:16])
    with np.load(path) as z:
      np.testing.assert_array_equal(z["image"], local["image"][:16])
  local["image"] = local["image"] * 0   # the kept one is used from now on
  assert grids.visual_batch(local, tmp_path)["image"].max() == 1
  # Also by a resume whose hosts read fewer examples each (2 processes
  # after 1): the kept batch's first 4, not this run's (zeros).
  small = {k: v[:4] for k, v in local.items()}
  got = grids.visual_batch(small, tmp_path)
  assert got["image"].shape == (4, 4, 4, 3) and got["image"].max() == 1
  with np.load(path) as z:
    assert z["image"].shape == (16, 4, 4, 3)
  # Fewer kept than this run shows: replaced, saying so.
  np.savez(path, **{k: v[:2] for k, v in local.items()})
  with caplog.at_level(logging.WARNING):
    got = grids.visual_batch(local, tmp_path)
  assert got["image"].shape == (16, 4, 4, 3)
  assert "holds 2 examples, fewer than the 16 this run shows" in caplog.text


def test_stop_saves_do_not_push_out_the_checkpoints_of_the_cadence(tmp_path):
  """keep_checkpoints counted a stop's save: three stops within one
  checkpoint_every interval left steps 34, 36 and 38 alone (a FAR run's step
  1,500,000, which its official evaluation reads, went with two). Kept now:
  the newest multiples of checkpoint_every, and the newest step."""
  ck = ckpt_lib.Checkpointer(str(tmp_path), keep=3, async_save=False, every=10)
  kept = []
  for step in (10, 20, 30, 34, 36, 38, 40):
    ck.save(step, {"w": np.ones(2, np.float32)})
    kept.append(ck.manager.all_steps())
  ck.close()
  assert kept[3:] == [[10, 20, 30, 34], [10, 20, 30, 36], [10, 20, 30, 38],
                      [20, 30, 40]]


def test_skipped_records_count_every_process_files(monkeypatch):
  """``skipped_records`` is the sum over the data groups (each reads its
  own share of the files); it was process 0's count alone."""
  from genvis_jax.core import multihost  # pylint: disable=import-outside-toplevel
  from genvis_jax.train import log_step  # pylint: disable=import-outside-toplevel
  written = {}

  class Stub:   # the writer, guard, progress, pipeline info and task
    num_skipped = 2
    write_scalars = staticmethod(lambda step, scalars: written.update(scalars))
    record = staticmethod(lambda loss, norms: None)
    learning_rates = staticmethod(lambda step: {"model": 0.1})
    __call__ = lambda self, done: {}
    exclude = staticmethod(lambda seconds: None)

  monkeypatch.setattr(multihost, "gather_ints",
                      lambda value: np.array([value, 5]))
  stub = Stub()
  log_step.Logger(stub, stub, stub, stub, 10, None, stub, 8)(
      4, {"loss": 1.0, "nonfinite": 0.0}, {"model": 1.0}, 4)
  assert written["skipped_records"] == 7.0
  # Processes of one data group read one shard: their files count once.
  monkeypatch.setattr(multihost, "gather_ints", lambda value: np.array(
      [2, 2, 5, 5] if value == 2 else [0, 0, 1, 1]))
  assert log_step.skipped_records(stub, (0, 2)) == 7
  assert log_step.skipped_records(stub, None) == 14


@pytest.mark.parametrize("again", [False, True])
def test_a_stopped_runs_arrays_are_freed_with_its_frames(tmp_path,
                                                         monkeypatch, again):
  """A notebook keeps a stopped cell's exception, traceback and frames: the
  training state in them stayed on the devices through the rerun (twice
  the state's memory). A stop (Ctrl-C here) lets them go, also where a
  Ctrl-C again ends the wait for the save in flight (the first is its
  ``__context__``)."""
  import gc   # pylint: disable=import-outside-toplevel
  import jax   # pylint: disable=import-outside-toplevel
  from genvis_jax import modes   # pylint: disable=import-outside-toplevel
  small_run.interrupt_step(monkeypatch, 3)
  if again:
    def ctrl_c_again(*args):
      raise KeyboardInterrupt
    monkeypatch.setattr(loop, "_finish_saves", ctrl_c_again)
  gc.collect()
  before = {id(a) for a in jax.live_arrays()}
  with pytest.raises(KeyboardInterrupt) as kept:   # as IPython keeps it
    modes.run(config(6), str(tmp_path / "wd"))
  gc.collect()
  new = [a.shape for a in jax.live_arrays() if id(a) not in before]
  assert kept.value.__traceback__ is not None and not new, new
  assert (kept.value.__context__ is not None) == again
