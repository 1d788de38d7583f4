"""``config.mode == "sample"``: class-conditional samples -> PNG grid + ADM ``.npz``.

Generator weights come from ``config.init_from`` (converted checkpoint, a
training workdir's newest readable step, pinned for the run, or one named
``<run>/checkpoints/<step>``), the tokenizer from ``config.tokenizer.{model, checkpoint}``. The tokenizer
decodes in ``config.tokenizer.dtype`` (default float32, whatever dtype its
model config trains in) and the images become uint8 with the tokenizer's
official sampler conversion (``config.tokenizer.uint8``, default per model:
``images.DEFAULT_UINT8``), on the host. Images are drawn in
global batches sharded over every device. Each finished batch is saved as a part
file named by its first index, so an interrupted run resumes where it stopped
with no duplicated or missing indices; the parts are assembled into
``samples.npz`` (``arr_0`` uint8 (N, H, W, 3), ``labels``) at the end.
``sample_parts/settings.json`` records what the parts were drawn with; a re-run
with other settings (weights, model, sampler) is refused instead of mixing
(``genvis_jax.sample.parts``). The sampler it draws with (also a notebook's)
is ``genvis_jax.sample.sampler.make_sample_fn``.
"""

from __future__ import annotations

import functools
import time

import jax
from jax.experimental import multihost_utils
import numpy as np
from absl import logging

from genvis_jax import errors
from genvis_jax.core import dtypes
from genvis_jax.core import files
from genvis_jax.core import multihost
from genvis_jax.core import preemption
from genvis_jax.core import sharding
from genvis_jax.core import weights as weights_lib
from genvis_jax.models import inference
from genvis_jax.sample import common
from genvis_jax.sample import images as images_lib
from genvis_jax.sample import labels as labels_lib
from genvis_jax.sample import parts
from genvis_jax.sample import sampler as sampler_lib
from genvis_jax.sample import trained_with


class SamplingStopped(errors.CleanStop):
  """A stop signal ended sampling after writing the batch in flight."""


PROGRESS_EVERY_S = 30.0   # at most one progress line this often (and the last)


@dtypes.at_matmul_precision(inference=True)
def sample_and_save(config, workdir: str) -> dict:
  """``mode=sample``: draws ``config.sample.num_samples`` images of the
  generator ``config.init_from`` decoded by ``config.tokenizer``, in global
  batches of ``config.sample.batch_size`` split over every device.

  Args:
    config: the run's config (``config.model`` names the generator and its
      sampler ``genvis_jax/sample/<name>.py``; ``config.sample`` the
      sampler's settings, labels, seed and batch size).
    workdir: where the run writes (local or gs://).
  Writes ``<workdir>/sample_parts/``: one part file per finished batch
  (``<start>.npz``: uint8 images (n, H, W, 3), int32 labels (n,)) and
  ``settings.json``; a re-run resumes from the parts. At the end (process 0)
  ``<workdir>/samples.npz`` (ADM layout: ``arr_0`` uint8 (N, H, W, 3),
  ``labels``) and ``samples.png``.
  Returns ``parts.assemble``'s dict: the ``npz`` and ``png`` paths and
  ``num_samples``.
  Raises:
    ConfigError: a count < 1, a negative seed, a batch size that is not a
      multiple of the device count, an unsupported ``config.sample.dtype``,
      settings the sampler refuses (its ``check_settings``: guidance,
      temperature, ...) or bad ``config.sample.classes`` / ``labels``
      (before anything loads).
    trained_with.TrainedWithError: the weights trained / converted with other
      model (or ``RUN_KEYS``) settings than the config samples with, or a
      generator run's samples decoded by other tokenizer weights than it
      trained on.
    inference.CodebookSizeError: the generator draws more codes than its
      tokenizer decodes (``check_codes_fit``, before the weights load).
    parts.SampleSettingsError: parts in ``workdir`` drawn with other
      settings, or the checkpoint changed while it loaded.
    sampler.NonFiniteSamplesError: a batch holds NaN / Inf (nothing of it
      written).
    SamplingStopped: a stop signal, after writing the batch in flight.
  """
  # A signal in the start-up (loading, compiling) whose exception was lost
  # stops before the first batch (preemption.NotedSignals).
  with preemption.NotedSignals() as noted:
    return _sample_and_save(config, workdir, noted)


