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
with other settings (weights, model, sampler) is refused instead of mixing.
"""

from __future__ import annotations

import copy
import functools
import glob
import json
import os
import time

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
from absl import logging

from genvis_jax import errors
from genvis_jax import models
from genvis_jax.core import multihost
from genvis_jax.core import preemption
from genvis_jax.core import registry
from genvis_jax.core import settings as settings_lib
from genvis_jax.core import sharding
from genvis_jax.core import weights as weights_lib
from genvis_jax.data import token_origin
from genvis_jax.models import inference
from genvis_jax.sample import ar
from genvis_jax.sample import images as images_lib


def _generator(name: str):
  """``genvis_jax/sample/<config.model.name>.py``'s ``generate(model, params,
  labels, rng, sample_config)``, returning codes in the tokenizer's
  ``decode`` format (see ``genvis_jax.core.registry``)."""
  return registry.module("genvis_jax.sample", name, ("generate",),
                         setting="config.model.name (the generator)").generate


LABEL_DRAWS = ("balanced", "uniform")


def class_labels(num_samples: int, num_classes: int, classes=(),
                 draw: str = "balanced", seed: int = 0) -> np.ndarray:
  """The class label of each of ``num_samples`` images, (num_samples,) int32.

  ``draw`` (``config.sample.labels``): "balanced" cycles ``classes``
  (default all), e.g. 50 per class for 50k (RAR's ``list(range(1000)) * 50``,
  the Equivariant sampler's ``arange(1000).repeat(50)``); "uniform" draws
  each i.i.d. from them with NumPy's generator seeded by ``seed`` (the
  official FAR sampler's ``torch.randint(0, 1000, (n,))``: per-class counts
  about 50 +- 7). Either way the first k labels do not depend on
  ``num_samples``, so a resumed run that asks for more images keeps them.

  Raises:
    ConfigError: a class outside 0..num_classes - 1 (naming
      ``config.sample.classes``), or another ``draw``.
  """
  classes = np.asarray(list(classes) or range(num_classes), np.int64)
  bad = classes[(classes < 0) | (classes >= num_classes)]
  if bad.size:
    raise errors.ConfigError(
        f"config.sample.classes holds {sorted(set(bad.tolist()))[:5]}, not "
        f"classes of this model: use 0..{num_classes - 1} "
        f"(config.model.num_classes={num_classes}), or leave it empty for "
        "all classes.")
  if draw == "balanced":
    return np.resize(classes.astype(np.int32), num_samples)
  if draw == "uniform":
    picks = np.random.default_rng(seed).integers(0, len(classes), num_samples,
                                                 dtype=np.int64)
    return classes[picks].astype(np.int32)
  raise errors.ConfigError(
      f"config.sample.labels={draw!r}; use one of {LABEL_DRAWS} ('balanced': "
      "the same number of images per class; 'uniform': i.i.d. labels).")


def host_uint8(images: jax.Array, value_range, method: str) -> jax.Array:
  """Float images (sharded over the batch) -> uint8 with the same sharding.

  Each addressable shard is converted in numpy (``images_lib.to_uint8``, the
  official bytes) and put back on its device, so multi-host callers gather a
  global uint8 array as before."""
  shards = [jax.device_put(images_lib.to_uint8(np.asarray(s.data), value_range,
                                               method), s.device)
            for s in images.addressable_shards]
  return jax.make_array_from_single_device_arrays(images.shape, images.sharding,
                                                  shards)


class Decoder:
  """A tokenizer's decode for sampling: ``dispatch(codes)`` -> float32
  images (B, H, W, 3) on the devices (asynchronous), ``to_uint8(images)``
  -> uint8 with the same sharding (the official conversion, on the host;
  waits for them); calling it does both."""

  def __init__(self, decode_float, params, value_range, method: str):
    self._decode_float, self._params = decode_float, params
    self._value_range, self._method = value_range, method

  def dispatch(self, codes) -> jax.Array:
    return self._decode_float(self._params, codes)

  def to_uint8(self, images: jax.Array) -> jax.Array:
    return host_uint8(images, self._value_range, self._method)

  def __call__(self, codes) -> jax.Array:
    return self.to_uint8(self.dispatch(codes))


def make_decode_fn(tok, mesh) -> Decoder:
  """``config.tokenizer`` -> a ``Decoder`` (``f(codes) -> uint8 (B, H, W,
  3)``, a jax array sharded like the decoded images): decode in
  ``inference.data_model_config`` (fp32 by default), then the official uint8
  conversion (``uint8_method``)."""
  model_cfg = inference.data_model_config(tok)
  method = images_lib.uint8_method(tok)
  tok_model = models.build(model_cfg)
  tok_params = models.load_params(
      model_cfg, tok.checkpoint, mesh, setting="--config.tokenizer.checkpoint")
  value_range = models.value_range(tok.model, {"tokenizer": tok},
                                   ("tokenizer",))

  # The weights are an argument, not a closed-over constant: a constant is
  # copied into the lowered program (seconds of lowering per 100 MB).
  @jax.jit
  def decode_float(params, codes):
    images = tok_model.apply({"params": params}, codes, method="decode")
    return images.astype(jnp.float32)

  return Decoder(decode_float, tok_params, value_range, method)


class Sampler:
  """``sampler(labels (B,), rng)`` -> uint8 (B, H, W, 3), a jax array
  sharded over the batch. ``sampler.dispatch(labels, rng)`` starts the same
  batch (generate, then decode) and returns at once a ``finish()`` that
  waits for it and gives those images: the driver dispatches the next batch
  before it finishes and writes this one, so the host's uint8 conversion and
  file writes overlap the devices' work."""

  def __init__(self, generate, decode: Decoder):
    self._generate, self._decode = generate, decode

  def dispatch(self, labels, rng):
    images = self._decode.dispatch(self._generate(labels, rng))
    return functools.partial(self._decode.to_uint8, images)

  def __call__(self, labels, rng) -> jax.Array:
    return self.dispatch(labels, rng)()


