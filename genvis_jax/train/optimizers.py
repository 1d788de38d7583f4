"""Optimizers and learning-rate schedules from ``config.optimizer``."""

from __future__ import annotations

import math
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import optax
from absl import logging

from genvis_jax import errors
from genvis_jax.core import checkpoint_fit as fit


# '/'-joined parameter path, e.g. ``blocks_0/attn/qkv/kernel``.
param_path = fit.key_path


def decay_mask(params, no_decay: Sequence[str],
               setting: str = "config.optimizer.no_decay"):
  """True where weight decay applies: no regex of ``no_decay`` matches the
  path. A pattern with a comma that matches no parameter is warned about
  once, naming ``setting``: ``--config...no_decay=bias,scale`` gives the one
  pattern ``"bias,scale"``, which exempts nothing. (The shared defaults name
  parameters some models lack, e.g. ``embedding``: not warned about.)"""
  pats = [re.compile(p) for p in no_decay]
  paths = [param_path(path) for path, _ in
           jax.tree_util.tree_leaves_with_path(params)]
  for p in pats:
    if ("," in p.pattern and paths
        and not any(p.search(path) for path in paths)):
      message = (f"{setting}: pattern {p.pattern!r} matches no parameter "
                 f"(e.g. {paths[0]!r}), so it exempts none from weight decay: "
                 "each pattern is its own entry, e.g. --config.optimizer."
                 "no_decay='(\"bias\",\"scale\")'")
      if message not in _WARNED:
        _WARNED.add(message)
        logging.warning("%s.", message)
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not any(p.search(param_path(path)) for p in pats), params)


_WARNED: set[str] = set()   # a mask is built for each optimizer state made


def step_decay_schedule(lr: float, warmup: int, every: int, rate: float):
  """Equivariant tokenizer's ``LambdaWarmUpDecayScheduler`` (official code):
  linear warm-up over ``warmup`` steps (reaching (warmup-1)/warmup), then
  x ``rate`` every ``every`` steps."""
  def schedule(n):
    n = jnp.asarray(n, jnp.float32)
    if warmup <= 0:
      return lr * rate ** jnp.floor(n / every)
    k = jnp.floor(jnp.maximum(n - warmup, 0.0) / every)
    after = (warmup - 1) / warmup * rate ** k
    return lr * jnp.where(n < warmup, n / warmup, after)
  return schedule


def make_schedule(opt_config, num_steps: int,
                  setting: str = "config.optimizer") -> optax.Schedule:
  """Learning rate per step from ``opt_config.schedule``:
    * ``constant``: ``lr``, after a linear warm-up from 0 over ``warmup_steps``;
    * ``cosine``: that warm-up, then cosine from ``lr`` to ``end_lr`` at
      ``num_steps``;
    * ``step_decay``: ``step_decay_schedule`` with ``decay_every`` and
      ``decay_rate``.
  Raises ``ConfigError`` naming ``setting``'s key for another schedule."""
  lr, warmup = opt_config.lr, int(opt_config.warmup_steps)
  if opt_config.schedule == "constant":
    if warmup:
      return optax.join_schedules(
          [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)],
          [warmup])
    return optax.constant_schedule(lr)
  if opt_config.schedule == "cosine":
    # Linear warm-up from 0 then cosine from lr down to end_lr at num_steps.
    return optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup_steps=max(warmup, 0), decay_steps=max(num_steps, warmup + 1),
        end_value=opt_config.end_lr)
  if opt_config.schedule == "step_decay":
    return step_decay_schedule(lr, warmup, int(opt_config.decay_every),
                               float(opt_config.decay_rate))
  raise errors.ConfigError(
      f"Unknown {setting}.schedule {opt_config.schedule!r}; "
      "use 'constant', 'cosine' or 'step_decay'.")


def _at_least_0(v):
  return 0 <= v < math.inf     # False for NaN too


def _below_1(v):
  return 0 <= v < 1


