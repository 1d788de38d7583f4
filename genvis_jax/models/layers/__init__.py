"""The building blocks every model composes, and the layer factories beneath them.

  attention.py  one multi-head attention (self / cross; full, causal or
                windowed via the kernel dispatcher; QK-norm, RoPE, KV caches)
  mlp.py        the transformer MLP (plain or gated) with named activations
  resnet.py     the conv ResNet block (padding / shortcut quirks as options),
                spatial attention block, upsampling
  resample.py   pixel-(un)shuffle residual resampling and the reflect-padded
                resolution levels of the Equivariant tokenizer's CNN
  vit.py        the pre-norm ViT block, tower and patch / class / position embedding

Every parameter carries logical axis names (``nn.with_logical_partitioning``); one
rules table in the config (``config.sharding.rules``) maps them to mesh axes, see
``genvis_jax/core/sharding.py``. Parameter names stay Flax defaults (``kernel``,
``bias``, ``scale``, ``embedding``) and modules are named for what they are; the
official PyTorch names are mapped by one table per family in
``genvis_jax/convert/``.

Logical axis vocabulary (parameters):
  embed     model width d               vocab         token / codebook entries
  mlp       MLP hidden width            heads         fused heads * head_dim
  conv_in   conv input channels         conv_out      conv output channels
  norm      norm scale / bias           pos           positional-table rows
  codebook_dim  code vector width
Activations: batch, length, act_embed (``nn.with_logical_constraint``),
act_heads (the heads of a Pallas attention call, ``kernels``).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from genvis_jax.errors import ConfigError

Dtype = Any   # the annotation of the modules' dtype / param_dtype fields

# The one N(0, 0.02) initializer of every model. PyTorch's
# ``trunc_normal_(std=.02)`` (RAR's init_weights, timm's ViTs) cuts at a=-2,
# b=2 in absolute units, 100 std: a plain N(0, 0.02). (flax's
# ``truncated_normal(0.02)`` cuts at 2 std.) LlamaGen / FAR's ``normal_(0,
# 0.02)``, the Equivariant generator's embeddings and taming's PatchGAN
# ``weights_init`` are the same plain normal.
default_kernel_init = nn.initializers.normal(0.02)
# torch's ``xavier_uniform_`` (the Linear layers of MAR / the Equivariant
# generator and its flow head).
xavier_uniform = nn.initializers.xavier_uniform()
conv_kernel_init = nn.initializers.lecun_normal()
zeros = nn.initializers.zeros
ones = nn.initializers.ones
# PyTorch's nn.Linear / nn.Conv*d default (``kaiming_uniform_(a=sqrt(5))``):
# kernel U(+-1/sqrt(fan_in)), variance 1/(3 fan_in), fan_in = in x kernel
# size as flax counts it; bias U(+-1/sqrt(fan_in)) of the same fan_in
# (``torch_bias_init``). The official LlamaGen / FQGAN VQ and Equivariant
# tokenizers set no init of their own, so they train from this.
torch_kernel_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def torch_bias_init(key, shape, dtype=jnp.float32, fan_in: int = 1):
  """PyTorch's default bias, U(+-1/sqrt(fan_in)); ``Dense`` / ``Conv`` pass
  their kernel's ``fan_in`` (``takes_fan_in``)."""
  bound = 1.0 / math.sqrt(fan_in)
  return jax.random.uniform(key, shape, dtype, -bound, bound)


torch_bias_init.takes_fan_in = True   # functools.wraps keeps it on `named`

# The Dense / Conv initialisers by family: "lecun" (flax's default: MaskGIT's
# JAX VQGAN) or "torch" (PyTorch's nn.Linear / nn.Conv default, above).
INITS = {"lecun": dict(kernel_init=conv_kernel_init, bias_init=zeros),
         "torch": dict(kernel_init=torch_kernel_init,
                       bias_init=torch_bias_init)}


def inits(family: str) -> dict:
  """``kernel_init`` / ``bias_init`` of a ``Dense`` / ``Conv`` of ``family``
  (a key of ``INITS``); ``ConfigError`` otherwise."""
  if family not in INITS:
    raise ConfigError(f"Unknown initialiser family {family!r}; choose one of "
                      f"{tuple(INITS)}.")
  return INITS[family]

