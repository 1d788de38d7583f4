"""The shared training loop: ``train_and_evaluate(config, workdir)``.

Mesh from ``config.mesh`` -> sharded state (``eval_shape`` -> shardings ->
``jit(init, out_shardings)``) -> Grain iterator -> donated jitted step ->
clu metrics, image grids and async Orbax checkpoints; resumes from ``workdir``.
"""

from __future__ import annotations

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from absl import logging

from genvis_jax import errors, models
from genvis_jax.core import checkpoint as ckpt_lib
from genvis_jax.core import dtypes
from genvis_jax.core import files
from genvis_jax.core import flops as flops_lib
from genvis_jax.core import hints
from genvis_jax.core import mesh_checks
from genvis_jax.core import metrics as metrics_lib
from genvis_jax.core import multihost
from genvis_jax.core import preemption
from genvis_jax.core import profiling
from genvis_jax.core import settings as settings_lib
from genvis_jax.core import sharding as shd
from genvis_jax.core import workdir_lock
from genvis_jax.train import checks
from genvis_jax.train import grids
from genvis_jax.train import guard as guard_lib
from genvis_jax.train import log_step
from genvis_jax.train import replicas
from genvis_jax.train import resume as resume_lib
from genvis_jax.train import state as state_lib
from genvis_jax.train import step as step_lib
from genvis_jax.train import tasks as tasks_lib


# Raised by the loop's health checks (see train/guard.py); UserErrors.
NonFiniteLossError = guard_lib.NonFiniteLossError
DivergenceError = guard_lib.DivergenceError
TrainingDivergedError = guard_lib.TrainingDivergedError


def setup(config, *, mesh=None, devices=None, task=None):
  """Everything that can fail on bad input, before any compilation:
  ``(mesh, task)`` (``task``: ``tasks.get_task(config)`` unless given)."""
  task = task or tasks_lib.get_task(config)
  checks.check_config(config, task)
  mesh = shd.auto_axes(mesh) or shd.create_mesh(config.mesh, devices)
  shd.check_batch_divisible(config.train.global_batch_size, mesh,
                            config.train.micro_batches, config.sharding.rules)
  mesh_checks.check_mesh_axes(mesh, config.sharding.rules)
  return mesh, task


def check_config(config, workdir: str | None = None) -> None:
  """What ``train_and_evaluate`` refuses before opening anything (``setup``:
  the task, its config checks, the mesh and batch split), for a runner of
  several jobs (the demo) checking each before the first starts. Raises
  ``ConfigError``."""
  del workdir   # a fresh run's init_from is checked once there is a workdir
  setup(config)


def data_group(config, mesh) -> tuple[int, int]:
  """This process's ``(group, count)`` of the training data on ``mesh``
  (``sharding.data_groups``); logged where processes share groups."""
  group, groups = shd.data_groups(mesh, config.train.global_batch_size,
                                  config.sharding.rules)
  if groups != jax.process_count():
    logging.info("The %d processes feed %d data groups (processes whose "
                 "devices hold the same batch rows read the same examples).",
                 jax.process_count(), groups)
  return group, groups


def create_train_iterator(config, task, *, group=None, seed=None):
  """This process's training batches, ``(iterator, PipelineInfo)``.
  ``group``: its ``data_group`` on the training mesh; None: one group per
  process."""
  from genvis_jax import data as data_lib  # local: keeps trainer import light
  index, count = group or (None, None)
  data_iter, info = data_lib.create_dataset(
      config.data, split=config.data.split,
      global_batch_size=config.train.global_batch_size,
      seed=config.seed if seed is None else seed, train=True,
      value_range=task.value_range, process_index=index, process_count=count,
      # A class-conditional model reads labels as class-table indexes.
      check_labels=bool(config.get("model", {}).get("num_classes")))
  checks.check_model_classes(config, info.num_classes,
                             from_data=info.classes_from_data)
  return data_iter, info


