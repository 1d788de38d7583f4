"""What a mode's last line says to run next, as a plain config's flags:
inside the demo, whose stages run one another's next steps (and whose
flags are ``--config.stages.<stage>.*``), nothing."""

from __future__ import annotations

import contextlib
import contextvars

_QUIET = contextvars.ContextVar("genvis_next_step_quiet", default=False)


def next_step(text: str) -> str:
  """``text`` (e.g. "; sample with --config.mode=sample ..."), or "" while
  ``quiet()`` holds."""
  return "" if _QUIET.get() else text


@contextlib.contextmanager
def quiet():
  """No ``next_step`` text inside (the demo runs its stages in it)."""
  token = _QUIET.set(True)
  try:
    yield
  finally:
    _QUIET.reset(token)
