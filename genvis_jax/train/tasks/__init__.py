"""Trainer tasks: what a trainable system supplies to the shared trainer.

The shared loop (``genvis_jax/train/trainer.py``) owns sharding, gradient
accumulation, optimizer updates, EMA, checkpoints and logging. A task owns the
models and losses. ``config.task`` names the module that defines it
(``"rar"`` -> ``tasks/rar.py``, whose ``TASK`` is the class).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import numpy as np
import optax

from genvis_jax import models
from genvis_jax.core import metrics
from genvis_jax.core import pixels
from genvis_jax.core import registry
from genvis_jax.errors import ConfigError, UserError
from genvis_jax.train import optimizers as opt_lib

PyTree = Any

def get_task(config) -> "Task":
  """The task ``config.task`` names: ``genvis_jax/train/tasks/<name>.py``
  defines ``TASK``, its ``Task`` subclass (see ``genvis_jax.core.registry``).
  Raises ``ConfigError`` for an unknown name."""
  mod = registry.module(__name__, config.task, ("TASK",),
                        setting="config.task")
  return mod.TASK(config)


class Task:
  """Interface between a model family and the shared trainer.

  Parameters are a dict of named groups (e.g. ``{"model": ..., "disc": ...}``);
  each group has its own optimizer. ``ema_group`` (or None) is tracked with EMA.
  """
  param_groups: tuple[str, ...] = ("model",)
  ema_group: str | None = "model"
  # Pixel range the data pipeline should produce for this task's models; a
  # task with a tokenizer takes it from the model (``models.value_range``).
  value_range: tuple[float, float] = (0.0, 1.0)
  # Whether the training data reach the model through config.tokenizer
  # (images encoded in the loss): its weights are then the data's origin,
  # recorded and checked like token files' (``data.token_origin``).
  encodes_with_tokenizer: bool = False
  # The config.data.source values whose batches this task reads (None: any
  # image source); refused otherwise before anything is built.
  data_sources: tuple[str, ...] | None = None
  # Groups updated one after another within a step, each phase's gradients
  # taken at the parameters the phases before it left (e.g. a discriminator
  # stepped on the updated generator's output, as PyTorch Lightning's
  # one-optimizer-at-a-time loop does). None: one phase, every group at once.
  update_phases: tuple[tuple[str, ...], ...] | None = None
  # Whether ``visualize`` shows the batch's examples (a tokenizer's
  # reconstructions): the batch is then kept in the workdir, and a resume's
  # grids show the same ones (``grids.visual_batch``).
  grids_show_batch: bool = False

  def __init__(self, config):
    self.config = config

  def needs_init_from(self) -> str:
    """Why a fresh run of this config needs ``config.init_from`` (the
    weights it continues), or "" where it does not: a run with
    ``config.init_groups`` (groups init_from gives) does."""
    groups = tuple(self.config.get("init_groups", ()))
    return (f"config.init_groups={groups} names groups to start from the "
            f"init_from run's" if groups else "")

  def hparam(self, name: str):
    """``config.<name>`` (dotted, e.g. ``"loss.rep_weight"``), required.

    Loss weights and schedules have their values in the configs only (the
    paper configs in ``configs/``), never a second default in a task that
    could drift from them; tasks read them in ``__init__``, so a missing one
    stops the run before anything is built. Raises ``ConfigError`` naming
    the field when it, or a section on its path, is absent or None.
    """
    node, path = self.config, "config"
    for part in name.split("."):
      if not hasattr(node, "keys"):
        raise ConfigError(f"{path} is a {type(node).__name__}, not a section; "
                          f"the {type(self).__name__} reads config.{name}.")
      path += "." + part
      node = node.get(part)
      if node is None:
        raise ConfigError(
            f"{path} is not set; the {type(self).__name__} needs it. Set it "
            "in the config (the paper configs in configs/ state each "
            "paper's value).")
    return node

  # --- construction -------------------------------------------------------
  def init_params(self, rng: jax.Array) -> Mapping[str, PyTree]:
    """Boxed (``nn.LogicallyPartitioned``) params per group; pure, jit-able.
    By default one group, "model", of ``config.model``."""
    return {"model": models.init_params(self.config.model, rng, boxed=True)}

  def optimizer_configs(self) -> Mapping[str, tuple]:
    """{group: (its optimizer's config section, that section's key)}: what
    ``optimizers`` builds and ``learning_rates`` reads. By default
    ``config.optimizer`` for the "model" group."""
    return {"model": (self.config.optimizer, "config.optimizer")}

  def optimizers(self) -> Mapping[str, optax.GradientTransformation]:
    """One optax transformation per group (clipping included), from
    ``optimizer_configs``."""
    return {group: opt_lib.make_optimizer(section, self.config.train, key)
            for group, (section, key) in self.optimizer_configs().items()}

  def learning_rates(self, step: int) -> dict[str, float]:
    """{group: the learning rate of update ``step``} (0-based: the update
    made after ``step`` done), from each group's schedule
    (``optimizers.make_schedule``); the trainer logs it as ``lr/<group>``."""
    return {group: float(schedule(step))
            for group, schedule in self._schedules.items()}

  @functools.cached_property
  def _schedules(self) -> dict:
    """{group: optax schedule}, built once (read at every log step)."""
    n = int(self.config.train.num_steps)
    return {group: opt_lib.make_schedule(section, n, key)
            for group, (section, key) in self.optimizer_configs().items()}

  def frozen_params(self) -> Mapping[str, PyTree]:
    """Non-trainable groups the losses read (e.g. ``{"lpips": ...}``).

    Passed to ``grads``/``visualize`` as their own ``frozen`` argument (never
    merged into ``params``, so a frozen name cannot shadow a trained group);
    never updated or checkpointed (they are loaded from local files).
    """
    return {}

  def frozen_axes(self) -> Mapping[str, PyTree]:
    """The logical axis names of the frozen groups the rules split as they
    split trained weights (a teacher, a tokenizer: ``fsdp`` then holds a
    share of them on each device, not a whole copy): ``{group: boxed
    abstract tree}`` (``nn.LogicallyPartitioned`` leaves, ``jax.eval_shape``
    of the module's init) with the structure of ``frozen_params()[group]``.
    Groups left out are replicated (LPIPS's 15M parameters). Called after
    ``frozen_params``; allocates nothing."""
    return {}

  # --- training -----------------------------------------------------------
  def grads(self, params: Mapping[str, PyTree], frozen: Mapping[str, PyTree],
            batch: Mapping[str, jax.Array], rng: jax.Array, step: jax.Array):
    """Gradients for one (micro-)batch.

    ``params``: the trainable groups (``param_groups``); ``frozen``: the
    output of ``frozen_params()``. Returns ``(grads, metrics)``: ``grads`` has
    the structure of ``params``, ``metrics`` is a flat dict of scalars; each is
    a mean over the batch, so averaging over equal micro-batches equals the
    full-batch value except for terms the official code also computes per
    GPU batch (grouped: InfoNCE negatives, the entropy loss, BatchNorm
    statistics; the adaptive GAN weight, from the micro-batch's gradients);
    ``rng`` differs per micro-batch, so what it draws matches
    the full batch's in expectation only. ``metrics`` must contain
    ``"loss"`` (checked for NaN/Inf by the trainer).

    A task with ``update_phases`` is called once per phase with
    ``groups=`` that phase's groups and returns their gradients only (and
    ``"loss"`` in the first phase).
    """
    raise NotImplementedError

  # --- outputs ------------------------------------------------------------
  def visualize(self, params: Mapping[str, PyTree],
                frozen: Mapping[str, PyTree], batch, rng) -> dict:
    """Images to log, ``{name: uint8 (N, H, W, 3)}``. Optional."""
    return {}

  def grid_uint8(self, images) -> np.ndarray:
    """Float images (N, H, W, 3) in ``value_range`` -> host uint8 for
    ``visualize``: the nearest byte (``pixels.to_uint8`` "round"; a picture
    to look at, not an official sampler's bytes). A jax array spread over
    several processes is gathered first (``metrics.host_array``), so every
    process must call it."""
    return pixels.to_uint8(metrics.host_array(images), self.value_range,
                           "round")


class GroupClashError(UserError, ValueError):
  """Two parameter trees joined into one module's parameters share a name."""


def join_groups(trained: Mapping[str, PyTree],
                frozen: Mapping[str, PyTree]) -> dict:
  """``{**trained, **frozen}`` for a module whose parameters are partly frozen
  (e.g. the DINO discriminator's ViT); a shared top-level name raises
  ``GroupClashError`` instead of silently taking the frozen value."""
  clash = sorted(set(trained) & set(frozen))
  if clash:
    raise GroupClashError(
        f"Trained and frozen parameters both hold {clash}: the frozen copy "
        f"would silently replace the trained one. Remove {clash} from the "
        f"trained group (e.g. a checkpoint saved with the frozen weights "
        f"inside it) or rename the frozen entry.")
  return {**trained, **frozen}
