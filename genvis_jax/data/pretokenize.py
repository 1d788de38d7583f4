"""``config.mode == "pretokenize"``: encode an image data set into token files.

Writes ArrayRecord files of (class, tokens) records (format: ``data/tokens.py``)
that generator configs read with ``config.data.source = "tokens"``. Each process
encodes its own shard of the split on its local devices and writes
``<output>-<process:05d>-of-<count:05d>.array_record``; nothing crosses hosts.

With ``ten_crop`` (the official RAR / LlamaGen recipe) every image gives 10
records, its ten crops, else 2, its centre crop and mirror image
(``data/ten_crop.py``).

The tokenizer runs in ``config.tokenizer.dtype`` (default float32, the official
models' precision) whatever compute dtype its model config trains with, so the
token files hold the codes the official fp32 model would write.

A file is written under a temporary name and renamed when complete, with a
``<file>.json`` beside it recording what decided its records; a re-run reuses
an output written with the same settings and refuses to replace one written
otherwise unless ``config.pretokenize.overwrite`` (``data/token_output.py``).

Config: ``config.tokenizer.{model, checkpoint, dtype}`` (the pixel range is
the model's, ``models.value_range``) and ``config.pretokenize.{data, split,
output, ten_crop, batch_size, device_batch, overwrite}``.
"""

from __future__ import annotations

import functools
import json
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from etils import epath

from genvis_jax import errors
from genvis_jax import models
from genvis_jax.core import dtypes
from genvis_jax.core import files
from genvis_jax.core import hints
from genvis_jax.core import multihost
from genvis_jax.core import padded
from genvis_jax.core import sharding
from genvis_jax.core import weights as weights_lib
from genvis_jax.data import pipeline
from genvis_jax.data import pretokenize_checks as checks
from genvis_jax.data import sources
from genvis_jax.data import ten_crop
from genvis_jax.data import token_output
from genvis_jax.data import tokens as tokens_lib
from genvis_jax.data import transforms
from genvis_jax.models import inference


def image_batches(p, value_range, process_index=None, process_count=None):
  """The centre-cropped image batches of ``p.split`` (one pass, in order):
  ``(iterator, info)`` of ``pipeline.create_dataset``."""
  return pipeline.create_dataset(
      ten_crop.crop_data_config(p), split=p.split,
      global_batch_size=p.batch_size * (process_count or jax.process_count()),
      seed=0, train=False, value_range=value_range, drop_remainder=False,
      process_index=process_index, process_count=process_count,
      setting="config.pretokenize.data",
      batch_setting="config.pretokenize.batch_size (images per process)")


def flatten_codes(codes) -> jax.Array:
  """Tokenizer codes -> records: (B, h, w) -> (B, h*w); a tuple of k maps
  (factorized tokenizers) -> (B, k, h*w)."""
  if isinstance(codes, (tuple, list)):
    return jnp.stack([c.reshape(c.shape[0], -1) for c in codes], axis=1)
  return codes.reshape(codes.shape[0], -1)


def make_encoder(model, params, mesh):
  """Jitted images -> flat codes, batch split over ``mesh``'s devices."""
  mesh = sharding.auto_axes(mesh)
  batch_sh = sharding.batch_sharding(mesh)

  # The weights are an argument, not a closed-over constant: a constant is
  # copied into the lowered program (seconds of lowering per 100 MB).
  @jax.jit
  def encode(params, images):
    images = jax.lax.with_sharding_constraint(images, batch_sh)
    return flatten_codes(model.apply({"params": params}, images, method="encode"))
  return functools.partial(encode, params)


def abstract_encoder(tok):
  """Images -> flat codes of the tokenizer ``config.tokenizer`` (``tok``) on
  zero weights of its shapes: for ``jax.eval_shape`` only (inside a trace
  the weights are never allocated), before its checkpoint is read."""
  model_cfg = inference.data_model_config(tok)
  model = models.build(model_cfg)
  shapes = models.param_shapes(model_cfg)

  def encode(images):
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    return flatten_codes(model.apply({"params": params}, images,
                                     method="encode"))
  return encode


def tokenizer_size(tok) -> int | None:
  """The one image size the tokenizer ``config.tokenizer`` takes, or None
  where it encodes any (a multiple of its downsampling factor)."""
  model = models.build(inference.data_model_config(tok))
  return getattr(model, "image_size", None)


def encode_in_chunks(encode, images: np.ndarray, chunk: int) -> np.ndarray:
  """``encode`` over ``images`` (N, ...) in calls of exactly ``chunk`` images
  (the last one zero-padded; the encoders treat images independently, so the
  padding changes no code), so one compiled program serves every batch and a
  device never encodes more than its share of ``chunk`` at once: a batch of
  256 images is 2,560 ten-crop images, far more activation memory than one
  call fits. Chunks are dispatched ahead of reading codes back, so uploads
  and copies overlap the encoding."""
  return padded.map_padded(lambda _, x: encode(x), None, images, chunk)