def _accepts(accepted, value) -> bool:
  """``accepted(float(value))``; False for a value that is no number (e.g. a
  string set in a config file)."""
  try:
    return accepted(float(value))
  except (TypeError, ValueError):
    return False


# Key -> (accepted, what it must be and why), for the keys an optimizer reads.
RULES = {
    "lr": (_at_least_0, "must be finite and >= 0: a negative learning rate "
           "climbs the loss (gradient ascent); e.g. 1e-4"),
    "end_lr": (_at_least_0, "must be finite and >= 0: the cosine schedule "
               "ends there, and below 0 it climbs the loss; 0 decays to zero"),
    "warmup_steps": (_at_least_0, "must be >= 0 (0: no warm-up)"),
    "decay_every": (lambda v: 1 <= v < math.inf, "must be at least 1 (steps "
                    "between two step_decay drops)"),
    "decay_rate": (_at_least_0, "must be finite and >= 0: step_decay "
                   "multiplies the learning rate by it, and below 0 flips its "
                   "sign (gradient ascent)"),
    "b1": (_below_1, "must be in [0, 1) (Adam's first-moment decay, e.g. 0.9)"),
    "b2": (_below_1, "must be in [0, 1) (Adam's second-moment decay, e.g. "
           "0.999)"),
    "eps": (_at_least_0, "must be finite and >= 0 (e.g. 1e-8)"),
    "weight_decay": (_at_least_0, "must be finite and >= 0: below 0 it pushes "
                     "the weights away from zero; 0 turns it off"),
    "momentum": (_below_1, "must be in [0, 1) (e.g. 0.9)"),
}


# Keys only some optimizers or schedules read: (the value that does nothing,
# the key choosing the reader, the readers). Another value under another
# reader was ignored without a word (weight decay under Adam, an end_lr
# under a constant schedule).
_READ_ONLY_BY = {"weight_decay": (0.0, "name", ("adamw",)),
                 "end_lr": (0.0, "schedule", ("cosine",))}


def _read_keys(opt_config) -> tuple[str, ...]:
  """The numeric keys the schedule and optimizer of ``opt_config`` read."""
  keys = ("lr", "warmup_steps")
  keys += {"cosine": ("end_lr",),
           "step_decay": ("decay_every", "decay_rate")}.get(
               opt_config.schedule, ())
  keys += {"adamw": ("b1", "b2", "eps", "weight_decay"),
           "adam": ("b1", "b2", "eps"), "sgd": ("momentum",)}.get(
               opt_config.name, ())
  return keys


def check_config(opt_config, setting: str = "config.optimizer") -> None:
  """Raises ``ConfigError`` naming ``setting``'s key (e.g.
  ``config.disc.optimizer.lr``) for a value no training can use: a negative
  or non-finite learning rate, end_lr, warm-up, weight decay or step_decay
  rate, Adam betas or momentum outside [0, 1), or a ``no_decay`` entry that
  is not a regular expression (an empty one, from ``--config...no_decay=``,
  would exempt every parameter), or a weight decay or end_lr that this
  optimizer or schedule would ignore (``_READ_ONLY_BY``), or a step_decay
  warm-up of 1 step (its learning rate is 0 after it). Keys the config
  lacks keep their defaults and are not checked."""
  for pattern in opt_config.get("no_decay", None) or ():
    why = ("is empty: it matches every parameter, so none would decay (for "
           f"no exemption set the tuple empty, --{setting}.no_decay='()')"
           if pattern == "" else "")
    if not why:
      try:
        re.compile(pattern)
      except (re.error, TypeError) as e:
        why = f"is not a regular expression ({e})"
    if why:
      raise errors.ConfigError(f"{setting}.no_decay entry {pattern!r} {why}.")
  for key, (no_effect, chooser, readers) in _READ_ONLY_BY.items():
    value, chosen = opt_config.get(key), opt_config.get(chooser)
    if value not in (None, no_effect) and chosen not in readers:
      raise errors.ConfigError(
          f"{setting}.{key}={value!r} is read only with {setting}.{chooser}="
          f"{readers[0]!r}, and {setting}.{chooser}={chosen!r} would ignore "
          f"it: set --{setting}.{chooser}={readers[0]}, or {key} to "
          f"{no_effect}.")
  for key in _read_keys(opt_config):
    value = opt_config.get(key)
    accepted, rule = RULES[key]
    if value is None:
      continue
    if not _accepts(accepted, value):
      raise errors.ConfigError(f"{setting}.{key}={value!r} {rule}.")
  if (opt_config.get("schedule") == "step_decay"
      and int(opt_config.get("warmup_steps", 0) or 0) == 1):
    raise errors.ConfigError(
        f"{setting}.warmup_steps=1 with the step_decay schedule: after its "
        "warm-up the official schedule holds (warmup - 1) / warmup x lr, 0 "
        "here, so the run would never update. Use a warm-up of 0 or at least "
        "2 (a runlocal config's is a quarter of config.train.num_steps).")


