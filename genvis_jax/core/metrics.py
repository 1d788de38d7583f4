"""Metric writers (clu: TensorBoard + log), progress with steps/s and ETA, image grids."""

from __future__ import annotations

import contextlib
import logging as py_logging
import math
import os
import time

import jax
from absl import logging
from jax.experimental import multihost_utils
import numpy as np
from PIL import Image

from genvis_jax import errors
from genvis_jax.core import files
from genvis_jax.core import multihost


def mark_start(workdir, step: int) -> None:
  """Marks in ``workdir``'s TensorBoard files that a run starts after
  ``step`` (process 0): a ``SessionLog.START`` event at ``step + 1``.
  TensorBoard takes a run's first such event as its start and each later
  one as a restart, dropping the points of steps >= its step read before: a
  run resumed from an earlier checkpoint redoes those steps, and their
  curves doubled back. Its own event file; on a resume (``step`` > 0) the
  next whole second comes before the writer's file is made, so the files
  (named by whole seconds) are read in this order."""
  if jax.process_index() != 0:
    return
  _warn_of_later_event_files(workdir)
  # pylint: disable=import-outside-toplevel
  from tensorboard.compat.proto import event_pb2
  from tensorboard.summary.writer.event_file_writer import EventFileWriter
  writer = EventFileWriter(os.fspath(workdir))
  writer.add_event(event_pb2.Event(
      step=step + 1, wall_time=time.time(),
      session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
  writer.close()
  if step:   # into the next whole second
    time.sleep(max(0.0, math.floor(time.time()) + 1.001 - time.time()))


def _warn_of_later_event_files(workdir) -> None:
  """Warns when ``workdir`` holds event files named after now: this clock
  is behind the one that wrote them, and TensorBoard, which reads a run's
  files in name order (whole seconds), would take this run's points first
  and drop them at the older run's restart marks."""
  newest = 0
  try:
    for name in os.listdir(os.fspath(workdir)):
      parts = name.split(".")
      if name.startswith("events.out.tfevents.") and parts[3].isdigit():
        newest = max(newest, int(parts[3]))
  except OSError:   # not there yet (a new run), or remote: nothing to compare
    return
  now = time.time()
  if newest > now:
    logging.warning(
        "TensorBoard event files in %s are named by a later time (%s) than "
        "this machine's clock (%s): TensorBoard would show this run's points "
        "before theirs and hide them. Set the clock right (NTP), or log this "
        "run to a new --workdir (--config.init_from=<this run> keeps the "
        "weights).", workdir, time.strftime("%Y-%m-%d %H:%M:%S",
                                            time.gmtime(newest)),
        time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(now)))


class _WriteErrors:
  """A clu metric writer whose failures to write (a full disk, a read-only
  folder: clu's asynchronous writer raises them at a later call as an
  ``AsyncError``) raise ``errors.OutputWriteError`` naming the folder and
  the system's error, not a traceback through clu's threads."""

  def __init__(self, writer, workdir):
    self._writer, self._workdir = writer, workdir

  def __getattr__(self, name):
    attr = getattr(self._writer, name)
    if not callable(attr):
      return attr

    def call(*args, **kwargs):
      try:
        return attr(*args, **kwargs)
      except Exception as e:  # pylint: disable=broad-exception-caught
        # TensorFlow's summary writer raises its own errors (an OpError
        # saying "No space left on device") for what is an OSError here.
        system = next((c for c in errors.causes(e) if isinstance(c, OSError)
                       or type(c).__module__.startswith("tensorflow")), None)
        if system is None:
          raise
        raise errors.OutputWriteError(
            f"Writing the training metrics (TensorBoard event files) under "
            f"{self._workdir} failed: {errors.first_line(system)}. Free "
            "space there (or make it writable) and run the same command "
            "again, or use another --workdir.") from system
    return call


class _ProducerTraceback(py_logging.Filter):
  """Drops clu's "Error in producer thread" record of a failed write."""

  def filter(self, record):
    return not (record.pathname.endswith(os.path.join("clu", "asynclib.py"))
                and str(record.msg).startswith("Error in producer thread"))


def create_writer(workdir: str):
  """TensorBoard + console on process 0; console-only elsewhere (clu's
  default writer, asynchronous). Hyperparameters go to TensorBoard only: in
  the log they were the whole config on one line of several KB, which
  ``--verbose`` logs readably. A failed write raises
  ``errors.OutputWriteError`` (``_WriteErrors``)."""
  # clu (and the TensorFlow it imports) only where a writer is made, so the
  # grid / uint8 helpers import on machines without TensorFlow.
  from clu import metric_writers  # pylint: disable=import-outside-toplevel

  class ConsoleWriter(metric_writers.LoggingWriter):

    def write_hparams(self, hparams):
      del hparams

  # The asynchronous writer logs a failed write's traceback from its
  # thread before the next call raises it (as _WriteErrors' one error).
  absl_logger = logging.get_absl_logger()
  if not any(isinstance(f, _ProducerTraceback) for f in absl_logger.filters):
    absl_logger.addFilter(_ProducerTraceback())
  writers = [ConsoleWriter()]
  if jax.process_index() == 0:
    writers.append(metric_writers.SummaryWriter(os.fspath(workdir)))
  return _WriteErrors(metric_writers.AsyncMultiWriter(writers), workdir)


class Progress:
  """Steps/s over the last interval and ETA to ``num_steps``.

  ``restart(step)`` starts the interval afresh, e.g. once the run's first
  step (its compilation) is done, so the first ETA is not inflated by it;
  ``exclude(seconds)`` / ``off_the_clock()`` leave out work that is not
  training (the sample grids, whose first draw compiles the sampler; the
  checkpoint saves). An interval without a
  step (a log at the compiled first step) gives no rate."""

  def __init__(self, start_step: int, num_steps: int):
    self.num_steps = num_steps
    self.restart(start_step)

  def restart(self, step: int) -> float:
    """Starts the interval at ``step`` now; returns seconds since the last."""
    t = time.perf_counter()
    since = t - getattr(self, "_t0", t)
    self._t0, self._s0 = t, step
    return since

  def exclude(self, seconds: float) -> None:
    """Leaves ``seconds`` just spent on other work out of the interval."""
    self._t0 += seconds

  @contextlib.contextmanager
  def off_the_clock(self, in_flight=None):
    """Leaves the work inside out of the interval, once ``in_flight`` (the
    step being computed: training time) is done."""
    jax.block_until_ready(in_flight)
    t = time.perf_counter()
    yield
    self.exclude(time.perf_counter() - t)

  def __call__(self, step: int) -> dict[str, float]:
    """``steps_per_sec`` / ``eta_sec`` over the interval up to ``step``
    (then restarted there); {} when the interval holds no step."""
    if step == self._s0:
      return {}
    t = time.perf_counter()
    rate = (step - self._s0) / max(t - self._t0, 1e-9)
    self._t0, self._s0 = t, step
    eta = (self.num_steps - step) / rate if rate > 0 else float("inf")
    return {"steps_per_sec": rate, "eta_sec": eta}


def format_eta(seconds: float) -> str:
  if not np.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h:d}:{m:02d}:{s:02d}"