class Trainer:
  """Holds the compiled step and the sharded state of one run."""

  def __init__(self, config, workdir: str | None = None, *, mesh=None,
               task=None, group=None):
    """``mesh`` and ``task`` from :func:`setup`, and ``group`` from
    :func:`data_group`, when the caller built them already (once per run);
    built here otherwise."""
    self.config = config
    self.workdir = workdir
    if task is None:
      mesh, task = setup(config, mesh=mesh)
    self.mesh, self.task = shd.auto_axes(mesh), task
    self.rules = shd.rules_tuple(config.sharding.rules)
    self.optimizers = self.task.optimizers()
    # Three streams: init, training (step s draws fold_in(train_rng, s)) and
    # the sample grids, which must not replay a step's key. Init and train
    # keep the 2-way split earlier runs resume with, whatever the PRNG.
    seed = jax.random.key(config.seed)
    self.init_rng, train_rng = jax.random.split(seed)
    # Placed once: an uncommitted key would be copied to every device at
    # every step. Through jit: device_put of a device array onto a mesh
    # spanning other processes is refused.
    self.train_rng = jax.jit(lambda k: k, out_shardings=shd.replicated(mesh))(
        train_rng)
    self.visual_rng = jax.random.split(seed, 3)[2]
    # Which shard of the data this process reads (sharding.data_groups).
    self.data_group = group or data_group(config, mesh)
    self.abstract, self.shardings = state_lib.state_shardings(
        self.task, self.optimizers, self.mesh, self.rules, self.init_rng)
    step_fn = step_lib.make_train_step(
        self.task, self.optimizers, config.train,
        shd.num_batch_shards(self.mesh, self.rules))
    # Non-trainable weights the losses use (LPIPS, teachers): read on every
    # process with the outcome agreed (a host missing a file stops all), and
    # each places its own shards, so the copies are compared. Split by the
    # rules where the task names their axes (a teacher, a tokenizer), else
    # replicated.
    frozen = multihost.run_everywhere(
        self.task.frozen_params,
        "could not read the frozen weights (LPIPS, teachers, the tokenizer; "
        "their logs say why).")
    checks.check_same_weights(frozen)
    frozen_shardings = state_lib.frozen_shardings(
        frozen, self.task.frozen_axes(), self.mesh, self.rules)
    self.frozen = shd.put_host(frozen, frozen_shardings)
    self._step_fn = step_fn   # bench/plan_memory.py compiles it for shapes
    self._step = step_lib.jit_train_step(
        step_fn, self.shardings, shd.batch_sharding(self.mesh, self.rules),
        shd.replicated(self.mesh), frozen_shardings)
    # FLOPs per device per step (``flops.step_flops``), counted at the first
    # step; False until then, None where XLA gives no count.
    self.step_flops: float | None | bool = False

  def context(self):
    return _Context(self.mesh, self.rules)

  def init_state(self):
    with self.context():
      state = jax.jit(
          lambda r: state_lib.init_state(self.task, self.optimizers, r),
          out_shardings=self.shardings)(self.init_rng)
    return state

  def abstract_state(self):
    return jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        self.abstract, self.shardings)

  @functools.cached_property
  def _param_norms(self):
    return jax.jit(lambda params: {g: optax.tree.norm(p)
                                   for g, p in params.items()})

  def param_norms(self, state) -> dict[str, float]:
    """Global L2 norm of each parameter group, on the host (one small jit)."""
    with self.context():
      return {g: float(v) for g, v in
              jax.device_get(self._param_norms(state.params)).items()}

  def step(self, state, local_batch):
    batch = shd.host_to_global(local_batch, self.mesh,
                               self.config.train.global_batch_size, self.rules)
    with self.context():
      if self.step_flops is False:   # once, before the state is donated
        self.step_flops = flops_lib.step_flops(
            self._step, (state, batch, self.train_rng, self.frozen),
            self.config.train.micro_batches, self.mesh.size)
      return self._step(state, batch, self.train_rng, self.frozen)


class _Context:
  """Mesh + logical rules, needed while tracing modules with constraints."""

  def __init__(self, mesh, rules):
    self.mesh, self.rules = mesh, rules

  def __enter__(self):
    self._m = jax.set_mesh(self.mesh)
    self._m.__enter__()
    self._r = nn.logical_axis_rules(self.rules)
    self._r.__enter__()

  def __exit__(self, *exc):
    self._r.__exit__(*exc)
    self._m.__exit__(*exc)