def _reused(path: str, done: dict, settings: dict, pattern: str) -> dict:
  print(f"[pretokenize] reusing {path} ({done['records']} records, written "
        f"with these settings, tokenizer "
        f"{weights_lib.readable(settings['weights'])})"
        + hints.next_step(f"; train with --config.data.path='{pattern}'"),
        flush=True)
  return {"files": [path], "records": done["records"], "pattern": pattern}


def output_prefix(config, workdir: str) -> str:
  """Where the token files go: ``config.pretokenize.output``, by default
  ``<workdir>/tokens/<split>`` (files ``<prefix>-<i>-of-<n>.array_record``)."""
  p = config.pretokenize
  # A TFDS slice ("train[:50%]") would be a glob's character class in the
  # training pattern: file names keep letters, digits and . _ + - only.
  return p.output or os.path.join(workdir, "tokens",
                                  re.sub(r"[^\w.+-]", "_", p.split))


def check_config(config, workdir: str) -> str:
  """What ``pretokenize`` refuses before reading any file: a config with
  no pre-tokenizing stage, a source of no images, a crop the images cannot
  take, a generator whose positions the tokenizer's codes do not fit
  (shapes only), a remote output. A runner of several jobs (the demo)
  calls it for each before the first starts. Returns the output prefix
  (``output_prefix``). Raises ``ConfigError``."""
  if "pretokenize" not in config:
    raise errors.ConfigError(
        "This config has no pretokenize stage (config.pretokenize): its "
        "generator reads images, or the config is not a generator's. "
        "Pre-tokenize with a RAR or FAR config.")
  p, tok = config.pretokenize, config.tokenizer
  sources.check_source(p.data.source, "config.pretokenize.data",
                       "pre-tokenizing encodes images")
  checks.check_images_in_data(config)
  # A bad crop is refused before an existing file is judged by its record.
  transforms.check_center_crop(
      p.data.get("center_crop", "") or "adm", p.data.image_size,
      p.data.get("image_width", 0), "config.pretokenize.data.center_crop")
  # Before an existing output is reused or any weights load (shapes only).
  checks.check_tokens_fit(config.get("model") or {}, abstract_encoder(tok),
                          p.data.image_size, tokenizer_size(tok))
  output = output_prefix(config, workdir)
  if files.is_remote(output):   # refused now, not after the whole split is encoded
    raise errors.ConfigError(
        f"Pre-tokenizing writes local files, and its output {output!r} is "
        f"remote ({'--config.pretokenize.output' if p.output else 'the workdir'}"
        "). Set --config.pretokenize.output to a local path (e.g. "
        "/tmp/tokens/train on each worker), then copy the files with their "
        ".json records to the bucket (README).")
  return output


@dtypes.at_matmul_precision(inference=True)
def pretokenize(config, workdir: str) -> dict:
  """Encodes ``config.pretokenize.split``; returns {"files", "records", "pattern"}."""
  output = check_config(config, workdir)
  p, tok = config.pretokenize, config.tokenizer
  path = tokens_lib.shard_path(output, jax.process_index(), jax.process_count())
  pattern = f"{output}-*-of-{jax.process_count():05d}.array_record"
  if jax.process_index() == 0:
    token_output.warn_other_sets(output)
  token_output.remove_stale_partials(output)   # each machine's own disk
  # The tokenizer run's newest step, pinned: the step recorded is the one read.
  checkpoint = weights_lib.resolve_all([tok.checkpoint])[0]
  if jax.process_index() == 0:
    checks.warn_other_trained_size(checkpoint, p.data)
  # Each process reads its data and checks its own shard; all agree before
  # the collective load, so a process that fails here (no data, a shard
  # written otherwise) or reuses its shard leaves none waiting there.
  settings, done, refused = None, None, None
  try:
    settings = token_output.output_settings(config, checkpoint)
    count = settings["examples"]["count"]
    if count < jax.process_count():   # every process refuses, none writes
      raise sources.DataConfigError(
          f"Split {p.split!r} of config.pretokenize.data has {count} "
          f"examples, fewer than the {jax.process_count()} processes: some "
          "would write empty shards. Pre-tokenize on fewer processes.")
    done = token_output.existing_output(path, settings, p.get("overwrite", False))
    if done is not None and token_output.lacks_remainder(done, settings):
      logging.warning("%s was written by an older version that left out this "
                      "process's share of the split's last %d examples; "
                      "writing it again.", path,
                      settings["examples"]["count"] % jax.process_count())
      done = None
  except Exception as e:  # pylint: disable=broad-except
    refused = e           # raised below, after the others have heard of it
  states = multihost.gather_or_raise(
      0 if done else 1, refused, f"failed to start their shards of {output} "
      "(their logs say why); this process wrote nothing.")
  multihost.check_agree(settings, "pre-tokenizing settings (flags, data, "
                        "tokenizer weights)")
  if done is not None and (states == 0).all():
    return _reused(path, done, settings, pattern)
  value_range = models.value_range(tok.model, config, ("tokenizer",))
  mesh = sharding.data_mesh(jax.local_devices())
  model_cfg = inference.data_model_config(tok)
  model = models.build(model_cfg)
  params = models.load_params(
      model_cfg, checkpoint, mesh, setting="--config.tokenizer.checkpoint")
  if done is not None:   # loaded with the others; this shard stays as it is
    write = lambda: _reused(path, done, settings, pattern)
  else:
    write = lambda: _write_shard(config, path, pattern, settings,
                                 make_encoder(model, params, mesh), value_range)
  # Every process waits here for the slowest shard: one that left first would
  # wait at jax.distributed's shutdown barrier, which gives up after 5 minutes
  # and stops the processes still encoding, leaving a .partial file.
  return multihost.run_everywhere(
      write, f"failed to write their shards of {output} (their logs say why).")


