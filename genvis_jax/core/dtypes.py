"""Dtype names of configs (``model.dtype``, ``tokenizer.dtype``,
``sample.dtype``) -> jnp dtypes, one check with one message shape; and
``config.matmul_precision``, what float32 matmuls compute in."""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp

from genvis_jax.errors import ConfigError

FLOAT_DTYPES = ("float32", "bfloat16", "float16")


def parse(value, setting: str, allowed: tuple[str, ...] = FLOAT_DTYPES,
          hint: str = ""):
  """``value`` (a dtype name or jnp dtype; None / '' = unset) -> a jnp dtype,
  or None when unset (the caller's default applies).

  Raises:
    ConfigError: ``value`` names no dtype in ``allowed``; the message names
      ``setting`` (e.g. "config.sample.dtype"), the allowed names and
      ``hint`` (what they mean where it is read).
  """
  if value is None or (isinstance(value, str) and not value):
    return None
  try:
    dtype = jnp.dtype(value)
  except TypeError:
    dtype = None
  if dtype is None or dtype.name not in allowed:
    raise ConfigError(f"{setting}={value!r} is not a supported dtype here; "
                      f"use one of {', '.join(map(repr, allowed))}{hint}.")
  return dtype


# config.matmul_precision -> what fp32 matmuls and convolutions compute in.
MATMUL_PRECISIONS = ("", "bfloat16", "tensorfloat32", "float32")
# What "" is where a mode produces data or numbers (pre-tokenizing,
# sampling, evaluating): at least TF32, as the official scripts run them
# (torch.backends.*.allow_tf32 = True). On NVIDIA GPUs that is XLA's
# default; on a TPU it is 3 bf16 passes where the default is one.
INFERENCE_DEFAULT = "tensorfloat32"


def precision_name(config, inference: bool = False) -> str:
  """The name of the precision a job of ``config`` computes fp32 dots and
  convolutions at: ``config.matmul_precision`` ("float32": full fp32;
  "tensorfloat32": 3 bf16 passes on TPU, TF32 on NVIDIA GPUs; "bfloat16":
  one bf16 pass), or for "" / absent ``INFERENCE_DEFAULT`` where
  ``inference`` and "" (XLA's default: one bf16 pass on TPU, TF32 on recent
  NVIDIA GPUs, full fp32 on CPU) in training. Raises ``ConfigError`` for
  another value."""
  value = config.get("matmul_precision", "") or ""
  if value not in MATMUL_PRECISIONS:
    raise ConfigError(f"config.matmul_precision={value!r}; choose one of "
                      f"{list(MATMUL_PRECISIONS)} ('' = XLA's default in "
                      f"training, {INFERENCE_DEFAULT!r} in inference).")
  return value or (INFERENCE_DEFAULT if inference else "")


def matmul_precision(config, inference: bool = False):
  """The context a job of ``config`` computes in: fp32 dots and
  convolutions at ``precision_name(config, inference)``. bf16 operands are
  unaffected; jit traces (and caches) under it. Raises ``ConfigError`` for
  a value jax does not take."""
  value = precision_name(config, inference)
  if not value:
    return contextlib.nullcontext()
  return jax.default_matmul_precision(value)


def at_matmul_precision(fn=None, *, inference: bool = False):
  """``fn(config, ...)`` run inside ``matmul_precision(config, inference)``:
  the entry points of the modes (train; with ``inference``: sample,
  evaluate, pretokenize), so the Python API and notebooks compute as the
  command line does."""
  if fn is None:
    return functools.partial(at_matmul_precision, inference=inference)

  @functools.wraps(fn)
  def wrapped(config, *args, **kwargs):
    with matmul_precision(config, inference):
      return fn(config, *args, **kwargs)
  wrapped.at_matmul_precision = "inference" if inference else "train"
  return wrapped


# How a 16-bit model rounds: "autocast" since norms return float32, GELU /
# SiLU round once and the attention scale multiplies float32 logits, as
# under torch.autocast (layers.norm_dtype); before, each op rounded to the
# model's dtype. The outputs a 16-bit model writes (token files, sample
# parts) record it, so a run does not reuse or continue a set written with
# the other rounding (float32 models compute as before).
BF16_ROUNDING = "autocast"


def rounding_record(*dtype_names) -> dict:
  """``{"bf16_rounding": BF16_ROUNDING}`` where one of ``dtype_names``
  (resolved compute dtypes, e.g. ``sample.dtype``, ``tokenizer.dtype``) is
  16-bit, else ``{}``: records of float32 outputs read as before."""
  if any(str(d) in ("bfloat16", "float16") for d in dtype_names):
    return {"bf16_rounding": BF16_ROUNDING}
  return {}


def rounding_note(diff: list[str]) -> str:
  """"; why" for a record's differences (``settings.differences`` lines)
  that name ``bf16_rounding``, else ""."""
  if any(line.startswith("bf16_rounding: (absent)") for line in diff):
    return ("; bf16_rounding: this version's 16-bit models round as torch "
            "autocast and record it; those outputs record no rounding, so "
            "an earlier version may have written them rounding each op")
  return ""