CONV_NAMES = (None, None, "conv_in", "conv_out")


def named(init, names: Sequence[str | None]):
  """Wraps an initializer so its parameter carries logical axis ``names``."""
  return nn.with_logical_partitioning(init, tuple(names))


def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
  """``y + bias`` (``bias`` broadcast over the leading axes) computed in
  float32 and rounded once to ``y``'s dtype. Under bf16 the bias gradient
  sums every row of the batch: added in bf16, the backward pass summed
  those rows in bf16 (XLA:CPU: a decoder's output-bias gradient 2.6x-9x off
  at 65k rows, worse with more), where PyTorch's autocast accumulates it in
  fp32. Identical in fp32."""
  if y.dtype == jnp.float32 and bias.dtype == jnp.float32:
    return y + bias
  return (y.astype(jnp.float32) + bias.astype(jnp.float32)).astype(y.dtype)


def _biased(module, y, fan_in: int):
  """``y`` plus ``module``'s ``bias`` parameter (created here, after the
  kernel: the same tree and initial values as Flax's) by ``add_bias``; a
  ``bias_init`` that ``takes_fan_in`` gets the kernel's ``fan_in``."""
  if not module.with_bias:
    return y
  extra = (fan_in,) if getattr(module.bias_init, "takes_fan_in", False) else ()
  return add_bias(y, module.param("bias", module.bias_init,
                                  (module.features,), module.param_dtype,
                                  *extra))


class Dense(nn.Dense):
  """``nn.Dense`` whose bias is added by ``add_bias``: built with
  ``use_bias=False`` and ``with_bias``."""
  with_bias: bool = True

  @nn.compact
  def __call__(self, inputs):
    return _biased(self, super().__call__(inputs), inputs.shape[-1])


