"""The shared training loop: ``train_and_evaluate(config, workdir)``.

Mesh from ``config.mesh`` -> sharded state (one trace of the initialiser ->
shardings -> its program jitted with them) -> Grain iterator -> donated step ->
clu metrics, image grids and async Orbax checkpoints; resumes from ``workdir``.
"""

from __future__ import annotations

import contextlib
import functools
import os

import flax.linen as nn
import jax
import optax
from absl import logging

from genvis_jax import errors, models
from genvis_jax.core import checkpoint as ckpt_lib
from genvis_jax.core import dtypes
from genvis_jax.core import files
from genvis_jax.core import flops as flops_lib
from genvis_jax.core import hints
from genvis_jax.core import mesh_checks
from genvis_jax.core import multihost
from genvis_jax.core import preemption
from genvis_jax.core import sharding as shd
from genvis_jax.core import workdir_lock
from genvis_jax.train import checks
from genvis_jax.train import guard as guard_lib
from genvis_jax.train import loop
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
    with self.context():
      self.abstract, self.shardings, self._init = state_lib.trace_init(
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

  @contextlib.contextmanager
  def context(self):
    """What the run's programs trace under: its mesh, its logical axis rules
    (the modules' constraints resolve there) and ``config.matmul_precision``
    (what its fp32 dots compute in, as under ``train_and_evaluate``), so a
    step, a grid or a plan from a notebook compiles the run's program."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules), \
        dtypes.matmul_precision(self.config):
      yield

  def init_state(self):
    with self.context():
      return self._init(self.init_rng)

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
        return loop.run_steps(config, workdir, trainer, ckpt, state,
                              data_iter, info, data_seed, on_log, start_up)
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
