"""The one exception type for user errors (bad flags, config, data, checkpoints).

``python -m genvis_jax.main`` prints a ``UserError`` as one message without a
traceback and exits non-zero; anything else is a bug and keeps its traceback.
Library errors that a user causes and can fix subclass it (often together with
the builtin type callers already catch, e.g. ``class X(UserError, ValueError)``).
"""

import pickle
import signal


def first_line(e: BaseException, limit: int = 300) -> str:
  """``"ExcType: <first line of its message>"`` (at most ``limit``
  characters of it), for one-line reasons in logs and messages."""
  text = str(e).strip().splitlines()
  text = text[0] if text else ""
  return f"{type(e).__name__}: {text[:limit]}"


def causes(e: BaseException | None, limit: int = 10):
  """``e``, then the exceptions it was raised from or during (``__cause__``,
  else ``__context__``), at most ``limit`` in all: where a library wrapped
  the error that says what happened."""
  for _ in range(limit):
    if e is None:
      return
    yield e
    e = e.__cause__ or e.__context__


def out_of_memory(e: BaseException, chain: bool = False) -> bool:
  """An XLA allocation failure (``RESOURCE_EXHAUSTED``), raised as jax's
  runtime error; with ``chain`` also one that ``e`` was raised from (a
  library that wraps it)."""
  return any(type(x).__name__ in ("JaxRuntimeError", "XlaRuntimeError")
             and "RESOURCE_EXHAUSTED" in str(x)
             for x in (causes(e) if chain else (e,)))


class UserError(Exception):
  """An error the user can fix; its message names the problem and the fix."""


class ConfigError(UserError, ValueError):
  """A config value or command-line argument that cannot work as given (e.g. a
  batch that does not split across the devices, a missing ``--src``); the
  message names the field and a working value."""


class OutputExistsError(UserError, FileExistsError):
  """An output path already holds data that would be replaced."""


class OutputWriteError(UserError, OSError):
  """An output could not be written (a full disk, a read-only or vanished
  folder); an ``OSError`` still, so callers that add what was kept catch it
  (``write_cause`` gives the system's own error to name)."""


def write_cause(e: BaseException) -> str:
  """The first line of the system error behind a failed write ``e`` (the
  ``OSError`` an ``OutputWriteError`` was raised from, else ``e``)."""
  if isinstance(e, OutputWriteError) and e.__cause__ is not None:
    e = e.__cause__
  return first_line(e)


# Weight files (``genvis_jax.convert``): read without torch, so the messages
# name the path, the format seen and what to do instead.


class UnsafeCheckpointError(UserError, pickle.UnpicklingError):
  """A pickle asked for a global outside the allow-list (it could run code)."""


class CheckpointFileError(UserError, ValueError):
  """A weight file is truncated, damaged or of an unknown format.

  The message names the path, the format seen and the size (``looks
  truncated: SEEN of EXPECTED bytes`` where the file states its full size).
  """

  @classmethod
  def truncated(cls, path: str, fmt: str, seen: int,
                expected: int | None = None, at_least: bool = False,
                detail: str = "") -> "CheckpointFileError":
    """The error for a file that ends early; ``expected`` None: size unknown."""
    if expected is None:
      size = f"{seen} bytes"
    else:
      size = f"{seen} of {'at least ' if at_least else ''}{expected} bytes"
    return cls(
        f"{path}: {fmt} file looks truncated: {size}{detail}. The download or "
        "copy was probably interrupted; fetch the file again (compare its "
        "size or checksum with the source).")


class CheckpointFileNotFoundError(UserError, FileNotFoundError):
  """The weight file named on the command line does not exist."""


class WeightKeyError(UserError, KeyError):
  """``--key`` names an entry the checkpoint does not have."""

  def __str__(self):   # the message as written (KeyError's str quotes it)
    return str(self.args[0]) if self.args else ""


# What running the same command again does after an unsaved stop, by mode.
RESUMES = {
    "train": "training resumes from its last saved checkpoint",
    "demo": "the demo reuses its finished stages; training resumes from its "
            "last saved checkpoint",
    "sample": "sampling resumes after its last written batch",
    "pretokenize": "pre-tokenizing encodes again what it had not finished; "
                   "complete token files are reused",
    "evaluate": "evaluation starts over",
}


def stopped_message(signum: int, mode: str | None = None,
                    resume: str = "", what: str = "") -> str:
  """What a run stopped at once by signal ``signum`` says (SIGINT: Ctrl-C);
  ``mode``: the ``config.mode`` stopped (None: unknown, every mode's);
  ``resume``: what running it again does, where the run knows (e.g. the
  step training resumes from), instead of the mode's general words;
  ``what``: when it stopped and what it kept, where the run knows (e.g.
  "before the first training step: ..."), instead of the general words."""
  by = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
  resume = resume or RESUMES.get(mode) or (
      "training resumes from its last saved checkpoint, sampling after its "
      "last written batch")
  what = (f" {what}" if what else
          ". Nothing half-written is kept under its final name")
  return f"Stopped by {by}{what}; run the same command again ({resume})."


class CleanStop(UserError, RuntimeError):
  """A stop signal ended a run after saving its work in flight (training's
  checkpoint, sampling's batch); the same command resumes. The command line
  exits with ``exit_code``, 128 + the signal's number, as a shell reports a
  run the signal ended (143 for SIGTERM, 130 for Ctrl-C)."""

  def __init__(self, message: str, signum: int = signal.SIGTERM):
    super().__init__(message)
    self.exit_code = 128 + int(signum)


class StoppedBySignal(BaseException):
  """SIGTERM on one process outside a clean stop (pre-tokenizing,
  evaluation, and training or sampling while they start up): unwinds like
  KeyboardInterrupt (not an ``Exception``), and the CLI exits with 128 + the
  signal's number after one line."""

  def __init__(self, signum: int):
    super().__init__(signum)
    self.signum = signum
    self.mode: str | None = None   # set by the mode runner (messages)
    # Set where the run knows better (``stopped_message``'s ``what`` and
    # ``resume``), e.g. by training before its first step; also read from a
    # KeyboardInterrupt.
    self.what, self.resume = "", ""
