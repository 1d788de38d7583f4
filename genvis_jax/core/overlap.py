"""Send ahead, read behind: work i + 1 goes to the devices before work i is
read back, so the devices never wait for the host.

A send is a callable that starts the work and returns ``finish``, a callable
that waits for it and gives its result. ``ahead`` runs sends over an iterable;
``InFlight`` holds them where the caller sends one at a time.
"""

from __future__ import annotations

import collections
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class InFlight:
  """The finishers of sends not read back yet, oldest first.

  ``push`` keeps at most ``depth`` of them waiting (``depth <= 0``: none, each
  finished at once): at most ``depth + 1`` sends are unfinished at a time.
  """

  def __init__(self, depth: int = 1):
    self.depth = max(depth, 0)
    self._sent = collections.deque()

  def __len__(self) -> int:
    return len(self._sent)

  def push(self, finish: Callable[[], R]) -> list[R]:
    """Adds a send's ``finish``, then finishes the oldest while more than
    ``depth`` wait: their results, oldest first (empty while filling up)."""
    self._sent.append(finish)
    return [self.pop() for _ in range(len(self._sent) - self.depth)]

  def pop(self) -> R:
    """Finishes the oldest send: its ``finish()``, which is dropped whether it
    returns or raises. Raises ``IndexError`` when none is waiting."""
    return self._sent.popleft()()

  def drain(self) -> list[R]:
    """Finishes every waiting send, oldest first: their results."""
    return [self.pop() for _ in range(len(self._sent))]


def ahead(items: Iterable[T], send: Callable[[T], Callable[[], R]],
          depth: int = 1) -> Iterator[R]:
  """``finish()`` of ``send(item)`` for each of ``items``, in order, each
  finished once ``depth`` later items are sent (or the items ran out).

  With ``depth=1`` the calls go send(0), send(1), finish(0), send(2),
  finish(1), ..., finish(last), each result yielded once finished; the next
  item is taken from ``items`` only when the caller asks for the next result.
  What a result needs of its item (the batch itself, say), ``finish`` returns.
  Nothing is sent before the first result is asked for; no items, no calls.
  Errors of ``items``, ``send`` and ``finish`` propagate as they are raised
  (the sends still in flight are then never finished).
  """
  in_flight = InFlight(depth)
  for item in items:
    yield from in_flight.push(send(item))
  while in_flight:
    yield in_flight.pop()