def make_sample_fn(config, mesh):
  """Returns a ``Sampler`` (``f(labels (B,), rng) -> uint8 (B, H, W, 3)``)
  of ``config`` and the batch sharding."""
  gen_model = models.build(config.model)
  gen_params = models.load_params(
      config.model, config.init_from, mesh, setting="--config.init_from")
  decode = make_decode_fn(config.tokenizer, mesh)
  generate = _generator(config.model.name)
  s = config.sample

  sample_fn = Sampler(
      lambda labels, rng: generate(gen_model, gen_params, labels, rng, s),
      decode)
  batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  return sample_fn, batch_sharding


# config.tokenizer keys that only messages read (configs/base.py add_tokenizer):
# parts drawn before they existed, or with other values, still resume.
MESSAGE_ONLY = ("config_file",)


def sample_settings(config, pinned=None) -> dict:
  """What decides the images of a part file (flat, JSON-normalised); the
  weights as the folders of ``pinned`` (``pin_weights(config)``) hold them."""
  pinned = config if pinned is None else pinned
  tok = config.tokenizer
  # Resolved, so a config without the keys still records what decoded.
  tokenizer = {**{k: v for k, v in tok.to_dict().items()
                  if k not in MESSAGE_ONLY},
               "uint8": images_lib.uint8_method(tok),
               "dtype": inference.data_model_config(tok).get("dtype", "")}
  # The weights each path resolves to (a training workdir's newest step), not
  # the paths: a run trained further since is other weights, a copied folder
  # the same ones.
  keep = {"init_from": config.init_from, "model": config.model.to_dict(),
          "tokenizer": tokenizer, "sample": config.sample.to_dict(),
          "devices": jax.device_count()}
  return json.loads(json.dumps({**settings_lib.flatten(keep),
                                **pinned_sources(pinned)}))


# Settings a resume may change: the parts depend only on their start index;
# the paths may move as long as ``weights`` (what they hold) stays the same;
# another device count draws the same keys with other per-device shapes
# (a warning: float rounding may flip a few tokens).
MAY_CHANGE = ("sample.num_samples", "init_from", "tokenizer.checkpoint",
              "devices")
