"""``config.mode == "pretokenize"``: encode an image data set into token files.

Writes ArrayRecord files of (class, tokens) records (format: ``data/tokens.py``)
that generator configs read with ``config.data.source = "tokens"``. Each process
encodes its own shard of the split on its local devices and writes
``<output>-<process:05d>-of-<count:05d>.array_record``; nothing crosses hosts.

With ``ten_crop`` (the official RAR / LlamaGen recipe) every image goes
through ADM's ``center_crop_arr`` at ``int(1.1 * size)`` (281 for 256, 563 for
512), then torchvision ``TenCrop(size)``: the 4 corner + centre crops, then the
same five cut from the mirrored image: 10 records per image. The official
scripts (RAR ``scripts/pretokenization.py``, LlamaGen / FQGAN
``extract_codes_c2i.py``) write exactly these crops. Without it, each image's
``center_crop_arr`` and its mirror image: 2 records per image, as RAR's
script writes (token training cannot flip afterwards).

The tokenizer runs in ``config.tokenizer.dtype`` (default float32, the official
models' precision) whatever compute dtype its model config trains with, so the
token files hold the codes the official fp32 model would write.

A file is written under a temporary name and renamed when complete, with a
``<file>.json`` beside it recording what decided its records (tokenizer
model and weights, data and the files the split holds, split, crops). A
re-run whose output exists reuses it when those match, and otherwise stops
(``OutputExistsError``) unless ``config.pretokenize.overwrite``: token files a
generator trained on are not replaced by another tokenizer's codes, or left
stale after images were added, without being asked.

Config: ``config.tokenizer.{model, checkpoint, value_range, dtype}`` and
``config.pretokenize.{data, split, output, ten_crop, batch_size, device_batch,
overwrite}``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from etils import epath

from genvis_jax import errors
from genvis_jax import models
from genvis_jax.core import settings as settings_lib
from genvis_jax.core import multihost
from genvis_jax.core import sharding
from genvis_jax.core import weights as weights_lib
from genvis_jax.data import pipeline
from genvis_jax.data import sources
from genvis_jax.data import tokens as tokens_lib
from genvis_jax.data import transforms
from genvis_jax.models import inference


def ten_crop_cover(size: int) -> int:
  """Side of the centre crop the ten crops are cut from: ``int(size * 1.1)``
  (truncated, as the official scripts' ``int(args.image_size * crop_range)``)."""
  return int(size * 1.1)


def _five_crop(images: np.ndarray, size: int) -> list[np.ndarray]:
  """torchvision ``five_crop`` on (B, H, W, C): tl, tr, bl, br, centre.

  The centre offset is torchvision ``center_crop``'s
  ``int(round((H - size) / 2.0))`` (Python rounds halves to even: 563 -> 512
  starts at 26, not ADM's floor 25)."""
  _, h, w, _ = images.shape
  top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
  boxes = [(0, 0), (0, w - size), (h - size, 0), (h - size, w - size),
           (top, left)]
  return [images[:, y:y + size, x:x + size] for y, x in boxes]


def ten_crop(images: np.ndarray, size: int) -> np.ndarray:
  """torchvision ``TenCrop(size)`` on a batch.

  Args:
    images: (B, H, W, C), any dtype, H and W >= size.
    size: crop side.
  Returns:
    (B, 10, size, size, C): ``five_crop`` (tl, tr, bl, br, centre) of the
    images, then ``five_crop`` of the horizontally flipped images (so crop 5
    is the mirrored top-right corner, not the mirrored top-left).
  Raises:
    ValueError if the images are smaller than ``size``.
  """
  _, h, w, _ = images.shape
  if h < size or w < size:
    raise ValueError(f"ten_crop needs images of at least {size}px, got {h}x{w}.")
  crops = _five_crop(images, size) + _five_crop(images[:, :, ::-1], size)
  return np.stack(crops, axis=1)


def crop_data_config(p) -> ml_collections.ConfigDict:
  """``config.pretokenize.data`` with the centre-crop size the pipeline cuts:
  ``ten_crop_cover(size)`` with ten-crop, else ``size``."""
  data_cfg = ml_collections.ConfigDict(p.data.to_dict())
  if p.ten_crop:
    data_cfg.image_size = ten_crop_cover(p.data.image_size)
  return data_cfg


def image_batches(p, value_range, process_index=None, process_count=None):
  """The centre-cropped image batches of ``p.split`` (one pass, in order):
  ``(iterator, info)`` of ``pipeline.create_dataset``."""
  return pipeline.create_dataset(
      crop_data_config(p), split=p.split,
      global_batch_size=p.batch_size * (process_count or jax.process_count()),
      seed=0, train=False, value_range=value_range, drop_remainder=False,
      process_index=process_index, process_count=process_count,
      setting="config.pretokenize.data")


def model_inputs(images: np.ndarray, labels: np.ndarray, size: int,
                 ten_crop_: bool):
  """A pipeline batch -> what the tokenizer encodes.

  (B, S, S, C) images and (B,) labels -> with ``ten_crop_`` (B*10, size, size,
  C) and (B*10,) (an image's 10 crops are consecutive), else (2B, ...): the
  batch, then its mirror images (RAR's ``torch.cat([x, x.flip(-1)])``)."""
  if not ten_crop_:
    return (np.concatenate([images, images[:, :, ::-1]]),
            np.concatenate([labels, labels]))
  crops = ten_crop(images, size)
  return crops.reshape(-1, size, size, images.shape[-1]), np.repeat(labels, 10)


def flatten_codes(codes) -> jax.Array:
  """Tokenizer codes -> records: (B, h, w) -> (B, h*w); a tuple of k maps
  (factorized tokenizers) -> (B, k, h*w)."""
  if isinstance(codes, (tuple, list)):
    return jnp.stack([c.reshape(c.shape[0], -1) for c in codes], axis=1)
  return codes.reshape(codes.shape[0], -1)


def make_encoder(model, params, mesh):
  """Jitted images -> flat codes, batch split over ``mesh``'s devices."""
  batch_sh = sharding.batch_sharding(mesh)

  # The weights are an argument, not a closed-over constant: a constant is
  # copied into the lowered program (seconds of lowering per 100 MB).
  @jax.jit
  def encode(params, images):
    images = jax.lax.with_sharding_constraint(images, batch_sh)
    return flatten_codes(model.apply({"params": params}, images, method="encode"))
  return functools.partial(encode, params)


def check_tokens_fit(generator, encode, size: int) -> None:
  """Refuses, before encoding anything, images of ``size`` px whose codes
  (``encode``'s shape, traced only) are not as many per image as the
  generator that trains on them reads (``generator.seq_len``, or a FAR
  ``grid`` squared): training would stop at its first batch instead.

  Raises:
    ConfigError: naming ``config.pretokenize.data.image_size`` and the size
      that fits, where there is one.
  """
  want = int(generator.get("seq_len", 0) or generator.get("grid", 0) ** 2)
  if not want:
    return
  got = jax.eval_shape(
      encode, jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)).shape[-1]
  if got == want:
    return
  fits = round(size * math.sqrt(want / got))   # tokens grow with the area
  hint = (f"--config.pretokenize.data.image_size={fits}"
          if fits * fits * got == want * size * size else
          "the image size this tokenizer encodes for this generator")
  raise errors.ConfigError(
      f"config.pretokenize.data.image_size={size} gives {got} tokens per "
      f"image with this tokenizer, but the generator (config.model) reads "
      f"{want}: pass {hint}, or a generator config of {got} tokens.")


