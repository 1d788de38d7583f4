"""The convolutional tokenizers' building blocks: one ResNet block, one spatial
self-attention block, nearest x2 upsampling and the resolution level stacking
them, NHWC.

MaskGIT's VQGAN, LlamaGen's VQ (and FQGAN's trunk on it) and the Equivariant
tokenizer's CNN all use the taming / LDM block
  GN(32) -> swish -> conv3x3 -> GN(32) -> swish -> dropout -> conv3x3, + shortcut
and differ only in the options below: the 3x3 padding (MaskGIT: TF "SAME";
LlamaGen: torch ``padding=1``; Equivariant: torch ``padding_mode="reflect"``),
conv biases (MaskGIT has none) and where the 1x1 ``shortcut`` (official
``nin_shortcut``) reads when the channel count changes.

Module names say what they are (``norm1``, ``conv1``, ``shortcut``, ``q``,
``proj_out``, ``upsample/conv``); the official names map onto them in
``genvis_jax/convert/`` (each family's rename table).
"""

from __future__ import annotations

import functools

from typing import Any

import flax.linen as nn
import jax
from flax.core import FrozenDict
import jax.numpy as jnp

from genvis_jax.errors import ConfigError
from genvis_jax.models import layers
from genvis_jax.models.layers import Dtype
from genvis_jax.models.layers.attention import dot_product_attention

PADDINGS = ("same", "torch", "reflect")
SHORTCUT_FROM = ("input", "output")


def conv_padding(padding: str, kernel_size: int):
  """``nn.Conv`` padding for a stride-1 ``kernel_size`` conv of mode ``padding``
  ("reflect" pads the input itself, see :func:`conv2d`); ConfigError otherwise."""
  if padding not in PADDINGS:
    raise ConfigError(f"Unknown conv padding {padding!r}; choose one of "
                      f"{PADDINGS} (TF SAME, torch zero padding k//2, torch "
                      f"reflect).")
  pad = kernel_size // 2
  if padding == "same":
    return "SAME"
  return "VALID" if padding == "reflect" else ((pad, pad), (pad, pad))


def conv2d(x, features: int, name: str, *, kernel_size: int = 3,
           padding: str = "torch", use_bias: bool = True,
           conv_init: str = "lecun",
           dtype=jnp.float32, param_dtype=jnp.float32):
  """Stride-1 conv (B, H, W, C) -> (B, H, W, features); call inside a compact
  method (the conv becomes the caller's submodule ``name``).

  ``padding``: "same" (TF SAME; for odd kernels at stride 1 equal to torch's
  zero padding), "torch" (zero padding ``k // 2``) or "reflect" (torch
  ``padding_mode="reflect"``: the edge pixel is not repeated); another value
  raises ``ConfigError``. ``conv_init``: the initialiser family
  (``layers.inits``). Output in ``dtype``.
  """
  mode = conv_padding(padding, kernel_size)
  pad = kernel_size // 2
  if padding == "reflect" and pad:
    x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
  return layers.conv(features, kernel_size, padding=mode, use_bias=use_bias,
                     dtype=dtype, param_dtype=param_dtype, name=name,
                     **layers.inits(conv_init))(x)


