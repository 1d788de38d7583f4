"""What pre-tokenizing refuses or warns of before it encodes an image.

Codes per image the generator that trains on them does not read, settings of
``config.pretokenize.data`` pre-tokenizing would not apply, a ``config.data``
naming images other than those encoded, and a tokenizer run trained at
another image size. ``data/pretokenize.py``'s ``check_config`` runs them.
"""

from __future__ import annotations

import math

from absl import logging
import jax
import jax.numpy as jnp

from genvis_jax import errors
from genvis_jax.core import weights as weights_lib
from genvis_jax.data import sources


def check_tokens_fit(generator, encode, size: int,
                     tokenizer_size: int | None = None) -> None:
  """Refuses, before encoding anything, images of ``size`` px whose codes
  (``encode``'s shape, traced only) are not as many per image as the
  generator that trains on them reads (``generator.seq_len``, or a FAR
  ``grid`` squared): training would stop at its first batch instead; and
  images of another size than a tokenizer of one size takes
  (``tokenizer_size``: FQGAN's, whose adapters' tables are sized).

  Raises:
    ConfigError: naming ``config.pretokenize.data.image_size`` and the size
      that fits, where there is one.
  """
  if tokenizer_size and size != tokenizer_size:
    raise errors.ConfigError(
        f"config.pretokenize.data.image_size={size}, but the tokenizer "
        f"(config.tokenizer.model) takes {tokenizer_size}x{tokenizer_size} "
        f"images: pass --config.pretokenize.data.image_size={tokenizer_size}.")
  try:
    got = jax.eval_shape(
        encode, jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)).shape[-1]
  except errors.ConfigError as e:   # a size the tokenizer cannot encode
    said = str(e).replace("config.data.image_size",   # the training setting
                          "config.pretokenize.data.image_size")
    raise errors.ConfigError(
        f"config.pretokenize.data.image_size={size} does not fit the "
        f"tokenizer (config.tokenizer.model): {said}") from None
  want = int(generator.get("seq_len", 0) or generator.get("grid", 0) ** 2)
  if not want or got == want:
    return
  fits = round(size * math.sqrt(want / got))   # tokens grow with the area
  side = math.isqrt(got)
  model = (f"--config.model.grid={side}" if generator.get("grid")
           and side * side == got else f"--config.model.seq_len={got}"
           if generator.get("seq_len") else f"a generator of {got} tokens")
  if tokenizer_size or fits * fits * got != want * size * size:
    hint = model   # the tokenizer takes this size alone, or none fits
  else:
    hint = f"--config.pretokenize.data.image_size={fits}, or {model}"
  raise errors.ConfigError(
      f"config.pretokenize.data.image_size={size} gives {got} tokens per "
      f"image with this tokenizer, but the generator (config.model) reads "
      f"{want}: pass {hint}.")


