"""Tokenizer evaluation: reconstructions next to originals, PSNR, SSIM, codebook
usage (per sub-codebook for factorized tokenizers), and optionally LPIPS
(``config.evaluate.lpips_path``) and rFID (``config.evaluate.inception``), over
exactly ``config.evaluate.num_images`` images at any batch size, with the
tokenizer in ``config.evaluate.dtype`` (float32 by default).

Each tokenizer is measured the way its official code measures it
(``protocols.PROTOCOLS``, chosen by ``config.model.name`` or
``config.evaluate.protocol``).
"""

from __future__ import annotations

import functools
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from genvis_jax import data as data_lib
from genvis_jax import errors
from genvis_jax import models
from genvis_jax.convert import inception as convert_inception
from genvis_jax.convert import lpips as convert_lpips
from genvis_jax.core import metrics as metrics_lib
from genvis_jax.core import multihost
from genvis_jax.core import overlap
from genvis_jax.core import pixels
from genvis_jax.core import sharding
from genvis_jax.core import weights as weights_lib
from genvis_jax.evaluate import batching
from genvis_jax.evaluate import report
from genvis_jax.evaluate import fid as fid_lib
from genvis_jax.evaluate import generation
from genvis_jax.evaluate import image_metrics
from genvis_jax.evaluate import inception as inception_lib
from genvis_jax.evaluate import protocols
from genvis_jax.data import sources as data_sources
from genvis_jax.models import inference
from genvis_jax.models import lpips as lpips_lib


def _on_own_rows(fn, mesh, replicated: int, batched: int):
  """jit of ``fn(*replicated args, *batched args)`` -> (B,) per-image values,
  in which each device of ``mesh`` runs ``fn`` on its own rows of the batch
  (split as the roundtrip splits them) and keeps its values. Nothing crosses
  devices: LPIPS concatenates its two images along the batch, which left to
  the partitioner would move images between devices."""
  rows, whole = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  shardings = (whole,) * replicated + (rows,) * batched
  mapped = jax.shard_map(fn, mesh=mesh, in_specs=tuple(s.spec for s in shardings),
                         out_specs=rows.spec)
  jitted = jax.jit(mapped, in_shardings=shardings, out_shardings=rows)
  # Host arrays go to the devices first: on several processes jit refuses
  # numpy inputs for a sharded argument (each process holds the whole batch
  # and evaluates on its own devices). Device arrays already there stay.
  return lambda *args: jitted(*jax.device_put(args, shardings))


def _lpips_fn(lpips_path: str, value_range, mesh):
  """(B, H, W, 3) pair on ``mesh`` -> (B,) LPIPS (VGG, local weights) there,
  not read back. The weights go to the devices once."""
  params = jax.device_put(convert_lpips.load_lpips_params(lpips_path),
                          sharding.replicated(mesh))
  fn = _on_own_rows(lambda p, a, b: lpips_lib.lpips_distance(
      p, a, b, value_range=value_range), mesh, 1, 2)
  return functools.partial(fn, params)


def _rfid_extractor(inception_path: str, batch_size: int, preprocess: str):
  params = convert_inception.load_inception_params(inception_path)
  return inception_lib.InceptionExtractor(params, batch_size=batch_size,
                                          preprocess=preprocess)