def make_grid(images: np.ndarray, ncols: int | None = None, pad: int = 2) -> np.ndarray:
  """(N, H, W, 3) uint8 -> one (rows*(H+pad)+pad, cols*(W+pad)+pad, 3)
  uint8 grid on white, ``cols = ncols`` (default ceil(sqrt(N)))."""
  images = np.asarray(images)
  n, h, w, c = images.shape
  ncols = ncols or int(np.ceil(np.sqrt(n)))
  nrows = int(np.ceil(n / ncols))
  grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
  for i, img in enumerate(images):
    r, col = divmod(i, ncols)
    y, x = pad + r * (h + pad), pad + col * (w + pad)
    grid[y:y + h, x:x + w] = img
  return grid


def host_array(x) -> np.ndarray:
  """``x`` on the host, whole: a jax.Array spread over several processes'
  devices (a grid drawn under the training mesh) is gathered first, which
  every process must then call."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def save_png(path: str, image: np.ndarray) -> None:
  """Writes ``image`` (H, W, 3) uint8 as a PNG at ``path`` (local or
  ``gs://``), whole or not at all; creates the folder."""
  files.write_whole(path, Image.fromarray(np.asarray(image)).save)


def write_images(writer, workdir: str, step: int, images: dict[str, np.ndarray],
                 ncols: int | None = None) -> list[str]:
  """Writes each (N, H, W, 3) uint8 batch as a PNG grid and a TensorBoard
  image. Every process calls it; process 0 writes the PNGs, and a failed
  write stops every process with its message (``multihost.on_process_0``)."""
  grids = {name: make_grid(batch, ncols)[None]
           for name, batch in images.items()}
  paths = [os.path.join(workdir, "images", f"{name}_{step:07d}.png")
           for name in grids]

  def save():
    for path, grid in zip(paths, grids.values()):
      save_png(path, grid[0])
  multihost.on_process_0(save)
  writer.write_images(step, grids)
  return paths if jax.process_index() == 0 else []
