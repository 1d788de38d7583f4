"""FQGAN factorized-quantization tokenizer (Bai et al. 2024), NHWC Flax Linen.

One shared LlamaGen CNN trunk (up to and including ``mid``) feeds k branches
(Dual: vis, sem; Triple: vis, sem_mid, sem_high). Each branch:
  FactorizedAdapter (pre-LN ViT, exact GELU, learned pos-embed, ln_pre/ln_post)
  -> GroupNorm -> swish -> conv3x3 (top -> z) -> quant_conv 1x1 (z -> code_dim)
  -> its own L2-normalised VectorQuantizer.
The k quantized maps are concatenated along channels in branch order ->
post_quant_conv 1x1 (k*code_dim -> z) -> LlamaGen decoder. ``FeatPredHead``s
read the quantized semantic features and predict a teacher's CLS feature
(representation loss, in the fq_tokenizer task). Facts: specs/fqgan.md.

Module names say what they are: the LlamaGen trunk and decoder as in
``llamagen_vq``, each adapter's / feature head's ViT blocks are the shared
``layers/vit.Block`` (``transformer/block_{i}/{norm1, attn/qkv, attn/out, norm2,
mlp/fc1, mlp/fc2}``). The official <-> Flax name mapping is
``genvis_jax.convert.fqgan.RENAMES``. Branch -> adapter name: vis ->
visual_head, sem -> semantic_head, sem_X -> semantic_head_X; feature head:
sem -> feat_pred_head, sem_X -> X_sem_feat_pred (see ``adapter_name`` /
``feat_head_name``).
"""

from __future__ import annotations

import itertools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from genvis_jax import models
from genvis_jax.errors import ConfigError
from genvis_jax.models import layers
from genvis_jax.models import llamagen_vq as lg
from genvis_jax.models.layers import Dtype
from genvis_jax.models.layers import images as images_lib
from genvis_jax.models.layers import vit
from genvis_jax.models.quantizers import l2_normalize

_LN_EPS = 1e-5  # torch nn.LayerNorm default


def adapter_name(branch: str) -> str:
  """Official encoder sub-module name of a branch's FactorizedAdapter list."""
  if branch == "vis":
    return "visual_head"
  if branch == "sem" or branch.startswith("sem_"):
    return "semantic_head" + branch[3:]
  return f"{branch}_head"


def feat_head_name(branch: str) -> str:
  """Official top-level name of the feature-prediction head of a branch."""
  if branch == "sem":
    return "feat_pred_head"
  if branch.startswith("sem_"):
    return f"{branch[4:]}_sem_feat_pred"
  return f"{branch}_feat_pred"


def disentangle_loss(quantized: Sequence[jax.Array]) -> jax.Array:
  """Paper eq. 7, unweighted: mean over patches of (l2n(q_i) . l2n(q_j))^2,
  averaged over all pairs i < j (Dual: one pair; Triple: three). 0 for k = 1.

  quantized: k arrays (..., D) (straight-through quantized features, so the
  gradient reaches the encoder and not the codebooks). Returns a float32
  scalar in [0, 1].
  """
  pairs = list(itertools.combinations(range(len(quantized)), 2))
  if not pairs:
    return jnp.zeros((), jnp.float32)
  unit = [l2_normalize(q.astype(jnp.float32)) for q in quantized]
  terms = [jnp.mean(jnp.square(jnp.sum(unit[i] * unit[j], axis=-1)))
           for i, j in pairs]
  return sum(terms) / len(terms)


def _pos_init(width: int):
  # official: width**-0.5 * randn
  return nn.initializers.normal(width ** -0.5)


def transformer(x, *, num_layers, num_heads, mlp_ratio=4.0, remat="none",
                dtype=jnp.float32, param_dtype=jnp.float32):
  """open_clip ``Transformer`` (B, N, W) -> (B, N, W): the shared ViT tower
  ``transformer`` (``vit.Encoder``: pre-norm blocks, torch LayerNorm eps 1e-5,
  exact GELU, fused qkv, PyTorch's default init as the official trains it);
  call inside a compact method."""
  return vit.Encoder(num_heads, int(x.shape[-1] * mlp_ratio), "gelu", _LN_EPS,
                     torch_init=True, depth=num_layers, remat=remat,
                     dtype=dtype, param_dtype=param_dtype,
                     name="transformer")(x)[-1]