@dtypes.at_matmul_precision
def train_and_evaluate(config, workdir: str | os.PathLike):
  """Trains ``config.task`` for ``config.train.num_steps``; resumes from workdir."""
  state = train_loop(config, workdir)
  step = state.step   # replicated: this process's copy
  step = step.addressable_data(0) if isinstance(step, jax.Array) else step
  multihost.console(   # the mode's last line, as the other modes'
      f"[train] done at step {int(step)}: "
      f"checkpoints in {os.path.join(workdir, 'checkpoints')}, TensorBoard "
      f"logs and grids in {workdir}"
      f"{hints.next_step(next_command(config, workdir))}")
  return state


def next_command(config, workdir) -> str:
  """What a finished run's weights are for, as the flags that use them
  (pre-tokenizing names its next command too): "" for a model that is
  neither a tokenizer nor a generator with a tokenizer (the demo's
  classifier)."""
  if models.is_image_tokenizer(config.get("model") or {}):
    return (f"; evaluate it with --config.mode=evaluate "
            f"--config.evaluate.checkpoint={workdir}, or give it to a "
            f"generator's config as --config.tokenizer.checkpoint={workdir}")
  tokenizer = config.get("tokenizer") or {}
  if not tokenizer.get("model"):
    return ""
  return (f"; sample with --config.mode=sample --config.init_from={workdir}"
          f" --config.tokenizer.checkpoint="
          f"{tokenizer.get('checkpoint', '') or 'TOKENIZER'}")


@dtypes.at_matmul_precision
def train_loop(config, workdir: str | os.PathLike, on_log=None):
  """The loop behind ``train_and_evaluate``; ``on_log(step, scalars)`` is called
  at every log step (all processes) — handy for tests and notebooks.

  Raises:
    WorkdirBusyError: another run trains in ``workdir``.
    TrainingStopped: a stop signal ended it after saving the step in flight.
  """
  workdir = os.fspath(workdir)   # clu's TensorBoard writer takes str only
  with _StartUp(workdir) as start_up:
    # Everything that can fail on bad input (mesh, batch split, data, task)
    # runs before anything is compiled.
    mesh, task = setup(config)
    resume_lib.check_fresh_start(config, task, workdir)
    group = data_group(config, mesh)
    # Token files: where they came from and the same listing on every
    # process (agreed through its own collectives, so not inside the next).
    from genvis_jax.data import token_origin  # pylint: disable=import-outside-toplevel
    token_origin.check_training_files(config)
    # Opened on every process, the outcome agreed: a host whose copy of the
    # data is missing stops every process, not only itself.
    data_iter, info = multihost.run_everywhere(
        lambda: create_train_iterator(config, task, group=group),
        "could not open the training data (their logs say why).")
    try:
      checks.check_same_data(config, info)
      files.makedirs(workdir)
      with workdir_lock.hold(workdir):
        # A grid PNG half-written by a killed run (write_whole's temporary).
        multihost.on_process_0(lambda: files.remove_stale_temporaries(
            os.path.join(workdir, "images")))
        files.remove_stale_transfers()   # each host's own TMPDIR
        trainer = Trainer(config, workdir, mesh=mesh, task=task, group=group)
        ckpt = ckpt_lib.Checkpointer(workdir,
                                     keep=config.train.keep_checkpoints,
                                     every=config.train.checkpoint_every)
        state, data_iter, info, data_seed = resume_lib.restore_or_init(
            config, workdir, trainer, ckpt, data_iter, info,
            lambda seed: create_train_iterator(config, task, group=group,
                                               seed=seed))
        return _run_steps(config, workdir, trainer, ckpt, state, data_iter,
                          info, data_seed, on_log, start_up)
    finally:   # the one in use (resume_lib closes those it replaced)
      resume_lib.close_iterator(data_iter)