def _pad_to(x: np.ndarray, multiple: int) -> np.ndarray:
  pad = (-len(x)) % multiple
  return x if not pad else np.concatenate([x, np.repeat(x[-1:], pad, 0)])


def encode_in_chunks(encode, images: np.ndarray, chunk: int) -> np.ndarray:
  """``encode`` over ``images`` (N, ...) in calls of exactly ``chunk`` images
  (the last one padded), so one compiled program serves every batch and a
  device never holds more than its share of ``chunk``: a batch of 256 images
  is 2,560 ten-crop images, far more activation memory than one call fits."""
  out = [np.asarray(encode(_pad_to(images[i:i + chunk], chunk)))
         [:len(images[i:i + chunk])] for i in range(0, len(images), chunk)]
  return np.concatenate(out)


# Data settings that change how fast records are read, not which.
_READER_KEYS = ("read_threads", "num_workers", "prefetch")
# Data settings added after token files were written -> the values that
# mean what those files were made with: left out of the record at those
# values, so the older files' records still match.
_ADDED_DEFAULTS = {"center_crop": ("", "adm"), "exif_transpose": (True,),
                   "random_crop_method": ("adm",)}


def output_settings(config, checkpoint: str | None = None) -> dict:
  """What decides the records of a token file (JSON-normalised);
  ``checkpoint`` (default ``config.tokenizer.checkpoint``) holds the weights."""
  p, tok = config.pretokenize, config.tokenizer
  # EXIF orientation changes only image-folder decodes (files written before
  # the setting applied it: True); TFDS and demo records leave it out.
  data = {k: v for k, v in p.data.to_dict().items() if k not in _READER_KEYS
          and v not in _ADDED_DEFAULTS.get(k, ())
          and (k != "exif_transpose" or p.data.source == "image_folder")}
  keep = {"tokenizer": inference.data_model_config(tok).to_dict(),
          "weights": weights_lib.params_source(
              tok.checkpoint if checkpoint is None else checkpoint),
          "data": data, "split": p.split, "ten_crop": p.ten_crop,
          # Centre-crop files hold mirror images too (written since then).
          **({} if p.ten_crop else {"mirrored": True}),
          "examples": source_fingerprint(p)}
  return json.loads(json.dumps(keep, sort_keys=True, default=str))