class FactorizedAdapter(nn.Module):
  """(B, g, g, W) -> (B, g, g, W): + pos-embed, ln_pre, ViT, ln_post. The
  residual stream and output are float32 in a bf16 model
  (``layers.norm_dtype``), as autocast's are: ln_pre returns float32.
  Raises ``ConfigError`` unless the grid holds ``grid_size**2`` positions."""
  grid_size: int
  num_layers: int = 6
  num_heads: int = 8
  mlp_ratio: float = 4.0
  remat: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    if h * w != self.grid_size ** 2:
      raise ConfigError(
          f"Adapter positional table is {self.grid_size}^2, got a "
          f"{h}x{w} grid; model.image_size fixes the grid.")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    pos = self.param("positional_embedding",
                     layers.named(_pos_init(c), ("pos", "embed")),
                     (self.grid_size ** 2, c), self.param_dtype)
    x = layers.add_bias(x.reshape(b, h * w, c).astype(self.dtype), pos)
    x = vit.layer_norm(_LN_EPS, name="ln_pre", **kw)(x)
    x = transformer(x, num_layers=self.num_layers, num_heads=self.num_heads,
                    mlp_ratio=self.mlp_ratio, remat=self.remat, **kw)
    x = vit.layer_norm(_LN_EPS, name="ln_post", **kw)(x)
    return x.reshape(b, h, w, c)


class FeatPredHead(nn.Module):
  """Quantized features (B, h, w, D) -> (B, 1 + h*w, width); [:, 0] is the
  predicted CLS. upscale (Linear D->W, ReLU, Linear W->W), prepend CLS, +
  pos-embed, ln_pre, ViT, ln_post. Stream and output in
  ``layers.norm_dtype(dtype)`` (float32 in a bf16 model, as under autocast);
  ``ConfigError`` unless h * w = ``grid_size**2``."""
  grid_size: int
  width: int = 1024
  num_layers: int = 3
  num_heads: int = 8
  remat: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, d = x.shape
    if h * w != self.grid_size ** 2:
      raise ConfigError(
          f"Feature head positional table is {self.grid_size}^2 "
          f"+ 1, got a {h}x{w} grid.")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = x.reshape(b, h * w, d).astype(self.dtype)
    init = layers.inits("torch")   # nn.Linear's default (the official sets none)
    x = layers.dense(self.width, ("codebook_dim", "embed"), name="upscale_0",
                     **init, **kw)(x)
    x = layers.dense(self.width, ("mlp", "embed"), name="upscale_2",
                     **init, **kw)(nn.relu(x))
    cls = self.param("class_embedding",
                     layers.named(_pos_init(self.width), ("pos", "embed")),
                     (1, self.width), self.param_dtype)
    pos = self.param("positional_embedding",
                     layers.named(_pos_init(self.width), ("pos", "embed")),
                     (self.grid_size ** 2 + 1, self.width), self.param_dtype)
    cls = jnp.broadcast_to(cls.astype(x.dtype)[None], (b, 1, self.width))
    x = jnp.concatenate([cls, x], axis=1) + pos.astype(x.dtype)
    x = vit.layer_norm(_LN_EPS, name="ln_pre", **kw)(x)
    x = transformer(x, num_layers=self.num_layers, num_heads=self.num_heads,
                    remat=self.remat, **kw)
    return vit.layer_norm(_LN_EPS, name="ln_post", **kw)(x)


class FQEncoder(lg.CNNBase):
  """LlamaGen trunk, then per branch: ``{adapter}_0`` -> ``norm_out_{b}`` ->
  swish -> ``conv_out_{b}``. (B, H, W, 3) -> {branch: (B, h, w, z)}."""
  branches: Sequence[str] = ("vis", "sem")
  grid_size: int = 16
  z_channels: int = 256
  adapter_layers: int = 6
  adapter_heads: int = 8
  adapter_mlp_ratio: float = 4.0

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = self._trunk(x, train)
    out = {}
    for b in self.branches:
      y = FactorizedAdapter(self.grid_size, self.adapter_layers,
                            self.adapter_heads, self.adapter_mlp_ratio,
                            remat=self.remat, name=f"{adapter_name(b)}_0",
                            **self._kw)(h)
      y = nn.silu(layers.group_norm(name=f"norm_out_{b}", **self._kw)(y))
      out[b] = lg._conv3(self.z_channels, f"conv_out_{b}", self._kw)(y)
    return out


