"""Frozen feature teachers for FQGAN's representation loss (local weights only).

Interface: ``get_teacher(name, **kwargs) -> (module, preprocess_fn)`` where
  ``module.apply({"params": p}, x)`` maps preprocessed images (B, S, S, 3) to
  the teacher's CLS feature (B, D) float32, and
  ``preprocess_fn(images, value_range)`` maps tokenizer images (B, H, W, 3) in
  ``value_range`` to the teacher's input: [0, 1] -> resize to S x S with
  PyTorch's legacy ``nearest`` (what FQGAN's ScalingLayer uses) -> (x - mean)
  / std.
Teacher weights are read from a local file by ``load_teacher_params`` (never
downloaded); ``save_teacher_params`` writes that format.

Registered here: ``vit``, a generic pre-LN ViT (open_clip block names) whose
CLS output is configurable to stand for the official teachers' read-outs:
CLIP ``hidden_states[-1][:, 0]`` = after the last block, before post-LN
(``final_norm=False``); DINOv2 ``last_hidden_state[:, 0]`` = after the final
LayerNorm (``final_norm=True``). The exact CLIP ViT-L/14, ViT-B/16 and DINOv2-S
towers (with converters from their released weights) register themselves with
``@register_teacher(name)``.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from genvis_jax.models import clip_vision, dinov2, layers
from genvis_jax.models.fqgan import transformer_stack

Dtype = Any
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_TEACHERS: dict[str, Callable[..., tuple[nn.Module, Callable]]] = {}


def register_teacher(name: str):
  """Decorator: ``factory(**kwargs) -> (module, preprocess_fn)``."""
  def deco(factory):
    _TEACHERS[name] = factory
    return factory
  return deco


def get_teacher(name: str, **kwargs):
  """Returns ``(module, preprocess_fn)`` of the teacher registered as ``name``."""
  if name not in _TEACHERS:
    raise ValueError(f"Unknown teacher {name!r}; registered: {sorted(_TEACHERS)}. "
                     "Register a Flax implementation with "
                     "genvis_jax.models.teachers.register_teacher.")
  return _TEACHERS[name](**kwargs)


def torch_nearest_resize(x: jax.Array, size: int) -> jax.Array:
  """(B, H, W, C) -> (B, size, size, C) as ``F.interpolate(mode="nearest")``:
  output index i reads input floor(i * in / out) (no half-pixel offset, unlike
  ``jax.image.resize``)."""
  rows = (np.arange(size) * x.shape[1]) // size
  cols = (np.arange(size) * x.shape[2]) // size
  return x[:, rows][:, :, cols]


def make_preprocess(size: int, mean, std) -> Callable:
  """``preprocess_fn(images, value_range=(-1, 1))`` for a teacher input size."""
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)

  def preprocess(images, value_range=(-1.0, 1.0)):
    lo, hi = (float(v) for v in value_range)
    x = (images.astype(jnp.float32) - lo) / (hi - lo)
    return (torch_nearest_resize(x, size) - mean) / std
  return preprocess


class ViTTeacher(nn.Module):
  """Pre-LN ViT: patch conv ``conv1`` -> [class_embedding; patches] +
  ``positional_embedding`` -> optional ``ln_pre`` -> ``transformer_{i}`` ->
  CLS, through ``ln_post`` if ``final_norm``. (B, S, S, 3) -> (B, width)."""
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
    b, h, w, _ = x.shape
    if (h, w) != (self.image_size,) * 2:
      raise ValueError(f"Teacher expects {self.image_size}x{self.image_size} "
                       f"inputs (use its preprocess_fn), got {h}x{w}.")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = layers.conv(self.width, self.patch_size, strides=self.patch_size,
                    padding="VALID", use_bias=self.patch_bias, name="conv1",
                    **kw)(x.astype(self.dtype))
    x = x.reshape(b, -1, self.width)
    init = layers.named(nn.initializers.normal(self.width ** -0.5),
                        ("pos", "embed"))
    cls = self.param("class_embedding", init, (1, self.width),
                     self.param_dtype)
    pos = self.param("positional_embedding", init, (x.shape[1] + 1, self.width),
                     self.param_dtype)
    cls = jnp.broadcast_to(cls.astype(x.dtype)[None], (b, 1, self.width))
    x = jnp.concatenate([cls, x], axis=1) + pos.astype(x.dtype)
    if self.ln_pre:
      x = layers.layer_norm(1e-5, name="ln_pre", **kw)(x)
    x = transformer_stack(x, num_layers=self.num_layers,
                          num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                          activation=self.activation, **kw)
    cls_out = x[:, 0]
    if self.final_norm:
      cls_out = layers.layer_norm(1e-5, name="ln_post", **kw)(cls_out)
    return cls_out.astype(jnp.float32)


_NORMS = {"clip": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
          "imagenet": (IMAGENET_MEAN, IMAGENET_STD)}


@register_teacher("vit")
def vit_teacher(normalization: str = "clip", dtype="float32", **kwargs):
  """Generic ViT teacher; ``kwargs`` are ``ViTTeacher`` fields."""
  if normalization not in _NORMS:
    raise ValueError(f"Unknown teacher normalization {normalization!r}; use "
                     f"{sorted(_NORMS)}.")
  module = ViTTeacher(dtype=jnp.dtype(dtype), **kwargs)
  return module, make_preprocess(module.image_size, *_NORMS[normalization])


# Exact HF towers (parity-tested, converted with --kind=clip_vision / dinov2).
register_teacher("clip_vit_l14")(partial(clip_vision.teacher, "vit_l14"))
register_teacher("clip_vit_b16")(partial(clip_vision.teacher, "vit_b16"))
register_teacher("dinov2_s14")(partial(dinov2.teacher, "vit_s14"))
register_teacher("dinov2_b14")(partial(dinov2.teacher, "vit_b14"))


def save_teacher_params(path: str, params) -> None:
  """Writes a params pytree as ``.npz`` with '/'-joined Flax paths as keys."""
  flat = traverse_util.flatten_dict(nn.unbox(params), sep="/")
  np.savez(path, **{k: np.asarray(v) for k, v in flat.items()})


def load_teacher_params(path: str):
  """Reads teacher params (Flax layout, '/'-joined keys) from ``.npz`` or
  ``.safetensors``."""
  from genvis_jax.convert import io as convert_io  # pylint: disable=import-outside-toplevel
  if not path.endswith((".npz", ".safetensors")):
    raise convert_io.CheckpointFileError(
        f"Teacher weights must be .npz or .safetensors, got {path!r}.")
  flat = convert_io.load_state_dict(
      path, setting="config.teachers[i].path: convert the teacher's released "
      "weights to a local .npz and point it there")
  return jax.tree_util.tree_map(
      jnp.asarray, traverse_util.unflatten_dict(flat, sep="/"))