def source_fingerprint(p) -> dict:
  """What the split holds: its size and, for an image folder, a digest of
  its files' paths (relative to the split) and labels, so a file written
  before images were added, removed or renamed is not reused. Files
  edited in place keep the digest."""
  src, _, _ = pipeline.make_source(crop_data_config(p), p.split,
                                   "config.pretokenize.data")
  out = {"count": len(src)}
  if isinstance(src, sources.ImageFolderSource):
    digest, cut = hashlib.sha256(), len(os.path.join(src.root, ""))
    for path, label in zip(src.paths, src.labels):   # 1.28M paths: ~1 s
      digest.update(f"{path[cut:]}\t{label}\n".encode())
    out["files_sha256"] = digest.hexdigest()
  return out


def _reads_as_recorded(path: str, record: dict) -> bool:
  """The file holds the record's count of records and, where the record
  has one (writers since ``sha256``), the bytes it hashed."""
  try:
    if tokens_lib.count_records(path) != record.get("records"):
      return False
  except tokens_lib.TokenFileError:
    return False
  want = record.get("sha256")
  return want is None or want == tokens_lib.file_sha256(path)


def existing_output(path: str, settings: dict, overwrite: bool) -> dict | None:
  """The record of a complete, readable token file at ``path`` written with
  ``settings`` (to reuse), else None (write it): always None with
  ``overwrite``. Raises ``OutputExistsError`` for a file written otherwise,
  or one that no longer reads as its record says (damaged since)."""
  if not epath.Path(path).exists() or overwrite:
    return None
  record = epath.Path(path + ".json")
  try:
    old = json.loads(record.read_text()) if record.exists() else None
  except ValueError:   # a damaged record is no record
    old = None
  before = (old or {}).get("settings") or {}
  if old is not None and "examples" not in before and {
      **settings, "examples": None} == {**before, "examples": None}:
    # Written before records held the split's fingerprint: reuse, and say so.
    logging.warning("%s records no fingerprint of its split (an older "
                    "writer); reusing it as its other settings match. Pass "
                    "--config.pretokenize.overwrite=True if images were added "
                    "or removed since.", path)
    before = settings
  if old is not None and before == settings:
    if _reads_as_recorded(path, old):
      return old
    why = (f"with these settings, but they no longer read as its record "
           f"says ({old.get('records')} records"
           f"{', SHA-256 ' + old['sha256'][:12] if old.get('sha256') else ''}"
           f"): damaged since")
  elif old is None:
    why = "with no record of their settings"
  else:
    diff = settings_lib.differences(before, settings)
    why = f"with other settings ({settings_lib.shorten(diff, 5)})"
  raise errors.OutputExistsError(weights_lib.readable(
      f"{path} already holds token records written {why}. Pass "
      "--config.pretokenize.overwrite=True to replace them, or write "
      "elsewhere (another --workdir or --config.pretokenize.output)."))