WEIGHTS = ("weights.generator", "weights.tokenizer")


def pin_weights(config):
  """A copy of ``config`` whose ``init_from`` / ``tokenizer.checkpoint`` name
  the exact folders they resolve to now (``core.weights.resolve``): a run's
  newest step cannot change under the load. Process 0 resolves and every
  process loads its folders, so all draw from the same step even if one is
  saved while they start."""
  paths = weights_lib.resolve_all(
      [config.init_from, config.tokenizer.get("checkpoint", "")])
  pinned = copy.deepcopy(config)
  with pinned.unlocked():
    pinned.init_from = paths[0]
    if pinned.tokenizer.get("checkpoint"):
      pinned.tokenizer.checkpoint = paths[1]
  return pinned


def pinned_sources(pinned) -> dict:
  """``WEIGHTS`` of a pinned config, as ``sample_settings`` records them."""
  return {"weights.generator": weights_lib.params_source(pinned.init_from),
          "weights.tokenizer": weights_lib.params_source(
              pinned.tokenizer.get("checkpoint", ""))}


def warn_other_tokenizer(init_from: str, tokenizer_source: str) -> str:
  """Warns (and returns the warning) when the generator run ``init_from``
  (pinned) trained on codes of other tokenizer weights than
  ``tokenizer_source`` (``core.weights.params_source``): its samples would be
  decoded by a tokenizer it never saw. "" when they match or the run
  recorded nothing (a converted checkpoint, a run of images)."""
  run = weights_lib.run_of(init_from)
  trained_on = token_origin.run_token_weights(run)
  if not trained_on or not tokenizer_source or tokenizer_source in trained_on:
    return ""
  msg = (f"The generator {run} trained on codes of tokenizer weights "
         f"{trained_on}, but config.tokenizer.checkpoint holds "
         f"{tokenizer_source!r}: the samples are decoded by another tokenizer. "
         "Point it at the step the tokens came from (<run>/checkpoints/<step>).")
  logging.warning(msg)
  return msg


class SamplingStopped(errors.UserError, RuntimeError):
  """A stop signal ended sampling after writing the batch in flight."""


class SampleSettingsError(errors.UserError, ValueError):
  """Sample parts in the workdir were drawn with other settings."""


def check_settings(parts_dir: str, settings: dict) -> None:
  """Writes ``settings.json`` on a fresh start; refuses a resume that differs
  (except in ``num_samples``, as a set can grow or shrink, and in the
  checkpoint paths while the weights they resolve to are the same). Process
  0 checks and writes; its error stops every process."""
  multihost.on_process_0(lambda: _check_settings(parts_dir, settings))


def _check_settings(parts_dir: str, settings: dict) -> None:
  path = os.path.join(parts_dir, "settings.json")
  parts = glob.glob(os.path.join(parts_dir, "[0-9]*[0-9].npz"))
  # A config without config.sample.seed (or parts drawn before it was a
  # setting) draws with seed 0.
  settings = {"sample.seed": 0, **settings}
  if os.path.exists(path):
    with open(path) as f:
      old = {"sample.seed": 0, **json.load(f)}
    # Parts written before the weights were recorded: compare the paths.
    may_change = MAY_CHANGE if all(k in old for k in WEIGHTS) else (
        "sample.num_samples", "devices") + WEIGHTS
    diff = settings_lib.differences(old, settings, ignore=may_change)
    if diff and parts:
      raise SampleSettingsError(
          f"{parts_dir} holds {len(parts)} sample parts drawn with other "
          f"settings ({settings_lib.shorten(diff, 5)}). Use a new workdir, or "
          "delete that folder to start over.")
    if parts and old.get("devices") not in (None, settings.get("devices")):
      logging.warning(
          "%s holds %d sample parts drawn on %d device(s) and this run has %d: "
          "the same keys and weights, but each device's share of a batch "
          "differs, so float rounding may change a few tokens against an "
          "uninterrupted run.", parts_dir, len(parts), old["devices"],
          settings["devices"])
  elif parts:
    raise SampleSettingsError(f"{parts_dir} holds {len(parts)} sample parts but no "
                     "settings.json, so they cannot be checked against this "
                     "run. Use a new workdir, or delete that folder.")
  with open(path, "w") as f:
    json.dump(settings, f, indent=1, sort_keys=True)


