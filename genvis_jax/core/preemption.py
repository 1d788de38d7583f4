"""Stopping a run cleanly: training saves a checkpoint at the next step and
sampling writes the batch in flight, then they exit.

A spot / preemptible TPU VM, ``launch/worker_start.sh --stop`` and ``kill``
send SIGTERM, and Ctrl-C sends SIGINT. Without a handler either kills the run
between checkpoints and loses up to ``checkpoint_every`` steps. Inside
:class:`StopRequest` the trainer finishes the step in flight, saves it and
raises :class:`TrainingStopped`; the same command resumes from that step.
The sampler (``sample.driver``) likewise writes the batch in flight and stops.

One process: SIGTERM and SIGINT are caught here (a second Ctrl-C stops at
once, as usual). Several processes: JAX's preemption notifier (set up by
``jax.distributed.initialize``) catches SIGTERM, and
``multihost_utils.reached_preemption_sync_point`` makes every host stop at
the same step, so their checkpoint shards agree.

Ctrl-C in a terminal also reaches Grain's worker processes
(``config.data.num_workers > 0``), which then stop feeding batches: with
workers, stop a run with SIGTERM (``kill``), which only the trainer gets.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Callable

import jax
from absl import logging
from jax.experimental import multihost_utils

from genvis_jax import errors
from genvis_jax.core import interrupts


# Set by the command-line entry point (genvis_jax.main): a second Ctrl-C
# ends the process at once. A notebook's or test's second interrupt raises
# KeyboardInterrupt instead, which keeps its kernel.
exit_on_second_interrupt = False


class TrainingStopped(errors.CleanStop):
  """A stop signal ended training after saving a checkpoint."""


class NotedSignals:
  """Context manager that notes SIGINT / SIGTERM as they arrive while the
  handlers set before it go on acting (one process, main thread: where
  they raise ``KeyboardInterrupt`` / ``errors.StoppedBySignal``).

  A run's start-up (loading, compiling) before its ``StopRequest``: an
  exception a handler raises inside a callback whose errors Python only
  prints (jax's garbage-collection hook, a ``__del__``) was lost there, and
  the run went on to the end after "Exception ignored ...
  KeyboardInterrupt". ``raise_noted()``, called as the loop's
  ``StopRequest`` takes over, raises it again."""

  def __init__(self):
    self.signum: int | None = None
    self._previous = {}

  def __enter__(self):
    if (jax.process_count() == 1
        and threading.current_thread() is threading.main_thread()):
      for sig in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(sig)
        if callable(handler):
          self._previous[sig] = handler
          signal.signal(sig, self._noting(handler))
    return self

  def _noting(self, handler):
    def noted(signum, frame):
      self.signum = signum
      handler(signum, frame)
    return noted

  def raise_noted(self) -> None:
    """Raises the stop a signal asked for since ``__enter__`` (its own
    exception was lost, or the caller would not be here); else nothing."""
    # A Ctrl-C noted since the process started (interrupts.note): this
    # process is still here, so its KeyboardInterrupt was lost too.
    if interrupts.take_noted() or self.signum == signal.SIGINT:
      raise KeyboardInterrupt
    if self.signum is not None:
      raise errors.StoppedBySignal(self.signum)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}


class StopRequest:
  """Context manager that turns SIGTERM / SIGINT into a request to stop.

  ``should_stop(step)`` is True once a stop is due at ``step`` (call it at
  every step, on every process). Outside the ``with`` block the previous
  handlers are back.
  """

  def __init__(self, action: str = "saving a checkpoint after the current step",
               lost: str = "without a final checkpoint",
               resumes: Callable[[], str] | None = None):
    """``action``: what happens before the stop; ``lost``: what a stop
    without the preemption service misses; ``resumes``: what running the
    command again after a stop at once would do, asked when it happens (e.g.
    the step training resumes from). All for the messages."""
    self.action, self.lost, self._resumes = action, lost, resumes
    self.signal: str | None = None    # what asked, for messages
    self.signum: int = signal.SIGTERM  # the signal, for the exit status
    self._previous = {}
    self._synced = False

  def __enter__(self):
    if jax.process_count() > 1:
      # Without JAX's preemption service (jax.distributed flag
      # jax_enable_preemption_service) there is no notice to agree on.
      from jax._src import distributed  # pylint: disable=g-import-not-at-top
      self._synced = distributed.global_state.preemption_sync_manager is not None
      if not self._synced:
        logging.warning("No preemption service: a SIGTERM stops this "
                        "multi-process run %s.", self.lost)
    elif threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        if signal.getsignal(sig) is not signal.SIG_IGN:  # e.g. a `&` job's SIGINT
          self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    if self.signal is not None and signum == signal.SIGINT:
      # Asked twice: stop now, unsaved. From the command line the process
      # ends here: a KeyboardInterrupt would unwind through a checkpoint
      # save in flight, whose threads log its traceback.
      if exit_on_second_interrupt:
        sys.stdout.flush()
        logging.flush()
        print(f"Error: {errors.stopped_message(signum, resume=self._resume())}",
              file=sys.stderr, flush=True)
        os._exit(128 + signum)  # pylint: disable=protected-access
      else:
        raise KeyboardInterrupt
    self.signal, self.signum = signal.Signals(signum).name, signum
    resume = self._resume()
    logging.warning("%s received: %s, then stopping (Ctrl-C%s stops at "
                    "once, unsaved%s).", self.signal, self.action,
                    " again" if signum == signal.SIGINT else "",
                    f": {resume}" if resume else "")

  def _resume(self) -> str:
    """``resumes()``, or "" where it is not given or fails (a message must
    not stop the stop)."""
    try:
      return self._resumes() if self._resumes else ""
    except Exception:  # pylint: disable=broad-except
      return ""

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1:
      if self._synced and multihost_utils.reached_preemption_sync_point(step):
        # The service says a stop is due, not which process got the SIGTERM.
        self.signal = self.signal or (
            f"a preemption notice (SIGTERM to one of the "
            f"{jax.process_count()} processes)")
        return True
      return False
    return self.signal is not None
