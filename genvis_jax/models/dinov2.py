"""DINOv2 ViT, layer for layer as Hugging Face ``Dinov2Model``.

Frozen teacher of FQGAN-Triple (ViT-S/14, ``last_hidden_state[:, 0]``) and of
the Equivariant tokenizer's semantic alignment (ViT-B/14 patch tokens).
The tower is the shared ViT (``models/layers/vit.py``: ``embed`` with a
``mask_token``, ``encoder/block_{i}`` with separate q/k/v, LayerScale and
exact GELU, final ``norm``); HF's names are mapped in ``convert/dinov2.py``.

Forward: patches (mask_token where ``bool_masked_pos``) + [cls] + position
table resized to the input grid -> blocks x + ls1 * attn(norm1 x);
x + ls2 * fc2(gelu(fc1(norm2 x))) -> layernorm = ``last_hidden_state``.
Drop path is the identity at inference (the released towers use rate 0).

The position table (G = 37 for the 518-px release) is resized with torch's
bicubic ``F.interpolate`` reproduced exactly as a pair of (out, in) matrices:
  interpolate_offset=0.0, interpolate_antialias=False: current HF (size=grid);
  interpolate_offset=0.1: HF <= 4.4x / original DINOv2 (scale (g + 0.1) / G),
      the transformers 4.41.1 that FQGAN pins;
  interpolate_antialias=True: timm ``resample_abs_pos_embed`` (what the
      Equivariant tokenizer applies to the torch-hub DINOv2 before use).
As in HF, the table is used as is when the grid already matches and H == W.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from genvis_jax.errors import ConfigError
from genvis_jax.models.clip_vision import preprocess as _preprocess
from genvis_jax.models.layers import Dtype
from genvis_jax.models.layers import images as images_lib
from genvis_jax.models.layers import vit

# HF Dinov2Config field names; the released facebook/dinov2-* towers.
CONFIGS = {
    "vit_s14": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6),
    "vit_b14": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
}
# How each project's official code resized the position table (see above).
TEACHER_INTERP = {"vit_s14": dict(interpolate_offset=0.1),     # FQGAN-Triple
                  "vit_b14": dict(interpolate_antialias=True)}  # Equivariant
OUTPUTS = ("last_hidden_state", "cls", "patch_tokens")


def interpolate_pos_encoding(pos, height: int, width: int, patch_size: int, *,
                             offset: float = 0.0, antialias: bool = False):
  """pos (1, 1 + G*G, D) -> (1, 1 + gh*gw, D) in pos.dtype for an H x W input
  (gh, gw = H // patch_size, W // patch_size; HF
  ``Dinov2Embeddings.interpolate_pos_encoding``; see the module docstring).
  Raises ``ValueError`` when the table's patch rows are not a square grid."""
  n = pos.shape[1] - 1
  g = math.isqrt(n)
  if g * g != n:
    raise ValueError(f"Position table of {n} patch rows is not a square grid.")
  gh, gw = height // patch_size, width // patch_size
  if gh * gw == n and height == width:
    return pos
  sf = lambda o: (o + offset) / g if offset else None
  mh = images_lib.bicubic_matrix(g, gh, scale_factor=sf(gh), antialias=antialias)
  mw = images_lib.bicubic_matrix(g, gw, scale_factor=sf(gw), antialias=antialias)
  table = pos[0, 1:].reshape(g, g, -1).astype(jnp.float32)
  table = jnp.einsum("ia,abd,jb->ijd", jnp.asarray(mh, jnp.float32), table,
                     jnp.asarray(mw, jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
  table = table.astype(pos.dtype).reshape(1, gh * gw, -1)
  return jnp.concatenate([pos[:, :1], table], axis=1)


def preprocess(images, value_range: Sequence[float] = (-1.0, 1.0), *,
               size: int = 224):
  """FQGAN's DINOv2 input: [lo, hi] -> [0, 1] -> nearest resize -> ImageNet
  mean/std. (B, H, W, 3) -> (B, size, size, 3) float32."""
  return _preprocess(images, value_range, size=size, mean=images_lib.IMAGENET_MEAN,
                     std=images_lib.IMAGENET_STD)


def _resize_table(pos, height: int, width: int, *, patch_size: int,
                  offset: float, antialias: bool):
  """``vit.Embed``'s resize: (1 + G*G, D) -> (1 + gh*gw, D)."""
  return interpolate_pos_encoding(pos[None], height, width, patch_size,
                                  offset=offset, antialias=antialias)[0]


# --- the model -------------------------------------------------------------------------

class Dinov2Model(nn.Module):
  """HF ``Dinov2Model`` (no pooler head beyond the CLS).

  ``__call__(pixel_values (B, H, W, 3) normalised, bool_masked_pos=None
  (B, num_patches) bool, output_hidden_states=False)`` returns, with
  ``output=None``, a dict of float32 arrays:
    last_hidden_state (B, 1 + gh*gw, D)  after the final ``layernorm``
    cls               (B, D)   last_hidden_state[:, 0] (= HF pooler_output)
    patch_tokens      (B, gh*gw, D)  last_hidden_state[:, 1:], row-major
                               over the (H/p, W/p) grid (DINOv2
                               ``x_norm_patchtokens``)
    hidden_states     tuple of num_hidden_layers + 1, before the final norm,
                      only if asked (HF's).
  With ``output`` one of ``OUTPUTS`` only that array is returned.
  Raises ``ValueError`` for pixel_values that are not (B, H, W, 3) with
  H, W >= patch_size, another ``output``, or a ``bool_masked_pos`` of
  another shape.
  """
  hidden_size: int = 384
  num_hidden_layers: int = 12
  num_attention_heads: int = 6
  mlp_ratio: float = 4.0
  image_size: int = 518            # sets the stored position grid (518/14 = 37)
  patch_size: int = 14
  layer_norm_eps: float = 1e-6
  layerscale_value: float = 1.0
  interpolate_offset: float = 0.0
  interpolate_antialias: bool = False
  output: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixel_values, bool_masked_pos=None,
               output_hidden_states: bool = False):
    p = self.patch_size
    if (pixel_values.ndim != 4 or pixel_values.shape[-1] != 3
        or min(pixel_values.shape[1:3]) < p):
      raise ValueError(f"Dinov2Model expects normalised (B, H, W, 3) images "
                       f"with H, W >= the patch size {p} (use "
                       f"dinov2.preprocess), got {pixel_values.shape}.")
    if self.output is not None and self.output not in OUTPUTS:
      raise ValueError(f"Unknown output {self.output!r}; use None or {OUTPUTS}.")
    d = self.hidden_size
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    resize = functools.partial(_resize_table, patch_size=p,
                               offset=self.interpolate_offset,
                               antialias=self.interpolate_antialias)
    x = vit.Embed(d, p, self.image_size // p, mask_token=True, resize=resize,
                  name="embed", **kw)(pixel_values, bool_masked_pos)
    states = vit.Encoder(self.num_attention_heads, int(d * self.mlp_ratio),
                         "gelu", self.layer_norm_eps, self.layerscale_value,
                         fused_qkv=False, depth=self.num_hidden_layers,
                         name="encoder", **kw)(x)
    last = vit.layer_norm(self.layer_norm_eps, name="norm", **kw)(states[-1])
    last = last.astype(jnp.float32)
    out = {"last_hidden_state": last, "cls": last[:, 0],
           "patch_tokens": last[:, 1:]}
    if self.output is not None:
      return out[self.output]
    if output_hidden_states:
      out["hidden_states"] = tuple(t.astype(jnp.float32) for t in states)
    return out


def from_hf_config(cfg: dict, **overrides) -> Dinov2Model:
  """Module from an HF Dinov2 ``config.json`` dict (architecture fields).
  Raises ConfigError for a tower this module does not implement (SwiGLU)."""
  if cfg.get("use_swiglu_ffn") or cfg.get("hidden_act", "gelu") != "gelu":
    raise ConfigError(
        "Only the GELU-MLP DINOv2 towers (S/B/L) are implemented; this config "
        "uses SwiGLU or another activation (giant): use the config.json of "
        f"a ViT-S/B/L checkpoint, or a released tower by name "
        f"({sorted(CONFIGS)}).")
  keys = ("hidden_size", "num_hidden_layers", "num_attention_heads",
          "mlp_ratio", "image_size", "patch_size", "layer_norm_eps",
          "layerscale_value")
  return Dinov2Model(**{k: cfg[k] for k in keys if k in cfg}, **overrides)


def dinov2(name: str = "vit_s14", **overrides) -> Dinov2Model:
  """A released tower by name (``CONFIGS``); ``overrides`` are module fields.
  Raises ``ConfigError`` for another name."""
  if name not in CONFIGS:
    raise ConfigError(f"Unknown DINOv2 config {name!r}; use one of "
                      f"{sorted(CONFIGS)}.")
  return Dinov2Model(**{**CONFIGS[name], **overrides})


def teacher(name: str, dtype="float32", **overrides):
  """``(module -> (B, D) cls, preprocess)``, the teacher ``"dinov2:{name}"``
  of ``teachers.get_teacher``, with the position-table resize of the project
  that used this tower (``TEACHER_INTERP``); pass ``output="patch_tokens"``
  for patch features. Raises ``ConfigError`` for a name not in ``CONFIGS``."""
  fields = {"output": "cls", **TEACHER_INTERP.get(name, {}), **overrides}
  module = dinov2(name, dtype=jnp.dtype(dtype), **fields)
  return module, preprocess


def example_inputs(module: Dinov2Model, batch_size: int = 1, size: int = 224):
  """(pixels f32 zeros (batch_size, size, size, 3),) for ``module`` (a tower,
  not a ``config.model``: not a registry model)."""
  return (jnp.zeros((batch_size, size, size, 3), jnp.float32),)
