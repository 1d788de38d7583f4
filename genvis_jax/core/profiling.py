"""A window of training steps traced with ``jax.profiler``.

``config.train.profile_steps`` steps (0 = off), after the first
``config.train.profile_skip_steps`` of the run (compilation and warm-up; a
resumed run counts from its own start; a resume whose workdir already holds
a trace traces none: rerunning "the same command" after each preemption
added a trace and its time per start), are traced on process 0 into
``workdir/plugins/profile/<time>/`` (``<host>.xplane.pb`` for TensorBoard's
Profile tab, which needs ``tensorboard-plugin-profile``; ``<host>.trace.json.gz``
for Perfetto). Process 0 only, like maxtext's default: on a pod its trace shows
its own devices, and every host writing one would multiply the files.
Every step carries a ``StepTraceAnnotation("train", step_num=step)`` (0-based),
which the profiler's step-time views key on.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import jax
from absl import logging
from etils import epath


class StepWindow(contextlib.AbstractContextManager):
  """Starts the trace before step ``start + skip`` (0-based) and stops it
  once step ``start + skip + num - 1`` has finished on the device; a run
  that ends or fails inside the window stops it on exit. Process 0 only."""

  def __init__(self, logdir: str, start: int, num: int, skip: int,
               settle: Callable[[], object] | None = None):
    """``settle``: called before the trace starts and stops (the trainer
    waits there for a checkpoint write in flight: jax's profiler crashed the
    process, stopping beside Orbax's writing threads)."""
    self.logdir = logdir
    self.first, self.last = start + skip, start + skip + num - 1
    self.enabled = num > 0 and jax.process_index() == 0
    traces = (sorted(str(p) for p in epath.Path(logdir).glob(
        "plugins/profile/*")) if self.enabled and start else [])
    if traces:
      self.enabled = False
      logging.info("Not tracing steps again: %s holds this run's profile "
                   "(config.train.profile_steps); delete it to trace the "
                   "resumed run.", traces[-1])
    self._active = False
    self._settle = settle or (lambda: None)

  def step(self, step: int):
    """A context for running ``step`` (0-based): annotated, and traced
    inside the window."""
    if self.enabled and step == self.first:
      self._settle()
      jax.profiler.start_trace(self.logdir)
      self._active = True
    return jax.profiler.StepTraceAnnotation("train", step_num=step)

  def done(self, step: int, outputs) -> None:
    """After ``step`` is dispatched: at the window's last step, waits for
    ``outputs`` (so the trace holds the whole step) and stops the trace."""
    if self._active and step >= self.last:
      jax.block_until_ready(outputs)
      self._stop()

  def _stop(self, failing: bool = False) -> None:
    self._active = False
    try:
      self._settle()
    except Exception:  # pylint: disable=broad-except
      if not failing:   # on the way out of an error, that error matters more
        raise
    jax.profiler.stop_trace()
    runs = sorted(str(p) for p in
                  epath.Path(self.logdir).glob("plugins/profile/*"))
    logging.info("Profile of training steps %d-%d (1-based) written to %s: "
                 "open it in TensorBoard's Profile tab (tensorboard-plugin-"
                 "profile) or the .trace.json.gz in Perfetto.", self.first + 1,
                 self.last + 1, runs[-1] if runs else self.logdir)

  def __exit__(self, *exc):
    if self._active:
      self._stop(failing=exc[0] is not None)
    return None
