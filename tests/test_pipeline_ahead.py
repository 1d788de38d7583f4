"""core.overlap: sends kept ``depth`` ahead of their reads, in order."""

import pytest

from genvis_jax.core import overlap


def _recorded(events, fail_send=None, fail_finish=None):
  """A send that records ("send", i), whose finish records ("finish", i)
  and gives 10 * i; each raises on the item named."""
  def send(i):
    events.append(("send", i))
    if i == fail_send:
      raise RuntimeError(f"send {i}")

    def finish():
      events.append(("finish", i))
      if i == fail_finish:
        raise RuntimeError(f"finish {i}")
      return 10 * i
    return finish
  return send


def _run(items, depth, **fail):
  """``ahead`` over ``items``: its events, each result recorded as it is
  yielded (("got", result))."""
  events = []
  for r in overlap.ahead(items, _recorded(events, **fail), depth):
    events.append(("got", r))
  return events


def test_depth_one_reads_each_item_after_sending_the_next():
  assert _run(range(3), 1) == [
      ("send", 0), ("send", 1), ("finish", 0), ("got", 0),
      ("send", 2), ("finish", 1), ("got", 10),
      ("finish", 2), ("got", 20)]
  assert _run([7], 1) == [("send", 7), ("finish", 7), ("got", 70)]


def test_deeper_pipelines_keep_depth_sends_waiting():
  assert _run(range(5), 3) == [
      ("send", 0), ("send", 1), ("send", 2), ("send", 3),
      ("finish", 0), ("got", 0), ("send", 4), ("finish", 1), ("got", 10),
      ("finish", 2), ("got", 20), ("finish", 3), ("got", 30),
      ("finish", 4), ("got", 40)]
  # Fewer items than the depth: all are sent, then read in order.
  assert _run(range(2), 4) == [("send", 0), ("send", 1), ("finish", 0),
                               ("got", 0), ("finish", 1), ("got", 10)]
  # Depth 0 (or below): each finished as soon as it is sent.
  for depth in (0, -1):
    assert _run(range(2), depth) == [("send", 0), ("finish", 0), ("got", 0),
                                     ("send", 1), ("finish", 1), ("got", 10)]


def test_items_are_taken_only_as_results_are_asked_for():
  taken = []

  def items():
    for i in range(4):
      taken.append(i)
      yield i
  got = overlap.ahead(items(), lambda i: lambda: i)
  assert taken == []                       # nothing before the first result
  assert next(got) == 0 and taken == [0, 1]
  assert list(got) == [1, 2, 3] and taken == [0, 1, 2, 3]


def test_no_items_no_calls():
  assert _run([], 1) == []
  assert _run(iter(()), 3) == []


@pytest.mark.parametrize("depth", [1, 2])
def test_an_error_in_send_stops_before_the_items_in_flight_are_read(depth):
  events = []
  with pytest.raises(RuntimeError, match="send 2"):
    for r in overlap.ahead(range(5), _recorded(events, fail_send=2), depth):
      events.append(("got", r))
  # Depth 1 read item 0 before sending item 2; depth 2 had read none.
  reads = {1: [("finish", 0), ("got", 0)], 2: []}[depth]
  assert events[-1] == ("send", 2)
  assert [e for e in events if e[0] != "send"] == reads


def test_an_error_in_finish_propagates_when_that_item_is_read():
  events = []
  got = overlap.ahead(range(4), _recorded(events, fail_finish=1))
  assert next(got) == 0
  with pytest.raises(RuntimeError, match="finish 1"):
    next(got)
  assert events == [("send", 0), ("send", 1), ("finish", 0), ("send", 2),
                    ("finish", 1)]
  # The last item's finish fails on the drain after the items ran out.
  with pytest.raises(RuntimeError, match="finish 2"):
    _run(range(3), 2, fail_finish=2)


def test_in_flight_push_and_drain():
  """The push form (a caller that sends one at a time): ``push`` returns the
  results it finished, oldest first; ``drain`` the rest."""
  events = []
  send = _recorded(events)
  sent = overlap.InFlight(depth=2)
  assert [sent.push(send(i)) for i in range(4)] == [[], [], [0], [10]]
  assert len(sent) == 2
  assert sent.drain() == [20, 30] and len(sent) == 0
  assert sent.drain() == []
  with pytest.raises(IndexError):
    sent.pop()
  assert events == [("send", 0), ("send", 1), ("send", 2), ("finish", 0),
                    ("send", 3), ("finish", 1), ("finish", 2), ("finish", 3)]