def grad_clip(train_config) -> float:
  """``train_config.grad_clip``, the global gradient norm clipped to (0 =
  off). Raises ``ConfigError`` for a value that is not finite and >= 0 (NaN
  or a negative one would turn clipping off without a word)."""
  value = train_config.get("grad_clip", 0.0)
  if not _accepts(_at_least_0, value):
    raise errors.ConfigError(
        f"config.train.grad_clip={value!r} must be finite and >= 0: the "
        "global gradient norm is clipped to it, and 0 turns clipping off "
        "(e.g. 1.0).")
  return float(value)


def warn_long_warmup(opt_config, num_steps: int,
                     setting: str = "config.optimizer") -> None:
  """Warns when ``opt_config``'s warm-up is not shorter than the run (e.g.
  a paper config with ``--config.train.num_steps`` alone): the learning
  rate would never reach its peak."""
  warmup = int(opt_config.get("warmup_steps", 0) or 0)
  if 0 < num_steps <= warmup:
    logging.warning(
        "%s.warmup_steps=%d is not below config.train.num_steps=%d: the "
        "learning rate never reaches %s.lr=%g (it ends near %.3g%s). Set the "
        "warm-up with the steps, e.g. --%s.warmup_steps=%d.", setting,
        warmup, num_steps, setting, opt_config.lr,
        opt_config.lr * num_steps / warmup,
        "" if opt_config.schedule != "cosine" else ", and the cosine decay "
        "never starts", setting, num_steps // 4)


def make_optimizer(opt_config, train_config,
                   setting: str = "config.optimizer"
                   ) -> optax.GradientTransformation:
  """Gradient clipping + Adam(W) with the configured schedule and decay mask.
  ``setting``: where ``opt_config`` is in the config, for messages
  (``check_config``)."""
  check_config(opt_config, setting)
  schedule = make_schedule(opt_config, int(train_config.num_steps), setting)
  # Always present (inf = off) so the state layout does not depend on it and a
  # run can be resumed with a different clip value.
  clip = grad_clip(train_config)
  clip = clip if clip > 0 else float("inf")
  chain = [optax.clip_by_global_norm(clip)]
  name = opt_config.name
  if name in ("adamw", "adam"):
    wd = opt_config.weight_decay if name == "adamw" else 0.0
    chain.append(optax.adamw(
        schedule, b1=opt_config.b1, b2=opt_config.b2, eps=opt_config.eps,
        weight_decay=wd,
        mask=lambda p: decay_mask(p, tuple(opt_config.no_decay),
                                  f"{setting}.no_decay")))
  elif name == "sgd":
    chain.append(optax.sgd(schedule, momentum=opt_config.get("momentum", 0.9)))
  else:
    raise errors.ConfigError(
        f"Unknown {setting}.name {name!r}; use adamw | adam | sgd.")
  return optax.chain(*chain)