def _write_shard(config, path: str, pattern: str, settings: dict, encode,
                 value_range) -> dict:
  """Encodes this process's share of ``config.pretokenize``'s split into the
  token file ``path`` and its ``.json`` record."""
  p = config.pretokenize
  size = p.data.image_size
  it, info = image_batches(p, value_range)
  chunk = jax.local_device_count() * int(p.get("device_batch", 32))
  t0, n_images, max_label = time.perf_counter(), 0, -1
  # A file being replaced (overwrite) and its record stay whole until the new
  # one is written and hashed: a run stopped before leaves the old pair,
  # still consistent (its record names its tokenizer), never the old file
  # without its record. Just before the rename the new record is written
  # whole as <file>.json.partial and the old one goes, so no record is ever
  # beside another file's tokens; a run killed between the rename and the
  # record's leaves the pending record, which the same command completes
  # (token_output.existing_output) instead of refusing the file.
  record = epath.Path(path + ".json")
  pending = epath.Path(token_output.pending_record(path))

  def skipped() -> int:
    # One pass: every record of the shard is an image or a skipped file.
    # The iterator's count is the last batch's state, without files read
    # after it (where the images fill whole batches).
    return max(info.num_skipped, info.num_examples_per_process - n_images)

  def before_replace():
    pending.write_text(json.dumps(
        {"settings": settings, "records": writer.count, "images": n_images,
         "remainder_kept": True, "sha256": writer.sha256,
         "max_label": int(max_label), "skipped_files": skipped()},
        indent=1, sort_keys=True))
    record.unlink(missing_ok=True)

  with tokens_lib.TokenWriter(path, before_replace=before_replace) as writer:
    for batch in it:
      images, labels = ten_crop.model_inputs(np.asarray(batch["image"]),
                                    np.asarray(batch["label"]), size, p.ten_crop)
      n = len(images)
      codes = encode_in_chunks(encode, images, chunk)
      writer.write_batch(labels, codes)
      n_images += len(batch["label"])
      max_label = max(max_label, int(np.max(labels)))
      # Labels of a source that states no class count (TFDS integer labels)
      # are checked here, not by the generator's first run on the tokens.
      if max_label >= p.data.num_classes:
        raise sources.DataConfigError(
            f"config.pretokenize.data holds label {max_label}, not below its "
            f"num_classes={p.data.num_classes}: labels would overflow the "
            "class embedding. Set --config.pretokenize.data.num_classes and "
            "the generator's --config.data.num_classes / --config.model."
            f"num_classes to at least {max_label + 1}; nothing was written.")
      if writer.count % (50 * n) < n:
        rate = n_images / (time.perf_counter() - t0)
        logging.info("pretokenize: %d / %d images (%.1f img/s)", n_images,
                     info.num_examples_per_process, rate)
  # The record holds the file's hash, so a later run reuses it only if no
  # byte changed, and its largest label, checked against the classes of the
  # model it trains.
  pending.replace(record)
  n_skipped = skipped()
  # Which images: a run that read other data than meant says so here.
  source = p.data.source
  where = {"image_folder": p.data.get("path", ""),
           "tfds": p.data.get("name", "")}.get(source, "")
  msg = (f"wrote {writer.count} token records ({n_images} images of "
         f"{source}{f' {where!r}' if where else ''}, "
         f"{f'{n_skipped} unreadable files skipped, ' if n_skipped else ''}"
         f"{'ten-crop' if p.ten_crop else 'centre crop + mirror'}) to {path}"
         + hints.next_step(f"; train with --config.data.path='{pattern}'"))
  logging.info(msg)
  print(f"[pretokenize] {msg}", flush=True)
  return {"files": [path], "records": writer.count, "pattern": pattern}
