"""The one Vision Transformer: a pre-norm block, a tower of blocks, and the
patch / class-token / position-table embedding.

Used by the CLIP and DINOv2 teachers (``models/clip_vision.py``,
``models/dinov2.py``), the DINO discriminator's frozen ViT
(``models/dino_disc.py``), the generic teacher ViT (``models/teachers.py``)
and FQGAN's adapters and feature heads (``models/fqgan.py``). What differs
between them is an option here (norm eps, activation, LayerScale, fused or
separate q/k/v) or stays in the model file (CLIP's pre-norm, DINOv2's
position-table resize and mask token, the discriminator heads).

Parameter names say what they are; the official PyTorch names are mapped in
``genvis_jax/convert/`` (``convert/vit.py`` holds the rule sets):
  embed/{patch_embed/{kernel, bias}, cls_token (d,), mask_token (d,),
         pos_embed (rows, d)}
  encoder/block_{i}/{norm1, attn/{qkv | q, k, v, out}, ls1/scale,
                     norm2, mlp/{fc1, fc2}, ls2/scale}

LayerNorms here compute the variance in two passes, E[(x - mu)^2], as torch
does: the residual stream of released ViTs (CLIP above all) has outlier
channels where E[x^2] - mu^2 loses digits.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import flax.linen as nn
import jax.numpy as jnp

from genvis_jax.models import layers
from genvis_jax.models.layers import Dtype
from genvis_jax.models.layers.attention import Attention
from genvis_jax.models.layers.mlp import Mlp


def layer_norm(eps: float, *, name: str, dtype=None, param_dtype=jnp.float32):
  """``layers.layer_norm`` with torch's two-pass variance (see the module doc)."""
  return layers.layer_norm(eps, use_fast_variance=False, dtype=dtype,
                           param_dtype=param_dtype, name=name)


class LayerScale(nn.Module):
  """(..., d) * ``scale`` (d,), initialised to ``init_value`` (CaiT / DINOv2);
  output in the promoted dtype, as torch's ``x * gamma``: float32 for a bf16
  x and float32 scale, so a bf16 model's residual add is not rounded first."""
  init_value: float = 1.0
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", layers.named(
        nn.initializers.constant(self.init_value), ("norm",)),
                       (x.shape[-1],), self.param_dtype)
    return x * scale


class Block(nn.Module):
  """Pre-norm transformer block, (B, N, d) -> (B, N, d):
  x + ls1(attn(norm1 x)), then x + ls2(mlp(norm2 x)).

  num_heads: attention heads (must divide d, else ``ValueError``).
  mlp_dim: hidden width of the MLP (``activation``: a name of
    ``layers.mlp.ACTIVATIONS``, e.g. gelu, gelu_tanh, quick_gelu).
  norm_eps: eps of both LayerNorms (torch default 1e-5, timm / HF DINOv2 1e-6).
  layerscale: init value of ``ls1`` / ``ls2``; None = no LayerScale.
  fused_qkv: one ``qkv`` projection (timm, open_clip) or ``q``/``k``/``v`` (HF).
  torch_init: PyTorch's defaults for a block built of ``nn.MultiheadAttention``
    and ``nn.Linear`` (open_clip's, as FQGAN trains its heads from scratch):
    xavier-uniform qkv, the ``nn.Linear`` default for the output projection
    and the MLP (``layers.torch_kernel_init``; MLP biases
    ``torch_bias_init``), attention biases 0. Default: N(0, 0.02) kernels,
    zero biases (the initialisers of the loaded ViTs do not matter).
  """
  num_heads: int
  mlp_dim: int
  activation: str = "gelu"
  norm_eps: float = 1e-6
  layerscale: float | None = None
  fused_qkv: bool = True
  torch_init: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    if d % self.num_heads:
      raise ValueError(f"ViT width {d} is not divisible by {self.num_heads} "
                       "heads; choose a head count that divides the width.")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    scaled = lambda name, y: (y if self.layerscale is None else LayerScale(
        self.layerscale, self.param_dtype, name=name)(y))
    attn_init, mlp_init = {}, {}
    if self.torch_init:
      attn_init = dict(kernel_init=layers.xavier_uniform,
                       out_init=layers.torch_kernel_init)
      mlp_init = layers.inits("torch")
    y = Attention(self.num_heads, fused_qkv=self.fused_qkv, name="attn",
                  **attn_init, **kw)(
        layer_norm(self.norm_eps, name="norm1", **kw)(x))
    x = x + scaled("ls1", y)
    y = Mlp(self.mlp_dim, activation=self.activation, name="mlp", **mlp_init,
            **kw)(layer_norm(self.norm_eps, name="norm2", **kw)(x))
    return x + scaled("ls2", y)