def _lacks_remainder(record: dict, settings: dict) -> bool:
  """Whether the shard of ``record`` misses an example this process reads:
  writers before ``remainder_kept`` gave every process ``n // count``
  examples, dropping the last ``n % count``, one from each of processes
  0 .. n % count - 1."""
  n, count = settings["examples"]["count"], jax.process_count()
  return not record.get("remainder_kept") and jax.process_index() < n % count


def _reused(path: str, done: dict, settings: dict, pattern: str) -> dict:
  print(f"[pretokenize] reusing {path} ({done['records']} records, written "
        f"with these settings, tokenizer "
        f"{weights_lib.readable(settings['weights'])}); train with "
        f"--config.data.path='{pattern}'", flush=True)
  return {"files": [path], "records": done["records"], "pattern": pattern}


def warn_other_sets(output: str) -> None:
  """Warns when ``output``'s folder holds token files of the same split
  written by another number of processes: a training glob matching both sets
  is refused (``tokens.check_shard_sets``), the pattern this run prints is
  not."""
  count = jax.process_count()
  try:
    names = [os.path.basename(f) for f in
             tokens_lib.glob_files(f"{output}-*-of-*.array_record")]
  except Exception as e:  # pylint: disable=broad-except
    # Advisory: a listing error must not stop this process alone (the others
    # would wait for it); the writes below meet the storage anyway.
    logging.warning("Could not list %s-*.array_record to look for token files "
                    "of another process count (%s).", output, e)
    return
  sets = tokens_lib.shard_sets(names).get(os.path.basename(output), {})
  others = {n: len(v) for n, v in sets.items() if n != count}
  if others:
    found = ", ".join(f"{v} file(s) -of-{n:05d}" for n, v in sorted(others.items()))
    logging.warning(
        "%s-*.array_record already holds token files written by another "
        "number of processes (%s); this run writes -of-%05d. Train with the "
        "pattern it prints (a glob matching both sets is refused), or delete "
        "the older files.", output, found, count)


def check_images_in_data(config) -> None:
  """Refuses a ``config.data`` (the generator's training input: token files)
  that names images ``config.pretokenize.data`` does not: pre-tokenizing
  reads the latter, so ``--config.data.*`` flags meant for it would encode
  other images (the demo's, by default) without a word.

  Raises:
    ConfigError: naming both and the flags to use.
  """
  d, p = config.data, config.pretokenize.data
  if d.get("source", "tokens") == "tokens" or (
      (d.source, d.get("path", "")) == (p.source, p.get("path", ""))):
    return
  raise errors.ConfigError(
      f"config.data names images (source {d.source!r}, path "
      f"{d.get('path', '')!r}), but pre-tokenizing reads "
      f"config.pretokenize.data (source {p.source!r}, path "
      f"{p.get('path', '')!r}); config.data is the generator's training "
      "input, its token files. To encode those images pass "
      f"--config.pretokenize.data.source={d.source} "
      f"--config.pretokenize.data.path={d.get('path', '')} instead of the "
      "--config.data flags.")


