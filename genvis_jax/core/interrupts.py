"""Ctrl-C from the first line of the command-line entry point.

jax registers a garbage-collection hook when it is imported; a
``KeyboardInterrupt`` raised inside it (or inside any ``__del__``) is only
printed ("Exception ignored ... KeyboardInterrupt"), so a Ctrl-C in a run's
first second (its imports) was lost and the run trained to the end.
``genvis_jax.main`` calls :func:`note` before jax is imported: until
:func:`started` (its ``main`` has begun), a Ctrl-C ends the process at once
with one line (nothing is written before then); after, each SIGINT is
noted as well as raised, and ``preemption.NotedSignals.raise_noted`` raises
one whose exception was lost. This module imports nothing that imports jax.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

_noted = False


def note() -> None:
  """Ctrl-C ends the process at once (exit status 130) until
  :func:`started`; main thread, where Python's default handler is set (an
  ignored SIGINT, as a ``&`` job's, stays ignored)."""
  if (threading.current_thread() is threading.main_thread()
      and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
    signal.signal(signal.SIGINT, _exit_now)


def started() -> None:
  """From now on a Ctrl-C raises ``KeyboardInterrupt`` and is noted (where
  :func:`note` set the handler; elsewhere nothing changes)."""
  if signal.getsignal(signal.SIGINT) is _exit_now:
    signal.signal(signal.SIGINT, _noting)


def _exit_now(signum, frame):  # pylint: disable=unused-argument
  sys.stdout.flush()
  sys.stderr.write("Error: Stopped by Ctrl-C while starting up; nothing was "
                   "written.\n")
  sys.stderr.flush()
  os._exit(128 + signal.SIGINT)   # pylint: disable=protected-access


def _noting(signum, frame):
  global _noted
  _noted = True
  signal.default_int_handler(signum, frame)


def take_noted() -> bool:
  """Whether a SIGINT was noted since the last call (and forgets it)."""
  global _noted
  noted, _noted = _noted, False
  return noted