def check_images_in_data(config) -> None:
  """Refuses ``config.pretokenize.data`` settings pre-tokenizing would not
  apply (augmentations; a ``split`` meant as the one encoded), and a
  ``config.data`` (the generator's training input: token files)
  that names images ``config.pretokenize.data`` does not: pre-tokenizing
  reads the latter, so ``--config.data.*`` flags meant for it would encode
  other images (the demo's, by default) without a word; and, where both
  name the same images (a tokenizer's config), another image size.

  Raises:
    ConfigError: naming both and the flags to use.
  """
  d, p = config.data, config.pretokenize.data
  for key in ("random_crop", "random_flip"):
    if p.get(key):
      raise errors.ConfigError(
          f"config.pretokenize.data.{key}=True: pre-tokenizing encodes centre "
          "crops, never training augmentations (with config.pretokenize."
          "ten_crop, a 1.1x centre crop's five crops and their flips; else "
          "a centre crop and its mirror image). Leave it False.")
  if p.get("split", "train") not in (config.pretokenize.split,
                                     d.get("split", "train")):
    raise errors.ConfigError(
        f"config.pretokenize.data.split={p.split!r} is not the split "
        f"encoded: that is config.pretokenize.split={config.pretokenize.split!r}"
        f", and config.pretokenize.data.split names the training split whose "
        f"class folders number the labels (as config.data.split="
        f"{d.get('split', 'train')!r}). To encode {p.split!r}, pass "
        f"--config.pretokenize.split={p.split} instead.")
  if d.get("source", "tokens") not in sources.SOURCES:
    raise sources.DataConfigError(
        f"Unknown config.data.source {d.source!r}; config.data is the "
        "generator's training input, its token files (source 'tokens'), and "
        "pre-tokenizing reads the images of config.pretokenize.data (sources: "
        f"{', '.join(sources.IMAGE_SOURCES)}). Leave config.data.source at "
        "tokens and set --config.pretokenize.data.source.")
  if d.get("source", "tokens") == "tokens":
    return
  # A tokenizer's own config (config.data: what it trains on), or a
  # generator's whose config.data names images.
  tokenizer = (config.get("tokenizer") or {}).get("model") or {}
  own = config.get("model", {}).get("name") == tokenizer.get("name")
  if (d.source, d.get("path", "")) == (p.source, p.get("path", "")):
    # Its own images: pretokenize.data is a copy made when the config was
    # built, so a --config.data.image_size flag (a tokenizer trained at
    # another size) did not reach it.
    if own and d.get("image_size") != p.get("image_size"):
      raise errors.ConfigError(
          f"config.data.image_size={d.get('image_size')} but pre-tokenizing "
          f"encodes config.pretokenize.data at image_size="
          f"{p.get('image_size')}: pass --config.pretokenize.data.image_size="
          f"{d.get('image_size')} to encode at the size the tokenizer trains "
          "at (or set both to the one you mean).")
    return
  if own:   # a --config.data flag did not reach config.pretokenize.data
    raise errors.ConfigError(
        f"config.data (the tokenizer's training images: source "
        f"{d.source!r}, path {d.get('path', '')!r}) and config."
        f"pretokenize.data (the images pre-tokenizing encodes: source "
        f"{p.source!r}, path {p.get('path', '')!r}) differ: pass the same "
        "--config.data.source / .path and --config.pretokenize.data.source "
        "/ .path.")
  raise errors.ConfigError(
      f"config.data names images (source {d.source!r}, path "
      f"{d.get('path', '')!r}), but pre-tokenizing reads "
      f"config.pretokenize.data (source {p.source!r}, path "
      f"{p.get('path', '')!r}); config.data is the generator's training "
      "input, its token files. To encode those images pass "
      f"--config.pretokenize.data.source={d.source} "
      f"--config.pretokenize.data.path={d.get('path', '')} instead of the "
      "--config.data flags.")


def warn_other_trained_size(checkpoint: str, data) -> None:
  """Warns when the tokenizer run at ``checkpoint`` (a training step, whose
  run config is recorded) trained on images of another size than
  ``data`` (``config.pretokenize.data``) encodes: codes of other sizes are
  not the ones it learned, and nothing else notices (a generator checks only
  the token count)."""
  saved, made = weights_lib.recorded_config(checkpoint)
  if made != "trained":
    return
  trained = saved.get("data") or {}
  size = lambda d: (int(d.get("image_width", 0) or d.get("image_size", 0)),
                    int(d.get("image_size", 0)))
  if not trained.get("image_size") or size(trained) == size(data):
    return
  flags = [f"--config.pretokenize.data.{key}={int(trained.get(key, 0) or 0)}"
           for key in ("image_size", "image_width")
           if int(trained.get(key, 0) or 0) != int(data.get(key, 0) or 0)]
  logging.warning(
      "The tokenizer at %s trained on %dx%d images, and pre-tokenizing "
      "encodes %dx%d ones (config.pretokenize.data.image_size / image_width): "
      "set %s to encode at its training size, unless the other size is what "
      "you mean.", checkpoint, *size(trained), *size(data), " ".join(flags))