def upsample_nearest_2x(x: jax.Array) -> jax.Array:
  """(B, H, W, C) -> (B, 2H, 2W, C), nearest neighbour (torch
  ``F.interpolate(scale_factor=2.0, mode="nearest")``)."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class ResnetBlock(nn.Module):
  """GN -> swish -> conv3x3 -> GN -> swish -> dropout -> conv3x3, + shortcut.

  ``__call__(x, train=False)``: x (B, H, W, C_in) -> (B, H, W, out_channels) in
  ``dtype``; ``train`` (a Python bool) enables dropout.

  Fields:
    padding: "same" | "torch" | "reflect" for the 3x3 convs (see ``conv2d``).
    use_bias: biases on conv1, conv2 and shortcut (MaskGIT: False).
    conv_init: the convs' initialisers, ``layers.inits`` (MaskGIT's JAX
      VQGAN: "lecun"; the PyTorch tokenizers: "torch").
    shortcut_from: when C_in != out_channels a 1x1 conv ``shortcut`` makes the
      residual. "input" (taming / LDM / LlamaGen / Equivariant): returns
      shortcut(x) + h. "output" (MaskGIT's VQGAN quirk, needed for parity with
      its checkpoint): the 1x1 conv reads the post-conv2 features, returning
      h + shortcut(h). Equal widths: x + h either way.

  Raises ``ConfigError`` for a ``padding`` or ``shortcut_from`` outside
  ``PADDINGS`` / ``SHORTCUT_FROM``.
  """
  out_channels: int
  dropout: float = 0.0
  padding: str = "torch"
  use_bias: bool = True
  shortcut_from: str = "input"
  uniform_guard: bool = False     # layers.group_norm's (reflect padding)
  conv_init: str = "lecun"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if self.shortcut_from not in SHORTCUT_FROM:
      raise ConfigError(f"ResnetBlock.shortcut_from is {self.shortcut_from!r}; "
                        f"choose one of {SHORTCUT_FROM}.")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    conv = lambda t, name, k=3: conv2d(
        t, self.out_channels, name, kernel_size=k, padding=self.padding,
        use_bias=self.use_bias, conv_init=self.conv_init, **kw)
    norm = functools.partial(layers.group_norm,
                             uniform_guard=self.uniform_guard, **kw)
    h = nn.silu(norm(name="norm1")(x))
    h = conv(h, "conv1")
    h = nn.silu(norm(name="norm2")(h))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = conv(h, "conv2")
    if x.shape[-1] == self.out_channels:
      return x + h
    if self.shortcut_from == "output":
      return h + conv(h, "shortcut", 1)
    return conv(x, "shortcut", 1) + h


class AttnBlock(nn.Module):
  """Single-head self-attention over all H*W positions, + residual.

  ``__call__(x, train=False)``: x (B, H, W, C) -> (B, H, W, C). GN(32) ``norm``,
  1x1-conv projections ``q`` / ``k`` / ``v``, softmax(q k^T / sqrt(C)) v with
  fp32 logits, 1x1-conv ``proj_out``. ``train`` is unused (no dropout); it keeps
  the signature of ``ResnetBlock`` so both remat alike. ``conv_init`` as
  ``ResnetBlock``'s.
  """
  uniform_guard: bool = False     # layers.group_norm's (reflect padding)
  conv_init: str = "lecun"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, h, w, c = x.shape
    y = layers.group_norm(uniform_guard=self.uniform_guard, name="norm",
                          **kw)(x)
    kw.update(layers.inits(self.conv_init))
    q, k, v = (layers.conv(c, 1, name=n, **kw)(y).reshape(b, h * w, 1, c)
               for n in ("q", "k", "v"))
    out = dot_product_attention(q, k, v, scale=c ** -0.5).reshape(b, h, w, c)
    return x + layers.conv(c, 1, name="proj_out", **kw)(out)


class Upsample(nn.Module):
  """Nearest x2 then a 3x3 ``conv`` keeping the width: (B, H, W, C) ->
  (B, 2H, 2W, C). ``padding`` and ``conv_init`` as in ``conv2d``."""
  padding: str = "torch"
  conv_init: str = "lecun"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return conv2d(upsample_nearest_2x(x), x.shape[-1], "conv",
                  padding=self.padding, conv_init=self.conv_init,
                  dtype=self.dtype, param_dtype=self.param_dtype)


def attn_options(block) -> dict:
  """The ``AttnBlock`` fields a level's ``ResnetBlock`` options ``block``
  decide too (its norms' guard, its convs' initialisers)."""
  return dict(uniform_guard=block.get("uniform_guard", False),
              conv_init=block.get("conv_init", "lecun"))


def remat_block(cls, remat: str):
  """``cls`` (a block called as ``block(x, train)``) under ``remat`` policy
  (``layers.maybe_remat``: ``ConfigError`` for an unknown one)."""
  # self=0, x=1, train=2: `train` is a Python bool and must stay static.
  return layers.maybe_remat(cls, remat, static_argnums=(2,))


def mid_stack(x: jax.Array, train: bool, *, block=FrozenDict(),
              names=("mid_0", "mid_1", "mid_2"), dropout: float = 0.0,
              remat: str = "none", dtype=jnp.float32,
              param_dtype=jnp.float32) -> jax.Array:
  """The lowest-resolution stack ResnetBlock -> AttnBlock -> ResnetBlock
  (taming / LDM ``mid``) keeping the width, named ``names`` (LlamaGen's
  ``mid_{0,1,2}``; the Equivariant ``block_1, attn_1, block_2``); ``block``:
  ``ResnetBlock`` options as in ``Level``. Call inside a compact method."""
  kw = dict(dtype=dtype, param_dtype=param_dtype)
  res = remat_block(ResnetBlock, remat)
  c = x.shape[-1]
  x = res(c, dropout, **block, name=names[0], **kw)(x, train)
  x = remat_block(AttnBlock, remat)(**attn_options(block), name=names[1],
                                    **kw)(x, train)
  return res(c, dropout, **block, name=names[2], **kw)(x, train)


class Level(nn.Module):
  """One resolution level of the tokenizers' CNNs: ``num_blocks`` x
  (``ResnetBlock`` ``{block_name}_{j}``, then ``AttnBlock`` ``attn_{j}`` when
  ``attn``), then the optional resampler.

  ``__call__(x, train=False)`` -> (output, features before the resampler):
  (B, H, W, C) -> (B, H', W', C') and (B, H, W, C'), C' = ``out_channels``
  (C when ``num_blocks`` is 0).

  Fields:
    block: ``ResnetBlock`` options (MaskGIT: ``padding="same",
      use_bias=False, shortcut_from="output"``; Equivariant:
      ``padding="reflect", uniform_guard=True, conv_init="torch"``;
      LlamaGen: ``conv_init="torch"``); ``attn_options`` takes the
      ``AttnBlock`` s' from them.
    block_name: the res blocks' name prefix ("block"; LlamaGen's is "res").
    resample: None, or (submodule name, module class or partial taking
      ``name``, ``dtype`` and ``param_dtype``): each family's own resampler
      (MaskGIT's average pool, LlamaGen's strided conv, the Equivariant pixel
      shuffles), e.g. ``("downsample", Downsample)``. Anything else raises
      ``ValueError`` when the module is constructed.
  """
  out_channels: int
  num_blocks: int
  attn: bool = False
  block: FrozenDict = FrozenDict()
  block_name: str = "block"
  resample: tuple[str, Any] | None = None
  dropout: float = 0.0
  remat: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    if self.resample is not None and not (
        len(self.resample) == 2 and isinstance(self.resample[0], str)
        and callable(self.resample[1])):
      raise ValueError(f"Level.resample is None or (name, module class); got "
                       f"{self.resample!r}.")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    res = remat_block(ResnetBlock, self.remat)
    attn = remat_block(AttnBlock, self.remat)
    for j in range(self.num_blocks):
      x = res(self.out_channels, self.dropout, **self.block,
              name=f"{self.block_name}_{j}", **kw)(x, train)
      if self.attn:
        x = attn(**attn_options(self.block), name=f"attn_{j}", **kw)(x, train)
    if self.resample is None:
      return x, x
    name, resampler = self.resample
    return resampler(name=name, **kw)(x), x