def check_config(config, workdir: str | None = None, *,
                 codes: bool = True) -> np.ndarray:
  """What ``sample_and_save`` refuses before reading any file: counts,
  seed, dtypes, the sampler's settings, image size, the uint8 conversion, a
  batch the devices do not divide, the classes drawn and, with ``codes``, a
  generator drawing codes its tokenizer lacks (``sample_and_save`` checks
  that once the run's record has named a generator trained otherwise: the
  more useful message). A runner of several jobs (the demo) calls it for
  each before the first starts. Returns the labels to draw
  (``labels.class_labels``: (num_samples,) int32). Raises ``ConfigError``,
  ``inference.CodebookSizeError``, ``pixels.Uint8MethodError``."""
  del workdir   # nothing of it is read here
  s = config.sample
  if s.num_samples < 1:
    raise errors.ConfigError(f"config.sample.num_samples={s.num_samples}: "
                             "set how many images to draw (at least 1).")
  if int(s.batch_size) < 1:
    raise errors.ConfigError(f"config.sample.batch_size={s.batch_size} must "
                             "be at least 1.")
  # jax keys keep the low 32 bits (x64 off): seed 2**32 drew seed 0's images
  # under another record; NumPy's label draw refuses a negative one.
  if not 0 <= int(s.get("seed", 0)) < 2**32:
    raise errors.ConfigError(
        f"config.sample.seed={s.seed} must be in [0, 2**32): a larger seed "
        "draws the images of its low 32 bits.")
  common.check_dtype(common.config_dtype(s))   # before the weights load
  common.check_configured(sampler_lib.sampler_module(config.model.name), s)
  common.check_image_size(config)
  if codes:
    inference.check_codes_fit(config)
  inference.data_model_config(config.tokenizer)   # its decode dtype
  images_lib.uint8_method(config.tokenizer)
  if s.batch_size % jax.device_count():
    raise errors.ConfigError(
        f"config.sample.batch_size={s.batch_size} must be a multiple of the "
        f"{jax.device_count()} devices; set --config.sample.batch_size to one "
        "(a workdir's parts resume only at the batch size they were drawn "
        f"with: resume those of batch {s.batch_size} on a device count that "
        "divides it, or draw into a new workdir).")
  return labels_lib.class_labels(
      s.num_samples, config.model.num_classes, s.get("classes", ()),
      s.get("labels", "balanced"), s.seed)