class FQGAN(lg.VQBase):
  """Factorized-quantization tokenizer with k = len(branches) sub-codebooks
  (the CNN and codebook settings are ``llamagen_vq.VQBase``'s).

  ``__call__(images, train=False, with_features=True) -> (reconstructions, aux)``:
    images: (B, image_size, image_size, 3) float in [-1, 1].
    reconstructions: (B, H, W, 3) float32, *not* clipped.
    aux: quantizer_loss (sum over sub-codebooks of codebook + beta * commitment
      + entropy_weight * entropy); codebook_loss / commitment_loss /
      entropy_loss (sums) and usage / perplexity (means over sub-codebooks);
      per sub-codebook ``{metric}/{branch}`` for quantizer_loss,
      codebook_loss, commitment_loss, entropy_loss, usage, perplexity;
      disentangle_loss (unweighted eq. 7, float32 scalar); codes: tuple of k
      (B, h, w) int32 in branch order; features: {branch: (B, width)}
      predicted CLS of every feature head (empty when ``with_features`` is
      False or there are no heads).
  ``encode(images)`` -> tuple of k (B, h, w) int32 code maps, branch order
    (the decoder's concatenation order).
  ``decode(codes)`` -> images (B, H, W, 3) float32 clipped to [-1, 1].

  Raises ``ConfigError`` for empty or repeated ``branches``, a feature head
  on another branch, an ``image_size`` the downsampling factor does not
  divide, or images of another size; ``ValueError`` for images that are not
  (B, H, W, 3), or ``decode`` codes that are not a tuple of k (B, h, w) maps.
  """
  branches: Sequence[str] = ("vis", "sem")
  image_size: int = 256
  adapter_layers: int = 6
  adapter_heads: int = 8
  adapter_mlp_ratio: float = 4.0
  feat_heads: Sequence[tuple[str, int]] = (("sem", 1024),)
  feat_layers: int = 3
  feat_num_heads: int = 8

  @property
  def grid_size(self) -> int:
    """Side of the code maps: ``image_size // factor``."""
    return self.image_size // self.factor

  def _check_config(self):
    names = tuple(self.branches)
    if not names or len(set(names)) != len(names):
      raise ConfigError(
          f"model.branches must be distinct names, got {names}.")
    for b, _ in self.feat_heads:
      if b not in names:
        raise ConfigError(
            f"Feature head on branch {b!r} but model.branches is "
            f"{names}; fix model.feat_heads.")
    if self.image_size % self.factor:
      raise ConfigError(
          f"The FQGAN image_size {self.image_size} (config.model, or "
          f"config.tokenizer.model for FAR) is not divisible by the "
          f"downsampling factor {self.factor}.")

  def setup(self):
    self._check_config()
    kw = self.cnn_kwargs()
    pk = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.encoder = FQEncoder(
        num_res_blocks=self.num_res_blocks, branches=tuple(self.branches),
        grid_size=self.grid_size, z_channels=self.z_channels,
        adapter_layers=self.adapter_layers, adapter_heads=self.adapter_heads,
        adapter_mlp_ratio=self.adapter_mlp_ratio, **kw)
    self.quant_convs = {b: lg.conv1x1(self.code_dim, f"quant_conv_{b}", pk)
                        for b in self.branches}
    self.quantizers = {b: self.codebook(f"quantize_{b}")
                       for b in self.branches}
    self.post_quant_conv = lg.conv1x1(self.z_channels, "post_quant_conv", pk)
    self.decoder = lg.Decoder(num_res_blocks=self.decoder_res_blocks,
                              out_channels=3, **kw)
    self.heads = {b: FeatPredHead(self.grid_size, int(w), self.feat_layers,
                                  self.feat_num_heads, remat=self.remat,
                                  name=feat_head_name(b), **pk)
                  for b, w in self.feat_heads}

  def encode_latents(self, images, train: bool = False):
    """images (B, image_size, image_size, 3) in [-1, 1] -> {branch: (B, h, w,
    code_dim)} pre-quantization latents in ``dtype``."""
    images_lib.check_images(images, self.image_size, self.factor)
    z = self.encoder(images, train)
    return {b: self.quant_convs[b](z[b]) for b in self.branches}

  def decode_latents(self, quantized: Sequence[jax.Array], train: bool = False):
    """k (B, h, w, code_dim) maps in branch order -> unclipped float32 images
    (B, H, W, 3)."""
    z = jnp.concatenate([q.astype(self.dtype) for q in quantized], axis=-1)
    return self.decoder(self.post_quant_conv(z), train).astype(jnp.float32)

  def encode(self, images):
    z = self.encode_latents(images)
    return tuple(self.quantizers[b].nearest(z[b]) for b in self.branches)

  def decode(self, codes):
    if not isinstance(codes, (tuple, list)) or len(codes) != len(self.branches):
      raise ValueError(f"decode needs a tuple of {len(self.branches)} code maps "
                       f"in order {tuple(self.branches)}, got "
                       f"{type(codes).__name__} of length "
                       f"{len(codes) if isinstance(codes, (tuple, list)) else '-'}.")
    for b, c in zip(self.branches, codes):
      images_lib.check_codes(c, f"codes[{b!r}]")
    quantized = [self.quantizers[b].lookup(c)
                 for b, c in zip(self.branches, codes)]
    return jnp.clip(self.decode_latents(quantized), -1.0, 1.0)

  def __call__(self, images, train: bool = False, with_features: bool = True):
    z = self.encode_latents(images, train)
    quantized, codes, aux = [], [], {}
    for b in self.branches:
      z_q, c, a = self.quantizers[b](z[b], train)
      quantized.append(z_q)
      codes.append(c)
      aux.update({f"{k}/{b}": v for k, v in a.items()})
    per = lambda k: [aux[f"{k}/{b}"] for b in self.branches]
    for k in ("quantizer_loss", "codebook_loss", "commitment_loss",
              "entropy_loss"):
      aux[k] = sum(per(k))
    for k in ("usage", "perplexity"):
      aux[k] = sum(per(k)) / len(self.branches)
    aux["disentangle_loss"] = disentangle_loss(quantized)
    q = dict(zip(self.branches, quantized))
    aux["features"] = ({b: head(q[b])[:, 0].astype(jnp.float32)
                        for b, head in self.heads.items()}
                       if with_features else {})
    aux["codes"] = tuple(codes)
    return self.decode_latents(quantized, train), aux