class Conv(nn.Conv):
  """``nn.Conv`` whose bias is added by ``add_bias``: built with
  ``use_bias=False`` and ``with_bias``. Image outputs (B, H, W, C) are
  sharded like the batch (``constrain_images``)."""
  with_bias: bool = True

  @nn.compact
  def __call__(self, inputs):
    fan_in = (math.prod(self.kernel_size) * inputs.shape[-1]
              // self.feature_group_count)
    y = _biased(self, super().__call__(inputs), fan_in)
    return constrain_images(y) if y.ndim == 4 else y


def dense(features: int, names=("embed", "mlp"), *, use_bias=True,
          kernel_init=default_kernel_init, bias_init=zeros, dtype=None,
          param_dtype=jnp.float32, name=None) -> Dense:
  """``Dense``: kernel (in, out) named ``names``, bias (out,) ``names[1]``
  (added in float32, ``add_bias``)."""
  return Dense(features, use_bias=False, with_bias=use_bias, dtype=dtype,
               param_dtype=param_dtype,
               kernel_init=named(kernel_init, names),
               bias_init=named(bias_init, (names[1],)), name=name)


def conv(features: int, kernel_size: int | Sequence[int] = 3, *, strides=1,
         padding: Any = "SAME", use_bias=True, kernel_init=conv_kernel_init,
         bias_init=zeros, dtype=None, param_dtype=jnp.float32,
         name=None) -> Conv:
  """NHWC ``Conv``; kernel (kh, kw, in, out); bias added in float32.

  ``padding="SAME"`` is TensorFlow SAME: the extra pixel of an odd total pad
  goes bottom/right (what MaskGIT's VQGAN was trained with). Initialisers:
  ``inits`` names the families (PyTorch's: ``**inits("torch")``).
  """
  ks = (kernel_size,) * 2 if isinstance(kernel_size, int) else tuple(kernel_size)
  st = (strides,) * 2 if isinstance(strides, int) else tuple(strides)
  return Conv(features, ks, strides=st, padding=padding, use_bias=False,
              with_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
              kernel_init=named(kernel_init, CONV_NAMES),
              bias_init=named(bias_init, ("conv_out",)), name=name)


# GroupNorm on a map that is spatially constant per channel: along spatially
# varying directions its input gradient is scale / sqrt(var_group + eps) times
# the incoming one, 1000x at eps 1e-6 where a group holds one channel. A
# uniform image through reflect-padded convs (Equivariant tokenizer) keeps
# every encoder map constant, so these factors compound (encoder gradients
# 1e17 / NaN on a black image at the runlocal width, 32 channels). In exact
# arithmetic that spatially varying, zero-mean field meets only constant
# activations and adds 0 to every weight gradient; float sums leave ~1e-7 of
# it (forward-mode derivatives stay O(1)). So for such an image the input
# gradient keeps only its spatial mean: exact for the weight gradients when
# the layers before are constant too (a uniform image); the forward is
# untouched. Opt-in (``uniform_guard``), for the reflect-padded Equivariant
# tokenizer only: zero-padded CNNs keep no map constant, and where an input
# gradient itself is used (a discriminator's, for the generator) a constant
# map need not come from constant layers.
_CONSTANT_RTOL = 4 * float(jnp.finfo(jnp.float32).eps)


def _spatially_constant(x):
  """(B, ..., C) -> (B,) bool: every channel of the image holds one value (to a
  few float32 ulps, in case a conv rounds border outputs differently)."""
  g = x.reshape(x.shape[0], -1, x.shape[-1]).astype(jnp.float32)
  hi, lo = jnp.max(g, axis=1), jnp.min(g, axis=1)
  tol = _CONSTANT_RTOL * jnp.maximum(jnp.abs(hi), jnp.abs(lo))
  return jnp.all(hi - lo <= tol, axis=-1)


@jax.custom_jvp
def constant_map_grads(x):
  """Identity on x (B, ..., C); on images whose channels are each spatially
  constant in x its derivative keeps only the spatial mean (see above)."""
  return x


@constant_map_grads.defjvp
def _constant_map_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  const = _spatially_constant(x).reshape((-1,) + (1,) * (x.ndim - 1))
  axes = tuple(range(1, x.ndim - 1))
  # Linear in t (reverse mode transposes it to the same projection); in
  # float32, so the transposed broadcast sums the map's pixels in float32.
  t32 = t.astype(jnp.float32)
  return x, jnp.where(const, jnp.mean(t32, axis=axes, keepdims=True),
                      t32).astype(t.dtype)


class GroupNorm(nn.GroupNorm):
  """``nn.GroupNorm`` (same parameters, same outputs) with
  ``constant_map_grads`` on its input."""

  def __call__(self, x, *, mask=None):
    return super().__call__(constant_map_grads(x), mask=mask)


def check_groups(base_key: str, base: int, mult_key: str, mults, *,
                 first: int = 0, num_groups: int = 32) -> None:
  """The channel widths ``base * mults[i]`` (``i >= first``) of a CNN whose
  norms are ``group_norm(num_groups)`` each split into the groups (Flax
  said only "Number of groups (32) does not divide the number of channels
  (48)", at init), and there is at least one level (an empty tuple failed
  with an ``IndexError``). Raises ``ConfigError`` naming
  ``config.model.<base_key>`` and ``<mult_key>``."""
  if not len(mults):
    raise ConfigError(
        f"config.model.{mult_key} is empty: it lists one channel multiplier "
        f"per resolution level and needs at least one, e.g. (1, 1, 2, 2, 4).")
  for i, m in enumerate(mults):
    if i >= first and (base * m) % num_groups:
      raise ConfigError(
          f"config.model.{base_key}={base} x {mult_key}[{i}]={m} = "
          f"{base * m} channels, which GroupNorm's {num_groups} groups do not "
          f"divide: use channel widths that are multiples of {num_groups}.")


def check_heads(heads_key: str, heads: int, width: int, width_of: str) -> None:
  """Attention of ``heads`` heads splits a ``width``-wide stream into equal
  heads (``vit.Block`` said only "ViT width 32 is not divisible by 3 heads",
  at init, without the setting). ``heads_key`` is the full key, e.g.
  ``config.model.adapter_heads``; ``width_of`` says where the width comes
  from. Raises ``ConfigError`` unless ``heads`` divides ``width``."""
  if heads >= 1 and width % heads:
    divisors = [h for h in range(1, min(width, 64) + 1) if width % h == 0]
    raise ConfigError(
        f"{heads_key}={heads} does not divide the attention width {width} "
        f"({width_of}): each head takes width / heads channels; use one of "
        f"{divisors[-6:]} or another divisor of {width}.")


def norm_dtype(dtype):
  """The output dtype of a norm in a model computing in ``dtype``: at least
  float32 (None: the promoted input and parameter dtype). torch autocast
  runs group_norm / layer_norm in float32 and returns float32, so what
  follows a norm in a bf16 model (swish, adaLN's modulate, a residual
  stream begun by ``ln_pre``) computes in float32 and the next matmul or
  conv, which casts to ``dtype``, rounds once (a bf16 norm rounded the
  ResnetBlock's conv inputs two more times: 45% of them differed)."""
  return None if dtype is None else jnp.promote_types(dtype, jnp.float32)


def group_norm(num_groups=32, epsilon=1e-6, *, dtype=None,
               param_dtype=jnp.float32, uniform_guard: bool = False,
               name=None) -> nn.GroupNorm:
  """``nn.GroupNorm`` (torch's defaults of the tokenizers' CNNs), returning
  ``norm_dtype(dtype)``; ``uniform_guard``: the ``GroupNorm`` above, same
  parameters and outputs."""
  cls = GroupNorm if uniform_guard else nn.GroupNorm
  return cls(num_groups=num_groups, epsilon=epsilon, dtype=norm_dtype(dtype),
             param_dtype=param_dtype, scale_init=named(ones, ("norm",)),
             bias_init=named(zeros, ("norm",)), name=name)


def layer_norm(epsilon=1e-6, *, use_scale=True, use_bias=True,
               use_fast_variance=True, dtype=None, param_dtype=jnp.float32,
               name=None) -> nn.LayerNorm:
  """``nn.LayerNorm`` returning ``norm_dtype(dtype)``;
  ``use_fast_variance=False`` computes E[(x - mu)^2] in two passes, as torch
  does (needed where activations have outlier channels, e.g. released ViTs'
  residual streams, see ``layers/vit.py``)."""
  return nn.LayerNorm(epsilon=epsilon, use_scale=use_scale, use_bias=use_bias,
                      use_fast_variance=use_fast_variance,
                      dtype=norm_dtype(dtype), param_dtype=param_dtype,
                      scale_init=named(ones, ("norm",)),
                      bias_init=named(zeros, ("norm",)), name=name)


def batch_norm_groups(x: jax.Array, groups: int, epsilon: float) -> jax.Array:
  """Train-mode batch normalisation, before the affine, of ``groups``
  batches in one: ``x`` (B, ..., C) is cut into ``groups`` runs of B //
  groups consecutive samples, each normalised per channel by the mean and
  biased variance over its samples and their other axes, as torch's
  ``BatchNorm{1,2}d`` in training mode normalises one GPU's (or one
  virtual) batch. Computes in float32 and returns it, ``x``'s shape. The
  caller checks that ``groups`` divides B (its own message)."""
  b, c = x.shape[0], x.shape[-1]
  y = x.astype(jnp.float32).reshape(groups, b // groups, -1, c)
  mean = jnp.mean(y, axis=(1, 2), keepdims=True)
  var = jnp.mean(jnp.square(y - mean), axis=(1, 2), keepdims=True)
  return ((y - mean) * jax.lax.rsqrt(var + epsilon)).reshape(x.shape)


def whole(table):
  """``table`` (rows, ...) unsplit on every device, for a lookup of its rows
  by a batch of ids (an embedding, a position table): each device gathers its
  own examples' rows, and the backward scatter-adds their cotangents into
  each device's copy, summed over the devices (one table's bytes). Left split
  (``embed`` -> ``fsdp``), GSPMD gathered the whole global batch's (B, L, d)
  cotangent onto every device for the scatter ("Involuntary full
  rematerialization"): bytes that grew with the global batch. Outside a mesh
  (no rules in context): ``table``."""
  return nn.with_logical_constraint(table, (None,) * table.ndim)


class Embed(nn.Embed):
  """``nn.Embed`` whose lookup reads the table ``whole``."""

  def __call__(self, inputs):
    if not jnp.issubdtype(inputs.dtype, jnp.integer):
      raise ValueError(f"Embed takes integer ids, got {inputs.dtype}.")
    (table,) = self.promote_dtype(whole(self.embedding), dtype=self.dtype,
                                  inexact=False)
    return jnp.take(table, inputs, axis=0)


def embed(num_embeddings: int, features: int, *, init=default_kernel_init,
          names=("vocab", "embed"), dtype=None, param_dtype=jnp.float32,
          name=None) -> Embed:
  """``Embed``: table ``embedding`` (num_embeddings, features) initialised
  with ``init`` and named ``names``; int ids (...) -> (..., features) in
  ``dtype`` (None: the table's ``param_dtype``)."""
  return Embed(num_embeddings, features, dtype=dtype, param_dtype=param_dtype,
               embedding_init=named(init, names), name=name)


class RMSNorm(nn.Module):
  """``x * rsqrt(mean(x^2) + eps) * scale``: normalised in fp32, cast back to
  x.dtype, then times the ``param_dtype`` scale (LlamaGen's
  ``_norm(x.float()).type_as(x) * weight``: bf16 x with an fp32 scale gives
  an fp32 output, as in torch). One parameter ``scale`` (d,) named ``norm``;
  x (..., d) -> (..., d)."""
  eps: float = 1e-5
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", named(ones, ("norm",)), (x.shape[-1],),
                       self.param_dtype)
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + self.eps)
    return y.astype(x.dtype) * scale