def sample_and_save(config, workdir: str) -> dict:
  s = config.sample
  mesh = sharding.data_mesh(jax.devices())
  if s.num_samples < 1:
    raise errors.ConfigError(f"config.sample.num_samples={s.num_samples}: "
                             "set how many images to draw (at least 1).")
  # Counts of the Equivariant sampler too, before anything is loaded.
  for key in ("batch_size", "num_columns", "num_steps"):
    if key in s and int(s[key]) < 1:
      raise errors.ConfigError(f"config.sample.{key}={s[key]} must be at "
                               "least 1.")
  ar.check_dtype(s.get("dtype", "float32"))   # before the weights load
  if s.batch_size % jax.device_count():
    raise errors.ConfigError(
        f"config.sample.batch_size={s.batch_size} must be a multiple of the "
        f"{jax.device_count()} devices; set --config.sample.batch_size to one.")
  labels_all = class_labels(s.num_samples, config.model.num_classes,
                            s.get("classes", ()), s.get("labels", "balanced"),
                            s.seed)
  # Load exactly the steps recorded: a run's newest step is pinned to its
  # folder (no fallback to an older one), and the record is checked again
  # after loading (a step re-committed in place meanwhile).
  pinned = pin_weights(config)
  settings = sample_settings(config, pinned)
  # Before the (collective) loads: a process with other flags would fail or
  # load something else there while the others wait for it.
  multihost.check_agree(settings, "sampling settings")
  recorded = {k: settings[k] for k in WEIGHTS}
  sample_fn, batch_sharding = make_sample_fn(pinned, mesh)
  if pinned_sources(pinned) != recorded:
    raise SampleSettingsError(
        f"The checkpoint changed while it was loaded ({config.init_from}, "
        f"{config.tokenizer.get('checkpoint', '')}); run again.")
  warn_other_tokenizer(pinned.init_from, recorded["weights.tokenizer"])
  parts_dir = os.path.join(workdir, "sample_parts")
  os.makedirs(parts_dir, exist_ok=True)
  check_settings(parts_dir, settings)
  print(f"[sample] generator: {config.init_from} "
        f"({settings['weights.generator']}); tokenizer: "
        f"{config.tokenizer.get('checkpoint', '')} "
        f"({settings['weights.tokenizer']})", flush=True)
  key = jax.random.key(s.get("seed", 0))
  starts = range(0, s.num_samples, s.batch_size)
  done = complete_parts(parts_dir, s.num_samples, s.batch_size)
  if jax.process_count() > 1:   # process 0 writes the parts: its view counts
    mask = np.array([start in done for start in starts])
    mask = np.asarray(multihost_utils.broadcast_one_to_all(mask))
    done = {start for start, m in zip(starts, mask) if m}
  if done:
    have = sum(min(s.batch_size, s.num_samples - d) for d in done)
    print(f"[sample] resuming: {have} of {s.num_samples} images already in "
          f"{parts_dir}", flush=True)
  t0, made = time.perf_counter(), 0

  written = 0

  def write(finish, start, labels):
    """Waits for a dispatched batch, writes its part; stops when asked."""
    nonlocal made, written
    written += 1
    n = len(labels)
    images = np.asarray(multihost_utils.process_allgather(
        finish(), tiled=True))[:n]
    multihost.write_on_process_0(
        os.path.join(parts_dir, f"{start:09d}.npz"),
        functools.partial(np.savez, images=images, labels=labels))
    made += n
    rate = made / (time.perf_counter() - t0)
    logging.info("sampled %d / %d (%.2f images/s)", start + n, s.num_samples,
                 rate)
    print(f"[sample] {start + n}/{s.num_samples} images, {rate:.2f} images/s",
          flush=True)
    if stop.should_stop(written) and start + n < s.num_samples:
      raise SamplingStopped(
          f"Sampling stopped by {stop.signal} after the batch of images "
          f"{start}..{start + n - 1}; the parts drawn so far are in "
          f"{parts_dir}. Run the same command to resume from them.")

  # SIGTERM / Ctrl-C: finish and write the batch in flight, then stop (the
  # next one, already dispatched, is dropped and drawn again on resume).
  with preemption.StopRequest("writing the batch of samples in flight",
                              "without writing the batch in flight") as stop:
    pending = None
    for start in starts:
      if start in done:
        continue
      labels = labels_all[start:start + s.batch_size]
      padded = np.resize(labels, s.batch_size)        # pad the last batch
      # The key depends only on the batch's first index: resumes draw the same.
      finish = sample_fn.dispatch(global_labels(padded, batch_sharding),
                                  jax.random.fold_in(key, start))
      if pending:   # the devices draw this batch while the last one is written
        write(*pending)
      pending = (finish, start, labels)
    if pending:
      write(*pending)
  if jax.process_count() > 1:   # the others wait for process 0's last part
    multihost_utils.sync_global_devices("genvis_jax sample parts written")
  return assemble(workdir, s.num_samples)