def pretokenize(config, workdir: str) -> dict:
  """Encodes ``config.pretokenize.split``; returns {"files", "records", "pattern"}."""
  if "pretokenize" not in config:
    raise errors.ConfigError(
        "This config has no pretokenize stage (config.pretokenize): its "
        "generator reads images, or the config is not a generator's. "
        "Pre-tokenize with a RAR or FAR config.")
  p, tok = config.pretokenize, config.tokenizer
  check_images_in_data(config)
  # A bad crop is refused before an existing file is judged by its record.
  transforms.check_center_crop(
      p.data.get("center_crop", "") or "adm", p.data.image_size,
      p.data.get("image_width", 0), "config.pretokenize.data.center_crop")
  output = p.output or os.path.join(workdir, "tokens", p.split)
  if "://" in output:   # refused now, not after the whole split is encoded
    raise errors.ConfigError(
        f"Pre-tokenizing writes local files, and its output {output!r} is "
        f"remote ({'--config.pretokenize.output' if p.output else 'the workdir'}"
        "). Set --config.pretokenize.output to a local path (e.g. "
        "/tmp/tokens/train on each worker), then copy the files with their "
        ".json records to the bucket (README).")
  path = tokens_lib.shard_path(output, jax.process_index(), jax.process_count())
  pattern = f"{output}-*-of-{jax.process_count():05d}.array_record"
  if jax.process_index() == 0:
    warn_other_sets(output)
  # The tokenizer run's newest step, pinned: the step recorded is the one read.
  checkpoint = weights_lib.resolve_all([tok.checkpoint])[0]
  # Each process reads its data and checks its own shard; all agree before
  # the collective load, so a process that fails here (no data, a shard
  # written otherwise) or reuses its shard leaves none waiting there.
  settings, done, refused = None, None, None
  try:
    settings = output_settings(config, checkpoint)
    count = settings["examples"]["count"]
    if count < jax.process_count():   # every process refuses, none writes
      raise sources.DataConfigError(
          f"Split {p.split!r} of config.pretokenize.data has {count} "
          f"examples, fewer than the {jax.process_count()} processes: some "
          "would write empty shards. Pre-tokenize on fewer processes.")
    done = existing_output(path, settings, p.get("overwrite", False))
    if done is not None and _lacks_remainder(done, settings):
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
  size = p.data.image_size
  value_range = models.value_range(tok.model, config, ("tokenizer",))
  mesh = sharding.data_mesh(jax.local_devices())
  model_cfg = inference.data_model_config(tok)
  model = models.build(model_cfg)
  params = models.load_params(
      model_cfg, checkpoint, mesh, setting="--config.tokenizer.checkpoint")
  if done is not None:   # loaded with the others; this shard stays as it is
    return _reused(path, done, settings, pattern)
  encode = make_encoder(model, params, mesh)
  check_tokens_fit(config.get("model") or {}, encode, size)
  it, info = image_batches(p, value_range)
  chunk = jax.local_device_count() * int(p.get("device_batch", 32))
  t0, n_images, max_label = time.perf_counter(), 0, -1
  # The record goes first: a file replaced (overwrite) is never left beside
  # the record of the one it replaced.
  epath.Path(path + ".json").unlink(missing_ok=True)
  with tokens_lib.TokenWriter(path) as writer:
    for batch in it:
      images, labels = model_inputs(np.asarray(batch["image"]),
                                    np.asarray(batch["label"]), size, p.ten_crop)
      n = len(images)
      codes = encode_in_chunks(encode, images, chunk)
      writer.write_batch(labels, codes)
      n_images += len(batch["label"])
      max_label = max(max_label, int(np.max(labels)))
      if writer.count % (50 * n) < n:
        rate = n_images / (time.perf_counter() - t0)
        logging.info("pretokenize: %d / %d images (%.1f img/s)", n_images,
                     info.num_examples_per_process, rate)
  # The file's hash, so a later run reuses it only if no byte changed; its
  # largest label, checked against the classes of the model it trains.
  skipped = info.num_skipped
  epath.Path(path + ".json").write_text(json.dumps(
      {"settings": settings, "records": writer.count, "images": n_images,
       "remainder_kept": True, "sha256": writer.sha256,
       "max_label": int(max_label), "skipped_files": skipped},
      indent=1, sort_keys=True))
  # Which images: a run that read other data than meant says so here.
  source = p.data.source
  where = {"image_folder": p.data.get("path", ""),
           "tfds": p.data.get("name", "")}.get(source, "")
  msg = (f"wrote {writer.count} token records ({n_images} images of "
         f"{source}{f' {where!r}' if where else ''}, "
         f"{f'{skipped} unreadable files skipped, ' if skipped else ''}"
         f"{'ten-crop' if p.ten_crop else 'centre crop + mirror'}) to {path}; "
         f"train with --config.data.path='{pattern}'")
  logging.info(msg)
  print(f"[pretokenize] {msg}", flush=True)
  return {"files": [path], "records": writer.count, "pattern": pattern}