# ``config.model.remat``: "none" (no rematerialisation) or the name of a
# ``jax.checkpoint`` policy (None = save nothing, recompute the whole block).
REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
REMAT_CHOICES = ("none", *REMAT_POLICIES)


def check_remat(name) -> None:
  """Raises ``ConfigError`` naming ``config.model.remat`` unless ``name`` is
  one of ``REMAT_CHOICES`` (or None / "", which mean "none")."""
  if name not in (None, "") and name not in REMAT_CHOICES:
    raise ConfigError(f"config.model.remat={name!r} is not a remat policy; "
                      f"use one of {REMAT_CHOICES}.")


def maybe_remat(module_cls, policy: str = "none", static_argnums=()):
  """``nn.remat(module_cls)`` with the ``REMAT_POLICIES`` entry ``policy``;
  ``module_cls`` itself for "none" (or None / ""). Raises ``ConfigError``
  for another name."""
  if policy in (None, "none", ""):
    return module_cls
  check_remat(policy)
  return nn.remat(module_cls, policy=REMAT_POLICIES[policy],
                  static_argnums=static_argnums)


def drop_labels(rng, labels, prob: float, null_label: int):
  """Classifier-free guidance training: replaces each label by ``null_label``
  with probability ``prob`` in [0, 1] (int labels of any shape; same shape
  and dtype out)."""
  drop = jax.random.uniform(rng, labels.shape) < prob
  return jnp.where(drop, null_label, labels)


def modulate(x, shift, scale):
  """adaLN modulation ``x * (1 + scale) + shift`` (DiT's ``modulate``; RAR's
  blocks and the Equivariant flow head): x (..., d), shift / scale
  broadcastable to it -> x's broadcast shape, in the promoted dtype."""
  return x * (1 + scale) + shift


def constrain_images(x):
  """Shards feature maps (B, H, W, C) over the batch axes only. Without it
  GSPMD followed the conv kernels' ``conv_out`` -> ``fsdp`` split into the
  activations and gathered the whole global batch onto every device (a
  MaskGIT VQGAN step at data=2, fsdp=4 held 2x the temporaries of data=8)."""
  return nn.with_logical_constraint(x, ("batch", None, None, "act_embed"))


def constrain_tokens(x):
  """Shards a token sequence (B, N, d) like the batch, length and width
  axes of the rules table say (the transformers' residual stream)."""
  return nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