class _Scores:
  """The host half of the metrics, fed one batch at a time in order.

  ``add`` reads a batch's reconstruction and codes back (the caller has
  dispatched the next batch by then), makes the protocol's bytes and [0, 1]
  images on the host (numpy, one operation at a time as the official code),
  sums PSNR / MSE in float64 and sends SSIM to the devices; the per-image
  SSIM and LPIPS arrays stay there until ``sums``.
  """

  def __init__(self, proto: protocols.Protocol, value_range, ssim_fn, extractor):
    self.proto, self.value_range = proto, value_range
    self.ssim_fn, self.extractor = ssim_fn, extractor
    self.to_bytes = functools.partial(pixels.to_uint8, value_range=value_range,
                                      method=proto.to_uint8)
    self.psnr = self.sq = 0.0
    self.on_device = []   # (mask, SSIM (B,), LPIPS (B,) or None) per batch
    self.counts, self.discrete, self.codes = None, True, None
    self.rstats = [fid_lib.StreamingStats(), fid_lib.StreamingStats()]
    self.iscore = (fid_lib.StreamingInceptionScore(*proto.inception_score)
                   if extractor is not None and proto.inception_score
                   else None)
    # Inception features of the batch sent last, folded into rstats once the
    # next batch is sent (the last one's by ``sums``).
    self._features = overlap.InFlight(depth=1)
    self.grid_x, self.grid_y = [], []
    self.pixels = 0   # values per image

  def add(self, images, mask, k, rec, codes, lpips) -> None:
    """images (B, H, W, 3) host batch, ``k`` valid rows (``mask``); rec, codes
    and lpips the devices' results for it."""
    rec = np.asarray(rec)
    x_bytes, y_bytes = self.to_bytes(images[:k]), self.to_bytes(rec[:k])
    # PSNR / SSIM / MSE on [0, 1] images: the float reconstruction or its bytes.
    x01 = pixels.as_unit(images, self.value_range)
    y01 = pixels.as_unit(y_bytes if self.proto.scored == "bytes" else rec[:k],
                   self.value_range)
    # One float64 squared error serves PSNR and MSE.
    sq = np.square(x01[:k].astype(np.float64) - y01)
    self.psnr += float(np.sum(image_metrics.mse_and_psnr(sq)[1],
                              dtype=np.float64))
    self.sq += float(np.sum(sq))
    del sq
    y01 = np.concatenate([y01, x01[k:]])   # the padding rows are masked out
    self.on_device.append((mask, self.ssim_fn(x01, y01), lpips))
    self.pixels = int(np.prod(images.shape[1:]))
    self.codes = codes
    maps = codes if isinstance(codes, (tuple, list)) else (codes,)
    # Usage of discrete codes only (continuous latents have no codebook).
    self.discrete = self.discrete and all(
        jnp.issubdtype(m.dtype, jnp.integer) for m in maps)
    if self.discrete:
      self.counts = image_metrics.add_counts(self.counts, image_metrics
                                             .code_counts([np.asarray(m)[:k]
                                                           for m in maps]))
    if self.extractor is not None:
      # The Inception runs on this batch while the last one's features are
      # folded into the float64 statistics.
      sent = [inception_lib.dispatch(self.extractor, v)
              for v in (x_bytes, y_bytes)]
      self._features.push(functools.partial(self._fold, sent))
    if sum(len(g) for g in self.grid_x) < 32:
      self.grid_x.append(x_bytes)
      self.grid_y.append(y_bytes)

  def _fold(self, sent) -> None:
    """Adds one batch's (real, reconstruction) Inception features to
    ``rstats`` (and the reconstructions' logits to ``iscore``), reading them
    back through their finishers ``sent``."""
    real, rec = (finish() for finish in sent)
    self.rstats[0].update(real["pool"])
    self.rstats[1].update(rec["pool"])
    if self.iscore is not None:
      self.iscore.update(rec["logits"])

  def sums(self) -> dict:
    """{"psnr", "ssim", "sq", "lpips"}: float64 sums over the valid images,
    batch by batch in order (LPIPS 0.0 without it). Called once, after the
    last ``add``: it folds that batch's Inception features, so ``rstats``
    is complete after it."""
    self._features.drain()
    masks, ssim, lpips = zip(*self.on_device)
    ssim, lpips = jax.device_get((ssim, lpips))
    total = lambda arrays: sum(
        (float(np.sum(a[m], dtype=np.float64)) for a, m in zip(arrays, masks)),
        0.0)
    return dict(psnr=self.psnr, ssim=total(ssim), sq=self.sq,
                lpips=0.0 if lpips[0] is None else total(lpips))


class _Plan(NamedTuple):
  """What ``evaluate`` runs with, from the config alone."""
  protocol_name: str
  protocol: protocols.Protocol
  value_range: tuple[float, float]
  model_config: Any       # config.model in config.evaluate.dtype
  batch_size: int
  preprocess: str         # the rFID resize
  data: Any               # config.data with the protocol's centre crop


def _plan(config) -> _Plan:
  """Raises ``ConfigError`` / ``DataConfigError`` as ``evaluate`` says."""
  ev = config.evaluate
  data_sources.check_source(
      config.data.source, "config.data",
      "config.evaluate.kind=tokenizer reconstructs images")
  proto_name, proto = protocols.protocol(config)
  value_range = models.value_range(config.model, config, ("data",))
  model_config = inference.with_compute_dtype(
      config.model, ev.get("dtype", "float32"), "config.evaluate.dtype")
  batch_size = batching.check_batch_size(ev.batch_size)
  return _Plan(proto_name, proto, value_range, model_config, batch_size,
               protocols.rfid_preprocess(ev, proto),
               protocols.eval_data(config, proto_name, proto))


def check_config(config, workdir: str | None = None) -> None:
  """What ``evaluate`` refuses before reading any file (a source of no
  images, no protocol, a dtype, batch size, preprocess or crop it does not
  take), for a runner of several jobs (the demo) checking each before the
  first starts."""
  del workdir
  _plan(config)