def complete_parts(parts_dir: str, num_samples: int, batch: int) -> set[int]:
  """Start indices of the part files that hold their whole batch; a short
  last batch of a smaller earlier set is drawn again when the set grows."""
  done = set()
  for p in glob.glob(os.path.join(parts_dir, "[0-9]*[0-9].npz")):
    start = int(os.path.basename(p)[:9])
    if start < num_samples:
      with np.load(p) as d:
        if len(d["labels"]) == min(batch, num_samples - start):
          done.add(start)
  return done


def global_labels(labels: np.ndarray, sharding) -> jax.Array:
  """Host labels (B,), the same on every process -> a (B,) array sharded by
  ``sharding`` whose row i is ``labels[i]`` whatever the mesh's device order.

  Each device takes its rows by global index. (Feeding each process a
  contiguous slice would misplace rows where a process's devices are not one
  contiguous block of the mesh, e.g. a 1-D mesh that follows a TPU pod's
  physical rings: images would be saved under other rows' labels.)"""
  return jax.make_array_from_callback(labels.shape, sharding,
                                      lambda index: labels[index])


def assemble(workdir: str, num_samples: int) -> dict:
  """Joins the part files into ``samples.npz`` + ``samples.png``; checks
  coverage. Process 0 only (it wrote the parts); the others get the paths."""
  out = {"npz": os.path.join(workdir, "samples.npz"),
         "png": os.path.join(workdir, "samples.png"),
         "num_samples": int(num_samples)}
  if jax.process_index() != 0:
    return out
  parts = sorted(glob.glob(os.path.join(workdir, "sample_parts", "[0-9]*[0-9].npz")))
  images, labels, expected = [], [], 0
  for p in parts:
    start = int(os.path.basename(p)[:9])
    if start >= num_samples:     # drawn for a larger set than asked for now
      break
    if start != expected:
      raise RuntimeError(f"Sample parts have a gap at index {expected} (next part "
                         f"starts at {start}); re-run the same command to fill it.")
    with np.load(p) as d:
      images.append(d["images"])
      labels.append(d["labels"])
    expected += len(images[-1])
  if expected < num_samples:
    raise RuntimeError(f"{expected} of {num_samples} samples present; re-run.")
  images = np.concatenate(images)[:num_samples]
  labels = np.concatenate(labels)[:num_samples]
  images_lib.save_npz(out["npz"], images, labels)
  order = np.argsort(labels[:100], kind="stable")
  images_lib.save_grid(images[:100][order], out["png"],
                       ncols=images_lib.grid_columns(*images.shape[1:3]))
  print(f"[sample] wrote {out['npz']} and {out['png']}", flush=True)
  return out
