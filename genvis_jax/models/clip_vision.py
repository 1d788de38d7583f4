"""CLIP vision tower, layer for layer as Hugging Face ``CLIPVisionModel``.

Frozen teacher of FQGAN's representation loss (Dual: ViT-L/14, Triple: ViT-B/16).
The tower is the shared ViT (``models/layers/vit.py``: ``embed``, ``pre_norm``,
``encoder/block_{i}`` with separate q/k/v and quick_gelu, ``post_norm``); HF's
names are mapped in ``convert/clip_vision.py``.

Forward: patches + [class] + position table -> pre_layrnorm -> pre-LN blocks
(x + attn(ln1 x); x + fc2(quick_gelu(fc1(ln2 x)))) -> ``last_hidden_state``;
``pooled`` = post_layernorm(last_hidden_state[:, 0]).  FQGAN's target is
``hidden_states[-1][:, 0]`` = ``last_hidden_state[:, 0]`` (``cls``), i.e. BEFORE
post_layernorm.

Also FQGAN's teacher ``preprocess``, which the DINOv2 tower shares.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from genvis_jax.core import pixels
from genvis_jax.errors import ConfigError
from genvis_jax.models.layers import Dtype
from genvis_jax.models.layers import vit

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# HF CLIPVisionConfig field names; the released openai/clip-vit-* towers.
CONFIGS = {
    "vit_l14": dict(hidden_size=1024, intermediate_size=4096,
                    num_hidden_layers=24, num_attention_heads=16,
                    image_size=224, patch_size=14),
    "vit_b16": dict(hidden_size=768, intermediate_size=3072,
                    num_hidden_layers=12, num_attention_heads=12,
                    image_size=224, patch_size=16),
}
OUTPUTS = ("last_hidden_state", "cls", "pooled")


# --- teacher preprocessing (shared with dinov2.py) -----------------------------

def resize_nearest(x, height: int, width: int):
  """(B, H, W, C) -> (B, height, width, C) as ``F.interpolate(mode="nearest")``:
  output index i reads input floor(i * in / out) (exact integer arithmetic, as
  torch 2.x; no half-pixel offset, unlike ``jax.image.resize``)."""
  rows = (np.arange(height) * x.shape[1]) // height
  cols = (np.arange(width) * x.shape[2]) // width
  return x[:, rows][:, :, cols]


def preprocess(images, value_range: Sequence[float] = (-1.0, 1.0), *,
               size: int = 224, mean=CLIP_MEAN, std=CLIP_STD):
  """FQGAN's teacher input: images (B, H, W, 3) in ``value_range`` -> [0, 1] ->
  nearest resize to ``size`` x ``size`` -> (x - mean) / std, float32.

  Defaults are CLIP's; ``dinov2.preprocess`` passes the ImageNet statistics.
  Returns (B, size, size, 3) float32. Raises ``ValueError`` for a
  ``value_range`` with hi <= lo or images that are not (B, H, W, 3)."""
  lo, hi = (float(v) for v in value_range)
  if hi <= lo:
    raise ValueError(f"value_range must be (low, high) with low < high, got "
                     f"{tuple(value_range)}; use (-1, 1) or (0, 1).")
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"Expected NHWC RGB images (B, H, W, 3), got {images.shape}.")
  x = pixels.to_unit(images.astype(jnp.float32), (lo, hi))
  x = resize_nearest(x, size, size)
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


# --- the model -------------------------------------------------------------------

class CLIPVisionModel(nn.Module):
  """HF ``CLIPVisionModel`` (no projection head).

  ``__call__(pixel_values (B, S, S, 3) normalised, output_hidden_states=False)``
  returns, with ``output=None``, a dict of float32 arrays:
    last_hidden_state (B, 1 + (S/p)^2, D)  encoder output (no post-LN)
    cls               (B, D)   last_hidden_state[:, 0] = FQGAN's teacher target
    pooled            (B, D)   post_layernorm(cls) = HF ``pooler_output``
    hidden_states     tuple of num_hidden_layers + 1 (B, N, D), only if asked
      (HF's: after pre_layrnorm, then after every layer).
  With ``output`` one of ``OUTPUTS`` only that array is returned.
  Raises ``ValueError`` for pixel_values not (B, image_size, image_size, 3)
  or another ``output``.
  """
  hidden_size: int = 1024
  intermediate_size: int = 4096
  num_hidden_layers: int = 24
  num_attention_heads: int = 16
  image_size: int = 224
  patch_size: int = 14
  layer_norm_eps: float = 1e-5
  output: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixel_values, output_hidden_states: bool = False):
    s = self.image_size
    if pixel_values.ndim != 4 or pixel_values.shape[1:] != (s, s, 3):
      raise ValueError(f"CLIPVisionModel expects (B, {s}, {s}, 3) normalised "
                       f"images (use clip_vision.preprocess), got "
                       f"{pixel_values.shape}.")
    if self.output is not None and self.output not in OUTPUTS:
      raise ValueError(f"Unknown output {self.output!r}; use None or {OUTPUTS}.")
    d, p = self.hidden_size, self.patch_size
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = vit.Embed(d, p, s // p, patch_bias=False,
                  cls_init=nn.initializers.normal(d ** -0.5), name="embed",
                  **kw)(pixel_values)
    x = vit.layer_norm(self.layer_norm_eps, name="pre_norm", **kw)(x)
    states = vit.Encoder(self.num_attention_heads, self.intermediate_size,
                         "quick_gelu", self.layer_norm_eps, fused_qkv=False,
                         depth=self.num_hidden_layers, name="encoder", **kw)(x)
    pooled = vit.layer_norm(self.layer_norm_eps, name="post_norm", **kw)(
        states[-1][:, 0])
    f32 = lambda t: t.astype(jnp.float32)
    out = {"last_hidden_state": f32(states[-1]), "cls": f32(states[-1][:, 0]),
           "pooled": f32(pooled)}
    if self.output is not None:
      return out[self.output]
    if output_hidden_states:
      out["hidden_states"] = tuple(f32(t) for t in states)
    return out


def from_hf_config(cfg: dict, **overrides) -> CLIPVisionModel:
  """Module from an HF ``config.json`` dict (a CLIPModel's ``vision_config`` or
  a CLIPVisionConfig); architecture fields only. Raises ConfigError for a
  tower this module does not implement (another activation)."""
  cfg = dict(cfg.get("vision_config", cfg))
  act = cfg.get("hidden_act", "quick_gelu")
  if act != "quick_gelu":
    raise ConfigError(
        f"Only hidden_act='quick_gelu' (OpenAI CLIP) is implemented, the "
        f"config has {act!r}: use the config.json of an OpenAI CLIP "
        f"checkpoint, or a released tower by name ({sorted(CONFIGS)}).")
  keys = (*CONFIGS["vit_b16"], "layer_norm_eps")
  return CLIPVisionModel(**{k: cfg[k] for k in keys if k in cfg}, **overrides)


def clip_vision(name: str = "vit_l14", **overrides) -> CLIPVisionModel:
  """A released tower by name (``CONFIGS``); ``overrides`` are module fields.
  Raises ``ConfigError`` for another name."""
  if name not in CONFIGS:
    raise ConfigError(f"Unknown CLIP vision config {name!r}; use one of "
                      f"{sorted(CONFIGS)}.")
  return CLIPVisionModel(**{**CONFIGS[name], **overrides})


def teacher(name: str, dtype="float32", **overrides):
  """FQGAN teacher ``"clip_vision:{name}"`` of ``teachers.get_teacher``:
  ``(module -> (B, D) float32 cls, preprocess)``; the CLS is taken before
  post_layernorm. Raises ``ConfigError`` for a name not in ``CONFIGS``."""
  module = clip_vision(name, output="cls", dtype=jnp.dtype(dtype), **overrides)
  return module, lambda images, value_range=(-1.0, 1.0): preprocess(
      images, value_range, size=module.image_size)


def example_inputs(module: CLIPVisionModel, batch_size: int = 1):
  """(pixels f32 zeros (batch_size, image_size, image_size, 3),) for
  ``module`` (a tower, not a ``config.model``: not a registry model)."""
  return (jnp.zeros((batch_size, module.image_size, module.image_size, 3),
                    jnp.float32),)
