"""Frozen feature teachers for FQGAN's representation loss (local weights only).

Interface: ``get_teacher(name, **kwargs) -> (module, preprocess_fn)`` where
  ``module.apply({"params": p}, x)`` maps preprocessed images (B, S, S, 3) to
  the teacher's CLS feature (B, D) float32, and
  ``preprocess_fn(images, value_range)`` maps tokenizer images (B, H, W, 3) in
  ``value_range`` to the teacher's input: [0, 1] -> resize to S x S with
  PyTorch's legacy ``nearest`` (what FQGAN's ScalingLayer uses) -> (x - mean)
  / std.
Teacher weights are read from a local file by
``genvis_jax.convert.clip_vision.load_teacher_params`` (never downloaded);
``save_teacher_params`` there writes that format.

A teacher name (``config.teachers[i].name``) names its module, as every
registry does (``genvis_jax.core.registry``): ``"<module>:<variant>"`` is
``genvis_jax.models.<module>.teacher(variant, **kwargs)``, e.g.
``"clip_vision:vit_l14"``, ``"clip_vision:vit_b16"``, ``"dinov2:vit_s14"``
(the exact HF towers, converted with ``--kind=clip_vision`` / ``dinov2``);
``"<module>"`` alone takes its default variant. A new teacher is a module
defining ``teacher``; no table names it.

This module's own ``teacher`` (``"teachers:vit"``) is the shared pre-norm ViT
(``models/layers/vit.py``) whose CLS output is configurable to stand for the
official teachers' read-outs: CLIP ``hidden_states[-1][:, 0]`` = after the
last block, before post-LN (``final_norm=False``); DINOv2
``last_hidden_state[:, 0]`` = after the final LayerNorm (``final_norm=True``).
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax.numpy as jnp

from genvis_jax.core import registry
from genvis_jax.errors import ConfigError
from genvis_jax.models import clip_vision
from genvis_jax.models.layers import Dtype
from genvis_jax.models.layers import images as images_lib
from genvis_jax.models.layers import vit

OPENAI_CLIP_MEAN, OPENAI_CLIP_STD = clip_vision.CLIP_MEAN, clip_vision.CLIP_STD
IMAGENET_MEAN, IMAGENET_STD = images_lib.IMAGENET_MEAN, images_lib.IMAGENET_STD
_LN_EPS = 1e-5  # torch nn.LayerNorm default

_FORM = ("config.teachers[i].name is '<module>:<variant>' where "
         "genvis_jax/models/<module>.py defines teacher(variant, **kwargs), "
         "e.g. 'clip_vision:vit_l14', 'dinov2:vit_s14', 'teachers:vit'")


def get_teacher(name: str, **kwargs):
  """``(module, preprocess_fn)`` of the teacher ``name`` (see the module doc):
  ``"<module>:<variant>"`` -> ``genvis_jax.models.<module>.teacher(variant,
  **kwargs)``; ``"<module>"`` -> ``teacher(**kwargs)``.

  Raises ConfigError naming the choices when no module of that name defines
  ``teacher`` (an unknown variant is the module's ConfigError).
  """
  module_name, _, variant = str(name).partition(":")
  try:
    mod = registry.module("genvis_jax.models", module_name, ("teacher",),
                          setting="teacher module")
  except ConfigError as e:
    raise ConfigError(f"Unknown teacher {name!r}: {_FORM}. {e}") from None
  return mod.teacher(variant, **kwargs) if variant else mod.teacher(**kwargs)


def make_preprocess(size: int, mean, std) -> Callable:
  """``preprocess_fn(images, value_range=(-1, 1))`` for a teacher input size
  (``clip_vision.preprocess`` with these statistics)."""
  return lambda images, value_range=(-1.0, 1.0): clip_vision.preprocess(
      images, value_range, size=size, mean=mean, std=std)


class ViTTeacher(nn.Module):
  """The shared pre-norm ViT (``models/layers/vit.py``): ``embed`` (patch conv,
  class token, position table) -> optional ``pre_norm`` -> ``encoder`` (torch
  LayerNorm eps 1e-5) -> CLS, through the final ``norm`` if ``final_norm``.
  (B, S, S, 3) -> (B, width) float32, S = ``image_size`` (``ValueError``
  otherwise)."""
  image_size: int = 224
  patch_size: int = 16
  width: int = 64
  num_layers: int = 2
  num_heads: int = 4
  mlp_ratio: float = 4.0
  activation: str = "gelu"
  ln_pre: bool = True
  final_norm: bool = False
  patch_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h, w = x.shape[1:3]
    if (h, w) != (self.image_size,) * 2:
      raise ValueError(f"Teacher expects {self.image_size}x{self.image_size} "
                       f"inputs (use its preprocess_fn), got {h}x{w}.")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    init = nn.initializers.normal(self.width ** -0.5)
    x = vit.Embed(self.width, self.patch_size,
                  self.image_size // self.patch_size,
                  patch_bias=self.patch_bias, cls_init=init, pos_init=init,
                  name="embed", **kw)(x)
    if self.ln_pre:
      x = vit.layer_norm(_LN_EPS, name="pre_norm", **kw)(x)
    x = vit.Encoder(self.num_heads, int(self.width * self.mlp_ratio),
                    self.activation, _LN_EPS, depth=self.num_layers,
                    name="encoder", **kw)(x)[-1]
    cls_out = x[:, 0]
    if self.final_norm:
      cls_out = vit.layer_norm(_LN_EPS, name="norm", **kw)(cls_out)
    return cls_out.astype(jnp.float32)


_NORMS = {"clip": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
          "imagenet": (IMAGENET_MEAN, IMAGENET_STD)}


def teacher(variant: str = "vit", normalization: str = "clip",
            dtype="float32", **kwargs):
  """Generic ViT teacher (``"teachers:vit"``, its one variant); ``kwargs`` are
  ``ViTTeacher`` fields, ``normalization`` one of ``_NORMS``. Raises
  ConfigError for another variant or normalization."""
  if variant != "vit":
    raise ConfigError(f"Unknown teacher variant 'teachers:{variant}'; the "
                      "generic ViT teacher is 'teachers:vit'.")
  if normalization not in _NORMS:
    raise ConfigError(f"Unknown teacher normalization {normalization!r}; use "
                      f"{sorted(_NORMS)}.")
  module = ViTTeacher(dtype=jnp.dtype(dtype), **kwargs)
  return module, make_preprocess(module.image_size, *_NORMS[normalization])
