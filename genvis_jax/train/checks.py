"""Start-up checks of a training config: each refuses a setting that would
fail (or silently mistrain) later, before any data opens or any compile, with
a ``ConfigError`` that names the key and the fix.

``check_config(config, task)`` runs the ones that need only the config;
``check_model_classes`` and ``check_same_data`` run once the data are open,
``check_same_weights`` once the frozen weights are read.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import logging

from genvis_jax import errors
from genvis_jax.core import dtypes
from genvis_jax.core import multihost
from genvis_jax.core import weights as weights_lib
from genvis_jax.train import optimizers as opt_lib

# The precision settings of the config groups whose weights training updates.
TRAINED_DTYPES = ("model.dtype", "model.param_dtype", "disc.dtype",
                  "disc.param_dtype")


def check_config(config, task) -> None:
  """Every check below that needs only ``config`` and its ``task``
  (``tasks.get_task(config)``)."""
  check_seed(config)
  check_intervals(config.train)
  check_ema(config.train)
  check_precision(config)
  task.optimizers()   # bad optimizer settings fail here, naming the key
  sections = {key: section for section, key in task.optimizer_configs().values()}
  for key, section in sections.items():
    opt_lib.warn_long_warmup(section, int(config.train.num_steps), key)
  check_data_source(config, task)
  check_image_size(config, task)
  check_token_width(config, task)
  check_tokenizer(config, task)


# config.model keys sizing a model trained on images, with the config.data
# key they must equal (read when the weights are initialised; a model that
# is fully convolutional would train on the data's size without a word).
_IMAGE_SIZES = (("image_size", "image_size"), ("resolution", "image_size"),
                ("image_width", "image_width"))


def check_image_size(config, task) -> None:
  """A task training on images: the model's image sizes
  (``config.model.image_size`` / ``resolution`` / ``image_width``, where
  set) are the data's (``config.data.image_size`` / ``image_width``; an
  unset or 0 width is the height). Raises ``ConfigError`` naming both."""
  if task.data_sources is not None:
    return   # trains on codes: their shapes are checked against the model
  model, data = config.model, config.data
  for key, data_key in _IMAGE_SIZES:
    size = model.get(key, 0)
    want = data.get(data_key, 0)
    if data_key == "image_width":
      size = size or model.get("image_size", 0) or model.get("resolution", 0)
      want = want or data.get("image_size", 0)
    if size and want and size != want:
      raise errors.ConfigError(
          f"config.model.{key}={size} but the images are {want} px "
          f"(config.data.{data_key}): the model trains on the data's images "
          f"and its {key} only sizes the initialisation. Set "
          f"--config.data.{data_key}={size} to train at {size} px, or "
          f"--config.model.{key}={want}.")


def check_token_width(config, task) -> None:
  """A column tokenizer trained on images, or encoding a generator's images:
  the data's width (``config.data.image_width``, 0 = the height) a multiple
  of its ``token_width``. Raises ``ConfigError`` at start-up, where the
  model's own check came at the first step, after a crop error that did
  not name the cause. A generator's ``config.model.seq_len`` (columns per
  training image) must be the data's column count: its weights do not
  depend on it (RoPE), so another value trained on the data's columns
  without a word (the run records it, and sampling checks it)."""
  if task.data_sources is not None:
    return   # trains on codes
  model = task.model if hasattr(task.model, "token_width") else (
      getattr(task, "tokenizer", None))
  unit = getattr(model, "token_width", None)
  key = "image_width" if config.data.get("image_width", 0) else "image_size"
  width = config.data.get(key, 0)
  if unit and width and width % unit:
    where = ("" if key == "image_width" else
             " (the width: config.data.image_width is 0, the height)")
    also = (" (and config.model.image_width to match)"
            if "image_width" in config.model else "")
    raise errors.ConfigError(
        f"config.data.{key}={width}{where} is not a multiple of the token "
        f"width {unit} px (one token per {unit}-px column): set "
        f"config.data.image_width{also} to {width // unit * unit or unit} or "
        f"{(width // unit + 1) * unit}.")
  seq_len = config.model.get("seq_len") if model is not task.model else None
  if unit and width and seq_len and width // unit != seq_len:
    raise errors.ConfigError(
        f"config.model.seq_len={seq_len}, but the training images are "
        f"{width // unit} columns (config.data.{key}={width} px / the "
        f"tokenizer's {unit} px per column). The columns come from the data: "
        f"set --config.model.seq_len={width // unit}, or the data width "
        f"(--config.data.image_width={seq_len * unit}).")


def check_intervals(train) -> None:
  """``train.num_steps`` / ``log_every`` / ``checkpoint_every`` >= 1,
  ``profile_steps`` / ``profile_skip_steps`` >= 0."""
  for key in ("num_steps", "log_every", "checkpoint_every"):
    if int(train[key]) < 1:
      raise errors.ConfigError(
          f"config.train.{key}={train[key]} must be at least 1"
          + (" (to save only at the end, set it to num_steps)."
             if key == "checkpoint_every" else "."))
  for key in ("profile_steps", "profile_skip_steps"):
    if int(train.get(key, 0)) < 0:
      raise errors.ConfigError(
          f"config.train.{key}={train[key]} must be >= 0 (profile_steps=0 "
          "turns profiling off).")


def check_seed(config) -> None:
  """``config.seed`` in [0, 2**32): jax's keys (x64 off) and Grain's seeds
  keep 32 bits, so seed 2**32 trained exactly as seed 0."""
  seed = config.get("seed", 0)
  if not (isinstance(seed, int) and 0 <= seed < 2**32):
    raise errors.ConfigError(
        f"config.seed={seed!r} must be an integer in [0, 2**32): the PRNG "
        "keys and the data order keep its low 32 bits, so a larger seed "
        "repeats a smaller one's run.")


def check_ema(train) -> None:
  """``train.ema_decay`` in [0, 1); 0 turns the EMA off."""
  decay = float(train.get("ema_decay", 0.0))
  if not 0 <= decay < 1:   # NaN too
    raise errors.ConfigError(
        f"config.train.ema_decay={decay:g} must be in [0, 1): each step "
        "keeps this fraction of the EMA weights (e.g. 0.9999; at 1 or more "
        "they never follow the model or blow up), and 0 turns the EMA off.")


def check_precision(config) -> None:
  """Every ``TRAINED_DTYPES`` setting names a float dtype, and not float16:
  training has no loss scaling, so float16's small gradients and updates
  underflow to zero. (Inference settings such as ``config.tokenizer.dtype``
  keep float16.)"""
  for key in TRAINED_DTYPES:
    group, field = key.split(".")
    value = (config.get(group) or {}).get(field)
    if dtypes.parse(value, f"config.{key}") == jnp.float16:
      raise errors.ConfigError(
          f"config.{key}={value!r}: training has no loss scaling, so float16 "
          "gradients and updates underflow to zero. Use "
          f"--config.{key}=bfloat16 (float32's range in half the memory) or "
          "float32.")


def check_data_source(config, task) -> None:
  """``config.data.source`` gives what ``task`` trains on: images, or the
  pre-tokenized codes of ``task.data_sources``."""
  from genvis_jax.data import sources  # pylint: disable=import-outside-toplevel
  if task.data_sources is None:
    sources.check_source(config.data.source, "config.data",
                         f"the {config.task} task trains on images")
  else:
    sources.check_source(config.data.source, "config.data",
                         f"the {config.task} task trains on pre-tokenized "
                         "codes", allowed=task.data_sources)


def check_tokenizer(config, task) -> None:
  """A task that encodes its images in the step needs
  ``config.tokenizer.checkpoint``: without it the first step would fail,
  after the workdir was written."""
  if task.encodes_with_tokenizer and not config.tokenizer.get("checkpoint"):
    raise errors.ConfigError(
        f"The {config.task} task trains on its images' latents from the "
        "frozen tokenizer, and config.tokenizer.checkpoint is not set: set "
        "--config.tokenizer.checkpoint to a genvis_jax.convert output or an "
        "eq_tokenizer training workdir.")


def check_same_data(config, info) -> None:
  """Every process of a multi-process job reads the same training split:
  each lists an image folder on its own host and takes its rows from its
  own listing, so a copy with images added or missing would duplicate or
  skip examples, and one missing a class folder would shift the labels
  after it, without a word. Compares ``info.fingerprint()`` (the split's
  size and, for an image folder, its files and labels; ``PipelineInfo``)
  across processes.

  Raises:
    multihost.OtherProcessError: on every process, naming the differences
      from process 0's split.
  """
  if jax.process_count() == 1:
    return
  data = config.data
  where = data.get("path") or data.get("name") or ""
  multihost.check_agree(
      info.fingerprint(),
      f"training data (config.data: {data.source}"
      f"{f' {where!r}' if where else ''})")


def weight_digests(tree) -> dict[str, str]:
  """{leaf path: ``weights.params_digest`` of the leaf (its dtype, shape and
  bytes; 16 hex digits)}: per leaf, so a difference names its leaves."""
  return {jax.tree_util.keystr(path): weights_lib.params_digest(leaf)[:16]
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def check_same_weights(frozen) -> None:
  """Every process of a multi-process job read the same frozen weights
  (LPIPS, teachers, the tokenizer): each reads its own host's files, and
  ``sharding.put_host`` places each process's copy on its own devices
  without comparing them, so a stale copy on one host would train with other
  losses there without a word. Costs one pass over the bytes (about a
  second for a 1.2 GB teacher) and one small collective; nothing when there
  is one process or no frozen weights.

  Raises:
    multihost.OtherProcessError: on every process; each differing process
      names the leaves whose bytes differ from process 0's.
  """
  if jax.process_count() == 1 or not jax.tree_util.tree_leaves(frozen):
    return
  multihost.check_agree(
      weight_digests(frozen), "frozen weights",
      fix="each host reads its own copy of the weight files: copy the same "
      "files to every host (or read them from one gs:// path), then run "
      "again.")


def check_model_classes(config, data_classes: int | None, *,
                        from_data: bool = True) -> None:
  """Labels must stay below ``config.model.num_classes``: a class-conditional
  generator reads label ``num_classes`` as its null (unconditional) class and
  larger ones past its class table (NaN, or a silently wrong class). Raises
  ``ConfigError`` naming both counts; warns when the data have fewer classes
  (the rest are never trained); a no-op for models without classes.
  ``from_data``: ``data_classes`` is the data's own count (which
  config.data.num_classes cannot lower), not config.data.num_classes."""
  model_classes = config.get("model", {}).get("num_classes")
  if not model_classes or not data_classes or data_classes == model_classes:
    return
  if data_classes < model_classes:
    untrained = (f"class {data_classes} is" if model_classes - data_classes
                 == 1 else f"classes {data_classes}...{model_classes - 1} are")
    logging.warning(
        "The training data has %d classes (labels 0...%d) but "
        "config.model.num_classes is %d: %s never trained, and sampling draws "
        "them too unless config.sample.classes lists the trained ones. Set "
        "--config.model.num_classes=%d if the data are all there is.",
        data_classes, data_classes - 1, model_classes, untrained, data_classes)
    return
  if from_data:
    # The pipeline refuses a config.data.num_classes below the data's count.
    what = f"The training data has {data_classes} classes (labels 0..."
    other = (" (the data's own count, which config.data.num_classes cannot "
             f"lower); a model of {model_classes} classes needs other data, "
             f"with labels 0...{model_classes - 1} only")
  else:
    what = (f"config.data.num_classes is {data_classes} (the data do not "
            "record their classes; labels 0...")
    other = (f", or, if every label of the data is below {model_classes}, "
             f"--config.data.num_classes={model_classes}")
  raise errors.ConfigError(
      f"{what}{data_classes - 1}) but config.model.num_classes "
      f"is {model_classes}: label {model_classes} would train as the model's "
      "null (unconditional) class and larger ones would read past its class "
      f"table. Set --config.model.num_classes={data_classes}{other}.")