class _StartUp(preemption.NotedSignals):
  """Names a stop signal that ends training before its loop (the CLI's
  ``StoppedBySignal`` for SIGTERM, ``KeyboardInterrupt`` for Ctrl-C; the
  loop's own ``StopRequest`` saves a step instead): the CLI's line says
  that no step ran and what a rerun resumes from. ``take_over()`` marks the
  loop taking over, raising first a stop whose exception was lost during
  start-up (``NotedSignals``)."""

  def __init__(self, workdir: str):
    super().__init__()
    self.workdir, self.started = workdir, False

  def take_over(self) -> None:
    self.raise_noted()
    self.started = True

  def __exit__(self, kind, e, tb):
    super().__exit__(kind, e, tb)
    if self.started or not isinstance(
        e, (errors.StoppedBySignal, KeyboardInterrupt)):
      return None
    e.what = "before the first training step: this run saved no checkpoint"
    try:
      e.resume = ckpt_lib.resume_note(os.path.join(self.workdir,
                                                   "checkpoints"))
    except Exception:  # pylint: disable=broad-except
      pass   # a listing that fails must not hide the stop (general words)
    return None


def _run_steps(config, workdir, trainer, ckpt, state, data_iter, info,
               data_seed, on_log, start_up):
  """Steps from ``state``'s to ``config.train.num_steps``: logs, health
  checks, grids, checkpoints and the stop on a signal (``start_up``'s until
  the loop begins). Returns the state."""
  start = int(jax.device_get(state.step))
  num_steps = int(config.train.num_steps)
  n_params = {g: models.count_params(p) for g, p in state.params.items()}
  # Epochs as the data counts them: a batch override keeps the recipe's
  # steps (FAR's 300 epochs at batch 256), so say what the run amounts to.
  epochs = num_steps / max(int(info.steps_per_epoch), 1)
  logging.info("Parameters: %s; mesh %s; start step %d of %d (%.4g epochs of "
               "%d examples at global batch %d)", n_params,
               dict(trainer.mesh.shape), start, num_steps, epochs,
               info.num_examples, int(config.train.global_batch_size))
  if start >= num_steps:
    logging.warning("Training already finished: %s holds step %d of "
                    "config.train.num_steps=%d. Raise --config.train.num_steps "
                    "to train further.", ckpt.directory, start, num_steps)

  # TensorBoard drops the points of the steps a resume redoes.
  metrics_lib.mark_start(workdir, start)
  writer = metrics_lib.create_writer(workdir)
  # At every start (a resume may change num_steps, the schedule ...);
  # sequences as text (they were left out).
  writer.write_hparams({
      k: v if isinstance(v, (int, float, str, bool)) else str(v)
      for k, v in settings_lib.flatten(config.to_dict()).items()})
  progress = metrics_lib.Progress(start, num_steps)
  guard = guard_lib.DivergenceGuard(
      config.train.get("divergence_factor", guard_lib.DEFAULT_DIVERGENCE_FACTOR),
      config.train.get("check_finite", True))
  guard.record(None, trainer.param_norms(state))
  log = log_step.Logger(writer, guard, progress, info, num_steps, on_log,
                        trainer.task, int(config.train.global_batch_size),
                        trainer.data_group, flops=lambda: trainer.step_flops,
                        peak_tflops=flops_lib.peak_tflops(
                            jax.devices()[0].device_kind,
                            config.train.get("peak_tflops")))
  group_check = replicas.GroupCheck(trainer.data_group)
  checked = start   # last step whose state passed the health checks
  acc, acc_n = None, 0
  visuals = grids.Schedule(trainer, writer, workdir, config.train.image_every,
                           num_steps)
  profile = profiling.StepWindow(
      workdir, start, int(config.train.get("profile_steps", 0)),
      int(config.train.get("profile_skip_steps", 5)), settle=ckpt.wait)
  try:
    # SIGTERM / Ctrl-C: finish the step in flight, save it, stop.
    with preemption.StopRequest(resumes=ckpt.resume_note) as stop, profile:
      start_up.take_over()
      for step in range(start, num_steps):
        local = next(data_iter)
        group_check.update(local)
        visuals.start(state, local, step)
        with profile.step(step):
          state, metrics = trainer.step(state, local)
        profile.done(step, metrics)
        done = step + 1
        if step == start:
          # Rates and ETAs count from here: the first step compiled (a log
          # at this step gives none).
          jax.block_until_ready(metrics)
          logging.info("First step (compilation included) took %.1f s.",
                       progress.restart(done))
        acc = metrics if acc is None else _add_metrics(acc, metrics)
        acc_n += 1
        stop_now = stop.should_stop(done)     # every step, on every process
        # A stop logs the steps since the last log: the resume's first log
        # covers only its own, so nothing else would.
        log_now = (done % config.train.log_every == 0 or done == num_steps
                   or stop_now)
        save_now = (done % config.train.checkpoint_every == 0 or done == num_steps
                    or stop_now)
        # A failed background save stops the run at the first step after its
        # write ends (the write overlaps the steps until then; the next save
        # waits for it). Several processes agree at log and save steps, so
        # all stop at the same one.
        if jax.process_count() == 1 or log_now or save_now:
          ckpt.check(at_step=done, agree=True)
        if log_now or save_now:
          group_check.check(done)
          # Health checks on what logging fetches anyway, and always right before
          # a save, so a diverged state is never written as a checkpoint.
          means = step_lib.interval_means(jax.device_get(acc), acc_n)
          norms = trainer.param_norms(state)
          guard_lib.check_health(config, guard, means, norms, acc_n,
                                 checked, done, ckpt,
                                 resumed=start if start else None,
                                 optimizers=trainer.task.optimizer_configs())
          checked = done
        if log_now:
          log(done, means, norms, acc_n)
          acc, acc_n = None, 0
        if stop_now:
          visuals.skip(done)
        elif visuals.due(done):
          # The step in flight is training time: waited for before the
          # grid's time is taken out (on a step that did not log, the grid
          # waited for it, and steps/s counted half the steps' time).
          with progress.off_the_clock(state):
            visuals.draw(state, done)
        if save_now:
          # As the grids: the save's foreground (copying the state off the
          # devices, waiting for the previous write) is not training time.
          with progress.off_the_clock(state):
            ckpt.save(done, state, data_iter, config, data_seed=data_seed,
                      data_group=trainer.data_group,
                      data_listing=info.listing())
        if stop_now and done < num_steps:
          ckpt.close()
          writer.flush()
          raise preemption.TrainingStopped(
              f"Training stopped by {stop.signal} after step {done} of "
              f"{num_steps}; the checkpoint of step {done} is saved in "
              f"{ckpt.directory}. Run the same command to resume from it.",
              stop.signum)
  except BaseException as e:
    # A save started before the error still completes (and is checked):
    # a multi-host process exits at once after an error (cli.exit_now). So
    # after a KeyboardInterrupt (a notebook's second Ctrl-C; the command
    # line's ends the process in the handler): the workdir lock is let go
    # next, and a rerun would remove the half-written step as an unfinished
    # save's leftovers and resume from the step before it.
    if not isinstance(e, Exception) and ckpt.in_flight() is not None:
      logging.warning("Stopping: waiting for the checkpoint of step %d, "
                      "still being written (Ctrl-C again stops without it).",
                      ckpt.in_flight())
    _finish_saves(ckpt, writer)
    raise
  ckpt.close()
  visuals.finish(state)
  writer.flush()
  return state


@functools.partial(jax.jit, donate_argnums=0)
def _add_metrics(total, metrics):
  """Running sums of the step metrics: one dispatch per step (summed leaf
  by leaf, eagerly, each would be its own launch over the mesh)."""
  return jax.tree_util.tree_map(jnp.add, total, metrics)


def _finish_saves(ckpt, writer) -> None:
  """Waits for the checkpoint save in flight and flushes the metric writer;
  a failure here is logged, not raised (the error being raised matters more)."""
  try:
    ckpt.wait()
  except Exception as e:  # pylint: disable=broad-except
    logging.error("The checkpoint save in flight failed too: %s",
                  errors.first_line(e))
  try:
    writer.flush()
  except Exception as e:  # pylint: disable=broad-except
    logging.error("Writing the metrics failed too: %s", errors.first_line(e))