class Encoder(Block):
  """``depth`` Blocks ``block_{i}``, each with this module's :class:`Block`
  fields; ``remat`` is one of ``layers.REMAT_CHOICES``.

  (B, N, d) -> list of depth + 1 arrays (B, N, d): the input, then the output
  of every block (HF ``hidden_states``; unused ones cost nothing under jit).
  """
  depth: int = 1
  remat: str = "none"

  @nn.compact
  def __call__(self, x):
    block = layers.maybe_remat(Block, self.remat)
    fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(Block)
              if f.name not in ("parent", "name")}
    states = [x]
    for i in range(self.depth):
      x = block(**fields, name=f"block_{i}")(x)
      states.append(x)
    return states


class Embed(nn.Module):
  """Images (B, H, W, C) -> tokens (B, 1 + (H/p)(W/p), dim): a p x p stride-p
  conv ``patch_embed`` (row-major patches), the class token ``cls_token``
  (dim,) in front, plus the position table ``pos_embed`` (1 + grid^2, dim).

  resize: ``fn(pos_embed, height, width) -> (1 + gh*gw, dim)`` for inputs
    whose patch grid is not ``grid`` x ``grid`` (the model's own rule,
    e.g. DINOv2's bicubic); None = such inputs raise ValueError.
  mask_token: adds a learned ``mask_token`` (dim,) that replaces the patches
    where ``mask`` (B, num_patches) bool is True (DINOv2 / iBOT masking).
  Output in ``dtype`` promoted with ``param_dtype``, as torch's ``cat`` of its
  float32 class token with bf16 patches and ``+`` of the float32 table: a
  bf16 model's residual stream starts float32 here, as under autocast (HF
  DINOv2 / CLIP, timm). Raises ``ValueError`` for another patch grid without
  ``resize``, a ``mask`` of another shape, or a ``mask`` without
  ``mask_token``.
  """
  dim: int
  patch_size: int
  grid: int
  patch_bias: bool = True
  mask_token: bool = False
  resize: Callable | None = None
  cls_init: Callable = layers.default_kernel_init
  pos_init: Callable = layers.default_kernel_init
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None):
    d, p = self.dim, self.patch_size
    b, h, w = x.shape[:3]
    x = layers.conv(d, p, strides=p, padding="VALID", use_bias=self.patch_bias,
                    dtype=self.dtype, param_dtype=self.param_dtype,
                    name="patch_embed")(x.astype(self.dtype))
    x = x.reshape(b, -1, d)
    if self.mask_token:
      token = self.param("mask_token", layers.named(layers.zeros, ("embed",)),
                         (d,), self.param_dtype)
      if mask is not None:
        if mask.shape != x.shape[:2]:
          raise ValueError(f"The patch mask must be (B, num_patches) = "
                           f"{x.shape[:2]}, got {mask.shape}.")
        x = jnp.where(mask[..., None], token.astype(x.dtype), x)
    elif mask is not None:
      raise ValueError("A patch mask needs Embed(mask_token=True).")
    cls = self.param("cls_token", layers.named(self.cls_init, ("embed",)),
                     (d,), self.param_dtype)
    pos = self.param("pos_embed", layers.named(self.pos_init, ("pos", "embed")),
                     (1 + self.grid ** 2, d), self.param_dtype)
    if self.resize is not None:
      pos = self.resize(pos, h, w)
    elif x.shape[1] != self.grid ** 2:
      raise ValueError(f"Inputs of {h}x{w} pixels give {h // p}x{w // p} "
                       f"patches; this ViT's position table is {self.grid}x"
                       f"{self.grid}: use {self.grid * p}x{self.grid * p} "
                       "images.")
    dt = jnp.promote_types(x.dtype, self.param_dtype)
    cls = jnp.broadcast_to(cls.astype(dt), (b, 1, d))
    return jnp.concatenate([cls, x.astype(dt)], axis=1) + pos.astype(dt)[None]