def _feat_heads(cfg) -> dict:
  """``feat_heads`` as (branch name, int width >= 1) pairs, one per branch."""
  if "feat_heads" not in cfg:
    return {}
  out = []
  for h in cfg.feat_heads:
    if (not isinstance(h, (tuple, list)) or len(h) != 2
        or not isinstance(h[1], int) or h[1] < 1):
      raise ConfigError(f"config.model.feat_heads entries are (branch, "
                        f"width >= 1) pairs, e.g. (('sem', 1024),); got {h!r}.")
    out.append((str(h[0]), int(h[1])))
  names = [b for b, _ in out]
  if len(set(names)) != len(names):
    raise ConfigError(f"config.model.feat_heads names a branch twice: {names}.")
  return {"feat_heads": tuple(out)}


CONFIG_UNSET = lg.CONFIG_UNSET   # decoder_res_blocks, as LlamaGen's
# Settings for which 0 is a size: no transformer layers in the adapters / the
# feature heads (models.config_fields).
ZERO_OK = ("adapter_layers", "feat_layers")


def build(cfg) -> FQGAN:
  """``config.model`` -> FQGAN; unset fields take the class defaults
  (FQGAN-Dual ds16). ``adapter_width``, when set, must equal the trunk's
  output channels. Raises ConfigError for an unknown key or a wrong
  adapter_width / feat_heads entry, channel widths GroupNorm cannot
  split, or head counts that do not divide their attention widths."""
  model = FQGAN(**models.config_fields(
      cfg, FQGAN, derived=("adapter_width",), **_feat_heads(cfg),
      **lg.decoder_res_blocks(cfg, FQGAN)))
  layers.check_groups("hidden_channels", model.hidden_channels,
                      "channel_mult", model.channel_mult)
  top = model.hidden_channels * tuple(model.channel_mult)[-1]
  width = cfg.get("adapter_width", top)
  if width != top:
    raise ConfigError(f"model.adapter_width ({width}) must equal the trunk's "
                      f"output channels hidden_channels * channel_mult[-1] = "
                      f"{top}: the adapters read the trunk features directly.")
  layers.check_heads("model.adapter_heads", model.adapter_heads, top,
                     "hidden_channels * channel_mult[-1]")
  for branch, feat_width in model.feat_heads:
    layers.check_heads("model.feat_num_heads", model.feat_num_heads,
                       feat_width, f"the width of feat_heads entry {branch!r}")
  return model


example_inputs = images_lib.square_inputs   # (B, image_size, image_size, 3) zeros