def _sample_and_save(config, workdir: str, noted) -> dict:
  s = config.sample
  mesh = sharding.data_mesh(jax.devices())
  labels_all = check_config(config, codes=False)   # make_sample_fn's
  multihost.on_process_0(
      lambda: trained_with.warn_untrained_classes(config, labels_all))
  # Load exactly the steps recorded: a run's newest step is pinned to its
  # folder (no fallback to an older one), and the record is checked again
  # after loading (a step re-committed in place meanwhile).
  pinned = trained_with.pin_weights(config)
  module = sampler_lib.sampler_module(config.model.name)
  trained_with.check_trained_with(config, pinned,
                                  getattr(module, "RUN_KEYS", {}))
  settings = parts.sample_settings(config, pinned)
  # Before the (collective) loads: a process with other flags would fail or
  # load something else there while the others wait for it.
  multihost.check_agree(settings, "sampling settings")
  recorded = {k: settings[k] for k in trained_with.WEIGHTS}
  sample_fn, batch_sharding = sampler_lib.make_sample_fn(pinned, mesh)
  if trained_with.pinned_sources(pinned) != recorded:
    raise parts.SampleSettingsError(
        f"The checkpoint changed while it was loaded ({config.init_from}, "
        f"{config.tokenizer.get('checkpoint', '')}); run again.")
  # After loading: a tokenizer of another shape is named by the loader first
  # (no allow_model_changes hint for weights that cannot decode these codes).
  trained_with.check_tokenizer_origin(config, pinned.init_from,
                               recorded["weights.tokenizer"])
  parts_dir = parts.directory(workdir)
  files.makedirs(parts_dir)
  parts.check_settings(parts_dir, settings)
  multihost.on_process_0(lambda: [files.remove_stale_temporaries(d)
                                  for d in (workdir, parts_dir)])
  files.remove_stale_transfers()   # each host's own TMPDIR
  multihost.console(
      f"[sample] generator: {config.init_from} "
      f"({weights_lib.readable(settings['weights.generator'])}); tokenizer: "
      f"{config.tokenizer.get('checkpoint', '')} "
      f"({weights_lib.readable(settings['weights.tokenizer'])})")
  key = jax.random.key(s.get("seed", 0))
  starts = range(0, s.num_samples, s.batch_size)
  # Process 0 writes the parts: its view counts (the others read none).
  done = (parts.complete_parts(parts_dir, s.num_samples, s.batch_size)
          if jax.process_index() == 0 else set())
  if jax.process_count() > 1:
    mask = np.array([start in done for start in starts])
    mask = np.asarray(multihost_utils.broadcast_one_to_all(mask))
    done = {start for start, m in zip(starts, mask) if m}
  if done:
    have = sum(min(s.batch_size, s.num_samples - d) for d in done)
    multihost.console(f"[sample] resuming: {have} of {s.num_samples} images "
                      f"already in {parts_dir}")
  if len(done) < len(starts):
    parts.drop_earlier_outputs(workdir, s.num_samples)
  t0, made = time.perf_counter(), 0
  written, said_at = 0, -float("inf")

  def gather(finish, start, n):
    """Waits for a dispatched batch: its n images on every process's host."""
    try:
      images = finish()
    except sampler_lib.NonFiniteSamplesError as e:
      raise sampler_lib.NonFiniteSamplesError(
          f"{e} Nothing of the batch of images {start}..{start + n - 1} was "
          f"written; the parts before it are in {parts_dir}.") from None
    return np.asarray(multihost_utils.process_allgather(
        images, tiled=True))[:n]

  def write(images, start, labels):
    """Writes a batch's part (process 0); stops when asked."""
    nonlocal made, written, said_at
    written += 1
    n = len(labels)
    try:
      multihost.write_on_process_0(
          parts.path(parts_dir, start),
          functools.partial(np.savez, images=images, labels=labels))
    except OSError as e:   # a full disk, a read-only or vanished folder
      raise errors.OutputWriteError(
          f"Writing the part of images {start}..{start + n - 1} in "
          f"{parts_dir} failed ({errors.write_cause(e)}); the parts written "
          "before it are kept there. Free space (or fix the folder) and run "
          "the same command to resume from them.") from e
    made += n
    now = time.perf_counter()
    if now - said_at >= PROGRESS_EVERY_S or start + n >= s.num_samples:
      said_at, rate = now, made / (now - t0)
      logging.info("sampled %d / %d (%.2f images/s)", start + n,
                   s.num_samples, rate)
      multihost.console(f"[sample] {start + n}/{s.num_samples} images, "
                        f"{rate:.2f} images/s")
    if stop.should_stop(written) and start + n < s.num_samples:
      raise SamplingStopped(
          f"Sampling stopped by {stop.signal} after the batch of images "
          f"{start}..{start + n - 1}; the parts drawn so far are in "
          f"{parts_dir}. Run the same command to resume from them.",
          stop.signum)

  # The devices draw each batch while the one before it is written. Across
  # processes the gather (and process 0's write agreement) are programs of
  # the devices too, which would queue behind the next batch and write each
  # part only once that batch is drawn: there a batch is gathered before the
  # next is dispatched, and written while it is drawn.
  gather_first = gathers_on_devices()
  # SIGTERM / Ctrl-C: finish and write the batch in flight, then stop (the
  # next one, already dispatched, is dropped and drawn again on resume).
  with preemption.StopRequest("writing the batch of samples in flight",
                              "without writing the batch in flight") as stop:
    noted.raise_noted()
    pending = None   # (images(): host images, start, labels) of the last batch
    for start in starts:
      if start in done:
        continue
      labels = labels_all[start:start + s.batch_size]
      padded = np.resize(labels, s.batch_size)        # pad the last batch
      if pending is not None and gather_first:
        images = pending[0]()
        pending = (lambda images=images: images, *pending[1:])
      # The key depends only on the batch's first index: resumes draw the same.
      finish = sample_fn.dispatch(
          labels_lib.global_labels(padded, batch_sharding),
          jax.random.fold_in(key, start))
      if pending is not None:
        write(pending[0](), *pending[1:])
      pending = (functools.partial(gather, finish, start, len(labels)), start,
                 labels)
    if pending is not None:
      write(pending[0](), *pending[1:])
  return parts.assemble(workdir, s.num_samples)   # the others wait for it


def gathers_on_devices() -> bool:
  """Whether gathering a batch's images onto the host (and agreeing on its
  write) runs programs on the devices: with more than one process."""
  return jax.process_count() > 1