def evaluate(config, workdir: str) -> dict:
  """Encodes/decodes exactly ``config.evaluate.num_images`` eval images (0 =
  the whole split) in batches of ``config.evaluate.batch_size`` (any size:
  rounded up to a multiple of this process's devices, over which each batch
  is split; the padding is masked out of every metric); writes
  ``reconstructions.png`` (original | reconstruction pairs) and metrics JSON.

  The tokenizer computes in ``config.evaluate.dtype`` (default "float32"; ""
  keeps ``config.model.dtype``), so bf16-trained models report fp32 numbers.
  Optional ``config.evaluate`` fields: ``lpips_path`` (LPIPS .npz) adds
  "lpips" (of the float reconstructions); ``inception`` (FID Inception
  weights) adds "rfid"; ``protocol`` ("" = the tokenizer's own, see
  ``protocols.PROTOCOLS``) decides the bytes, resize and pixel metrics, and
  ``preprocess`` ("auto" = the protocol's) overrides its Inception resize,
  ``config.data.center_crop`` ("" = the protocol's) its crop.
  Metrics are streamed (nothing of size num_images x image is kept). Each
  batch is sent to the devices before the previous one is read back; its
  LPIPS and SSIM run there on each device's own rows, kept until the end.

  Returns (and writes to ``workdir/metrics.json``) {"psnr" (dB), "ssim",
  "mse" (in the tokenizer's value range), "num_images", "dtype", "protocol",
  "center_crop", "scored"}, plus "codebook_usage" / "codes_used" /
  "codebook_entropy" (discrete codes, ``image_metrics.codebook_stats``),
  "lpips", "rfid" / "rfid_preprocess" and, where the protocol has one,
  "inception_score" of the reconstructions when enabled.

  Raises ``batching.NotEnoughImages`` when the split has fewer images than
  ``num_images`` (or none readable), ``errors.ConfigError`` for a tokenizer
  with no known protocol, a batch size <= 0, an unknown preprocess or
  centre crop; ``DataConfigError`` for a ``config.data.source`` that gives
  no images.
  """
  ev = config.evaluate
  (proto_name, proto, value_range, model_config, batch_size, preprocess,
   data) = _plan(config)
  model = models.build(model_config)
  mesh = sharding.data_mesh(jax.local_devices())
  # The step a run resolves to, pinned: metrics.json names what was scored.
  checkpoint = weights_lib.resolve_all([ev.checkpoint])[0]
  params = models.load_params(model_config, checkpoint, mesh,
                              setting="--config.evaluate.checkpoint")
  rows = -(-batch_size // mesh.size) * mesh.size
  split = config.data.eval_split
  # Every process evaluates the same first N images (process 0 of 1).
  it, info = data_lib.create_dataset(
      data, split=split, global_batch_size=batch_size, seed=0,
      train=False, process_index=0, process_count=1, value_range=value_range,
      drop_remainder=False)
  what = f"split {split!r} of the {config.data.source!r} data"
  setting = "config.evaluate.num_images"
  n = batching.check_count(ev.get("num_images", 0), info.num_examples, what,
                           setting, may_skip=info.may_skip)
  seen = 0   # n, or fewer with "all" (0) where unreadable files are skipped

  rows_sharding = sharding.batch_sharding(mesh)

  @functools.partial(jax.jit, in_shardings=(
      sharding.replicated(mesh), rows_sharding), out_shardings=rows_sharding)
  def roundtrip(p, images):
    codes = model.apply({"params": p}, images, method="encode")
    rec = model.apply({"params": p}, codes, method="decode")
    return rec.astype(jnp.float32), codes

  ssim_fn = _on_own_rows(
      lambda a, b: image_metrics.ssim(a, b, **proto.ssim), mesh, 0, 2)
  lpips_fn = (_lpips_fn(ev.lpips_path, value_range, mesh)
              if ev.get("lpips_path") else None)
  extractor = (_rfid_extractor(ev.inception, rows, preprocess)
               if ev.get("inception") else None)
  scores = _Scores(proto, value_range, ssim_fn, extractor)
  sent = overlap.InFlight(depth=1)   # scored once the next batch is sent
  for images, mask, k in batching.exact_batches(
      it, n, rows, what, setting, key="image",
      up_to=not ev.get("num_images", 0)):
    seen += k
    x = jax.device_put(images, rows_sharding)
    rec, codes = roundtrip(params, x)
    lpips = lpips_fn(x, rec) if lpips_fn is not None else None
    for a in jax.tree.leaves((rec, codes)):   # read back by scores.add
      a.copy_to_host_async()
    sent.push(functools.partial(scores.add, images, mask, k, rec, codes,
                                lpips))
  sent.drain()
  # Said in metrics.json too: a reader of the numbers sees why they are not
  # comparable without the log.
  caveats = []
  if data.source == "image_folder":   # warned of when the data was opened
    caveats.append(data_sources.held_out_note(
        data.path, split, "config.data", train_split=data.split))
  if seen < n:
    caveats.append(f"{what}: {n - seen} of its {n} files are unreadable and "
                   f"were skipped; the metrics cover the {seen} that were read")
    logging.warning("%s.", caveats[-1])
    n = seen
  if not n:
    raise batching.NotEnoughImages(f"{what} has no readable images to evaluate.")
  lo, hi = (float(v) for v in value_range)
  sums = scores.sums()
  results = {
      "psnr": sums["psnr"] / n,
      "ssim": sums["ssim"] / n,
      # In the tokenizer's value range, of what PSNR / SSIM scored.
      "mse": sums["sq"] * (hi - lo) ** 2 / (n * scores.pixels),
      "num_images": int(n),
      "dtype": str(model_config.get("dtype", "")),
      "protocol": proto_name,
      "center_crop": data.center_crop,
      "scored": proto.scored,
      # What was scored: the folder read (a run's step) and its weights.
      "checkpoint": checkpoint,
      "weights": weights_lib.readable(weights_lib.params_source(checkpoint)),
      "caveats": [c for c in caveats if c],
  }
  num_codes = config.model.get("num_codes", None)
  if num_codes and scores.discrete:
    results.update(image_metrics.codebook_stats(
        scores.counts, num_codes,
        factorized=isinstance(scores.codes, (tuple, list))))
  if lpips_fn is not None:
    results["lpips"] = sums["lpips"] / n
  if extractor is not None:
    results["rfid"] = fid_lib.frechet_distance(
        *scores.rstats[0].result(), *scores.rstats[1].result(), name="rFID")
    results["rfid_preprocess"] = preprocess
    if scores.iscore is not None:
      results["inception_score"] = scores.iscore.result()
    if getattr(extractor, "untrained", False):
      results["caveats"].append(generation.UNTRAINED_NOTE)
      logging.warning("%s.", results["caveats"][-1])
    if n < fid_lib.FEATURE_DIM:
      results["caveats"].append(
          f"rFID of only {n} images: with fewer than {fid_lib.FEATURE_DIM} "
          "the feature covariance is rank-deficient, so it is not comparable "
          "with published numbers (the protocols use the 50,000 validation "
          "images)")
      logging.warning("%s.", results["caveats"][-1])
  gx = np.concatenate(scores.grid_x)[:32]
  gy = np.concatenate(scores.grid_y)[:32]
  pairs = np.stack([gx, gy], 1).reshape(-1, *gx.shape[1:])
  grid = metrics_lib.make_grid(pairs, ncols=8)
  grid_path = os.path.join(workdir, "reconstructions.png")
  # The numbers first: a grid that cannot be written (a full disk) must not
  # take them with it.
  out = report.write(workdir, results,
                     f"{_summary(results, num_codes)}; grid: {grid_path}")
  try:
    multihost.on_process_0(lambda: metrics_lib.save_png(grid_path, grid))
  except OSError as e:
    raise errors.OutputWriteError(
        f"Writing {grid_path} failed ({errors.write_cause(e)}); the numbers "
        "are in metrics.json beside it.") from e
  return out


def _summary(r: dict, num_codes) -> str:
  parts = [f"tokenizer eval on {r['num_images']} images ({r['protocol']} "
           f"protocol): PSNR {r['psnr']:.2f} dB",
           f"SSIM {r['ssim']:.4f}"]
  if "lpips" in r:
    parts.append(f"LPIPS {r['lpips']:.4f}")
  if "rfid" in r:
    parts.append(f"rFID {r['rfid']:.2f}")
  if "inception_score" in r:
    parts.append(f"IS {r['inception_score']:.2f}")
  if "codebook_usage" in r:
    subs = [f"{100 * r[k]:.1f}%" for k in sorted(r)
            if k.startswith("codebook_usage_")]
    detail = f" (per sub-codebook {', '.join(subs)})" if subs else ""
    if isinstance(num_codes, (tuple, list)):   # one size per sub-codebook
      of = " + ".join(str(c) for c in num_codes)
    else:
      of = f"{len(subs)} x {num_codes}" if subs else str(num_codes)
    parts.append(f"codebook usage {100 * r['codebook_usage']:.1f}% of "
                 f"{of}{detail}, entropy {r['codebook_entropy']:.2f} bits")
  return ", ".join(parts)
